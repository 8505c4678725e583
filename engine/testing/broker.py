"""A private RabbitMQ broker on loopback, for the tests and `bench --source amqp`.

Why this is long: one class drives a whole Erlang node's life (ports, cookie,
plugins, user, start, readiness, kill by token, restart on the same data), and
its failure messages; split, each part would need the others' private state.

`LocalBroker` runs Debian's `rabbitmq-server` (the real one, not a fake) in a
temporary directory of its own: its own node name, AMQP port, distribution
port and epmd port (all on 127.0.0.1, all chosen free), its own Erlang cookie,
config, plugin list (rabbitmq_stream only: a stream listener on a free port
too) and data dir, so two of them, or a system broker on 5672, never meet.
As root it runs as user `rabbitmq` (the directory is handed to that user);
otherwise as the current user.

    with LocalBroker() as broker:          # started, ready for AMQP
        connect(broker.url)                # amqp://guest:guest@127.0.0.1:PORT/%2F
        broker.stream_url                  # rabbitmq-stream://guest:guest@127.0.0.1:SPORT/%2F
        broker.kill()                      # SIGKILL, nothing of it left
        broker.start()                     # same port, same data: durable queues survive
    # closed: stopped and its directory removed

Every process of a broker (the start script, beam.smp, erl_child_setup, epmd,
inet_gethost, the shells it runs) carries one environment variable with the
broker's own token, which is how `kill()` finds them all, even those that left
the process group (epmd daemonises, erl_child_setup calls setsid).

Starting takes a while on a slow machine (about 13-18 s here, on 2 busy cores,
a fresh data dir and a restart alike); `start()` waits for a real AMQP
handshake (guest/guest, vhost "/") and gives up after `start_timeout` seconds
with a `BrokerError` quoting the end of the broker's logs.

Imports nothing of the engine but its errors (no AMQP client library either:
the readiness check speaks the few AMQP 0-9-1 frames it needs itself).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import random
import secrets
import shutil
import signal
import socket
import stat
import struct
import subprocess
import tempfile
import time
import weakref
from pathlib import Path
from types import TracebackType

from engine.errors import EventDatagramError

# The real start script (Debian's /usr/sbin/rabbitmq-server is a wrapper that
# changes directory to /var/lib/rabbitmq and writes to /var/log/rabbitmq).
DEBIAN_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
SERVER_ENV = "EVENT_DATAGRAM_RABBITMQ_SERVER"  # overrides the search
TOKEN_ENV = "EVENT_DATAGRAM_BROKER_TOKEN"  # marks every process of one broker
# Distribution on loopback only (epmd is told so by ERL_EPMD_ADDRESS).
DEFAULT_ERL_ARGS = "-kernel inet_dist_use_interface {127,0,0,1}"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0
USER = "guest"
PASSWORD = "guest"  # RabbitMQ's default user, loopback only

_counter = 0
_live: weakref.WeakSet[LocalBroker] = weakref.WeakSet()


class BrokerError(EventDatagramError, RuntimeError):
    """A local broker could not be started or stopped; the message says why
    (and quotes the end of its logs)."""


def find_rabbitmq_server() -> str | None:
    """The rabbitmq-server start script to run, or None when RabbitMQ is not
    installed: $EVENT_DATAGRAM_RABBITMQ_SERVER, Debian's
    /usr/lib/rabbitmq/bin/rabbitmq-server, else `rabbitmq-server` on PATH (or
    in /usr/sbin), with Debian's wrapper resolved to the script it wraps."""
    override = os.environ.get(SERVER_ENV)
    if override:
        return override if os.access(override, os.X_OK) else None
    if os.access(DEBIAN_SERVER, os.X_OK):
        return DEBIAN_SERVER
    path = os.environ.get("PATH", os.defpath) + os.pathsep + "/usr/sbin:/usr/local/sbin"
    found = shutil.which("rabbitmq-server", path=path)
    if found is None:
        return None
    real = Path(found).resolve()
    if real.name == "rabbitmq-script-wrapper":
        wrapped = real.with_name("rabbitmq-server")
        return str(wrapped) if os.access(wrapped, os.X_OK) else None
    return str(real)


class LocalBroker:
    """One private rabbitmq-server on 127.0.0.1 (see the module docstring).

    Ports and directory are chosen when it is made; nothing runs until
    `start()` (or `with`). `port` and `url` stay the same across restarts, as
    does the data dir, until `close()`.
    """

    def __init__(
        self,
        *,
        port: int = 0,
        base_dir: str | os.PathLike[str] | None = None,
        start_timeout: float = START_TIMEOUT,
        stop_timeout: float = STOP_TIMEOUT,
        server: str | None = None,
        erl_args: str = DEFAULT_ERL_ARGS,
    ) -> None:
        global _counter
        found = server or find_rabbitmq_server()
        if found is None:
            raise BrokerError(
                "rabbitmq-server is not installed (Debian/Ubuntu, as root: "
                "apt-get install --no-install-recommends rabbitmq-server), or set "
                f"${SERVER_ENV} to its start script"
            )
        self.server = found
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.erl_args = erl_args
        _counter += 1
        self.nodename = f"edg-{os.getpid()}-{_counter}@localhost"
        self._token = secrets.token_hex(8)
        self._user = _run_as()
        self.directory = Path(
            tempfile.mkdtemp(prefix="edg-rabbitmq-", dir=_base_dir(base_dir, self._user))
        )
        self._closed = False
        self._process: subprocess.Popen[bytes] | None = None
        self.start_seconds: float | None = None  # how long the last start took
        self.dist_port = 0
        self.epmd_port = 0
        try:
            self.port = port or free_port()
            self.stream_port = free_port(avoid={self.port})  # the stream protocol's
            self._prepare()
        except BaseException:
            shutil.rmtree(self.directory, ignore_errors=True)
            raise
        _live.add(self)

    # -- what callers use ---------------------------------------------------

    @property
    def url(self) -> str:
        return f"amqp://{USER}:{PASSWORD}@127.0.0.1:{self.port}/%2F"

    @property
    def stream_url(self) -> str:
        """The stream protocol's listener (the rabbitmq_stream plugin)."""
        return f"rabbitmq-stream://{USER}:{PASSWORD}@127.0.0.1:{self.stream_port}/%2F"

    @property
    def log_file(self) -> Path:
        return self.directory / "log" / f"{self.nodename}.log"

    @property
    def console_log(self) -> Path:
        """The start script's stdout and stderr (early boot failures land here)."""
        return self.directory / "log" / "console.log"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> LocalBroker:
        """Start the broker (a no-op when it runs) on its port and data dir, and
        wait until it completes an AMQP handshake; BrokerError after
        `start_timeout` seconds or when it exits, with the end of its logs."""
        if self._closed:
            raise BrokerError(f"broker {self.nodename} is closed")
        if self.running:
            return self
        self.kill()  # whatever is left of an earlier run
        for port in (self.port, self.stream_port):
            if not _port_free(port):
                raise BrokerError(
                    f"cannot start broker {self.nodename}: 127.0.0.1:{port} is in use"
                )
        ours = {self.port, self.stream_port}
        self.dist_port = free_port(avoid=ours)
        self.epmd_port = free_port(avoid={*ours, self.dist_port})
        self._write_config()
        started = time.monotonic()
        with open(self.console_log, "ab") as console:
            console.write(f"--- start {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
            console.flush()
            self._process = subprocess.Popen(
                [self.server],
                cwd=self.directory,
                env=self._environment(),
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                user=None if self._user is None else self._user.pw_uid,
                group=None if self._user is None else self._user.pw_gid,
                extra_groups=None if self._user is None else [],
            )
        try:
            self._wait_ready(started)
        except BaseException:
            self.kill()
            raise
        self.start_seconds = time.monotonic() - started
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Stop gracefully (SIGTERM: RabbitMQ shuts down cleanly), killing it
        after `timeout` seconds (default `stop_timeout`); then kill what is
        left (epmd stays otherwise)."""
        process = self._process
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(self.stop_timeout if timeout is None else timeout)
        self.kill()

    def kill(self) -> None:
        """SIGKILL every process of this broker, and wait until none is left."""
        process = self._process
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10.0
        while True:
            pids = self.processes()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            if process is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(0.05 if pids else 5.0)
            if not pids:
                break
            if time.monotonic() > deadline:
                raise BrokerError(f"broker {self.nodename}: processes {pids} survive SIGKILL")
            time.sleep(0.05)
        self._process = None

    def close(self) -> None:
        """Kill the broker and remove its directory (its data with it)."""
        if self._closed:
            return
        try:
            self.kill()
        finally:
            self._closed = True
            shutil.rmtree(self.directory, ignore_errors=True)
            _live.discard(self)

    def processes(self) -> list[int]:
        """The pids of this broker's processes (zombies excluded)."""
        marker = f"{TOKEN_ENV}={self._token}".encode()
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/environ", "rb") as file:
                    environ = file.read()
            except OSError:
                continue  # gone, or not ours to read
            if marker in environ.split(b"\0"):
                found.append(int(entry))
        return found

    def logs(self, lines: int = 30) -> str:
        """The last lines of the broker's log and of its console output."""
        parts = []
        for path in (self.log_file, self.console_log):
            try:
                text = path.read_text(errors="replace").splitlines()[-lines:]
            except OSError:
                continue
            parts.append(f"--- {path} (last {len(text)} lines):\n" + "\n".join(text))
        return "\n".join(parts) or f"(no logs in {self.directory / 'log'})"

    def __enter__(self) -> LocalBroker:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "running" if self.running else "stopped"
        return f"<LocalBroker {self.nodename} {self.url} {state}>"

    # -- the rest -----------------------------------------------------------

    def _prepare(self) -> None:
        for name in ("mnesia", "log"):
            (self.directory / name).mkdir()
        # The stream plugin only (Debian's rabbitmq-server ships it): streams over
        # their own protocol, for [[stream]] sources and `bench --source stream`.
        (self.directory / "enabled_plugins").write_text("[rabbitmq_stream].\n")
        (self.directory / "rabbitmq-env.conf").write_text("")  # not /etc/rabbitmq's
        cookie = self.directory / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(16).upper())
        cookie.chmod(0o400)
        self.directory.chmod(0o700)
        if self._user is not None:
            for path in [self.directory, *self.directory.rglob("*")]:
                os.chown(path, self._user.pw_uid, self._user.pw_gid)

    def _write_config(self) -> None:
        config = self.directory / "rabbitmq.conf"
        config.write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.port}\n"
            "log.console = false\n"
            "log.file.level = info\n"
            "disk_free_limit.absolute = 1MB\n"
            "collect_statistics = none\n"
            f"stream.listeners.tcp.1 = 127.0.0.1:{self.stream_port}\n"
            # what the broker tells stream clients to connect to (else its host name)
            "stream.advertised_host = 127.0.0.1\n"
            f"stream.advertised_port = {self.stream_port}\n"
        )
        if self._user is not None:
            os.chown(config, self._user.pw_uid, self._user.pw_gid)

    def _environment(self) -> dict[str, str]:
        home = str(self.directory)
        path = os.environ.get("PATH", "") + ":/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"
        return {
            "PATH": path.lstrip(":"),
            "HOME": home,  # where Erlang finds the cookie
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            TOKEN_ENV: self._token,
            "RABBITMQ_NODENAME": self.nodename,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "ERL_EPMD_PORT": str(self.epmd_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_MNESIA_BASE": f"{home}/mnesia",
            "RABBITMQ_LOG_BASE": f"{home}/log",
            "RABBITMQ_CONFIG_FILE": f"{home}/rabbitmq.conf",
            "RABBITMQ_ADVANCED_CONFIG_FILE": f"{home}/advanced.config",
            "RABBITMQ_CONF_ENV_FILE": f"{home}/rabbitmq-env.conf",
            "RABBITMQ_ENABLED_PLUGINS_FILE": f"{home}/enabled_plugins",
            "RABBITMQ_PID_FILE": f"{home}/rabbitmq.pid",
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": self.erl_args,
        }

    def _wait_ready(self, started: float) -> None:
        deadline = started + self.start_timeout
        last = "no answer yet"
        while True:
            process = self._process
            assert process is not None
            code = process.poll()
            if code is not None:
                raise BrokerError(
                    f"broker {self.nodename} exited with status {code} while starting "
                    f"(port {self.port}):\n{self.logs()}"
                )
            try:
                budget = max(1.0, min(5.0, deadline - time.monotonic()))
                amqp_handshake(self.port, timeout=budget)
                # the stream listener comes up with its plugin, just before AMQP's
                socket.create_connection(("127.0.0.1", self.stream_port), timeout=budget).close()
                return
            except (OSError, BrokerError) as error:
                last = f"{type(error).__name__}: {error}"
            if time.monotonic() > deadline:
                raise BrokerError(
                    f"broker {self.nodename} did not accept AMQP on 127.0.0.1:{self.port} "
                    f"within {self.start_timeout:.0f} s (last: {last}):\n{self.logs()}"
                )
            time.sleep(0.1)


def amqp_handshake(port: int, *, host: str = "127.0.0.1", timeout: float = 5.0) -> None:
    """Open and close one AMQP 0-9-1 connection as guest on vhost "/".

    Raises OSError when nothing answers, BrokerError when the broker refuses."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        sock.sendall(b"AMQP\x00\x00\x09\x01")
        _expect(sock, 10, 10)  # connection.start
        sock.sendall(
            _method(
                10,
                11,  # connection.start-ok: no client properties, PLAIN, en_US
                struct.pack(">I", 0)
                + _shortstr(b"PLAIN")
                + _longstr(f"\0{USER}\0{PASSWORD}".encode())
                + _shortstr(b"en_US"),
            )
        )
        tune = _expect(sock, 10, 30)
        channel_max, frame_max, _heartbeat = struct.unpack(">HIH", tune[:8])
        sock.sendall(_method(10, 31, struct.pack(">HIH", channel_max, frame_max, 0)))
        sock.sendall(_method(10, 40, _shortstr(b"/") + _shortstr(b"") + b"\x00"))
        _expect(sock, 10, 41)  # connection.open-ok
        sock.sendall(_method(10, 50, struct.pack(">H", 200) + _shortstr(b"") + b"\0\0\0\0"))
        with contextlib.suppress(OSError, BrokerError):
            _expect(sock, 10, 51)  # connection.close-ok


def _shortstr(data: bytes) -> bytes:
    return bytes([len(data)]) + data


def _longstr(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def _method(class_id: int, method_id: int, arguments: bytes) -> bytes:
    payload = struct.pack(">HH", class_id, method_id) + arguments
    return struct.pack(">BHI", 1, 0, len(payload)) + payload + b"\xce"


def _receive(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise BrokerError("the broker closed the connection during the handshake")
        data += chunk
    return data


def _expect(sock: socket.socket, class_id: int, method_id: int) -> bytes:
    """Read one method frame on channel 0; its arguments if it is the one expected."""
    kind, _channel, size = struct.unpack(">BHI", _receive(sock, 7))
    payload = _receive(sock, size + 1)[:-1]
    if kind != 1 or len(payload) < 4:
        raise BrokerError(f"unexpected AMQP frame type {kind} during the handshake")
    got = struct.unpack(">HH", payload[:4])
    if got == (10, 50):  # connection.close: the broker refuses, and says why
        text = payload[7 : 7 + payload[6]].decode(errors="replace")
        code = struct.unpack(">H", payload[4:6])[0]
        raise BrokerError(f"the broker refused the connection: {code} {text}")
    if got != (class_id, method_id):
        raise BrokerError(f"expected AMQP method {class_id}.{method_id}, got {got[0]}.{got[1]}")
    return payload[4:]


def free_port(avoid: set[int] | frozenset[int] = frozenset()) -> int:
    """A free TCP port on 127.0.0.1, below the ephemeral range when there is room
    (so no outgoing connection takes it while a broker is down between a kill
    and a restart)."""
    low = 32768
    with contextlib.suppress(OSError, ValueError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    if low > 12000:
        for _ in range(200):
            port = random.randrange(10000, low)
            if port not in avoid and _port_free(port):
                return port
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in avoid:
            return port


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _run_as() -> pwd.struct_passwd | None:
    """User rabbitmq when we are root and it exists, else None (ourselves)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("rabbitmq")
    except KeyError:
        return None


def _base_dir(
    base_dir: str | os.PathLike[str] | None, user: pwd.struct_passwd | None
) -> str | None:
    """Where the broker's directory goes: one that user rabbitmq can reach."""
    chosen = Path(base_dir) if base_dir is not None else Path(tempfile.gettempdir())
    if user is None or _reachable(chosen):
        return str(chosen)
    if base_dir is None and _reachable(Path("/tmp")):
        return "/tmp"
    raise BrokerError(f"user rabbitmq cannot reach {chosen}: pick a base_dir it can traverse")


def _reachable(path: Path) -> bool:
    """Every directory down to `path` can be traversed by others."""
    path = path.resolve()
    for part in [path, *path.parents]:
        try:
            if not os.stat(part).st_mode & stat.S_IXOTH:
                return False
        except OSError:
            return False
    return True


@atexit.register
def _kill_leftovers() -> None:
    for broker in list(_live):
        with contextlib.suppress(Exception):
            broker.close()
