"""The bench's results: the JSON document, the table, the system limits.

The JSON schema (version 1) is documented in docs/benchmark.md, "bench.json";
`summarize()` builds it from the per-round dicts the orchestrator collected.
"""

from __future__ import annotations

import array
import math
import os
import platform
import statistics
from collections.abc import Sequence
from typing import Any, Final

from engine.bench.amqp import amqp_summary
from engine.bench.common import read_sysctl
from engine.bench.stream import stream_summary

SCHEMA_VERSION: Final = 1
OPENSIPS_DG_PER_S: Final = 37_486  # MEASUREMENTS.md 7.2: 1 process, 4 subscribers (median)
TARGET_RATIO: Final = 1.5
TARGET_CEILING_FRACTION: Final = 0.9
TARGET_OPENSIPS_FACTOR: Final = 5.0
TARGET_P99_S: Final = 0.002
TARGET_IDLE_CPU_PERCENT: Final = 0.1  # of one core, per worker
TARGET_IDLE_P99_S: Final = 200e-6
SYSCTLS: Final = (
    "net.core.rmem_max",
    "net.core.rmem_default",
    "net.core.wmem_max",
    "net.core.wmem_default",
    "net.core.netdev_max_backlog",
    "net.unix.max_dgram_qlen",
)
UNIX_QLEN_WANTED: Final = 1024
CDF_QUANTILES: Final = tuple([i / 100 for i in range(100)] + [0.995, 0.999, 0.9995, 0.9999, 1.0])


# -- machine and limits ----------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    import msgspec
    import psutil

    from engine.bench.common import available_cpus

    model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cores": os.cpu_count(),
        "usable_cpus": available_cpus(),
        "cpu_model": model,
        "memory_bytes": int(psutil.virtual_memory().total),
        "kernel": platform.release(),
        "system": platform.system(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "msgspec": msgspec.__version__,
        "psutil": psutil.__version__,
        "loadavg_at_start": list(os.getloadavg()),
    }


def sysctl_info(
    kinds: Sequence[str], rcvbuf: int, buffers: Sequence[dict[str, Any]]
) -> tuple[dict[str, Any], list[str]]:
    """The limits found (nothing is changed) and a warning for each that binds."""
    values: dict[str, Any] = {name: read_sysctl(name) for name in SYSCTLS}
    warnings: list[str] = []
    limits: list[dict[str, Any]] = []
    methods = sorted({str(b["method"]) for b in buffers})
    effective = min((int(b["effective"]) for b in buffers), default=0)
    values["receive_buffer"] = {
        "requested_bytes": rcvbuf,
        "method": methods[0] if len(methods) == 1 else methods,
        "effective_bytes": effective,  # getsockopt(SO_RCVBUF): the kernel doubles it
    }
    rmem_max = values["net.core.rmem_max"]
    if "SO_RCVBUF" in methods and effective < 2 * rcvbuf:
        limits.append(
            {
                "sysctl": "net.core.rmem_max",
                "value": rmem_max,
                "wanted": rcvbuf,
                "effect": "receive buffers capped: UDP receivers may overflow during bursts",
            }
        )
        warnings.append(
            f"net.core.rmem_max = {rmem_max} caps each receiver's SO_RCVBUF (asked for "
            f"{rcvbuf}; SO_RCVBUFFORCE needs CAP_NET_ADMIN). Overflows show as "
            f"udp_rcvbuf_errors and loss. To lift it: sysctl -w net.core.rmem_max={rcvbuf}"
        )
    qlen = values["net.unix.max_dgram_qlen"]
    if "unix" in kinds and qlen is not None and qlen < UNIX_QLEN_WANTED:
        limits.append(
            {
                "sysctl": "net.unix.max_dgram_qlen",
                "value": qlen,
                "wanted": UNIX_QLEN_WANTED,
                "effect": "a UNIX datagram receiver queues at most this many datagrams; "
                "senders get EAGAIN beyond it (counted as send failures, never retried)",
            }
        )
        warnings.append(
            f"net.unix.max_dgram_qlen = {qlen}: each UNIX receiver queues at most {qlen} "
            "datagrams, so fast senders get EAGAIN (the engine counts these as eagain "
            "failures; the receivers cannot keep up in bursts). To lift it: "
            f"sysctl -w net.unix.max_dgram_qlen={UNIX_QLEN_WANTED} (read when a socket is "
            "created: restart the receivers after changing it)"
        )
    values["limits"] = limits
    return values, warnings


def backlog_warning(values: dict[str, Any], drops: int) -> str:
    backlog = values.get("net.core.netdev_max_backlog")
    return (
        f"{drops} packet(s) dropped at the per-CPU input backlog "
        f"(net.core.netdev_max_backlog = {backlog}); loopback traffic passes through it. "
        f"To lift it: sysctl -w net.core.netdev_max_backlog={max(10000, 4 * (backlog or 1000))}"
    )


# -- numbers ------------------------------------------------------------------------------------
def median(values: Sequence[float]) -> float | None:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return float(statistics.median(vals)) if vals else None


def latency_summary(samples_ns: array.array[int], rate: float, duration_s: float) -> dict[str, Any]:
    """p50/p99/p99.9 (nearest rank) and a CDF, in seconds."""
    ordered = sorted(samples_ns)
    n = len(ordered)

    def q(p: float) -> float | None:
        if not n:
            return None
        return ordered[min(n - 1, max(0, math.ceil(p * n) - 1))] / 1e9

    cdf = [[q(p) if p > 0 else ordered[0] / 1e9, p] for p in CDF_QUANTILES] if n else []
    return {
        "p50": q(0.50),
        "p90": q(0.90),
        "p99": q(0.99),
        "p999": q(0.999),
        "max": ordered[-1] / 1e9 if n else None,
        "mean": sum(ordered) / n / 1e9 if n else None,
        "samples": n,
        "rate_events_per_s": rate,
        "duration_s": duration_s,
        "cdf": cdf,
    }


def _merge_counts(dicts: Sequence[dict[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + int(v)
    return out


def _side(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The medians of one contender's rounds."""
    if not rounds:
        return {}

    def med(key: str) -> float | None:
        return median([r[key] for r in rounds])

    roles = rounds[0]["cpu_s"].keys()
    cpu = {role: median([r["cpu_s"][role] for r in rounds]) for role in roles}
    per_dg = {role: median([r["cpu_us_per_datagram"][role] for r in rounds]) for role in roles}
    return {
        "datagrams_received_per_s": med("datagrams_received_per_s"),
        "datagrams_sent_per_s": med("datagrams_sent_per_s"),
        "events_accepted_per_s": med("events_accepted_per_s"),
        "datagrams_received": sum(r["datagrams_received"] for r in rounds),
        "datagrams_sent": sum(r["datagrams_sent"] for r in rounds),
        "loss": sum(r["loss"] for r in rounds),
        "duplicates": sum(r["duplicates"] for r in rounds),
        "invalid": sum(r["invalid"] + r["truncated"] for r in rounds),
        "send_failures": _merge_counts([r["send_failures"] for r in rounds]),
        "cpu_s": cpu,
        "cpu_us_per_datagram": per_dg,
        "datagrams_per_sending_cpu_s": med("datagrams_per_sending_cpu_s"),
        "datagrams_per_cpu_s_all_processes": med("datagrams_per_cpu_s_all_processes"),
        "rounds": len(rounds),
    }


def _ingest_side(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The ingest rounds: the keys of every contender, plus what the ingest socket saw."""
    side = _side(rounds)
    if not rounds:
        return side
    blocks = [r["ingest"] for r in rounds]
    roles = blocks[0]["cpu_us_per_event"].keys()
    side.update(
        events_ingested_per_s=median([b["events_ingested_per_s"] for b in blocks]),
        datagrams_emitted_per_s=median([b["datagrams_emitted_per_s"] for b in blocks]),
        datagrams_emitted=sum(b["datagrams_emitted"] for b in blocks),
        events_ingested=sum(b["events_ingested"] for b in blocks),
        kernel_drops=sum(b["kernel_drops"] for b in blocks),
        rejected=_merge_counts([b["rejected"] for b in blocks]),
        emit_failures=_merge_counts([b["emit_failures"] for b in blocks]),
        cpu_us_per_event={
            role: median([b["cpu_us_per_event"][role] for b in blocks]) for role in roles
        },
    )
    return side


def summarize(
    rounds: list[dict[str, Any]],
    latency: dict[str, Any] | None,
    idle: dict[str, Any] | None,
    rss: dict[str, Any],
    machine: dict[str, Any],
    settings: dict[str, Any],
    sysctl: dict[str, Any],
    warnings: list[str],
    metrics: dict[str, Any],
    interrupted: str | None,
) -> dict[str, Any]:
    contenders = ("engine", "ingest", "amqp", "stream", "baseline", "ceiling")
    by = {c: [r for r in rounds if r["contender"] == c] for c in contenders}
    engine, baseline, ceiling = _side(by["engine"]), _side(by["baseline"]), _side(by["ceiling"])
    ingest = _ingest_side(by["ingest"])
    amqp = amqp_summary(by["amqp"], by["engine"], _side(by["amqp"]))
    stream = stream_summary(by["stream"], by["engine"], _side(by["stream"]))
    ingest_ratios = []
    for g in by["ingest"]:
        e = next((r for r in by["engine"] if r["round"] == g["round"]), None)
        if e and e["datagrams_received_per_s"]:
            # The producer's CPU per event, ingested vs raised with raise_event: the
            # ratio of the two costs, comparable across machines of different speed.
            g_us = g["ingest"]["cpu_us_per_event"].get("producer")
            e_us = 1e6 * e["cpu_s"]["producer"] / e["events"] if e.get("events") else None
            ingest_ratios.append(
                {
                    "round": g["round"],
                    "ingest": g["datagrams_received_per_s"],
                    "api": e["datagrams_received_per_s"],
                    "ratio": g["datagrams_received_per_s"] / e["datagrams_received_per_s"],
                    "producer_us_per_event_ingest": g_us,
                    "producer_us_per_event_api": e_us,
                    "producer_cost_ratio": g_us / e_us if g_us and e_us else None,
                }
            )
    ratios = []
    for e in by["engine"]:
        b = next((r for r in by["baseline"] if r["round"] == e["round"]), None)
        if b and b["datagrams_received_per_s"]:
            ratios.append(
                {
                    "round": e["round"],
                    "engine": e["datagrams_received_per_s"],
                    "baseline": b["datagrams_received_per_s"],
                    "ratio": e["datagrams_received_per_s"] / b["datagrams_received_per_s"],
                }
            )
    ratio_median = median([r["ratio"] for r in ratios])
    lat_round = latency["round"] if latency else None
    identity = [
        f"round {r['round']} ({r['contender']}): {e}"
        for r in rounds
        for e in r.get("identity_errors", [])
    ]
    if lat_round:
        identity += [f"latency phase: {e}" for e in lat_round.get("identity_errors", [])]
    idle_round = idle["round"] if idle else None
    if idle_round:
        identity += [f"idle phase: {e}" for e in idle_round.get("identity_errors", [])]
    idle_cpu: dict[str, float] = dict(idle_round["idle_cpu"]["percent"]) if idle_round else {}
    idle_lat: dict[str, Any] = idle["latency_s"] if idle else {}
    worst_idle_cpu = max(idle_cpu.values()) if idle_cpu else None
    idle_p99 = idle_lat.get("p99")
    eng_rx = engine.get("datagrams_received_per_s")
    ceil_rx = ceiling.get("datagrams_received_per_s")
    p99 = latency["latency_s"]["p99"] if latency else None
    lat_loss = lat_round["loss"] if lat_round else None
    targets = {
        "note": "informative; set for 4 UDP subscribers and ~120-byte events on a 2-core machine",
        "ratio_vs_baseline": _target(ratio_median, TARGET_RATIO),
        "fraction_of_ceiling": _target(
            eng_rx / ceil_rx if eng_rx and ceil_rx else None, TARGET_CEILING_FRACTION
        ),
        "factor_vs_opensips": _target(
            eng_rx / OPENSIPS_DG_PER_S if eng_rx else None, TARGET_OPENSIPS_FACTOR
        ),
        "opensips_datagrams_per_s": OPENSIPS_DG_PER_S,
        "latency_p99_s": {
            "value": p99,
            "target": TARGET_P99_S,
            "met": p99 is not None and p99 < TARGET_P99_S,
        },
        "latency_phase_loss": {"value": lat_loss, "target": 0, "met": lat_loss == 0},
        "idle_cpu_percent": _target_below(worst_idle_cpu, TARGET_IDLE_CPU_PERCENT),
        "idle_latency_p99_s": _target_below(idle_p99, TARGET_IDLE_P99_S),
    }
    engine_drops = _merge_counts([r["drops"] for r in by["engine"]])
    return {
        "schema": SCHEMA_VERSION,
        "engine": engine,
        "baseline": baseline,
        "ceiling": ceiling,
        "ratio_median": ratio_median,
        "ratios": ratios,
        "ingest": ingest,
        "ratio_ingest_vs_api_median": median([r["ratio"] for r in ingest_ratios]),
        "ingest_cost_vs_api_median": median(
            [r["producer_cost_ratio"] for r in ingest_ratios if r["producer_cost_ratio"]]
        ),
        "ratios_ingest_vs_api": ingest_ratios,
        "amqp": amqp,
        "ratio_amqp_vs_api_median": amqp.get("ratio_vs_api_median"),
        "stream": stream,
        "ratio_stream_vs_api_median": stream.get("ratio_vs_api_median"),
        "loss": {
            "engine": engine.get("loss"),
            "ingest": ingest.get("loss"),
            "amqp": amqp.get("loss"),
            "stream": stream.get("loss"),
            "baseline": baseline.get("loss"),
            "ceiling": ceiling.get("loss"),
            "latency_phase": lat_loss,
            "idle_phase": idle_round["loss"] if idle_round else None,
        },
        "drops": {
            "engine": engine_drops,
            "engine_send_failures": engine.get("send_failures", {}),
            "baseline_send_failures": baseline.get("send_failures", {}),
            "ceiling_send_failures": ceiling.get("send_failures", {}),
            "latency_phase": lat_round["drops"] if lat_round else {},
            "latency_phase_send_failures": lat_round["send_failures"] if lat_round else {},
            "idle_phase": idle_round["drops"] if idle_round else {},
        },
        "oversize": sum(r.get("oversize", 0) for r in by["engine"])
        + (lat_round.get("oversize", 0) if lat_round else 0)
        + (idle_round.get("oversize", 0) if idle_round else 0),
        "latency_s": latency["latency_s"] if latency else {},
        "latency": lat_round,
        "idle_latency_s": idle_lat,
        "idle_cpu_percent": idle_cpu,
        "idle_latency": idle_round,
        "backlog": _backlog(by["engine"]),
        "cpu_s": {
            "engine": engine.get("cpu_s", {}),
            "ingest": ingest.get("cpu_s", {}),
            "amqp": amqp.get("cpu_s", {}),
            "baseline": baseline.get("cpu_s", {}),
            "ceiling": ceiling.get("cpu_s", {}),
            "latency_phase": lat_round["cpu_s"] if lat_round else {},
            "idle_phase": idle_round["cpu_s"] if idle_round else {},
        },
        "rss_bytes": rss,
        "identity_errors": identity,
        "targets": targets,
        "rounds": rounds,
        "metrics": metrics,
        "machine": machine,
        "settings": settings,
        "sysctl": sysctl,
        "warnings": warnings,
        "interrupted": interrupted,
    }


def _target(value: float | None, target: float) -> dict[str, Any]:
    return {"value": value, "target": target, "met": value is not None and value >= target}


def _target_below(value: float | None, target: float) -> dict[str, Any]:
    return {"value": value, "target": target, "met": value is not None and value < target}


def _backlog(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The engine rounds' backlog: the bound, what waited when raising stopped (median
    over rounds), the peak seen, the longest drain, the events the bound turned away."""
    found = [r["backlog"] for r in rounds if "backlog" in r]
    if not found:
        return {}
    return {
        "max_pending_datagrams": found[0]["max_pending_datagrams"],
        "pending_at_end_of_raising": median([b["pending_at_end_of_raising"] for b in found]),
        "peak_pending_sampled": max(b["peak_pending_sampled"] for b in found),
        "drain_s": max(b["drain_s"] for b in found),
        "drain_datagrams_per_s": median(
            [b["drain_datagrams_per_s"] for b in found if b["drain_datagrams_per_s"]]
        ),
        "ring_full": sum(b["ring_full"] for b in found),
        "pairs_stale": sum(b["pairs_stale"] for b in found),
    }


# -- the table --------------------------------------------------------------------------------
def _n(v: float | None, unit: str = "") -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}{unit}"


def format_us(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v * 1e6:,.0f} us" if v < 0.01 else f"{v * 1e3:,.1f} ms"


def _counts(d: dict[str, int]) -> str:
    items = [f"{k} {v:,}" for k, v in sorted(d.items()) if v]
    return ", ".join(items) if items else "0"


def format_table(result: dict[str, Any]) -> str:
    s = result["settings"]
    m = result["machine"]
    sides = [(name, result[name]) for name in ("engine", "ingest", "amqp") if result.get(name)]
    sides.append(("baseline", result["baseline"]))
    if result["ceiling"]:
        sides.append(("ceiling", result["ceiling"]))
    lines = [
        f"event-datagram bench: {s['subscribers']} x {s['transport']} subscriber(s), "
        f"{s['payload_bytes']}-byte datagrams, {s['workers_effective']} worker(s), "
        f"{s['rounds']} interleaved round(s) x {s['duration_s']:g} s",
        f"machine: {m['cores']} CPU(s) {m['cpu_model']}, Linux {m['kernel']}, Python {m['python']}",
        "",
        f"{'median per round':<30}" + "".join(f"{name:>16}" for name, _ in sides),
    ]

    def row(label: str, values: list[str]) -> None:
        lines.append(f"{label:<30}" + "".join(f"{v:>16}" for v in values))

    row("datagrams/s received", [_n(d.get("datagrams_received_per_s")) for _, d in sides])
    row("datagrams/s sent", [_n(d.get("datagrams_sent_per_s")) for _, d in sides])
    row("events/s accepted", [_n(d.get("events_accepted_per_s")) for _, d in sides])
    row("loss (sent - received), all", [_n(d.get("loss")) for _, d in sides])
    row("dg per sending CPU-second", [_n(d.get("datagrams_per_sending_cpu_s")) for _, d in sides])
    row(
        "dg per CPU-s, with receivers",
        [_n(d.get("datagrams_per_cpu_s_all_processes")) for _, d in sides],
    )
    for role in ("producer", "workers", "emitter", "sender", "broker", "receivers"):
        vals = [d.get("cpu_us_per_datagram", {}).get(role) for _, d in sides]
        if any(v is not None for v in vals):
            row(f"CPU us/datagram, {role}", [f"{v:.2f}" if v is not None else "" for v in vals])
    lines.append("")
    ratio = result["ratio_median"]
    per_round = " ".join(f"{r['ratio']:.2f}" for r in result["ratios"])
    lines.append(
        f"engine / baseline (datagrams/s received): median {ratio:.2f}x  (rounds: {per_round})"
        if ratio is not None
        else "engine / baseline: -"
    )
    ingest = result.get("ingest")
    if ingest:
        per_event = ingest["cpu_us_per_event"]
        ratio_g = result.get("ratio_ingest_vs_api_median")
        lines.append(
            f"ingest: {_n(ingest['events_ingested_per_s'])} events/s ingested of "
            f"{_n(ingest['datagrams_emitted_per_s'])} emitted (median), kernel drops at the "
            f"ingest socket {ingest['kernel_drops']:,}, rejected {_counts(ingest['rejected'])}; "
            "CPU us per ingested event: "
            + ", ".join(f"{k} {v:.2f}" for k, v in per_event.items() if v is not None)
            + (f"; ingest / api (datagrams/s received): median {ratio_g:.2f}x" if ratio_g else "")
            + (
                f"; producer CPU per event, ingest / raise_event: median {cost_g:.2f}x"
                if (cost_g := result.get("ingest_cost_vs_api_median"))
                else ""
            )
        )
    amqp = result.get("amqp")
    if amqp:
        per_message = amqp["cpu_us_per_message"]
        ratio_a = result.get("ratio_amqp_vs_api_median")
        lines.append(
            f"amqp: {_n(amqp['messages_consumed_per_s'])} messages/s consumed from one queue "
            f"(median; the fill published {_n(amqp['messages_published_per_s'])}/s); "
            "CPU us per message: "
            + ", ".join(f"{k} {v:.2f}" for k, v in per_message.items() if v is not None)
            + (f"; amqp / api (datagrams/s received): median {ratio_a:.2f}x" if ratio_a else "")
        )
    lines += _stream_lines(result)
    drops = result["drops"]
    lines.append(f"engine drops: {_counts(drops['engine'])}; oversize {result['oversize']:,}")
    lines.append(
        f"send failures: engine {_counts(drops['engine_send_failures'])}; "
        f"baseline {_counts(drops['baseline_send_failures'])}"
    )
    lat = result["latency_s"]
    if lat:
        lines.append(
            f"latency raise->receive at {lat['rate_events_per_s']:,.0f} events/s for "
            f"{lat['duration_s']:g} s ({lat['samples']:,} datagrams): "
            f"p50 {format_us(lat['p50'])}, p99 {format_us(lat['p99'])}, "
            f"p99.9 {format_us(lat['p999'])}, max {format_us(lat['max'])}; "
            f"loss {result['loss']['latency_phase']}"
        )
    backlog = result["backlog"]
    if backlog:
        lines.append(
            f"backlog: bound {backlog['max_pending_datagrams']:,} datagrams per worker; "
            f"{_n(backlog['pending_at_end_of_raising'])} waiting when raising stopped "
            f"(peak seen {backlog['peak_pending_sampled']:,}), drained in "
            f"{backlog['drain_s']:.2f} s; events turned away (ring_full) "
            f"{backlog['ring_full']:,}; stale {backlog['pairs_stale']:,}"
        )
    idle = result["idle_latency"]
    if idle:
        cpu = result["idle_cpu_percent"]
        window = idle["idle_cpu"]["window_s"]
        if cpu:
            lines.append(
                f"idle: worker CPU over {window:.1f} s of quiet, % of one core: "
                + ", ".join(f"worker {k} {cpu[k]:.3f}%" for k in sorted(cpu, key=int))
                + "; sleeps "
                + ", ".join(f"{n}" for _, n in sorted(idle["idle_cpu"]["sleeps"].items()))
            )
        ilat = result["idle_latency_s"]
        if ilat:
            woken = idle["latency_after_sleep_s"]
            lines.append(
                f"idle latency raise->receive at {ilat['rate_events_per_s']:,.0f} events/s "
                f"for {ilat['duration_s']:g} s after quiet ({ilat['samples']:,} datagrams): "
                f"p50 {format_us(ilat['p50'])}, p99 {format_us(ilat['p99'])}, "
                f"max {format_us(ilat['max'])}; {idle['events_after_sleep']} of "
                f"{idle['events']} events woke a sleeping worker (their p50 "
                f"{format_us(woken['p50'])}, p99 {format_us(woken['p99'])}); workers "
                f"{idle['workers_cpu_percent_while_raising']:.1f}% of a core meanwhile; "
                f"loss {idle['loss']}"
            )
    rss = result["rss_bytes"]
    mib = 1 << 20
    parts = [f"{k} {v / mib:.0f}" for k, v in rss.items() if isinstance(v, int)]
    parts += [
        f"{k} " + "/".join(f"{x / mib:.0f}" for x in v if x)
        for k, v in rss.items()
        if isinstance(v, list) and v
    ]
    lines.append("peak RSS MiB: " + ", ".join(parts))
    lines.append("")
    lines.append(
        f"{'round':<7}{'contender':<11}{'rx dg/s':>12}{'sent dg/s':>12}{'loss':>9}"
        f"{'drops+fail':>12}{'busy cores':>11}{'softirq':>9}{'foreign':>9}"
    )
    for r in result["rounds"]:
        fails = sum(r["send_failures"].values()) + sum(r.get("drops", {}).values())
        lines.append(
            f"{r['round']:<7}{r['contender']:<11}{_n(r['datagrams_received_per_s']):>12}"
            f"{_n(r['datagrams_sent_per_s']):>12}{r['loss']:>9,}{fails:>12,}"
            f"{r['system']['busy_cores']:>11.2f}{r['system']['softirq_cores']:>9.2f}"
            f"{r['system']['foreign_cores']:>9.2f}"
        )
    t = result["targets"]
    lines.append("")
    lines.append(
        "targets (informative): "
        + "; ".join(
            f"{name} {_fmt_target(t[name])}"
            for name in (
                "ratio_vs_baseline",
                "fraction_of_ceiling",
                "factor_vs_opensips",
                "latency_p99_s",
                "latency_phase_loss",
                "idle_cpu_percent",
                "idle_latency_p99_s",
            )
        )
    )
    if result["identity_errors"]:
        lines.append("ACCOUNTING IDENTITY FAILED: " + "; ".join(result["identity_errors"]))
    for w in result["warnings"]:
        lines.append(f"note: {w}")
    if result["interrupted"]:
        lines.append(f"INTERRUPTED ({result['interrupted']}): partial results")
    return "\n".join(lines)


def _fmt_target(t: dict[str, Any]) -> str:
    v = t["value"]
    if v is None:
        return "n/a"
    text = f"{v:.3g}" if isinstance(v, float) else str(v)
    return f"{text} ({'met' if t['met'] else 'NOT met'}, target {t['target']})"


def _stream_lines(result: dict[str, Any]) -> list[str]:
    """--source stream: the stream rounds, and the broker's cost per engine."""
    stream = result.get("stream") or {}
    lines = []
    if stream.get("messages_consumed_per_s") is not None:
        ratio = result.get("ratio_stream_vs_api_median")
        lines.append(
            f"stream: {_n(stream['messages_consumed_per_s'])} messages/s read from one stream "
            "(median); CPU us per message: "
            + ", ".join(
                f"{k} {v:.2f}" for k, v in stream["cpu_us_per_message"].items() if v is not None
            )
            + (f"; stream / api (datagrams/s received): median {ratio:.2f}x" if ratio else "")
        )
    scaling = stream.get("engines_scaling") or {}
    for kind in ("stream", "classic"):
        costs = scaling.get(kind)
        if costs:
            each = ", ".join(
                f"{n} engine(s) {v['total']:.1f} (store {v['store']:.1f} + deliver "
                f"{v['deliver']:.1f})"
                for n, v in costs.items()
                if isinstance(v, dict)
            )
            lines.append(
                f"broker CPU us per published message, {kind}: {each}; "
                f"+{costs['added_per_engine_us']:.1f} per added engine"
            )
    return lines
