"""The Grafana dashboard's files, read as they are (a real Prometheus evaluates its
queries in system/test_prometheus.py)."""

from __future__ import annotations

import re

from tests.helpers.dashboard import DASHBOARD, DATASOURCE, PROVIDER, dashboard, panel_queries


def test_dashboard_is_provisionable_as_is() -> None:
    """Fixed uids; every query on the datasource variable $DS_PROMETHEUS, whose default is
    the provisioned datasource (so provisioning works as is, and a manual import lets
    the user pick a Prometheus); no import-time __inputs; rates over $__rate_interval."""
    text = DASHBOARD.read_text()
    board = dashboard()
    assert board["uid"] == "event-datagram"
    assert "__inputs" not in board and "event-datagram-prom" not in text.replace(
        '"value": "event-datagram-prom"', ""
    )
    uid = re.search(r"^\s*uid:\s*(\S+)", DATASOURCE.read_text(), re.MULTILINE)
    assert uid is not None and uid.group(1) == "event-datagram-prom"
    ds_vars = [v for v in board["templating"]["list"] if v["type"] == "datasource"]
    assert ds_vars == [
        {
            "name": "DS_PROMETHEUS",
            "label": "Data source",
            "type": "datasource",
            "query": "prometheus",
            "current": {
                "selected": False,
                "text": "Prometheus (event-datagram)",
                "value": "event-datagram-prom",
            },
            "regex": "",
            "refresh": 1,
            "includeAll": False,
            "multi": False,
            "options": [],
            "hide": 0,
        }
    ]
    ours = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
    provider = PROVIDER.read_text()
    assert re.search(r"^\s*type:\s*file\s*$", provider, re.MULTILINE)
    assert re.search(r"^\s*path:\s*\S+", provider, re.MULTILINE)
    stack = list(board["panels"])
    titles = []
    while stack:
        panel = stack.pop(0)
        stack.extend(panel.get("panels", []))
        titles.append(panel["title"])
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == ours
        for target in panel["targets"]:
            assert target["datasource"] == ours
    assert len(titles) == len(set(titles)), "panel titles must be unique"
    queries = panel_queries()
    assert len(queries) >= 15
    for title, expr in queries:
        windows = re.findall(r"\[([^\]]+)\]", expr)
        assert all(w == "$__rate_interval" for w in windows), f"{title}: fixed window in {expr}"
        assert 'instance=~"$instance"' in expr, f"{title}: not filtered by $instance"
    for variable in board["templating"]["list"]:
        if variable["type"] != "datasource":
            assert variable["datasource"] == ours


def test_dashboard_shows_stale_datagrams_by_event_and_worker_sleeps() -> None:
    """The bounded-delay series (issue 12) have their panels, by the right labels."""
    queries = dict(panel_queries())
    stale = queries["Stale datagrams by event"]
    assert re.fullmatch(
        r"sum by \(event\) \(rate\(event_datagram_stale_datagrams_total\{[^}]*\}"
        r"\[\$__rate_interval\]\)\)",
        stale,
    ), stale
    sleeps = queries["Worker sleeps"]
    assert re.fullmatch(
        r"sum by \(worker\) \(rate\(event_datagram_worker_sleeps_total\{[^}]*\}"
        r"\[\$__rate_interval\]\)\)",
        sleeps,
    ), sleeps


def test_panels_do_not_overlap() -> None:
    """Each panel has its own place on the 24-column grid (rows included)."""
    cells: dict[tuple[int, int], str] = {}
    for panel in dashboard()["panels"]:
        g = panel["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, panel["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                other = cells.setdefault((x, y), panel["title"])
                assert other == panel["title"], f"{panel['title']} overlaps {other}"


def test_dashboard_shows_ingest_sockets_and_upstreams() -> None:
    """The source series (issue 11 item 3) have their panels, by socket, reason and MI."""
    queries = dict(panel_queries())

    def rate_by(labels: str, metric: str) -> str:
        return (
            rf"sum by \({labels}\) \(rate\(event_datagram_{metric}"
            r"\{instance=~\"\$instance\"\}\[\$__rate_interval\]\)\)"
        )

    expected = {
        "Ingest datagrams / s by socket": rate_by("socket", "ingest_datagrams_total"),
        "Ingest events raised / s by socket": rate_by("socket", "ingest_events_raised_total"),
        "Ingest rejections by reason": rate_by("socket, reason", "ingest_rejected_total"),
        "Ingest kernel drops by socket": rate_by("socket", "ingest_kernel_drops_total"),
        "Upstream up": r"max by \(mi\) \(event_datagram_upstream_up\{[^}]*\}\)",
        "Upstream subscribed events": (
            r"sum by \(mi\) \(event_datagram_upstream_subscribed_events\{[^}]*\}\)"
        ),
        "Upstream errors by reason": rate_by("mi, reason", "upstream_errors_total"),
    }
    for title, pattern in expected.items():
        assert title in queries, f"no panel {title!r}"
        assert re.fullmatch(pattern, queries[title]), (title, queries[title])


def test_dashboard_shows_broker_sources() -> None:
    """The broker series (issue 13) have their panels, by source and reason."""
    queries: dict[str, list[str]] = {}
    for title, expr in panel_queries():
        queries.setdefault(title, []).append(expr)

    def rate_by(labels: str, metric: str) -> str:
        return (
            rf"sum by \({labels}\) \(rate\(event_datagram_amqp_{metric}"
            r"\{instance=~\"\$instance\"\}\[\$__rate_interval\]\)\)"
        )

    expected = {
        "Broker up": [r"max by \(source\) \(event_datagram_amqp_up\{[^}]*\}\)"],
        "Broker messages / s": [rate_by("source", "messages_total")],
        "Broker events raised / s": [rate_by("source", "events_raised_total")],
        "Broker rejections by reason": [rate_by("source, reason", "rejected_total")],
        "Broker queue messages": [
            r"max by \(source\) \(event_datagram_amqp_queue_messages\{[^}]*\}\)"
        ],
        "Broker reconnects and errors": [
            rate_by("source, reason", "errors_total"),
            rate_by("source", "reconnects_total"),
        ],
    }
    for title, patterns in expected.items():
        assert title in queries, f"no panel {title!r}"
        assert len(queries[title]) == len(patterns), (title, queries[title])
        for pattern, expr in zip(patterns, queries[title], strict=True):
            assert re.fullmatch(pattern, expr), (title, expr)
