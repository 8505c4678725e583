"""The ``event-datagram`` command.

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
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

import msgspec

from engine import config as config_mod
from engine import version as version_mod
from engine.cli.logs import LEVELS
from engine.errors import ListenError, MIClientError, MIReplyError, RunError
from engine.mi.client import DEFAULT_TARGET, call
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
    return parent


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="event-datagram",
        description="OpenSIPS event_datagram as a fan-out engine: run it, or talk to its MI.",
    )
    parser.add_argument(
        "--version", action="version", version=f"event-datagram {version_mod.version()}"
    )
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="COMMAND")
    client = _client_options()

    run = verbs.add_parser("run", help="start the engine and its MI listeners")
    run.add_argument("--config", metavar="PATH", help="TOML config (default: the built-in one)")
    run.add_argument("--http", metavar="HOST:PORT", help='HTTP MI + /metrics ("" = off)')
    run.add_argument("--mi-datagram", metavar="HOST:PORT", help='UDP MI ("" = off)')
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
        "udp:HOST:PORT, http://HOST:PORT/mi or fifo:PATH (repeat; adds to [[upstream]])",
    )
    run.add_argument(
        "--amqp",
        action="append",
        metavar="URL",
        help='consume from a queue of this engine\'s own on the exchange "opensips" of the '
        "RabbitMQ at amqp://USER:PASS@HOST:PORT/VHOST, every routing key (repeat; adds to "
        "[[amqp]]; needs the amqp extra)",
    )

    run.add_argument(
        "--log-level", choices=LEVELS, help="lowest level logged (default: [log] level, info)"
    )
    run.add_argument(
        "--log-format", choices=("text", "json"), help="log lines (default: [log] format, text)"
    )

    reload = verbs.add_parser(
        "reload",
        help="make the running engine read its config again (SIGHUP)",
        description="Send SIGHUP to the engine of this instance, found by its lock file "
        "(<runtime dir>/<instance>.lock); it reloads its config and logs what it applied. "
        "Example: event-datagram reload --config /etc/event-datagram/config.toml",
    )
    reload.add_argument("--config", metavar="PATH", help="the config the engine runs with")
    reload.add_argument("--instance", metavar="NAME", help="instance name (default: the config's)")
    verbs.add_parser(
        "version",
        help="print this package's version",
        description="Print the installed version and the Python and msgspec it runs on, "
        "without asking a running engine (its MI answers `version` in OpenSIPS's shape). "
        "Example: event-datagram version",
    )

    sub = verbs.add_parser("subscribe", parents=[client], help="subscribe a socket to an event")
    sub.add_argument("event")
    sub.add_argument("socket")
    sub.add_argument("expire", nargs="?", type=int, help="seconds (default 3600; 0 = remove)")
    unsub = verbs.add_parser("unsubscribe", parents=[client], help="remove a subscription")
    unsub.add_argument("event")
    unsub.add_argument("socket")
    verbs.add_parser("events", parents=[client], help="list the events")
    subs = verbs.add_parser("subscribers", parents=[client], help="list subscribers")
    subs.add_argument("event", nargs="?")
    subs.add_argument("socket", nargs="?")
    raise_ = verbs.add_parser("raise", parents=[client], help="raise an event")
    raise_.add_argument("event")
    raise_.add_argument("params", nargs="?", metavar="JSON-PARAMS", help="a JSON object or array")
    listen = verbs.add_parser("listen", parents=[client], help="receive events on a socket")
    listen.add_argument("socket", help="udp:IP:PORT (port 0 = any), unix:/PATH or /PATH")
    listen.add_argument("events", nargs="+", metavar="EVENT")
    listen.add_argument("--expire", type=int, default=60, help="seconds (default 60)")

    if argv and argv[0] == "bench":
        bench = verbs.add_parser("bench", help="stress run (make bench)")
        importlib.import_module("engine.bench.main").add_arguments(bench)
    else:
        verbs.add_parser("bench", help="stress run (see: event-datagram bench --help)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser(args_list)
    except ImportError as exc:
        print(f"event-datagram bench is not available: {exc}", file=sys.stderr)
        return 2
    args = parser.parse_args(args_list)
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


def _client(args: argparse.Namespace) -> int:
    method, params = _request(args)
    if method is None:
        return 2
    try:
        result = call(args.mi, method, params, timeout=args.timeout)
    except (MIReplyError, MIClientError) as exc:
        print(f"event-datagram {args.verb}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        sys.stdout.buffer.write(msgspec.json.encode(result) + b"\n")
    else:
        print(_human(args.verb, result))
    return 0


def _request(args: argparse.Namespace) -> tuple[str | None, list[Any]]:
    verb = args.verb
    if verb == "subscribe":
        extra = [] if args.expire is None else [args.expire]
        return "event_subscribe", [args.event, args.socket, *extra]
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
    if sub.get("expire") == "never":
        return f"{sub.get('socket')}  expire never"
    return f"{sub.get('socket')}  expire {sub.get('expire')}  ttl {sub.get('ttl')}"


def _listen(args: argparse.Namespace) -> int:
    from engine.cli.listen import run_listener

    if args.expire < 1:
        print("event-datagram listen: --expire must be at least 1", file=sys.stderr)
        return 2
    try:
        return run_listener(args.mi, args.socket, args.events, args.expire, args.json, args.timeout)
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


def _apply_flags(cfg: config_mod.Config, args: argparse.Namespace) -> None:
    """Command-line flags override the config file."""
    if args.http is not None:
        cfg.mi.http = args.http
    if args.mi_datagram is not None:
        cfg.mi.datagram = args.mi_datagram
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
