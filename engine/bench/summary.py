"""The bench's results: the JSON document and the system limits (the table a person
reads is `bench.table`).

The JSON schema (version 1) is documented in docs/benchmark.md, "bench.json";
`summarize()` builds it from the per-round dicts the orchestrator collected.
"""

from __future__ import annotations

import array
import math
import statistics
from collections.abc import Sequence
from typing import Any, Final

from engine.bench.amqp import amqp_summary
from engine.bench.stream import stream_summary

SCHEMA_VERSION: Final = 1
OPENSIPS_DG_PER_S: Final = 37_486  # MEASUREMENTS.md 7.2: 1 process, 4 subscribers (median)
TARGET_RATIO: Final = 1.5
TARGET_CEILING_FRACTION: Final = 0.9
TARGET_OPENSIPS_FACTOR: Final = 5.0
TARGET_P99_S: Final = 0.002
TARGET_WORKERS_EFFICIENCY: Final = 0.9  # ceiling's CPU per datagram / the workers'
TARGET_PATH_EFFICIENCY: Final = 0.65  # ... / (producer + workers)
TARGET_IDLE_CPU_PERCENT: Final = 0.1  # of one core, per worker
TARGET_IDLE_P99_S: Final = 200e-6
TARGET_IDLE_FIRST_VS_C: Final = 1.5  # first datagram after a pause / wake.c, p50 (issue 20)
CDF_QUANTILES: Final = tuple([i / 100 for i in range(100)] + [0.995, 0.999, 0.9995, 0.9999, 1.0])


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
        # Loss told apart (totals): the sender's own versus the receivers' overflow.
        "engine_loss": sum(r.get("engine_loss", 0) for r in rounds),
        "receiver_kernel_drops": sum(r.get("receiver_kernel_drops", 0) for r in rounds),
        "receiver_refused": sum(r.get("receiver_refused", 0) for r in rounds),
        "receiver_overflow": sum(r.get("receiver_overflow", 0) for r in rounds),
        "loss_unexplained": sum(r.get("loss_unexplained", 0) for r in rounds),
        "limited_by": (
            "receivers" if any(r.get("receiver_overflow", 0) for r in rounds) else "sender"
        ),
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


def headline(
    engine_rounds: list[dict[str, Any]], ceiling_rounds: list[dict[str, Any]]
) -> dict[str, Any]:
    """The figures to quote: the engine's own, whatever the receivers managed. Its CPU
    efficiency is compared with the ceiling contender's (pre-encoded sendmmsg) of the
    same round number, so both ran on the same machine in the same conditions."""
    if not engine_rounds:
        return {}
    fractions: list[dict[str, Any]] = []
    for e in engine_rounds:
        c = next((r for r in ceiling_rounds if r["round"] == e["round"]), None)
        us = e["cpu_us_per_datagram"]
        ceil_us = c["cpu_us_per_datagram"].get("sender") if c else None
        workers, producer = us.get("workers"), us.get("producer")
        both = workers + producer if workers and producer is not None else None
        fractions.append(
            {
                "round": e["round"],
                "ceiling_us_per_datagram": ceil_us,
                "workers": ceil_us / workers if ceil_us and workers else None,
                "producer_and_workers": ceil_us / both if ceil_us and both else None,
            }
        )

    def med(values: list[float | None]) -> float | None:
        return median([v for v in values if v is not None])

    roles = ("producer", "workers")
    us_per_dg = {
        role: med([r["cpu_us_per_datagram"].get(role) for r in engine_rounds]) for role in roles
    }
    overflow = sum(r.get("receiver_overflow", 0) for r in engine_rounds)
    return {
        "datagrams_sent_per_s": med([r["datagrams_sent_per_s"] for r in engine_rounds]),
        "cpu_us_per_datagram": {
            **us_per_dg,
            "producer_and_workers": med(
                [
                    r["cpu_us_per_datagram"]["producer"] + r["cpu_us_per_datagram"]["workers"]
                    for r in engine_rounds
                ]
            ),
        },
        "ceiling_cpu_us_per_datagram": med([f["ceiling_us_per_datagram"] for f in fractions]),
        "fraction_of_ceiling_efficiency": {
            "workers": med([f["workers"] for f in fractions]),
            "producer_and_workers": med([f["producer_and_workers"] for f in fractions]),
        },
        "fractions_of_ceiling_efficiency": fractions,
        "engine_loss": sum(r.get("engine_loss", 0) for r in engine_rounds),
        "receiver_overflow": overflow,
        "limited_by": "receivers" if overflow else "sender",
        "receivers_datagrams_received_per_s": med(
            [r["datagrams_received_per_s"] for r in engine_rounds]
        ),
    }


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
    idle_first: dict[str, Any] = (
        idle_round.get("latency_first_datagram_s") or {} if idle_round else {}
    )
    worst_idle_cpu = max(idle_cpu.values()) if idle_cpu else None
    idle_p99 = idle_lat.get("p99")
    c_wake = idle.get("c_wake") if idle else None
    py_wake = idle.get("py_wake") if idle else None
    idle_first_vs_c = _c_ratio(idle_first, c_wake)
    eng_rx = engine.get("datagrams_received_per_s")
    eng_tx = engine.get("datagrams_sent_per_s")
    ceil_tx = ceiling.get("datagrams_sent_per_s")
    p99 = latency["latency_s"]["p99"] if latency else None
    lat_loss = lat_round["loss"] if lat_round else None
    targets = {
        "note": "informative; set for 4 UDP subscribers and ~120-byte events on a 2-core machine",
        "ratio_vs_baseline": _target(ratio_median, TARGET_RATIO),
        "fraction_of_ceiling": _target(
            # Datagrams sent, the senders' own figure: received ones measure the
            # receivers whenever they overflow (see `headline.limited_by`).
            eng_tx / ceil_tx if eng_tx and ceil_tx else None,
            TARGET_CEILING_FRACTION,
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
        "idle_first_datagram_vs_c_p50": {
            "value": idle_first_vs_c,
            "target": TARGET_IDLE_FIRST_VS_C,
            "met": idle_first_vs_c is not None and idle_first_vs_c <= TARGET_IDLE_FIRST_VS_C,
        },
    }
    engine_drops = _merge_counts([r["drops"] for r in by["engine"]])
    head = headline(by["engine"], by["ceiling"])
    efficiency = head.get("fraction_of_ceiling_efficiency", {})
    targets["cpu_efficiency_vs_ceiling_workers"] = _target(
        efficiency.get("workers"), TARGET_WORKERS_EFFICIENCY
    )
    targets["cpu_efficiency_vs_ceiling_producer_and_workers"] = _target(
        efficiency.get("producer_and_workers"), TARGET_PATH_EFFICIENCY
    )
    sides = {"engine": engine, "ingest": ingest, "amqp": amqp, "stream": stream}
    sides |= {"baseline": baseline, "ceiling": ceiling}
    phases = {"latency_phase": lat_round, "idle_phase": idle_round}
    return {
        "schema": SCHEMA_VERSION,
        "headline": head,
        "engine_loss": {
            **{k: v.get("engine_loss") for k, v in sides.items()},
            **{k: r.get("engine_loss") if r else None for k, r in phases.items()},
        },
        "receiver_overflow": {
            **{
                k: {
                    "kernel_drops": v.get("receiver_kernel_drops"),
                    "refused": v.get("receiver_refused"),
                    "total": v.get("receiver_overflow"),
                    "loss_unexplained": v.get("loss_unexplained"),
                }
                for k, v in sides.items()
                if v
            },
            **{
                k: {
                    "kernel_drops": r.get("receiver_kernel_drops"),
                    "refused": r.get("receiver_refused"),
                    "total": r.get("receiver_overflow"),
                    "loss_unexplained": r.get("loss_unexplained"),
                }
                for k, r in phases.items()
                if r
            },
        },
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
        "latency_engine_raise_to_send_le_s": _engine_quantiles(lat_round),
        "latency": lat_round,
        "idle_latency_s": idle_lat,
        "idle_latency_c_s": c_wake or {},
        "idle_latency_c_ratio_p50": _c_ratio(idle_lat, c_wake),
        "idle_latency_py_s": py_wake or {},
        "idle_latency_first_s": idle_first,
        "idle_latency_c_ratio_first_p50": idle_first_vs_c,
        "idle_latency_py_ratio_first_p50": _c_ratio(idle_first, py_wake),
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


def _engine_quantiles(round_record: dict[str, Any] | None) -> dict[str, Any]:
    """The latency phase's raise -> sent as the workers' own histogram has it (the
    engine's part of raise -> receive, whatever the receivers add): per quantile, the
    upper bound of the bucket it falls in, in seconds ("+Inf" past the last)."""
    hist = (round_record or {}).get("engine_raise_to_send")
    if not hist:
        return {}
    counts, bounds = hist["counts"], hist["le_s"]
    total = sum(counts)
    out: dict[str, Any] = {"samples": total}
    for name, q in (("p50", 0.5), ("p99", 0.99), ("p999", 0.999)):
        seen = 0
        out[name] = None
        for bound, count in zip(bounds, counts, strict=True):
            seen += count
            if total and seen >= q * total:
                out[name] = bound
                break
    return out


def _c_ratio(engine: dict[str, Any], c: dict[str, Any] | None) -> float | None:
    """Engine idle p50 / a reference chain's p50 in the same run: wake.c's (issue 20's
    target: <= 1.5) or py_wake.py's (CPython's own floor)."""
    if not c or c.get("status") != "ok" or not engine.get("p50") or not c.get("p50"):
        return None
    return float(engine["p50"]) / float(c["p50"])
