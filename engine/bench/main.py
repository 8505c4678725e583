"""`event-datagram bench` (`make bench`): the stress run operators use before a rollout.

One run, on loopback and UNIX sockets only:

1. receiver processes (bench_receivers) bind the subscriber sockets; a reference
   sender process (bench_baseline) waits for its rounds;
2. `--rounds` times, interleaved: an **engine** round (a fresh `Engine`, the
   same code path as `run` with the metrics exposition scraped every second,
   events raised through `Engine.raise_event` as fast as the rings take them,
   or at `--rate`), with `--source ingest|both` an **ingest** round (instead of
   or after it: the same engine fed through an ingest socket by an emitter
   process, sendmmsg as fast as it can or at `--rate`), a **baseline** round
   (json.dumps + sendto per subscriber, one process) and, unless `--no-ceiling`,
   a **ceiling** round (pre-encoded sendmmsg, one process: what the kernel gives
   a single sending core);
3. a **latency** phase: a fresh engine at a fixed rate (half the measured
   maximum, at most LATENCY_RATE_CAP events/s), every datagram's raise-to-receive
   time kept by the receivers;
4. an **idle** phase: a fresh engine with 4 subscribers left quiet (its workers
   go to sleep), each worker's CPU measured over `--idle-cpu-duration` s, then
   events at a low rate (`--idle-latency-rate`) with their latencies kept;
5. a table on stdout, the JSON document (`--json`), the PNG (`--plot`).

Nothing system-wide is changed: limits found (net.core.rmem_max,
net.unix.max_dgram_qlen, ...) are reported with the setting that would lift them.
Interrupted (SIGINT/SIGTERM), it stops the engine, the receivers and the sender,
removes its sockets and shared memory, and still writes what it measured.

Exit status: 0 done; 1 the bench could not run (the message says why); 2 bad
arguments; 3 done, but --plot could not be written (matplotlib missing: the
message says how to install it); 4 done, but the engine's accounting identity
did not hold; 130 / 143 interrupted by SIGINT / SIGTERM (partial results written).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from types import FrameType
from typing import Any, Final

from engine.bench.common import (
    DEFAULT_PAYLOAD_BYTES,
    PR_GET_TIMERSLACK,
    PR_SET_TIMERSLACK,
    make_tag,
    prctl,
)
from engine.bench.machine import backlog_warning, machine_info, sysctl_info
from engine.bench.plot import PLOT_HINT, write_plot
from engine.bench.run import LATENCY_RATE_CAP, RCVBUF_BUDGET, Bench, Interrupted
from engine.bench.summary import median, summarize
from engine.bench.table import format_table
from engine.errors import EngineError
from engine.options import EngineOptions

FOREIGN_WARN_CORES: Final = 0.25
FOREIGN_WARN_LATENCY_CORES: Final = 0.05
TRANSPORTS: Final = ("udp", "udp6", "unix", "mixed")
SOURCES: Final = ("api", "ingest", "both", "amqp", "stream")
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_PLOT, EXIT_IDENTITY = 0, 1, 2, 3, 4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--duration", type=float, default=5.0, help="seconds per round (default 5)")
    a("--rounds", type=int, default=3, help="interleaved engine/baseline rounds (default 3)")
    a("--subscribers", type=int, default=4, help="subscriber sockets (default 4)")
    a(
        "--transport",
        choices=TRANSPORTS,
        default="udp",
        help="udp (127.0.0.1), udp6 (::1), unix, or mixed (default udp)",
    )
    a(
        "--payload-bytes",
        type=int,
        default=DEFAULT_PAYLOAD_BYTES,
        help="datagram size; the E_BENCH tag is padded to reach it (default 120)",
    )
    a(
        "--source",
        choices=SOURCES,
        default="api",
        help="how events reach the engine: api (Engine.raise_event, default), ingest (an "
        "emitter process sends the notifications to an ingest socket with sendmmsg), or "
        "both (an api and an ingest round in every round, interleaved), or amqp (an api "
        "round and a round consuming from RabbitMQ, interleaved; needs the amqp extra), or "
        "stream (an api round and a round reading a RabbitMQ stream, then the broker's cost "
        "with 1-3 engines on a stream and on classic queues; needs the stream extra)",
    )
    a(
        "--amqp-url",
        default="",
        help="--source amqp: the broker (amqp://USER:PASS@HOST:PORT/VHOST); default: start "
        "a private rabbitmq-server for the run",
    )
    a(
        "--stream-url",
        default="",
        help="--source stream: the broker's stream listener "
        "(rabbitmq-stream://USER:PASS@HOST:PORT/VHOST); default: the private broker's, or "
        "--amqp-url's host on port 5552",
    )
    a(
        "--amqp-messages",
        type=int,
        default=50_000,
        help="--source amqp: messages published to the queue before each broker round "
        "(default 50000)",
    )
    a("--workers", type=int, default=0, help="engine workers (default: CPUs - 1)")
    a(
        "--rate",
        type=float,
        default=0.0,
        help="events/s in the throughput rounds (default: as fast as possible)",
    )
    a(
        "--ingest-rate",
        type=float,
        default=None,
        help="events/s the emitter sends to the ingest socket in the ingest rounds (default: "
        "--rate); match it to what the workers sustain to check for kernel drops",
    )
    a(
        "--emitter-sched",
        choices=("normal", "idle"),
        default="normal",
        help="scheduling of the ingest emitter: normal (default: at full speed it takes "
        "about half of the CPU it shares with a worker) or idle (SCHED_IDLE: it still "
        "sends as fast as it can, but only on CPU time the engine does not use)",
    )
    a(
        "--latency-duration",
        type=float,
        default=8.0,
        help="seconds of the fixed-rate latency phase; 0 skips it (default 8)",
    )
    a(
        "--latency-rate",
        type=float,
        default=0.0,
        help=f"events/s of the latency phase (default: half the measured maximum, "
        f"at most {LATENCY_RATE_CAP:,.0f})",
    )
    a(
        "--idle-latency-rate",
        type=float,
        default=20.0,
        help="events/s of the idle phase, raised after a quiet period (default 20)",
    )
    a(
        "--idle-latency-duration",
        type=float,
        default=5.0,
        help="seconds of raising in the idle phase; 0 skips it (default 5)",
    )
    a(
        "--idle-cpu-duration",
        type=float,
        default=3.0,
        help="seconds of the idle phase's quiet period over which each worker's CPU is "
        "measured (after 1 s of quiet); 0 skips it (default 3)",
    )
    a("--json", metavar="PATH", help="write the results as JSON here")
    a("--plot", metavar="PATH", help="write a PNG here (needs the 'bench' extra: matplotlib)")
    a("--quiet", action="store_true", help="no progress line")
    a("--receivers", type=int, default=1, help="receiver processes (default 1)")
    a(
        "--rcvbuf-bytes",
        type=int,
        default=64 << 20,
        help="receive buffer per receiver socket (default 64 MiB)",
    )
    a(
        "--full-ring-policy",
        choices=("wait", "drop"),
        default="wait",
        help="engine policy with a full ring; 'wait' (default) makes 'as fast as possible' "
        "mean as fast as the workers send, 'drop' counts what does not fit",
    )
    a("--ring-bytes", type=int, default=EngineOptions().ring_bytes, help="engine ring size")
    a("--no-ceiling", action="store_true", help="skip the pre-encoded sendmmsg reference")
    a(
        "--baseline-encode-once",
        action="store_true",
        help="the baseline encodes once per event instead of once per subscriber",
    )
    a(
        "--wait-idle",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="before each round, wait up to this long for other processes to leave the "
        "CPUs alone (busy < 0.15 core); 0 = do not wait (default)",
    )
    a(
        "--routing",
        action="store_true",
        help="instead of the stress run: virtual groups and filters against plain "
        "subscribers, --rounds interleaved rounds of 30000 events to --subscribers UDP "
        "sinks (python -m engine.bench.probes.routing; docs/routing.md)",
    )
    a(
        "--receiver-cpus",
        choices=("auto", "none"),
        default="auto",
        help="auto: pin receivers to the CPUs the workers do not use (default)",
    )


def _check(args: argparse.Namespace) -> None:
    checks = (
        (0 < args.duration <= 600, "--duration must be in (0, 600] seconds"),
        (1 <= args.rounds <= 50, "--rounds must be 1-50"),
        (1 <= args.subscribers <= 1024, "--subscribers must be 1-1024"),
        (args.workers >= 0, "--workers must be >= 0"),
        (0 <= args.rate <= 10_000_000, "--rate must be 0-10000000 events/s"),
        (0 <= args.latency_duration <= 600, "--latency-duration must be 0-600 seconds"),
        (0 <= args.latency_rate <= 10_000_000, "--latency-rate must be 0-10000000"),
        (0 < args.idle_latency_rate <= 1000, "--idle-latency-rate must be in (0, 1000]"),
        (0 <= args.idle_latency_duration <= 600, "--idle-latency-duration must be 0-600 s"),
        (0 <= args.idle_cpu_duration <= 600, "--idle-cpu-duration must be 0-600 seconds"),
        (1 <= args.receivers <= 64, "--receivers must be 1-64"),
        (4096 <= args.rcvbuf_bytes <= 1 << 30, "--rcvbuf-bytes must be 4096-1073741824"),
        (0 <= args.wait_idle <= 3600, "--wait-idle must be 0-3600 seconds"),
        (1 <= args.amqp_messages <= 10_000_000, "--amqp-messages must be 1-10000000"),
    )
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    for option, path in (("--json", args.json), ("--plot", args.plot)):
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise ValueError(f"{option} {path}: the directory does not exist")
    make_tag(args.payload_bytes, time.monotonic_ns())  # raises with the valid range


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    raise Interrupted(signal.Signals(signum).name)


def run(args: argparse.Namespace) -> int:
    """Run the bench (the `bench` subcommand); return the exit status."""
    try:
        _check(args)
    except ValueError as exc:
        print(f"event-datagram bench: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.routing:
        from engine.bench.probes.routing import MODES, report

        workers = args.workers or 1
        report(list(MODES), args.rounds, 30_000, workers, args.subscribers, args.json)
        return EXIT_OK
    bench = Bench(args)
    main_thread = threading.current_thread() is threading.main_thread()
    old = {}
    if main_thread:
        old = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    slack = prctl(PR_GET_TIMERSLACK, 0)
    prctl(PR_SET_TIMERSLACK, 1000)  # 1 us: paced raises sleep as long as asked, no longer
    interrupted: str | None = None
    error: str | None = None
    leftovers: list[str] = []
    rss: dict[str, Any] = {}
    try:
        try:
            interrupted = bench.execute()
        except (EngineError, RuntimeError, OSError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        finally:
            if main_thread:  # no second interruption while cleaning up
                for s in old:
                    signal.signal(s, signal.SIG_IGN)
            rss = bench.rss()
            leftovers = bench.cleanup()
    finally:
        if slack is not None and slack > 0:
            prctl(PR_SET_TIMERSLACK, slack)
        for s, handler in old.items():
            signal.signal(s, handler)
    return _finish(bench, rss, interrupted, error, leftovers)


def _finish(
    bench: Bench,
    rss: dict[str, Any],
    interrupted: str | None,
    error: str | None,
    leftovers: list[str],
) -> int:
    args = bench.args
    if error:
        print(f"event-datagram bench: {error}", file=sys.stderr)
    sysctl, warnings = sysctl_info(
        bench.kinds, bench.rcvbuf, bench.pool.buffers if bench.pool else []
    )
    foreign = median([r["system"]["foreign_cores"] for r in bench.rounds])
    if foreign is not None and foreign > FOREIGN_WARN_CORES:
        warnings.append(
            f"other processes used {foreign:.2f} CPU core(s) (median per round) while the "
            "bench ran: the numbers are lower and noisier than on an idle machine"
        )
    for name, phase in (("latency", bench.latency), ("idle", bench.idle)):
        lat_foreign = phase["round"]["system"]["foreign_cores"] if phase else 0.0
        if lat_foreign > FOREIGN_WARN_LATENCY_CORES:
            warnings.append(
                f"other processes used {lat_foreign:.2f} CPU core(s) during the {name} "
                "phase: its tail (p99, p99.9) shows them more than the engine"
            )
    if bench.rcvbuf < args.rcvbuf_bytes:
        warnings.append(
            f"receive buffers: {bench.rcvbuf:,} bytes asked for per socket, not "
            f"--rcvbuf-bytes {args.rcvbuf_bytes:,}: {len(bench.kinds)} sockets share a "
            f"{RCVBUF_BUDGET:,}-byte budget"
        )
    drops = sum(r["system"].get("machine_backlog_drops", 0) for r in bench.rounds)
    if drops:
        warnings.append(backlog_warning(sysctl, drops))
    if leftovers:
        warnings.append(f"removed leftovers by force: {leftovers}")
    metrics = bench.scraper.summary()
    if not metrics["available"]:
        warnings.append(metrics["note"])
    result = summarize(
        bench.rounds,
        bench.latency,
        bench.idle,
        rss,
        machine_info(),
        bench.settings(),
        sysctl,
        warnings,
        metrics,
        interrupted,
    )
    if bench.stream_scaling:
        result.setdefault("stream", {})["engines_scaling"] = bench.stream_scaling
    result["error"] = error
    json_failed = plot_failed = False
    if args.json:
        try:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(result, f, indent=2)
                f.write("\n")
        except OSError as exc:
            print(f"event-datagram bench: cannot write {args.json}: {exc}", file=sys.stderr)
            json_failed = True
    if bench.rounds or bench.latency or bench.idle:
        print(format_table(result))
    if args.plot and (bench.rounds or bench.latency):
        try:
            write_plot(result, args.plot)
        except ImportError:
            print(f"event-datagram bench: {PLOT_HINT}", file=sys.stderr)
            plot_failed = True
    if interrupted:
        return 143 if interrupted == "SIGTERM" else 130
    if error or json_failed:
        return EXIT_ERROR
    if result["identity_errors"]:
        return EXIT_IDENTITY
    return EXIT_PLOT if plot_failed else EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="event-datagram bench", description=__doc__.split("\n")[0]
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
