"""The Grafana dashboard and its provisioning files, as shipped in grafana/."""

from __future__ import annotations

import json
from typing import Any

from tests.support import REPO

GRAFANA = REPO / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "event-datagram.json"
DATASOURCE = GRAFANA / "provisioning" / "datasources" / "prometheus.yaml"
PROVIDER = GRAFANA / "provisioning" / "dashboards" / "event-datagram.yaml"


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def panel_queries() -> list[tuple[str, str]]:
    """(panel title, expr) of every target of every panel, rows included."""
    out = []
    stack = list(dashboard()["panels"])
    while stack:
        panel = stack.pop(0)
        stack.extend(panel.get("panels", []))
        out += [(panel["title"], t["expr"]) for t in panel.get("targets", [])]
    return out
