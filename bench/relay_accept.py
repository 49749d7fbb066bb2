"""Accept-rate benchmark of the relay: N clients over STARTTLS+AUTH, spool with fdatasync.

    .venv/bin/python bench/relay_accept.py --clients 32 --messages 200 --size 4096

Starts smtp-sink (no capture) as upstream and the relay (``python -m txmail_relay``, file
mode) as a subprocess, submits ``clients x messages`` messages over persistent connections,
and prints messages/s accepted (every 250 is durable), plus the spool's group-commit figures
from /metrics. ``BENCH_PY_ARGS`` adds interpreter arguments to the relay (``-X importtime``).
A benchmark, not a test: nothing is asserted, the figures go to docs/performance.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiosmtplib
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from bench.common import OneLineParser, at_least, write_credentials  # noqa: E402

from peers import SMTP_SINK, free_port, make_authority  # noqa: E402
from relay.relaykit import HOSTNAME, smarthost_relay, submission_only  # noqa: E402

POSITIVE = at_least(1)
PROG = "relay_accept.py"


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = OneLineParser(
        prog=PROG,
        description="Accept rate of the relay: clients x messages over STARTTLS+AUTH into a "
        "durable spool (smtp-sink upstream).",
    )
    parser.add_argument("--clients", type=POSITIVE, default=32, help="parallel SMTP sessions")
    parser.add_argument("--messages", type=POSITIVE, default=200, help="messages per session")
    parser.add_argument("--size", type=POSITIVE, default=4096, help="message size in bytes")
    parser.add_argument("--spool", type=Path, help="spool directory (default: a temporary one)")
    return parser.parse_args(argv)


def _wait_listening(port: int, relay: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if relay.poll() is not None:
            raise SystemExit(f"{PROG}: the relay exited with status {relay.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"{PROG}: the relay does not listen on {port} after {timeout:.0f} s")


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


async def _submit(
    port: int, context: ssl.SSLContext, password: str, args: argparse.Namespace
) -> float:
    line = b"x" * 78 + b"\r\n"
    body = b"From: bench@example.com\r\nTo: user@dest.test\r\nSubject: bench\r\n\r\n" + line * max(
        1, args.size // len(line)
    )
    started = time.perf_counter()
    await asyncio.gather(
        *(_client(port, context, password, args.messages, body) for _ in range(args.clients))
    )
    return time.perf_counter() - started


def _settings(
    work: Path, spool: Path, sink_port: int, port: int, metrics_port: int
) -> tuple[dict[str, Any], Path]:
    """The relay's settings file (file mode) and the CA file its certificate chains to."""
    tls = make_authority(work / "tls", "txmail bench", HOSTNAME)
    return {
        "relay": smarthost_relay(sink_port),
        "credentialFiles": ["creds.json"],
        "listen": {"host": "127.0.0.1", **submission_only(port), "metrics": metrics_port},
        "tls": {"certFile": str(tls.cert_file), "keyFile": str(tls.key_file)},
        "spool": {"directory": str(spool)},
        "limits": {"spoolMinFreeBytes": 0},
        "logging": {"level": "WARNING"},
    }, tls.ca_file


def _spool_figures(metrics_port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {
        line.split()[0]: float(line.split()[1])
        for line in text.splitlines()
        if line.startswith(("txmail_relay_spool_sync_seconds_", "txmail_relay_spool_batch_"))
        and ("_sum" in line or "_count" in line)
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    if not Path(SMTP_SINK).exists():
        print(f"{PROG}: {SMTP_SINK} is missing (Postfix's smtp-sink; make debs)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="txmail-bench-"))
    password = secrets.token_urlsafe(32)
    write_credentials(work / "creds.json", "bench", password)
    sink_port, port, metrics_port = free_port(), free_port(), free_port()
    settings, ca_file = _settings(work, args.spool or work / "spool", sink_port, port, metrics_port)
    (work / "relay.yaml").write_text(yaml.safe_dump(settings))
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    sink = subprocess.Popen([SMTP_SINK, *user, f"127.0.0.1:{sink_port}", "256"])
    py_args = os.environ.get("BENCH_PY_ARGS", "").split()
    relay = subprocess.Popen(
        [sys.executable, *py_args, "-m", "txmail_relay", "--config", str(work / "relay.yaml")]
    )
    try:
        _wait_listening(port, relay)
        context = ssl.create_default_context(cafile=str(ca_file))
        context.check_hostname = False  # the certificate names relay.test, we dial 127.0.0.1
        elapsed = asyncio.run(_submit(port, context, password, args))
        total = args.clients * args.messages
        figures = _spool_figures(metrics_port)
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
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
