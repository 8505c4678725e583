"""The Grafana dashboard against a real Prometheus that scrapes a running engine:
`event-datagram run` (its own config) under a steady load of events raised over
its MI and of notifications (valid and not) sent to its ingest socket and
published to its `[[amqp]]` queue on a real RabbitMQ (tests.helpers.broker), with an
`[[upstream]]` that is a second engine's MI in this process (so the upstream series
exist, up 1; the engine's own MI would be a self-subscription, refused),
Prometheus scraping its `GET /metrics` every second on the metrics listener of its
own (`[metrics] listen`), through TLS and basic auth (a `scrape_config` with
`scheme: https`, `basic_auth` and `tls_config`, the production layout of
docs/security-http.md), then every panel query of the dashboard evaluated
through Prometheus's HTTP API.

Prometheus comes from the Debian package `prometheus` (`.ci/run` installs it).
Where it is missing the test FAILS with the command to install it; set
EVENT_DATAGRAM_SKIP_PROMETHEUS=1 to skip it knowingly (never honoured in CI).
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pika
import pytest

from engine.mi.server import HTTPServer
from engine.testing.broker import LocalBroker
from tests.helpers.dashboard import dashboard, panel_queries, rule_selectors
from tests.helpers.support import running_engine, udp_receiver, unix_receiver
from tests.helpers.tls import PASSWORD, USER, TLSFiles, web_config

WINDOW = "15s"  # stands in for Grafana's $__rate_interval
INSTALL = (
    "Prometheus is not installed, so the dashboard cannot be checked against it.\n"
    "Install it (Debian/Ubuntu, as root):\n"
    "    apt-get update && apt-get install -y --no-install-recommends prometheus\n"
    "or put a `prometheus` binary on PATH. To skip this test knowingly (not in CI):\n"
    "    EVENT_DATAGRAM_SKIP_PROMETHEUS=1 make test"
)


def prometheus_binary() -> str:
    found = shutil.which("prometheus") or (
        "/usr/bin/prometheus" if os.access("/usr/bin/prometheus", os.X_OK) else None
    )
    if found:
        return found
    in_ci = os.environ.get("CI", "").lower() in ("1", "true", "yes")
    if os.environ.get("EVENT_DATAGRAM_SKIP_PROMETHEUS") == "1" and not in_ci:
        pytest.skip("EVENT_DATAGRAM_SKIP_PROMETHEUS=1: the real-Prometheus check was skipped")
    pytest.fail("\n" + "!" * 72 + "\n" + INSTALL + "\n" + "!" * 72, pytrace=False)


def concrete(expr: str) -> str:
    """The query as Grafana would send it: the rate window and the `All` instance value."""
    text = expr.replace("$__rate_interval", WINDOW).replace("$instance", ".*")
    assert "$" not in text, f"unresolved Grafana variable in {expr!r}"
    return text


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def get_json(url: str, timeout: float = 30.0) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        data: dict[str, Any] = json.load(response)
    return data


def wait_until(check: Callable[[], bool], timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(
            OSError, ValueError, KeyError, IndexError, http.client.HTTPException
        ):
            if check():
                return
        time.sleep(0.25)
    tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{tail}")


def end_process(proc: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds; bounded, and never raises."""
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            print(f"warning: pid {proc.pid} ({proc.args!r}) survived SIGKILL for 30 s")


# -- what Prometheus scrapes: `event-datagram run` under load --------------------------------
class MI:
    """A keep-alive JSON-RPC client of the engine's `POST /mi`."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.conn: http.client.HTTPConnection | None = None

    def call(self, method: str, params: list[Any] | dict[str, Any]) -> Any:
        body = json.dumps({"jsonrpc": "2.0", "method": method, "params": params, "id": 1})
        for attempt in (1, 2):
            if self.conn is None:
                host, port = self.address.rsplit(":", 1)
                self.conn = http.client.HTTPConnection(host, int(port), timeout=5)
            try:
                self.conn.request("POST", "/mi", body, {"Content-Type": "application/json"})
                reply = json.loads(self.conn.getresponse().read())
                break
            except (OSError, http.client.HTTPException):
                self.close()
                if attempt == 2:
                    raise
        if "error" in reply:
            raise AssertionError(f"MI {method} {params}: {reply['error']}")
        return reply["result"]

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


@dataclasses.dataclass(frozen=True)
class Running:
    address: str
    """The HTTP host:port of `POST /mi` and `GET /metrics`."""
    ingest: tuple[str, int]
    """The ingest socket as bound (named by the ready line)."""
    broker_url: str
    """The RabbitMQ its [[amqp]] source consumes from (exchange AMQP_EXCHANGE)."""
    metrics_address: str
    """The host:port of its metrics listener (TLS + basic auth)."""
    tls: TLSFiles
    """The CA, certificates and keys made for it."""
    upstream: str
    """The MI of its [[upstream]]."""

    @property
    def ingest_text(self) -> str:
        return f"udp:{self.ingest[0]}:{self.ingest[1]}"


READY_INGEST = re.compile(rb"ready: .*\bingest udp:(127\.0\.0\.1):(\d+)")
AMQP_EXCHANGE = f"edg-prom-{os.getpid()}"
STREAM = f"edg-prom-stream-{os.getpid()}"  # the [[stream]]: bound with STREAM_KEY
STREAM_KEY = "stream.E_OTHER"


@contextlib.contextmanager
def engine_process(workdir: Path, broker: LocalBroker, upstream: str) -> Iterator[Running]:
    """`event-datagram run` with its own config: an ingest socket, `upstream` (an MI)
    as its upstream for E_IDLE, and a queue on the broker's AMQP_EXCHANGE; yields
    where it listens."""
    address = f"127.0.0.1:{free_port()}"
    metrics_address = f"127.0.0.1:{free_port()}"
    tls = TLSFiles.make(workdir)
    web = web_config(workdir / "web.yml", tls)
    config = workdir / "engine.toml"
    config.write_text(
        'events = ["E_LOAD", "E_OTHER", "E_IDLE"]\n'
        "[engine]\n"
        f'instance = "prom{os.getpid()}"\n'
        "workers = 2\n"
        "pin = false\n"
        f'runtime_dir = "{workdir / "run"}"\n'
        "[mi]\n"
        f'http = "{address}"\n'
        'datagram = ""\n'
        "[state]\n"
        "enabled = false\n"
        "[metrics]\n"
        "per_subscriber = true\n"
        f'listen = "{metrics_address}"\n'
        f'web_config = "{web}"\n'
        "[ingest]\n"
        'listen = ["udp:127.0.0.1:0"]\n'
        "[[upstream]]\n"
        f'mi = "{upstream}"\n'
        'events = ["E_IDLE"]\n'
        "expire = 60\n"
        "[[amqp]]\n"
        f'url = "{broker.url}"\n'
        f'exchange = "{AMQP_EXCHANGE}"\n'
        "declare = true\n"
        "max_age_ms = 60000\n"
        "[[stream]]\n"
        f'url = "{broker.stream_url}"\n'
        f'amqp_url = "{broker.url}"\n'
        f'stream = "{STREAM}"\n'
        f'exchange = "{AMQP_EXCHANGE}"\n'
        f'binding_keys = ["{STREAM_KEY}"]\n'
        "declare = true\n"
        "store_every_ms = 100\n"
    )
    log = workdir / "engine.log"
    script = Path(sys.executable).with_name("event-datagram")  # the console command
    program = [str(script)] if script.exists() else [sys.executable, "-m", "engine"]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*program, "run", "--config", str(config)], stdout=out, stderr=subprocess.STDOUT
        )
    mi = MI(address)

    def answers() -> bool:
        if proc.poll() is not None:
            raise AssertionError(
                f"`event-datagram run` exited with {proc.returncode}:\n"
                + log.read_text(errors="replace")[-3000:]
            )
        return bool(mi.call("events_list", []))

    try:
        wait_until(
            answers,
            timeout=30,
            what="`event-datagram run` to answer on /mi",
            log=log,
        )
        # The MI answers before every source has started: the ready line comes after.
        wait_until(
            lambda: READY_INGEST.search(log.read_bytes()) is not None,
            timeout=30,
            what="the ready line naming the ingest socket",
            log=log,
        )
        found = READY_INGEST.search(log.read_bytes())
        assert found, "the ready line names no ingest socket:\n" + log.read_text()[-3000:]
        ingest = (found.group(1).decode(), int(found.group(2)))
        yield Running(address, ingest, broker.url, metrics_address, tls, upstream)
    finally:
        mi.close()
        end_process(proc, grace=15)  # SIGTERM: the engine drains and exits


def notification(method: str, params: Any) -> bytes:
    """What OpenSIPS's event_datagram sends a subscriber."""
    return json.dumps({"jsonrpc": "2.0", "method": method, "params": params}).encode()


@contextlib.contextmanager
def load(engine: Running, seconds: float = 60.0) -> Iterator[None]:
    """Raise events over the MI and send notifications to the ingest socket (a few of
    them malformed or of an unknown event) in the background until the block ends (at
    most `seconds`)."""
    stop = threading.Event()
    raised = [0]

    def produce() -> None:
        mi = MI(engine.address)
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        broker = pika.BlockingConnection(pika.URLParameters(engine.broker_url))
        channel = broker.channel()
        channel.exchange_declare(AMQP_EXCHANGE, "topic", durable=True)
        old = pika.BasicProperties(timestamp=int(time.time()) - 3600)
        deadline = time.monotonic() + seconds
        try:
            while not stop.is_set() and time.monotonic() < deadline:
                seq = raised[0]
                mi.call(
                    "raise_event", ["E_LOAD", json.dumps({"seq": seq, "pad": "x" * (seq % 300)})]
                )
                mi.call("raise_event", ["E_OTHER", [str(seq)]])
                sender.sendto(notification("E_OTHER", {"ingested": seq}), engine.ingest)
                relayed = notification("E_OTHER", {"amqp": seq})
                channel.basic_publish(AMQP_EXCHANGE, "E_OTHER", relayed)
                streamed = notification("E_OTHER", {"stream": seq})
                channel.basic_publish(AMQP_EXCHANGE, STREAM_KEY, streamed)
                if seq % 10 == 0:
                    sender.sendto(b"{not json", engine.ingest)  # malformed
                    sender.sendto(notification("E_NOPE", [seq]), engine.ingest)  # unknown_event
                    channel.basic_publish(AMQP_EXCHANGE, "E_OTHER", b"{not json")
                    channel.basic_publish(AMQP_EXCHANGE, STREAM_KEY, b"{not json")
                    channel.basic_publish(
                        AMQP_EXCHANGE, "E_OTHER", notification("E_OTHER", {"stale": seq}), old
                    )
                raised[0] += 1
                time.sleep(0.001)  # a steady stream, not a CPU hog on a shared machine
        finally:
            mi.close()
            sender.close()
            broker.close()

    thread = threading.Thread(target=produce, name="load", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(10)
    assert raised[0] > 0, "the load generator raised nothing"


# -- a real Prometheus ---------------------------------------------------------------------------
@contextlib.contextmanager
def prometheus(binary: str, target: str, workdir: Path, ca: Path) -> Iterator[str]:
    """A Prometheus scraping `target` every second, over TLS (the server certificate
    checked against `ca`) with basic auth; yields its base URL."""
    password = workdir / "scrape.password"
    password.write_text(PASSWORD)
    config = workdir / "prometheus.yml"
    config.write_text(
        "global:\n"
        "  scrape_interval: 1s\n"
        "  scrape_timeout: 1s\n"
        "  evaluation_interval: 1s\n"
        "scrape_configs:\n"
        "  - job_name: event-datagram\n"
        "    scheme: https\n"
        "    basic_auth:\n"
        f"      username: {USER}\n"
        f"      password_file: {password}\n"
        "    tls_config:\n"
        f"      ca_file: {ca}\n"
        "    static_configs:\n"
        f"      - targets: ['{target}']\n"
    )
    log = workdir / "prometheus.log"
    port = free_port()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=info",  # shown when something times out
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            if proc.poll() is not None:
                tail = log.read_text(errors="replace")[-3000:]
                raise AssertionError(f"prometheus exited with {proc.returncode}:\n{tail}")
            return bool(urllib.request.urlopen(f"{url}/-/ready", timeout=5).status == 200)

        wait_until(ready, timeout=60, what="Prometheus to be ready", log=log)
        yield url
    finally:
        end_process(proc, grace=10)


def query(url: str, expr: str) -> dict[str, Any]:
    return get_json(f"{url}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))


# -- the tests -------------------------------------------------------------------------------------
def test_every_dashboard_query_returns_data_from_a_real_prometheus(
    tmp_path: Path, rabbitmq: LocalBroker
) -> None:
    binary = prometheus_binary()
    rx_udp, rx_unix = udp_receiver(), unix_receiver(tmp_path)
    try:
        with (
            running_engine(["E_IDLE"], pin=False, workers=1) as upstream,
            upstream_mi(upstream) as upstream_url,
            engine_process(tmp_path, rabbitmq, upstream_url) as engine,
        ):
            mi = MI(engine.address)
            mi.call("event_subscribe", ["E_LOAD", rx_udp.socket_text])
            mi.call("event_subscribe", ["E_OTHER", rx_udp.socket_text])
            mi.call("event_subscribe", ["E_OTHER", rx_unix.socket_text])
            # Routing (docs/routing.md): a FAILOVER group whose first member is gone
            # (every event fails over) and a filtered subscription.
            group = f"virtual:FAILOVER unix:{tmp_path}/gone.sock {rx_udp.socket_text}"
            mi.call("event_subscribe", ["E_LOAD", group])
            filtered = {"event": "E_LOAD", "socket": rx_unix.socket_text, "filter": "seq=*0"}
            mi.call("event_subscribe", filtered)
            with pytest.raises(AssertionError, match="this engine's own ingest socket"):
                mi.call("event_subscribe", ["E_OTHER", engine.ingest_text])  # a loop
            mi.close()
            refuse_some(engine)
            target, ca = engine.metrics_address, engine.tls.ca.path
            with load(engine), prometheus(binary, target, tmp_path, ca) as url:
                check_panels(url, tmp_path / "prometheus.log")
                check_security(url)
                check_sources(url, engine)
                check_guards(url)
                check_alert_series(url)
                check_routing(url, group, rx_udp.socket_text)
                # [metrics] per_subscriber = true reached the exposition.
                ttl = query(url, "event_datagram_subscriber_ttl_seconds")["data"]["result"]
                sockets = {r["metric"]["socket"] for r in ttl}
                by_filter = f"{rx_unix.socket_text} filter=seq=*0"
                assert sockets == {rx_udp.socket_text, rx_unix.socket_text, group, by_filter}
                sent = query(url, "event_datagram_subscriber_datagrams_sent_total")["data"][
                    "result"
                ]
                counts = {r["metric"]["socket"]: float(r["value"][1]) for r in sent}
                assert counts[by_filter] > 0 and counts[group] > 0, counts
        assert rx_udp.datagrams and rx_unix.datagrams
        assert any(b'"ingested"' in d for d in rx_udp.datagrams), "no ingested event relayed"
        assert any(b'"amqp"' in d for d in rx_unix.datagrams), "no broker message relayed"
        assert any(b'"stream"' in d for d in rx_unix.datagrams), "no stream message relayed"
        assert not any(b'"stale"' in d for d in rx_unix.datagrams), "a stale message relayed"
    finally:
        rx_udp.close()
        rx_unix.close()


def check_panels(url: str, log: Path) -> None:
    # Enough scrapes of a busy engine for a 15 s rate window (a rate needs two samples).
    samples = 'count_over_time(event_datagram_workers_alive{job="event-datagram"}[1m])'
    wait_until(
        lambda: float(query(url, samples)["data"]["result"][0]["value"][1]) >= 5,
        timeout=40,
        what="five scrapes of the engine",
        log=log,
    )
    # The upstream (a second engine's MI) subscribed: it may have missed the MI at start
    # (it retries every 2 s), and its rate panel needs two samples of it as up.
    up_for = 'min_over_time(event_datagram_upstream_up{job="event-datagram"}[3s])'
    wait_until(
        lambda: query(url, up_for)["data"]["result"][0]["value"][1] == "1",
        timeout=30,
        what="the upstream to be up for two scrapes",
        log=log,
    )
    up = query(url, 'up{job="event-datagram"}')["data"]["result"]
    assert [r["value"][1] for r in up] == ["1"]
    for variable in dashboard()["templating"]["list"]:  # label_values(metric, label)
        if variable["type"] == "datasource":  # $DS_PROMETHEUS: Grafana's, not a query
            continue
        found = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", variable["query"])
        assert found, f"unexpected variable query {variable['query']!r}"
        metric, label = found.groups()
        values = get_json(
            f"{url}/api/v1/label/{label}/values?" + urllib.parse.urlencode({"match[]": metric})
        )
        assert values["status"] == "success" and values["data"], f"${variable['name']}: no values"
    failures = []
    for title, expr in panel_queries():
        reply = query(url, concrete(expr))
        if reply.get("status") != "success" or not reply["data"]["result"]:
            failures.append(f"{title}: {concrete(expr)}\n    -> {json.dumps(reply)[:300]}")
    assert not failures, "dashboard queries without data:\n" + "\n".join(failures)
    # The load really was scraped: a positive send rate over UDP and over UNIX.
    by_transport = query(url, concrete(panel_expr("Send rate by transport")))["data"]["result"]
    rates = {r["metric"]["transport"]: float(r["value"][1]) for r in by_transport}
    assert rates["udp"] > 0 and rates["unix"] > 0, rates
    # The bounded-delay panels: a stale rate for every event (0: max_delay_ms is off)
    # and a sleep rate for each of the two workers.
    stale = query(url, concrete(panel_expr("Stale datagrams by event")))["data"]["result"]
    assert {r["metric"]["event"]: float(r["value"][1]) for r in stale} == {
        "E_LOAD": 0.0,
        "E_OTHER": 0.0,
        "E_IDLE": 0.0,
    }
    sleeps = query(url, concrete(panel_expr("Worker sleeps")))["data"]["result"]
    assert sorted(r["metric"]["worker"] for r in sleeps) == ["0", "1"], sleeps
    assert all(float(r["value"][1]) >= 0 for r in sleeps), sleeps


def check_alert_series(url: str) -> None:
    """Every series the alert rules read exists, with the labels they select on
    (grafana/alerts; the rules' logic is unit-tested in test_alerts.py)."""
    selectors = rule_selectors()
    assert len(selectors) >= 10, selectors
    missing = []
    for selector in sorted(selectors):
        if not query(url, selector)["data"]["result"]:
            missing.append(selector)
    assert not missing, f"alert rules read series the engine does not expose: {missing}"


def check_routing(url: str, group: str, second: str) -> None:
    """The routing panels show the group failing over to its second member, and the
    filtered subscription's events filtered out."""

    def by(title: str, *labels: str) -> dict[tuple[str, ...], float]:
        rows = query(url, concrete(panel_expr(title)))["data"]["result"]
        return {tuple(r["metric"][k] for k in labels): float(r["value"][1]) for r in rows}

    filtered = by("Filtered datagrams by event", "event")
    assert filtered[("E_LOAD",)] > 0 and filtered[("E_OTHER",)] == 0, filtered
    members = by("Group datagrams by member", "group", "member")
    assert members[(group, second)] > 0, members
    assert members[(group, group.split()[1])] == 0, members
    # Its first member failed once, then is skipped for failover_timeout_s (30 s): the
    # counter moved (by its first batch), its rate may be back at 0.
    assert by("Group failovers", "group")[(group,)] >= 0
    total = query(url, 'event_datagram_group_failovers_total{job="event-datagram"}')
    assert [float(r["value"][1]) > 0 for r in total["data"]["result"]] == [True], total
    assert by("Group members down", "group") == {(group,): 1.0}


def check_sources(url: str, engine: Running) -> None:
    """The ingest and upstream panels show this engine's socket and MI, with the load."""

    def result(title: str) -> list[dict[str, Any]]:
        reply: list[dict[str, Any]] = query(url, concrete(panel_expr(title)))["data"]["result"]
        return reply

    def by(title: str, *labels: str) -> dict[tuple[str, ...], float]:
        rows = result(title)
        return {tuple(r["metric"][k] for k in labels): float(r["value"][1]) for r in rows}

    sock = engine.ingest_text
    received = by("Ingest datagrams / s by socket", "socket")
    raised = by("Ingest events raised / s by socket", "socket")
    assert set(received) == set(raised) == {(sock,)}, (received, raised)
    assert received[(sock,)] > raised[(sock,)] > 0, (received, raised)
    rejected = by("Ingest rejections by reason", "socket", "reason")
    assert rejected.get((sock, "malformed"), 0) > 0, rejected
    assert rejected.get((sock, "unknown_event"), 0) > 0, rejected
    assert by("Ingest kernel drops by socket", "socket") == {(sock,): 0.0}
    mi = engine.upstream
    assert by("Upstream up", "mi") == {(mi,): 1.0}
    assert by("Upstream subscribed events", "mi") == {(mi,): 1.0}
    errors = by("Upstream errors by reason", "mi", "reason")
    assert {reason for _mi, reason in errors} >= {"unreachable", "mi_error", "bad_reply"}, errors
    host = engine.broker_url.split("@", 1)[1].split("/", 1)[0]
    source = f"amqp://{host}/%2F {AMQP_EXCHANGE}"
    assert by("Broker up", "source") == {(source,): 1.0}
    messages = by("Broker messages / s", "source")
    raised = by("Broker events raised / s", "source")
    assert messages[(source,)] > raised[(source,)] > 0, (messages, raised)
    rejected = by("Broker rejections by reason", "source", "reason")
    assert rejected[(source, "malformed")] > 0 and rejected[(source, "stale")] > 0, rejected
    assert rejected[(source, "unknown_event")] == 0.0, rejected
    assert by("Broker queue messages", "source")[(source,)] >= 0
    errors = by("Broker reconnects and errors", "source", "reason")
    assert {reason for _s, reason in errors} == {
        "connect_failed",
        "connection_lost",
        "exchange_missing",
        "queue_refused",
        "access_refused",
        "internal",
        "thread_restarted",
    }, errors
    check_stream(by)


def check_stream(by: Callable[..., dict[tuple[str, ...], float]]) -> None:
    """The stream panels show the [[stream]] source reading STREAM under load."""
    (source,) = by("Stream up", "source")
    assert source[0].endswith(f"/%2F {STREAM}") and "guest" not in source[0], source
    assert by("Stream up", "source") == {source: 1.0}
    messages = by("Stream messages / s", "source")
    raised = by("Stream events raised / s", "source")
    assert messages[source] > raised[source] > 0, (messages, raised)
    rejected = by("Stream rejections by reason", "source", "reason")
    assert rejected[(*source, "malformed")] > 0, rejected
    assert rejected[(*source, "not_amqp10")] == 0.0, rejected
    assert by("Stream stored offset", "source")[source] > 0
    assert by("Stream lag (offsets)", "source")[source] >= 0
    assert by("Stream offsets missed / s", "source") == {source: 0.0}
    errors = by("Stream reconnects and errors", "source", "reason")
    assert {reason for _s, reason in errors} == {
        "connect_failed",
        "connection_lost",
        "declare_failed",
        "stream_missing",
        "stream_deleted",
        "subscribe_failed",
    }, errors


def refuse_some(engine: Running) -> None:
    """A scrape without credentials (401 on the metrics listener) and a browser's
    cross-origin text/plain POST to the MI (415), for the security panels."""
    host, port = engine.metrics_address.rsplit(":", 1)
    context = ssl.create_default_context(cafile=str(engine.tls.ca.path))
    conn = http.client.HTTPSConnection(host, int(port), timeout=10, context=context)
    try:
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        assert response.status == 401 and response.getheader("WWW-Authenticate")
        response.read()
    finally:
        conn.close()
    host, port = engine.address.rsplit(":", 1)
    plain = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        plain.request("POST", "/mi", b"{}", {"Content-Type": "text/plain", "Origin": "null"})
        assert plain.getresponse().status == 403  # the Origin is checked first
    finally:
        plain.close()


def check_security(url: str) -> None:
    """The refusals above, and none of Prometheus's own authenticated scrapes."""

    def value(expr: str) -> float:
        return float(query(url, expr)["data"]["result"][0]["value"][1])

    auth = 'event_datagram_http_auth_failures_total{listener="metrics",reason="missing"}'
    assert value(auth) == 1.0
    assert value('sum(event_datagram_http_auth_failures_total{reason="bad_credentials"})') == 0
    assert value('event_datagram_http_requests_refused_total{listener="mi",reason="origin"}') == 1
    rows = query(url, concrete(panel_expr("HTTP authentication failures by reason")))
    assert {(r["metric"]["listener"], r["metric"]["reason"]) for r in rows["data"]["result"]} >= {
        ("metrics", "missing"),
        ("mi", "bad_credentials"),
    }


@contextlib.contextmanager
def upstream_mi(engine: Any) -> Iterator[str]:
    """An HTTP MI for `engine` (the upstream the engine under test subscribes at)."""
    server = HTTPServer(engine, ("127.0.0.1", 0))
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


def check_guards(url: str) -> None:
    """The control plane's refusals: every reason and origin is a series (0 or more),
    and the one self-subscription the test tried is counted."""
    refused = query(url, "event_datagram_self_subscriptions_refused_total")["data"]["result"]
    counts = {r["metric"]["origin"]: float(r["value"][1]) for r in refused}
    assert counts == {"subscribe": 1.0, "state": 0.0, "listener": 0.0}, counts
    dropped = query(url, concrete(panel_expr("UDP MI datagrams dropped by reason")))
    reasons = {r["metric"].get("reason") for r in dropped["data"]["result"]}
    assert reasons == {"source_not_allowed", "empty", "response", "rate_limited"}, reasons


def panel_expr(title: str) -> str:
    return next(expr for t, expr in panel_queries() if t == title)
