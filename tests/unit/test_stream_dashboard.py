"""The Streams row of the dashboard (issue 22): every stream series has its panel,
by source and reason (tests/system/test_prometheus.py runs the queries for real)."""

from __future__ import annotations

import re

from tests.helpers.dashboard import dashboard, panel_queries


def test_dashboard_shows_stream_sources() -> None:
    queries: dict[str, list[str]] = {}
    for title, expr in panel_queries():
        queries.setdefault(title, []).append(expr)

    def rate_by(labels: str, metric: str) -> str:
        return (
            rf"sum by \({labels}\) \(rate\(event_datagram_stream_{metric}"
            r"\{instance=~\"\$instance\"\}\[\$__rate_interval\]\)\)"
        )

    def gauge(metric: str) -> str:
        return rf"max by \(source\) \(event_datagram_stream_{metric}\{{[^}}]*\}}\)"

    expected = {
        "Stream up": [gauge("up")],
        "Stream messages / s": [rate_by("source", "messages_total")],
        "Stream events raised / s": [rate_by("source", "events_raised_total")],
        "Stream rejections by reason": [rate_by("source, reason", "rejected_total")],
        "Stream stored offset": [gauge("stored_offset")],
        "Stream lag (offsets)": [gauge("lag_offsets")],
        "Stream offsets missed / s": [rate_by("source", "missed_offsets_total")],
        "Stream reconnects and errors": [
            rate_by("source, reason", "errors_total"),
            rate_by("source", "reconnects_total"),
        ],
    }
    for title, patterns in expected.items():
        assert title in queries, f"no panel {title!r}"
        assert len(queries[title]) == len(patterns), (title, queries[title])
        for pattern, expr in zip(patterns, queries[title], strict=True):
            assert re.fullmatch(pattern, expr), (title, expr)
    rows = [p["title"] for p in dashboard()["panels"] if p["type"] == "row"]
    assert "Streams (RabbitMQ)" in rows
