"""The Grafana dashboard, its provisioning files and the alert rules, as shipped in grafana/."""

from __future__ import annotations

import json
import re
from typing import Any

from tests.helpers.support import REPO

GRAFANA = REPO / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "event-datagram.json"
DATASOURCE = GRAFANA / "provisioning" / "datasources" / "prometheus.yaml"
PROVIDER = GRAFANA / "provisioning" / "dashboards" / "event-datagram.yaml"
RULES = GRAFANA / "alerts" / "event-datagram.rules.yml"


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


def rule_selectors() -> set[str]:
    """Every series selector (`name{labels}`) the alert rules' expressions read."""
    exprs = re.findall(r"expr: (?:>-\n)?((?:.+\n)+?)\s+(?:for|labels):", RULES.read_text())
    return {m for e in exprs for m in re.findall(r"\b(?:event_datagram_\w+|up)\{[^}]*\}", e)}
