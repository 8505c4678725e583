"""The C chain beside the engine (engine/bench/probes/c_wake.py): its output parsed
into seconds, and a short real compile + run when gcc is present."""

from __future__ import annotations

import shutil

import pytest

from engine.bench.probes import c_wake


def test_parse_reads_the_line_in_seconds() -> None:
    got = c_wake.parse("n=60 gap=50ms: p50 120 us, p90 180 us, p99 300 us, max 410 us\n")
    assert got == {
        "samples": 60,
        "gap_ms": 50,
        "p50": 120e-6,
        "p90": 180e-6,
        "p99": 300e-6,
        "max": 410e-6,
    }


@pytest.mark.parametrize("text", ["", "garbage", "n=1 gap=2ms: p50 x us"])
def test_parse_rejects_other_output(text: str) -> None:
    assert c_wake.parse(text) is None


def test_source_is_shipped_beside_the_module() -> None:
    assert c_wake.SOURCE.is_file()
    assert "FUTEX_WAKE" in c_wake.SOURCE.read_text()


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc not installed")
def test_short_real_run_reports_ordered_percentiles() -> None:
    got = c_wake.run(events=10, gap_ms=5)
    assert got["status"] == "ok", got
    assert got["samples"] == 10
    assert 0 < got["p50"] <= got["p90"] <= got["p99"] <= got["max"]


def test_without_gcc_it_is_skipped_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "")
    assert c_wake.run(events=2, gap_ms=1) == {"status": "skipped", "reason": "gcc not found"}


def test_the_python_chain_runs_and_reports_in_the_same_shape() -> None:
    got = c_wake.run_python(events=10, gap_ms=5)
    assert got["status"] == "ok", got
    assert got["samples"] == 10 and got["gap_ms"] == 5
    assert 0 < got["p50"] <= got["p90"] <= got["p99"] <= got["max"]
