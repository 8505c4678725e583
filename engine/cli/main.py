"""The ``event-datagram`` command.

Why this is long: the parser of every verb is one table read top to bottom, in `--help`
order; each verb's body is short.

``run`` starts the engine and its MI listeners; ``reload`` makes a running one
read its config again (SIGHUP); ``version`` (and ``--version``) prints this
package's version; ``bench`` is the stress run (engine/bench.py); the other
verbs are MI clients of a running engine (or of any OpenSIPS): ``subscribe``,
``unsubscribe``, ``events``, ``subscribers``, ``raise`` and ``listen``. Exit
status: 0 success, 1 failure (the MI's error text on stderr, e.g. "error 404:
Event not published"), 2 bad usage or config.
"""

from __future__ import annotations

import argparse
import importlib
import ipaddress
import logging
import os
import re
import signal
import sys
import urllib.parse
from collections.abc import Sequence
from typing import Any, Final

import msgspec

from engine import config as config_mod
from engine import version as version_mod
from engine.cli.explain import explain, socket_problem
from engine.cli.logs import LEVELS
from engine.errors import ListenError, MIClientError, MIReplyError, RunError
from engine.mi.client import DEFAULT_TARGET, call
from engine.mi.http_client import ClientAuth, read_password_file, url_password_problem
from engine.signals import SignalCatcher

log = logging.getLogger("event_datagram.cli")


def _client_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--mi",
        "--url",
        dest="mi",
        default=os.environ.get("EVENT_DATAGRAM_MI", DEFAULT_TARGET),
        metavar="TARGET",
        help="the MI to talk to: http://HOST:PORT/mi (default %(default)s, or "
        "$EVENT_DATAGRAM_MI), udp:HOST:PORT or fifo:PATH",
    )
    parent.add_argument("--json", action="store_true", help="print the MI result as JSON")
    parent.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")
    # An authenticated MI (docs/security-http.md). No --password: argv is readable by
    # every local user; the password comes from a file or the environment only.
    parent.add_argument("--ca-file", metavar="PATH", help="https: the CA to trust (PEM)")
    parent.add_argument("--cert-file", metavar="PATH", help="https: a client certificate (PEM)")
    parent.add_argument("--key-file", metavar="PATH", help="https: the client certificate's key")
    parent.add_argument(
        "--user",
        metavar="NAME",
        help="basic-auth user (or the URL's user@, or $EVENT_DATAGRAM_MI_USER)",
    )
    parent.add_argument(
        "--password-file",
        metavar="PATH",
        help="basic-auth password: the first line of PATH (or $EVENT_DATAGRAM_MI_PASSWORD)",
    )
    # Taken only to be refused (argparse would read "--password X" as the
    # abbreviation of --password-file, and a message would show X).
    parent.add_argument("--password", nargs="?", action=_NoPassword, help=argparse.SUPPRESS)
    return parent


class _NoPassword(argparse.Action):
    def __call__(self, parser: argparse.ArgumentParser, *_: Any, **__: Any) -> None:
        parser.error(
            "there is no --password (argv is readable by every local user): use "
            "--password-file PATH or $EVENT_DATAGRAM_MI_PASSWORD"
        )


USER_ENV: Final = "EVENT_DATAGRAM_MI_USER"
PASSWORD_ENV: Final = "EVENT_DATAGRAM_MI_PASSWORD"


def client_auth(args: argparse.Namespace) -> ClientAuth | None:
    """The TLS and basic-auth settings of the client verbs, from their flags and the
    environment; ValueError saying what is wrong (never showing a password)."""
    target: str = args.mi
    if problem := url_password_problem(target):
        raise ValueError(problem)
    http = target.startswith(("http://", "https://"))
    flags = {
        "--ca-file": args.ca_file,
        "--cert-file": args.cert_file,
        "--key-file": args.key_file,
        "--user": args.user,
        "--password-file": args.password_file,
    }
    given = [flag for flag, value in flags.items() if value is not None]
    if not http:
        if given:
            raise ValueError(f"{given[0]} is for an http:// or https:// MI, not {target}")
        return None  # the environment's credentials are for HTTP MIs only
    if target.startswith("http://") and (args.ca_file or args.cert_file or args.key_file):
        raise ValueError("--ca-file, --cert-file and --key-file are for an https:// MI")
    if args.key_file and not args.cert_file:
        raise ValueError("--key-file needs --cert-file")
    url_user = urllib.parse.unquote(urllib.parse.urlsplit(target).username or "")
    user = args.user or url_user or os.environ.get(USER_ENV, "")
    if args.password_file:
        try:
            password = read_password_file(args.password_file)
        except MIClientError as exc:
            raise ValueError(str(exc)) from None
    else:
        password = os.environ.get(PASSWORD_ENV, "")
    if password and not user:
        raise ValueError(
            f"a password needs a user: --user NAME, https://NAME@HOST/mi or ${USER_ENV}"
        )
    if user and not password:
        raise ValueError(f"user {user!r} needs a password: --password-file PATH or ${PASSWORD_ENV}")
    if ":" in user:
        raise ValueError(f"user {user!r}: a basic-auth user name has no ':'")
    return ClientAuth(
        ca_file=args.ca_file or "",
        cert_file=args.cert_file or "",
        key_file=args.key_file or "",
        user=user,
        password=password,
    )


# Each verb's --help: what it does in one line, then an example (argparse's epilog).
_HELP: dict[str, tuple[str, str]] = {
    "run": (
        "Start the engine and its MI listeners (loopback only by default).",
        "event-datagram run --config /etc/event-datagram.toml\n"
        "  event-datagram run --ingest udp:127.0.0.1:9050 --upstream udp:127.0.0.1:8080",
    ),
    "subscribe": (
        "Subscribe a UDP or UNIX datagram socket to an event (event_subscribe).",
        "event-datagram subscribe E_PIKE_BLOCKED udp:127.0.0.1:9999 --expire 600",
    ),
    "unsubscribe": (
        "Remove a subscription (event_subscribe with expire 0).",
        "event-datagram unsubscribe E_PIKE_BLOCKED udp:127.0.0.1:9999",
    ),
    "events": ("List the events the MI knows (events_list).", "event-datagram events"),
    "subscribers": (
        "List subscribers: of every event, of one event, or one socket (subscribers_list).",
        "event-datagram subscribers E_PIKE_BLOCKED",
    ),
    "raise": (
        "Raise an event with optional parameters (raise_event).",
        'event-datagram raise E_PIKE_BLOCKED \'{"ip":"192.168.2.11"}\'',
    ),
    "listen": (
        "Bind a socket, subscribe it to events and print each datagram as it arrives.",
        "event-datagram listen udp:127.0.0.1:0 E_PIKE_BLOCKED E_CORE_THRESHOLD",
    ),
    "reload": (
        "Send SIGHUP to the engine of this instance, found by its lock file"
        " (<runtime dir>/<instance>.lock): it reads its config again and logs what it applied.",
        "event-datagram reload --config /etc/event-datagram/config.toml",
    ),
    "version": (
        "Print the installed version and the Python and msgspec it runs on, without asking"
        " a running engine (its MI answers `version` in OpenSIPS's shape).",
        "event-datagram version",
    ),
    "bench": (
        "The stress run behind `make bench`: the engine against a naive baseline.",
        "event-datagram bench --subscribers 16 --json bench.json",
    ),
}


def _verb(verbs: Any, name: str, **kwargs: Any) -> argparse.ArgumentParser:
    """A verb's parser, with its one-line description and example."""
    description, example = _HELP[name]
    parser: argparse.ArgumentParser = verbs.add_parser(
        name,
        description=description,
        epilog=f"example:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        **kwargs,
    )
    return parser


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="event-datagram",
        description="OpenSIPS event_datagram as a fan-out engine: run it, or talk to its MI.",
        epilog="Each command has its own help, with an example: event-datagram COMMAND --help",
    )
    parser.add_argument(
        "--version", action="version", version=f"event-datagram {version_mod.version()}"
    )
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="COMMAND")
    client = _client_options()

    run = _verb(verbs, "run", help="start the engine and its MI listeners")
    run.add_argument("--config", metavar="PATH", help="TOML config (default: the built-in one)")
    run.add_argument("--http", metavar="HOST:PORT", help='HTTP MI + /metrics ("" = off)')
    run.add_argument("--mi-datagram", metavar="HOST:PORT", help='UDP MI ("" = off)')
    run.add_argument(
        "--web-config",
        metavar="PATH",
        help="TLS + basic auth of the HTTP MI (exporter-toolkit YAML; sets [mi] web_config)",
    )
    run.add_argument("--mi-fifo", metavar="PATH", help="create an MI FIFO at PATH")
    run.add_argument("--event", action="append", metavar="NAME", help="event (repeat; replaces)")
    run.add_argument("--workers", type=int, metavar="N", help="worker processes")
    run.add_argument("--state-file", metavar="PATH", help="where subscriptions are persisted")
    run.add_argument("--allow", action="append", metavar="DEST", help="allow-list item (repeat)")
    run.add_argument("--instance", metavar="NAME", help="instance name (shared memory)")
    run.add_argument(
        "--ingest",
        action="append",
        metavar="SOCKET",
        help="take notifications on udp:HOST:PORT or unix:/PATH (repeat; replaces)",
    )
    run.add_argument(
        "--upstream",
        action="append",
        metavar="MI",
        help="subscribe the first ingest socket to every event of the OpenSIPS MI at "
        "udp:HOST:PORT, http(s)://HOST:PORT/mi or fifo:PATH (repeat; adds to [[upstream]]; "
        "TLS and credentials: [[upstream]] keys)",
    )
    run.add_argument(
        "--amqp",
        action="append",
        metavar="URL",
        help='consume from a queue of this engine\'s own on the exchange "opensips" of the '
        "RabbitMQ at amqp://USER:PASS@HOST:PORT/VHOST, every routing key (repeat; adds to "
        "[[amqp]]; needs the amqp extra). A password here is rewritten out of the "
        "process title, but prefer --amqp-url-file",
    )
    run.add_argument(
        "--amqp-url-file",
        action="append",
        metavar="PATH",
        help="as --amqp, the URL read from the first line of PATH (keeps the password "
        "out of argv; repeat)",
    )
    run.add_argument(
        "--stream",
        action="append",
        metavar="URL",
        help='read the RabbitMQ stream "opensips" at rabbitmq-stream://USER:PASS@HOST:PORT/'
        "VHOST, resuming at this engine's stored offset (repeat; adds a [[stream]] of "
        "defaults; needs the stream extra). A password here is rewritten out of the "
        "process title, but prefer --stream-url-file",
    )
    run.add_argument(
        "--stream-url-file",
        action="append",
        metavar="PATH",
        help="as --stream, the URL read from the first line of PATH (keeps the password "
        "out of argv; repeat)",
    )

    run.add_argument(
        "--log-level", choices=LEVELS, help="lowest level logged (default: [log] level, info)"
    )
    run.add_argument(
        "--log-format", choices=("text", "json"), help="log lines (default: [log] format, text)"
    )

    reload = _verb(verbs, "reload", help="make the running engine read its config again (SIGHUP)")
    reload.add_argument("--config", metavar="PATH", help="the config the engine runs with")
    reload.add_argument("--instance", metavar="NAME", help="instance name (default: the config's)")
    _verb(verbs, "version", help="print this package's version")

    sub = _verb(verbs, "subscribe", parents=[client], help="subscribe a socket to an event")
    sub.add_argument("event")
    sub.add_argument("socket", help="udp:HOST:PORT, udp:[IPV6]:PORT, unix:/PATH or /PATH")
    sub.add_argument("expire", nargs="?", type=int, help="seconds (default 3600; 0 = remove)")
    sub.add_argument(
        "--expire", dest="expire_flag", type=int, metavar="N", help="the same as EXPIRE"
    )
    filter_help = "name=pattern on the event's params, shell wildcards (repeat: ANDed)"
    sub.add_argument("--filter", action="append", metavar="NAME=PATTERN", help=filter_help)
    unsub = _verb(verbs, "unsubscribe", parents=[client], help="remove a subscription")
    unsub.add_argument("event")
    unsub.add_argument("socket")
    unsub.add_argument("--filter", action="append", metavar="NAME=PATTERN", help=filter_help)
    _verb(verbs, "events", parents=[client], help="list the events")
    subs = _verb(verbs, "subscribers", parents=[client], help="list subscribers")
    subs.add_argument("event", nargs="?")
    subs.add_argument("socket", nargs="?")
    raise_ = _verb(verbs, "raise", parents=[client], help="raise an event")
    raise_.add_argument("event")
    raise_.add_argument("params", nargs="?", metavar="JSON-PARAMS", help="a JSON object or array")
    listen = _verb(verbs, "listen", parents=[client], help="receive events on a socket")
    listen.add_argument("socket", help="udp:IP:PORT (port 0 = any), unix:/PATH or /PATH")
    listen.add_argument("events", nargs="+", metavar="EVENT")
    listen.add_argument("--expire", type=int, default=60, help="seconds (default 60)")
    listen.add_argument("--filter", action="append", metavar="NAME=PATTERN", help=filter_help)

    if argv and argv[0] == "bench":
        bench = _verb(verbs, "bench", help="stress run (make bench)")
        importlib.import_module("engine.bench.main").add_arguments(bench)
    else:
        _verb(verbs, "bench", help="stress run (see: event-datagram bench --help)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser(args_list)
    except ImportError as exc:
        print(f"event-datagram bench is not available: {exc}", file=sys.stderr)
        return 2
    args, extra = parser.parse_known_args(args_list)
    if extra:  # an option of the verb's that does not exist: the verb's own usage
        _verb_parser(parser, args.verb).error(f"unrecognized arguments: {' '.join(extra)}")
    if args.verb == "run":
        return run(args)
    if args.verb == "bench":
        status: int = importlib.import_module("engine.bench.main").run(args)
        return status
    if args.verb == "listen":
        return _listen(args)
    if args.verb == "version":
        info = version_mod.build()
        print(
            f"event-datagram {info['version']} (python {info['python']}, msgspec {info['msgspec']})"
        )
        return 0
    if args.verb == "reload":
        return _reload(args)
    return _client(args)


def _verb_parser(parser: argparse.ArgumentParser, verb: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found: argparse.ArgumentParser = action.choices[verb]
            return found
    return parser


def _reload(args: argparse.Namespace) -> int:
    from engine.shm.segment import lock_holder

    try:
        cfg = config_mod.load(args.config)
    except config_mod.ConfigError as exc:
        print(f"event-datagram reload: {exc}", file=sys.stderr)
        return 2
    instance = args.instance or cfg.engine.instance
    runtime = cfg.engine.resolved_runtime_dir()
    try:
        pid = lock_holder(runtime, instance)
    except ValueError as exc:  # a bad instance name
        print(f"event-datagram reload: {exc}", file=sys.stderr)
        return 2
    if pid is None:
        print(
            f"event-datagram reload: no engine of instance {instance!r} runs "
            f"(no lock held in {runtime})",
            file=sys.stderr,
        )
        return 1
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError as exc:
        print(f"event-datagram reload: cannot signal pid {pid}: {exc.strerror}", file=sys.stderr)
        return 1
    print(f"sent SIGHUP to pid {pid} (instance {instance}); its log says what was applied")
    return 0


# -- client verbs ---------------------------------------------------------------------------


def _auth_or_usage(args: argparse.Namespace) -> tuple[bool, ClientAuth | None]:
    """(False, None) after printing why the client options are unusable."""
    try:
        auth = client_auth(args)
    except ValueError as exc:
        print(f"event-datagram {args.verb}: {exc}", file=sys.stderr)
        return False, None
    if auth is not None and auth.user and _plain_beyond_loopback(args.mi):
        print(
            f"event-datagram {args.verb}: warning: the password goes unencrypted to "
            f"{args.mi} (http:// beyond loopback): use https://",
            file=sys.stderr,
        )
    return True, auth


def _plain_beyond_loopback(target: str) -> bool:
    if not target.startswith("http://"):
        return False
    host = urllib.parse.urlsplit(target).hostname or ""
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True  # a name: it may resolve anywhere


def _client(args: argparse.Namespace) -> int:
    ok, auth = _auth_or_usage(args)
    if not ok:
        return 2
    method, params = _request(args)
    if method is None:
        return 2
    try:
        result = call(args.mi, method, params, timeout=args.timeout, auth=auth)
    except MIReplyError as exc:
        positional = list(params.values()) if isinstance(params, dict) else params
        why = explain(args.mi, method, positional, exc, args.timeout, auth)
        print(f"event-datagram {args.verb}: {why}", file=sys.stderr)
        return 1
    except MIClientError as exc:
        print(f"event-datagram {args.verb}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        sys.stdout.buffer.write(msgspec.json.encode(result) + b"\n")
    else:
        print(_human(args.verb, result))
    return 0


def _request(args: argparse.Namespace) -> tuple[str | None, list[Any] | dict[str, Any]]:
    verb = args.verb
    socket = getattr(args, "socket", None)
    if socket is not None and (problem := socket_problem(socket, ours_only=True)):
        print(f"event-datagram {verb}: {problem}", file=sys.stderr)  # never sent
        return None, []
    filters = getattr(args, "filter", None)
    if verb == "subscribe":
        if args.expire is not None and args.expire_flag is not None:
            print("event-datagram subscribe: give EXPIRE or --expire, not both", file=sys.stderr)
            return None, []
        expire = args.expire if args.expire_flag is None else args.expire_flag
        if filters:  # named params: `filter` is ours, OpenSIPS's clients never send it
            named = {"event": args.event, "socket": args.socket, "filter": filters}
            return "event_subscribe", named if expire is None else {**named, "expire": expire}
        extra = [] if expire is None else [expire]
        return "event_subscribe", [args.event, args.socket, *extra]
    if verb == "unsubscribe" and filters:
        named = {"event": args.event, "socket": args.socket, "filter": filters, "expire": 0}
        return "event_subscribe", named
    if verb == "unsubscribe":
        return "event_subscribe", [args.event, args.socket, 0]
    if verb == "events":
        return "events_list", []
    if verb == "subscribers":
        if args.socket is not None:
            return "subscribers_list", [args.event, args.socket]
        return "subscribers_list", [] if args.event is None else [args.event]
    if args.params is None:
        return "raise_event", [args.event]
    try:
        value = msgspec.json.decode(args.params)
    except msgspec.DecodeError as exc:
        print(f"event-datagram raise: JSON-PARAMS is not JSON: {exc}", file=sys.stderr)
        return None, []
    if isinstance(value, dict):  # OpenSIPS's form: the object as a JSON string
        return "raise_event", [args.event, args.params]
    if isinstance(value, list):
        return "raise_event", [args.event, value]
    print("event-datagram raise: JSON-PARAMS must be a JSON object or array", file=sys.stderr)
    return None, []


def _human(verb: str, result: Any) -> str:
    if isinstance(result, str):
        return result
    if verb == "events" and isinstance(result, dict):
        rows = result.get("Events", [])
        return "\n".join(f"{e.get('id'):>4}  {e.get('name')}" for e in rows) or "(no events)"
    if verb == "subscribers" and isinstance(result, dict):
        return _human_subscribers(result)
    return msgspec.json.format(msgspec.json.encode(result), indent=2).decode()


def _human_subscribers(result: dict[str, Any]) -> str:
    if "Events" in result:
        events = result["Events"]
        if not events:
            return "(no subscribers)"
        return "\n".join(_human_event(e) for e in events)
    event = result.get("Event") or {}
    if not event:
        return "(no subscribers)"
    if "Subscriber" in event:
        return f"{event['name']}  {_human_sub(event['Subscriber'])}"
    return _human_event(event)


def _human_event(event: dict[str, Any]) -> str:
    lines = [f"{event.get('name')} (id {event.get('id')})"]
    lines += [f"  {_human_sub(s)}" for s in event.get("Subscribers", [])]
    return "\n".join(lines)


def _human_sub(sub: dict[str, Any]) -> str:
    shown = f"  filter {sub['filter']}" if "filter" in sub else ""
    if sub.get("expire") == "never":
        return f"{sub.get('socket')}  expire never{shown}"
    return f"{sub.get('socket')}  expire {sub.get('expire')}  ttl {sub.get('ttl')}{shown}"


def _listen(args: argparse.Namespace) -> int:
    from engine.cli.listen import run_listener

    if args.expire < 1:
        print("event-datagram listen: --expire must be at least 1", file=sys.stderr)
        return 2
    ok, auth = _auth_or_usage(args)
    if not ok:
        return 2
    try:
        return run_listener(
            args.mi, args.socket, args.events, args.expire, args.json, args.timeout,
            filters=args.filter or None, auth=auth,
        )  # fmt: skip
    except ListenError as exc:
        print(f"event-datagram listen: {exc}", file=sys.stderr)
        return 1


# -- run ------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    from engine import metrics
    from engine.cli import logs
    from engine.cli.notify import Notifier
    from engine.cli.reload import ReloadStatus, reload
    from engine.cli.run import Runner

    logs.setup(args.log_level or "info", args.log_format or "text")
    _hide_passwords(sys.argv)

    def load() -> config_mod.Config:
        cfg = config_mod.load(args.config)
        _apply_flags(cfg, args)
        return cfg

    try:
        cfg = load()
    except config_mod.ConfigError as exc:
        logs.announce(f"event-datagram: {exc}", logging.ERROR)
        return 2
    logs.setup(cfg.log.level, cfg.log.format)
    notify = Notifier()
    # Stop signals reach every process of the group (a service manager, a terminal):
    # workers ignore them and the supervisor drains them. SIGHUP reloads.
    stop_signals = (signal.SIGINT, signal.SIGTERM)
    with SignalCatcher(stop_signals, reload=(signal.SIGHUP,)) as caught:
        runner = Runner(cfg, args.config or "the default config")
        try:
            runner.start()
        except config_mod.ConfigError as exc:
            logs.announce(f"event-datagram: {exc}", logging.ERROR)
            return 2
        except RunError as exc:
            logs.announce(f"event-datagram: {exc}", logging.ERROR)
            return 1
        status = ReloadStatus()
        metrics.watch_reloads(runner.engine, status)
        logs.announce(f"event-datagram ready: {runner.describe()}")
        notify.ready("ready")
        try:
            while True:
                notify.watchdog()
                caught.wait(min(0.25, notify.watchdog_s or 0.25))
                if caught.received is not None or runner.engine.failure:
                    break
                runner.revive_sources()
                if caught.take_reload():
                    notify.reloading()
                    ok = reload(runner, load, status)
                    notify.ready("ready" if ok else "ready; the last reload failed (see the log)")
        finally:  # whatever happened above, the workers drain and the memory is freed
            notify.stopping()
            failure = runner.engine.failure
            runner.stop()
        if failure:
            logs.announce(f"event-datagram: engine failed: {failure}", logging.ERROR)
            return 1
        return 0


_PASSWORD: Final = re.compile(r"((?:amqps?|rabbitmq-stream)://[^:/@\s]*:)[^@\s]*@")


def _hide_passwords(argv: list[str]) -> bool:
    """Rewrite the process title without the password of a URL in argv (run --amqp
    URL, run --stream URL), so /proc/PID/cmdline and ps no longer show it, and warn
    once pointing at the file and environment ways. True when there was one to hide."""
    redacted = [_PASSWORD.sub(r"\1***@", arg) for arg in argv]
    if redacted == argv:
        return False
    try:
        import setproctitle
    except ImportError:
        log.warning(
            "a broker password is on the command line, readable by every local user in "
            "ps (install setproctitle, in the amqp and stream extras, to hide it): use "
            "[[amqp]] or [[stream]] url_file or url_env, or run --amqp-url-file / "
            "--stream-url-file PATH"
        )
        return True
    setproctitle.setproctitle(" ".join([os.path.basename(sys.executable), *redacted]))
    log.warning(
        "a broker password was on the command line (now rewritten out of the process "
        "title, but briefly readable in ps): use [[amqp]] or [[stream]] url_file or "
        "url_env, or run --amqp-url-file / --stream-url-file PATH"
    )
    return True


def _apply_flags(cfg: config_mod.Config, args: argparse.Namespace) -> None:
    """Command-line flags override the config file."""
    if args.http is not None:
        cfg.mi.http = args.http
    if args.mi_datagram is not None:
        cfg.mi.datagram = args.mi_datagram
    if args.web_config is not None:
        cfg.mi.web_config = args.web_config
    if args.mi_fifo is not None:
        cfg.mi.fifo = args.mi_fifo
    if args.event:
        cfg.events = list(args.event)
    if args.state_file is not None:
        cfg.state.file = args.state_file
        cfg.state.enabled = True
    if args.allow:
        cfg.allow = list(args.allow)
    if args.ingest:
        cfg.ingest.listen = list(args.ingest)
    for mi in args.upstream or []:
        cfg.upstream.append(config_mod.UpstreamConfig(mi=mi, events=["*"]))
    for url in args.amqp or []:
        cfg.amqp.append(config_mod.AmqpConfig(url=url))
    for path in args.amqp_url_file or []:
        cfg.amqp.append(config_mod.AmqpConfig(url="", url_file=path))
    for url in args.stream or []:
        cfg.stream.append(config_mod.StreamConfig(url=url))
    for path in args.stream_url_file or []:
        cfg.stream.append(config_mod.StreamConfig(url="", url_file=path))
    if args.log_level is not None:
        cfg.log.level = args.log_level
    if args.log_format is not None:
        cfg.log.format = args.log_format
    engine: dict[str, Any] = msgspec.structs.asdict(cfg.engine)
    if args.workers is not None:
        engine["workers"] = args.workers
    if args.instance is not None:
        engine["instance"] = args.instance
    try:
        cfg.engine = msgspec.convert(engine, type(cfg.engine))
    except msgspec.ValidationError as exc:
        why, _, where = str(exc).partition(" - at `$.")
        flag = f" --{where.rstrip('`')}" if where.rstrip("`") in ("workers", "instance") else ""
        raise config_mod.ConfigError(f"bad option{flag}: {why}") from None
    try:
        cfg.validate()
    except config_mod.ConfigError as exc:
        raise config_mod.ConfigError(f"bad option: {exc}") from None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
