"""The Grafana dashboard's files, read as they are (a real Prometheus evaluates its
queries in system/test_prometheus.py)."""

from __future__ import annotations

import re

from tests.dashboard_support import DASHBOARD, DATASOURCE, PROVIDER, dashboard, panel_queries


def test_dashboard_is_provisionable_as_is() -> None:
    """Fixed uids, the datasource by uid, no import placeholders, rates over $__rate_interval."""
    text = DASHBOARD.read_text()
    board = dashboard()
    assert board["uid"] == "event-datagram"
    assert "${DS_" not in text and "__inputs" not in board
    uid = re.search(r"^\s*uid:\s*(\S+)", DATASOURCE.read_text(), re.MULTILINE)
    assert uid is not None and uid.group(1) == "event-datagram-prom"
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
        assert panel["datasource"] == {"type": "prometheus", "uid": "event-datagram-prom"}
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "event-datagram-prom"
    assert len(titles) == len(set(titles)), "panel titles must be unique"
    queries = panel_queries()
    assert len(queries) >= 15
    for title, expr in queries:
        windows = re.findall(r"\[([^\]]+)\]", expr)
        assert all(w == "$__rate_interval" for w in windows), f"{title}: fixed window in {expr}"
        assert 'instance=~"$instance"' in expr, f"{title}: not filtered by $instance"
    for variable in board["templating"]["list"]:
        assert variable["datasource"]["uid"] == "event-datagram-prom"
