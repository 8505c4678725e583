"""`event-datagram run` with its HTTP listeners closed: --web-config (TLS + basic
auth on the MI), [metrics] listen with a web config of its own, a bad web config
refused at start naming the key, and /health and /ready on both listeners."""

from __future__ import annotations

import base64
import http.client
import json
import re
import socket
import ssl
import subprocess
import sys
from pathlib import Path

from tests.helpers.mi import RunProc, processes
from tests.helpers.support import unique_instance
from tests.helpers.tls import PASSWORD, USER, TLSFiles, web_config

AUTH = {"Authorization": "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()}


def _config(tmp_path: Path, *extra: str) -> Path:
    lines = ['events = ["E_SAMPLE"]', "[engine]", "workers = 1", "pin = false",
             f'instance = "{unique_instance("http")}"', f'runtime_dir = "{tmp_path}"',
             "[state]", "enabled = false", "[mi]", 'http = "127.0.0.1:0"', 'datagram = ""',
             *extra]  # fmt: skip
    path = tmp_path / "run.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _get(
    url: str, path: str, context: ssl.SSLContext, headers: dict[str, str]
) -> tuple[int, bytes]:
    found = re.match(r"https://([\d.]+):(\d+)", url)
    assert found, url
    conn = http.client.HTTPSConnection(found[1], int(found[2]), timeout=10, context=context)
    try:
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_a_bad_web_config_at_start_is_a_clear_error_naming_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "web.yml"
    bad.write_text("basic_auth_user:\n  alice: x\n")
    done = subprocess.run(
        [sys.executable, "-m", "engine", "run", "--config", str(_config(tmp_path)),
         "--web-config", str(bad)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert f"web config error in {bad}" in done.stderr
    assert "`basic_auth_user`" in done.stderr and "Traceback" not in done.stderr


def test_tls_and_auth_on_the_mi_and_a_metrics_listener_of_its_own(tmp_path: Path) -> None:
    tls = TLSFiles.make(tmp_path)
    mi_web = web_config(tmp_path / "mi.yml", tls)
    metrics_web = web_config(tmp_path / "metrics.yml", tls, client_auth="VerifyClientCertIfGiven")
    config = _config(
        tmp_path, "[metrics]", 'listen = "127.0.0.1:0"', f'web_config = "{metrics_web}"'
    )
    context = ssl.create_default_context(cafile=str(tls.ca.path))
    with processes() as started:
        proc = RunProc("--config", str(config), "--web-config", str(mi_web))
        started.append(proc)
        mi = re.search(r"mi (https://\S+/mi)", proc.ready)
        metrics = re.search(r"metrics (https://\S+)/metrics", proc.ready)
        assert mi and metrics, proc.ready
        assert mi[1].rsplit(":", 1)[0] == metrics[1].rsplit(":", 1)[0]  # both on 127.0.0.1
        assert mi[1] != metrics[1] + "/mi"
        # The MI: 401 without credentials, answered with them.
        host, port = re.match(r"https://([\d.]+):(\d+)", mi[1]).groups()  # type: ignore[union-attr]
        body = b'{"jsonrpc":"2.0","id":1,"method":"events_list"}'
        for headers, status in (({}, 401), (AUTH, 200)):
            conn = http.client.HTTPSConnection(host, int(port), timeout=10, context=context)
            conn.request("POST", "/mi", body, {"Content-Type": "application/json", **headers})
            response = conn.getresponse()
            assert response.status == status
            if status == 200:
                assert json.loads(response.read())["result"]["Events"][0]["name"] == "E_SAMPLE"
            conn.close()
        # /metrics is on the metrics listener only; /health and /ready on both.
        assert _get(mi[1], "/metrics", context, AUTH)[0] == 404
        status, text = _get(metrics[1], "/metrics", context, AUTH)
        assert status == 200 and b"event_datagram_workers_alive 1.0" in text
        assert _get(metrics[1], "/metrics", context, {})[0] == 401
        for url in (mi[1], metrics[1]):
            assert _get(url, "/health", context, AUTH) == (200, b"OK\n")
            assert _get(url, "/ready", context, AUTH) == (200, b"ready\n")
        assert proc.stop() == 0
    assert "beyond loopback" not in proc.stderr  # both on loopback: no warning


def test_ready_names_an_upstream_that_is_not_subscribed(tmp_path: Path) -> None:
    closed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    closed.bind(("127.0.0.1", 0))
    upstream = f"udp:127.0.0.1:{closed.getsockname()[1]}"
    closed.close()  # nothing answers there: the upstream never subscribes
    config = _config(tmp_path)
    with processes() as started:
        proc = RunProc(
            "--config", str(config), "--ingest", "udp:127.0.0.1:0", "--upstream", upstream
        )
        started.append(proc)
        assert proc.http is not None
        host, port = re.match(r"http://([\d.]+):(\d+)", proc.http).groups()  # type: ignore[union-attr]
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        try:
            conn.request("GET", "/ready")
            response = conn.getresponse()
            body = response.read()
            assert response.status == 503, body
            assert f"upstream {upstream} is not subscribed".encode() in body
            conn.request("GET", "/health")
            assert conn.getresponse().read() == b"OK\n"
        finally:
            conn.close()
        assert proc.stop() == 0
