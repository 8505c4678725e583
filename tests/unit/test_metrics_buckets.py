"""engine.metrics's histogram buckets, without an engine."""

from __future__ import annotations

import pytest

from engine.metrics import cumulative


@pytest.mark.parametrize(
    ("counts", "expected"),
    [([0, 0, 0], [0, 0, 0]), ([1, 2, 3], [1, 3, 6]), ([5, 0, 1], [5, 5, 6])],
)
def test_cumulative_buckets(counts: list[int], expected: list[int]) -> None:
    buckets = cumulative(counts, (1, 2.5e-5))
    assert buckets == [
        (le, float(n)) for le, n in zip(("1.0", "2.5e-05", "+Inf"), expected, strict=True)
    ]
    with pytest.raises(ValueError):
        cumulative(counts, (1,))
