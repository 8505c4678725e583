"""The bench's PNG: datagrams/s per round side by side, and the latency CDF.

matplotlib is the optional `bench` extra (pip install 'event-datagram[bench]');
without it `write_plot` raises ImportError and the caller prints PLOT_HINT.
"""

from __future__ import annotations

from typing import Any, Final

from engine.bench.summary import OPENSIPS_DG_PER_S, TARGET_P99_S
from engine.bench.table import format_us

PLOT_HINT: Final = (
    "--plot needs matplotlib, the optional 'bench' extra: "
    "pip install 'event-datagram[bench]'  (or: pip install 'matplotlib>=3.7')"
)
BUSY_ROUND_CORES: Final = 0.25  # a round with more foreign load is hatched in the plot


def write_plot(result: dict[str, Any], path: str) -> None:
    """PNG: datagrams/s per round (engine, baseline, ceiling) and the latency CDF.
    Raises ImportError when matplotlib is missing."""
    import matplotlib  # type: ignore[import-not-found, unused-ignore]

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # type: ignore[import-not-found, unused-ignore]

    rounds = result["rounds"]
    names = [c for c in ("engine", "baseline", "ceiling") if result.get(c)]
    colors = {"engine": "#1f77b4", "baseline": "#ff7f0e", "ceiling": "#9a9a9a"}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5.6))
    numbers = sorted({r["round"] for r in rounds if r["contender"] in names})
    width = 0.8 / max(1, len(names))
    for k, name in enumerate(names):
        xs, ys, hatches = [], [], []
        for r in rounds:
            if r["contender"] == name:
                xs.append(numbers.index(r["round"]) + (k - (len(names) - 1) / 2) * width)
                ys.append(r["datagrams_sent_per_s"] / 1e3)
                busy = r["system"]["foreign_cores"] > BUSY_ROUND_CORES
                hatches.append("//" if busy else "")
        # Sent: the senders' own figure (received measures the receivers when they overflow).
        med = result[name].get("datagrams_sent_per_s")
        label = f"{name} (median {med / 1e3:,.0f}k)" if med else name
        bars = ax1.bar(xs, ys, width, color=colors[name], hatch=hatches)
        ax1.bar([0], [0], 0, color=colors[name], label=label)  # the legend's plain swatch
        ax1.bar_label(bars, [f"{y:,.0f}k" for y in ys], fontsize=7, padding=2)
        if med:
            ax1.axhline(med / 1e3, color=colors[name], linestyle="--", linewidth=0.8)
    ax1.axhline(
        OPENSIPS_DG_PER_S / 1e3,
        color="#d62728",
        linestyle=":",
        linewidth=1.2,
        label=f"OpenSIPS, 1 process ({OPENSIPS_DG_PER_S / 1e3:.1f}k)",
    )
    if any(r["system"]["foreign_cores"] > BUSY_ROUND_CORES for r in rounds):
        ax1.bar([0], [0], 0, color="white", edgecolor="#444", hatch="//",
                label=f"other processes busy (> {BUSY_ROUND_CORES} core)")  # fmt: skip
    ax1.set_xticks(range(len(numbers)), [f"round {n}" for n in numbers])
    ax1.set_ylabel("datagrams/s sent (thousands)")
    ax1.margins(y=0.12)
    s = result["settings"]
    ratio = result["ratio_median"]
    ax1.set_title(
        f"{s['subscribers']} x {s['transport']} subscribers, {s['payload_bytes']}-byte "
        "datagrams\nengine / baseline: " + (f"{ratio:.2f}x (median)" if ratio else "-"),
        fontsize=10,
    )
    ax1.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, fontsize=8)
    lat = result["latency_s"]
    if lat and lat.get("cdf"):
        xs = [max(p[0], 1e-7) * 1e6 for p in lat["cdf"]]
        ys = [p[1] for p in lat["cdf"]]
        ax2.plot(xs, ys, drawstyle="steps-post", color=colors["engine"], label="engine")
        idle = result.get("idle_latency_s") or {}
        if idle.get("cdf"):
            ax2.plot(
                [max(p[0], 1e-7) * 1e6 for p in idle["cdf"]],
                [p[1] for p in idle["cdf"]],
                drawstyle="steps-post",
                color="#2ca02c",
                label=f"idle: {idle['rate_events_per_s']:g} events/s after quiet",
            )
        ax2.set_xscale("log")
        for label, key, style in (
            ("p50", "p50", "-"),
            ("p99", "p99", "--"),
            ("p99.9", "p999", ":"),
        ):
            v = lat.get(key)
            if v:
                ax2.axvline(v * 1e6, color="#444", linestyle=style, linewidth=1,
                            label=f"{label} {format_us(v)}")  # fmt: skip
        ax2.axvline(TARGET_P99_S * 1e6, color="#d62728", linestyle=":", linewidth=1.2,
                    label="target p99 < 2 ms")  # fmt: skip
        ax2.set_xlabel("raise -> receive latency (us, log scale)")
        ax2.set_ylabel("fraction of datagrams")
        ax2.set_ylim(0, 1.01)
        loss = result["loss"]["latency_phase"]
        ax2.set_title(
            f"latency CDF at {lat['rate_events_per_s']:,.0f} events/s "
            f"({lat['samples']:,} datagrams, loss {loss})",
            fontsize=10,
        )
        ax2.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3, fontsize=8)
        ax2.grid(True, which="both", alpha=0.3)
    else:
        ax2.text(0.5, 0.5, "no latency phase", ha="center", va="center")
        ax2.set_axis_off()
    m = result["machine"]
    title = f"event-datagram bench - {m['cores']} CPU(s), Linux {m['kernel']}, Python {m['python']}"
    busy = [w for w in result["warnings"] if w.startswith("other processes used")]
    if busy:
        cores = [w.split(" CPU core")[0].rsplit(" ", 1)[-1] for w in busy]
        where = [
            w.split("during the ", 1)[1].split(":")[0] if "during the " in w else "rounds"
            for w in busy
        ]
        title += (
            "\nother processes used CPU core(s): "
            + ", ".join(f"{c} ({p})" for c, p in zip(cores, where, strict=True))
            + ": see the JSON"
        )
    fig.suptitle(title, fontsize=10, color="#b00" if busy else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
