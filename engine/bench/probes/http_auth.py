"""What TLS and basic auth cost the HTTP listeners (issue 17's targets), run once by hand:

    python -m engine.bench.probes.http_auth [--seconds 3] [--rounds 3]

One engine (one worker, one subscriber that never reads), three MI listeners on
loopback: plain, basic auth (bcrypt cost 10, as htpasswd -B makes), TLS + basic
auth. A client process of its own (the engine's threads and the client's never
share a GIL) drives each listener in turn, round after round so the machine's
noise falls on all three alike: ``raise_event`` on one keep-alive connection
(requests/s), then ``GET /metrics`` (mean seconds per scrape, keep-alive).
Printed as JSON, with the ratios the issue asks for.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RAISE = b'{"jsonrpc":"2.0","id":1,"method":"raise_event","params":["E_BENCH",{"n":1}]}'
USER, PASSWORD = "bench", "bench-password"


def _client(url: str, ca: str, mode: str, seconds: float) -> dict[str, float]:
    """Requests/s of raise_event, or seconds per /metrics scrape, on one connection."""
    scheme, rest = url.split("://", 1)
    host, port = rest.split("/", 1)[0].rsplit(":", 1)
    conn: http.client.HTTPConnection
    if scheme == "https":
        context = ssl.create_default_context(cafile=ca)
        conn = http.client.HTTPSConnection(host, int(port), timeout=10, context=context)
    else:
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
    token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    headers = {"Content-Type": "application/json", "Authorization": f"Basic {token}"}
    done = 0
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        if mode == "raise":
            conn.request("POST", "/mi", RAISE, headers)
        else:
            conn.request("GET", "/metrics", headers=headers)
        response = conn.getresponse()
        response.read()
        if response.status != 200:
            raise SystemExit(f"{url}: HTTP {response.status}")
        done += 1
    took = time.perf_counter() - start
    conn.close()
    return {"per_s": done / took, "s_per": took / done}


def _measure(url: str, ca: str, mode: str, seconds: float) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-m", "engine.bench.probes.http_auth", "--client", url, "--ca", ca,
         "--mode", mode, "--seconds", str(seconds)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    result: dict[str, float] = json.loads(out.stdout)
    return result


def _files(directory: Path) -> tuple[Path, Path, str]:
    """A self-signed certificate for 127.0.0.1 (openssl), and two web configs."""
    import bcrypt

    key, cert = directory / "k.pem", directory / "c.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=bench",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(10)).decode()
    users = f"basic_auth_users:\n  {USER}: {hashed}\n"
    auth = directory / "auth.yml"
    auth.write_text(users)
    tls = directory / "tls.yml"
    tls.write_text(f"tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n" + users)
    return auth, tls, str(cert)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--client", help=argparse.SUPPRESS)
    parser.add_argument("--ca", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.client:
        print(json.dumps(_client(args.client, args.ca, args.mode, args.seconds)))
        return 0

    from engine.mi.server import HTTPServer
    from engine.mi.webconfig import WebConfig
    from engine.options import EngineOptions
    from engine.producer import Engine

    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    options = EngineOptions(workers=1, pin=False, instance=f"httpauth{os.getpid()}")
    engine = Engine(options, events=["E_BENCH"])
    engine.start()
    servers: dict[str, HTTPServer] = {}
    with tempfile.TemporaryDirectory() as tmp:
        auth, tls, ca = _files(Path(tmp))
        try:
            engine.subscribe("E_BENCH", f"udp:127.0.0.1:{sink.getsockname()[1]}", None)
            for name, web in (("plain", None), ("auth", auth), ("tls", tls)):
                config = WebConfig(str(web)) if web is not None else None
                servers[name] = HTTPServer(engine, ("127.0.0.1", 0), web=config)
                servers[name].start()
            results: dict[str, dict[str, list[float]]] = {
                name: {"raise": [], "metrics": []} for name in servers
            }
            for _ in range(args.rounds):
                for mode in ("raise", "metrics"):
                    for name, server in servers.items():
                        got = _measure(server.url, ca, mode, args.seconds)
                        key = "per_s" if mode == "raise" else "s_per"
                        results[name][mode].append(got[key])
        finally:
            for server in servers.values():
                server.stop()
            engine.stop()
            sink.close()

    def median(values: list[float]) -> float:
        return sorted(values)[len(values) // 2]

    summary: dict[str, Any] = {
        name: {
            "raise_event_per_s": round(median(r["raise"])),
            "metrics_scrape_ms": round(1000 * median(r["metrics"]), 3),
        }
        for name, r in results.items()
    }
    plain, auth_r, tls_r = summary["plain"], summary["auth"], summary["tls"]
    summary["ratios"] = {
        "auth_raise_vs_plain (target >= 0.9)": round(
            auth_r["raise_event_per_s"] / plain["raise_event_per_s"], 3
        ),
        "tls_raise_vs_plain (target >= 0.7)": round(
            tls_r["raise_event_per_s"] / plain["raise_event_per_s"], 3
        ),
        "tls_scrape_vs_plain (target <= 1.5)": round(
            tls_r["metrics_scrape_ms"] / plain["metrics_scrape_ms"], 3
        ),
    }
    summary["runs"] = {name: r for name, r in results.items()}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
