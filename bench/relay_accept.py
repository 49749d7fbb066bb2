"""Accept-rate benchmark of the relay: N clients over STARTTLS+AUTH, spool with fdatasync.

    .venv/bin/python bench/relay_accept.py --clients 32 --messages 200 --size 4096

Starts smtp-sink (no capture) as upstream and the relay as a subprocess, submits
``clients x messages`` messages over persistent connections, and prints messages/s
accepted (every 250 is durable), plus the spool's group-commit figures from /metrics.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aiosmtplib
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "relay"))

from conftest import TLSFiles, credential, tls_files  # noqa: E402


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_listening(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


async def _client(
    port: int, context: ssl.SSLContext, password: str, count: int, body: bytes
) -> None:
    smtp = aiosmtplib.SMTP(
        hostname="127.0.0.1", port=port, start_tls=True, tls_context=context, timeout=60
    )
    await smtp.connect()
    await smtp.login("bench", password)
    for _ in range(count):
        await smtp.sendmail("bench@example.com", ["user@dest.test"], body)
    await smtp.quit()


async def _run(
    port: int, context: ssl.SSLContext, password: str, args: argparse.Namespace
) -> float:
    body = (
        b"From: bench@example.com\r\nTo: user@dest.test\r\nSubject: bench\r\n\r\n"
        + b"x" * 76
        + b"\r\n"
    ) * max(1, args.size // 80)
    started = time.perf_counter()
    await asyncio.gather(
        *(_client(port, context, password, args.messages, body) for _ in range(args.clients))
    )
    return time.perf_counter() - started


class _Factory:
    def __init__(self, base: Path) -> None:
        self._base = base

    def mktemp(self, name: str) -> Path:
        path = self._base / name
        path.mkdir()
        return path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--spool", type=Path, help="spool directory (default: a temp dir)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="txmail-bench-"))
    tls: TLSFiles = tls_files.__wrapped__(_Factory(work))  # type: ignore[attr-defined]
    password = secrets.token_urlsafe(32)
    (work / "creds.json").write_text(
        json.dumps([json.loads(credential("bench", password).to_json())])
    )
    sink_port, port, metrics_port = _port(), _port(), _port()
    settings = {
        "relay": {
            "dedicatedIP": "127.0.0.1",
            "address": "127.0.0.1",
            "hostname": "relay.test",
            "domains": ["example.com"],
            "delivery": {
                "mode": "Smarthost",
                "smarthost": {"host": "127.0.0.1", "port": sink_port, "tls": "None"},
            },
        },
        "credentialFiles": ["creds.json"],
        "listen": {
            "host": "127.0.0.1",
            "submission": port,
            "submissions": None,
            "tracking": None,
            "api": None,
            "metrics": metrics_port,
        },
        "tls": {"certFile": str(tls.cert_file), "keyFile": str(tls.key_file)},
        "spool": {"directory": str(args.spool or work / "spool")},
        "limits": {"spoolMinFreeBytes": 0},
        "logging": {"level": "WARNING"},
    }
    (work / "relay.yaml").write_text(yaml.safe_dump(settings))
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    sink = subprocess.Popen(["/usr/sbin/smtp-sink", *user, f"127.0.0.1:{sink_port}", "256"])
    relay = subprocess.Popen(
        [
            sys.executable,
            *os.environ.get("BENCH_PY_ARGS", "").split(),
            "-m",
            "txmail_relay",
            "--config",
            str(work / "relay.yaml"),
        ]
    )
    try:
        _wait_listening(port)
        context = ssl.create_default_context(cafile=str(tls.ca_file))
        context.check_hostname = False
        elapsed = asyncio.run(_run(port, context, password, args))
        total = args.clients * args.messages
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics") as response:
            metrics = response.read().decode()
        figures = {
            line.split()[0]: float(line.split()[1])
            for line in metrics.splitlines()
            if line.startswith(("txmail_relay_spool_sync_seconds_", "txmail_relay_spool_batch_"))
            and ("_sum" in line or "_count" in line)
        }
        commits = figures["txmail_relay_spool_sync_seconds_count"]
        print(
            f"{total} messages of ~{args.size} B from {args.clients} clients in {elapsed:.2f} s: "
            f"{total / elapsed:.0f} msgs/s accepted; {commits:.0f} group commits "
            f"(avg {figures['txmail_relay_spool_batch_records_sum'] / commits:.1f} records, "
            f"avg {1000 * figures['txmail_relay_spool_sync_seconds_sum'] / commits:.2f} ms)"
        )
    finally:
        relay.terminate()
        relay.wait(30)
        sink.terminate()
        sink.wait(10)


if __name__ == "__main__":
    main()
