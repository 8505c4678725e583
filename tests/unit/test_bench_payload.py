"""engine.bench's pieces that need no process: the payload it sends, its plot extra."""

from __future__ import annotations

import json
import sys
import time

import pytest

from engine.bench import plot as bench_plot
from engine.bench.common import EVENT, SEQ_BASE, bench_params, make_tag, payload_size
from engine.wire import MAX_PAYLOAD, encode_notification


def test_tag_padding_gives_the_exact_datagram_size() -> None:
    t = time.monotonic_ns()
    smallest = payload_size("", t)
    for size in (smallest, 120, 512, 1472, MAX_PAYLOAD):
        if size < smallest:
            continue
        tag = make_tag(size, t)
        assert len(encode_notification(EVENT, bench_params(tag, SEQ_BASE + 5, t))) == size
    with pytest.raises(ValueError, match="payload-bytes"):
        make_tag(smallest - 1, t)
    with pytest.raises(ValueError, match="payload-bytes"):
        make_tag(MAX_PAYLOAD + 1, t)


def test_the_naive_baseline_sends_the_engines_bytes() -> None:
    params = bench_params(make_tag(120, 10**12), SEQ_BASE + 42, 10**12)
    note = {"jsonrpc": "2.0", "method": EVENT, "params": params}
    naive = json.dumps(note, separators=(",", ":")).encode()
    assert naive == encode_notification(EVENT, params)


def test_plot_without_matplotlib_raises_import_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError):
        bench_plot.write_plot({}, "unused.png")
