"""The bench's table: what `bench` prints, built from the JSON document
(`bench.summary.summarize`). The engine's own figures come first; what the
receivers saw is labelled as theirs."""

from __future__ import annotations

from typing import Any


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
        *_headline_lines(result.get("headline") or {}),
        "",
        f"{'median per round':<30}" + "".join(f"{name:>16}" for name, _ in sides),
    ]

    def row(label: str, values: list[str]) -> None:
        lines.append(f"{label:<30}" + "".join(f"{v:>16}" for v in values))

    row("datagrams/s sent", [_n(d.get("datagrams_sent_per_s")) for _, d in sides])
    row("dg/s received (receivers')", [_n(d.get("datagrams_received_per_s")) for _, d in sides])
    row("events/s accepted", [_n(d.get("events_accepted_per_s")) for _, d in sides])
    row("loss (sent - received), all", [_n(d.get("loss")) for _, d in sides])
    row("  engine loss (its own)", [_n(d.get("engine_loss")) for _, d in sides])
    row("  receiver kernel drops", [_n(d.get("receiver_kernel_drops")) for _, d in sides])
    row("  refused by full receiver", [_n(d.get("receiver_refused")) for _, d in sides])
    row("  unexplained", [_n(d.get("loss_unexplained")) for _, d in sides])
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
        own = result.get("latency_engine_raise_to_send_le_s") or {}
        if own.get("p99") is not None:
            lines.append(
                f"  of which the engine's raise->sent (the workers' histogram, bucket bounds): "
                f"p50 <= {_le(own['p50'])}, p99 <= {_le(own['p99'])}, "
                f"p99.9 <= {_le(own['p999'])}; the rest is the receivers' (2-core machine: "
                f"they share the producer's CPU)"
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
        cw = result.get("idle_latency_c_s") or {}
        if cw.get("status") == "ok":
            ratio = result.get("idle_latency_c_ratio_p50")
            lines.append(
                f"C chain (wake.c, futex wake -> UDP send -> recv, {cw['samples']} events "
                f"{cw['gap_ms']} ms apart): p50 {format_us(cw['p50'])}, "
                f"p90 {format_us(cw['p90'])}, p99 {format_us(cw['p99'])}; engine p50 / C p50 "
                + (f"{ratio:.2f}" if ratio is not None else "n/a")
            )
            py = result.get("idle_latency_py_s") or {}
            if py.get("status") == "ok":
                lines.append(
                    f"  the same chain in Python (py_wake.py: eventfd, socket.send, recv): "
                    f"p50 {format_us(py['p50'])}, p99 {format_us(py['p99'])}; Python / C "
                    f"{py['p50'] / cw['p50']:.2f}"
                )
            first = result.get("idle_latency_first_s") or {}
            first_ratio = result.get("idle_latency_c_ratio_first_p50")
            py_ratio = result.get("idle_latency_py_ratio_first_p50")
            if first.get("p50") is not None:
                lines.append(
                    f"  each event's first datagram (the C chain's shape: one wake, one send): "
                    f"p50 {format_us(first['p50'])}, p99 {format_us(first['p99'])}; engine / C "
                    + (f"{first_ratio:.2f}" if first_ratio is not None else "n/a")
                    + (f", engine / Python {py_ratio:.2f}" if py_ratio is not None else "")
                )
        elif cw:
            lines.append(f"C chain: {cw['status']} ({cw.get('reason', '')})")
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
        f"{'round':<7}{'contender':<11}{'sent dg/s':>12}{'rx dg/s':>12}{'loss':>9}"
        f"{'engine':>9}{'rx drops':>10}{'drops+fail':>12}{'busy cores':>11}{'softirq':>9}"
        f"{'foreign':>9}"
    )
    for r in result["rounds"]:
        fails = sum(r["send_failures"].values()) + sum(r.get("drops", {}).values())
        lines.append(
            f"{r['round']:<7}{r['contender']:<11}{_n(r['datagrams_sent_per_s']):>12}"
            f"{_n(r['datagrams_received_per_s']):>12}{r['loss']:>9,}"
            f"{r.get('engine_loss', 0):>9,}{r.get('receiver_overflow', 0):>10,}{fails:>12,}"
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
                "idle_first_datagram_vs_c_p50",
                "cpu_efficiency_vs_ceiling_workers",
                "cpu_efficiency_vs_ceiling_producer_and_workers",
            )
            if name in t
        )
    )
    if result["identity_errors"]:
        lines.append("ACCOUNTING IDENTITY FAILED: " + "; ".join(result["identity_errors"]))
    for w in result["warnings"]:
        lines.append(f"note: {w}")
    if result["interrupted"]:
        lines.append(f"INTERRUPTED ({result['interrupted']}): partial results")
    return "\n".join(lines)


def _headline_lines(head: dict[str, Any]) -> list[str]:
    """The engine's own figures, the ones to quote."""
    if not head:
        return []
    us = head["cpu_us_per_datagram"]
    eff = head["fraction_of_ceiling_efficiency"]

    def f(v: float | None, spec: str = ".2f") -> str:
        return "-" if v is None else format(v, spec)

    lines = [
        "",
        f"ENGINE: {_n(head['datagrams_sent_per_s'])} datagrams/s sent (median); CPU us per "
        f"datagram: producer {f(us['producer'])}, workers {f(us['workers'])}, both "
        f"{f(us['producer_and_workers'])} (ceiling sender {f(head['ceiling_cpu_us_per_datagram'])}"
        f"); efficiency vs the ceiling: workers {f(eff['workers'])}, producer + workers "
        f"{f(eff['producer_and_workers'])}",
        f"engine loss {head['engine_loss']:,}; receiver overflow {head['receiver_overflow']:,}"
        + (
            f" (the receivers limit: they got {_n(head['receivers_datagrams_received_per_s'])}"
            " datagrams/s; that is their figure, not the engine's)"
            if head["limited_by"] == "receivers"
            else ""
        ),
    ]
    return lines


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


def _le(bound: float | str | None) -> str:
    """A histogram bucket bound for the table."""
    return bound if isinstance(bound, str) else format_us(bound) if bound is not None else "n/a"
