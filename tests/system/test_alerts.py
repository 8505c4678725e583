"""The alert rules shipped in grafana/alerts/, checked by Prometheus's own promtool:
`promtool check rules` (syntax, PromQL, templates) and `promtool test rules`
(alerts.test.yml: input series that fire each alert, and healthy ones that do not).

promtool comes with Debian's `prometheus` package (`make test` installs it as
root). Where it is missing the tests FAIL with the command to install it; set
EVENT_DATAGRAM_SKIP_PROMETHEUS=1 to skip them knowingly (never honoured in CI).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers.dashboard import RULES, rule_selectors
from tests.helpers.support import REPO

TESTS = Path(__file__).with_name("alerts.test.yml")
# Series the rules use that engine/metrics.py does not define: Prometheus's own
# `up`, and the reload gauge the reload code exports (issue 18, item 2).
NOT_OURS = {"up", "event_datagram_config_last_reload_successful"}


def promtool() -> str:
    found = shutil.which("promtool") or (
        "/usr/bin/promtool" if os.access("/usr/bin/promtool", os.X_OK) else None
    )
    if found:
        return found
    in_ci = os.environ.get("CI", "").lower() in ("1", "true", "yes")
    if os.environ.get("EVENT_DATAGRAM_SKIP_PROMETHEUS") == "1" and not in_ci:
        pytest.skip("EVENT_DATAGRAM_SKIP_PROMETHEUS=1: the promtool checks were skipped")
    pytest.fail(
        "promtool is not installed (Debian/Ubuntu, as root: apt-get install -y "
        "--no-install-recommends prometheus); to skip knowingly (not in CI): "
        "EVENT_DATAGRAM_SKIP_PROMETHEUS=1",
        pytrace=False,
    )


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args], capture_output=True, text=True, cwd=cwd, timeout=120, check=False
    )


def alert_names() -> list[str]:
    return re.findall(r"^\s*- alert: (\w+)$", RULES.read_text(), re.MULTILINE)


def test_rules_pass_promtool_check() -> None:
    done = run("check", "rules", str(RULES), cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(alert_names())} rules found" in done.stdout


def test_rules_unit_tests_pass() -> None:
    done = run("test", "rules", TESTS.name, cwd=TESTS.parent)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_every_alert_is_tested_firing_and_quiet() -> None:
    """Each alert has a case where it fires (exp_alerts with entries) and one where it does not."""
    text = TESTS.read_text()
    cases = re.findall(r"alertname: (\w+)\n\s+exp_alerts:( \[\])?", text)
    names = alert_names()
    assert len(names) >= 10 and len(set(names)) == len(names)
    for name in names:
        kinds = {quiet == " []" for alert, quiet in cases if alert == name}
        assert kinds == {True, False}, f"{name}: firing and quiet cases wanted, got {kinds}"


def test_rules_use_metrics_the_engine_exports() -> None:
    """Every series a rule reads is one engine/metrics.py defines (no typo in a name)."""
    source = (REPO / "engine" / "metrics.py").read_text()
    defined = {"event_datagram_" + n for n in re.findall(r'"([a-z_]+)"', source)}
    used = {selector.partition("{")[0] for selector in rule_selectors()}
    assert {"up", "event_datagram_upstream_up", "event_datagram_amqp_up"} <= used
    assert used - NOT_OURS <= defined, sorted(used - NOT_OURS - defined)


def test_a_broken_rule_fails_its_unit_test(tmp_path: Path) -> None:
    """The unit tests can fail: a send-failure threshold of 50 % no longer fires at 17 %."""
    rules = RULES.read_text()
    assert rules.count(") > 0.05") == 1
    (tmp_path / "rules.yml").write_text(rules.replace(") > 0.05", ") > 0.5"))
    tests = TESTS.read_text().replace("../../grafana/alerts/event-datagram.rules.yml", "rules.yml")
    (tmp_path / "tests.yml").write_text(tests)
    done = run("test", "rules", "tests.yml", cwd=tmp_path)
    assert done.returncode != 0
    assert "alertname: EventDatagramSendFailuresRising" in done.stdout + done.stderr
