"""Click-redirect benchmark: ``wrk`` on one valid click URL of the relay, and on nginx.

    .venv/bin/python bench/click_redirect.py --connections 64 --duration 10 --nginx

Starts smtp-sink (capturing) as upstream and the relay (``python -m txmail_relay``, file
mode, tracking on, the default machine-click rules) as a subprocess, sends one tracked
message through the send API, takes its first click link from the captured message (so the
click belongs to a recorded send and every hit is a real write: an event, counters, a
unique), then runs ``wrk -t2 -c64 --latency`` on it. Measured: requests/s, p50/p99 latency
(wrk's), the relay's RSS (``/proc/PID/status`` VmRSS, sampled every 0.2 s) before, at most
and after, and the drain: the time from wrk's end until the records hold every click the
relay answered (``events`` rows of type CLICK, read from the SQLite file, plus the hits the
relay counted as dropped, ``txmail_relay_tracking_dropped_total``). ``--nginx`` also runs
the same wrk on nginx's ``return 302`` (a private config on a loopback port, as many workers
as cores). ``--rev REV`` runs the relay of a git revision (``git archive``) instead of the
work tree; ``--profile PATH`` records the relay with py-spy during the wrk run (raw format).

For bench/relay_vs_postfix.py: ``measure_relay(...)`` and ``measure_nginx(...)`` return the
figures as dicts. A benchmark, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from bench.common import OneLineParser, at_least, write_credentials  # noqa: E402

from peers import SMTP_SINK, Sink, free_port, make_authority  # noqa: E402
from relay.relaykit import (  # noqa: E402
    BROWSER,
    HOSTNAME,
    bearer,
    http,
    parsed,
    smarthost_relay,
    template_doc,
    tracking_keys_file,
    wait_for,
)
from txmail_relay.http.api import SEND_PATH  # noqa: E402

POSITIVE = at_least(1)
PROG = "click_redirect.py"
EMAIL_ID = 7
TARGET = "https://shop.example.com/landing"
CLICK_LINK = re.compile(r"https://t\.example\.com(/c/[A-Za-z0-9_-]+)")
NGINX = "/usr/sbin/nginx"
WRK = "/usr/bin/wrk"
CLICK_TYPE = "CLICK"  # records/model.py EventType.CLICK


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = OneLineParser(
        prog=PROG, description="wrk on the relay's click redirect (and nginx's)."
    )
    parser.add_argument("--connections", type=POSITIVE, default=64, help="wrk -c")
    parser.add_argument("--threads", type=POSITIVE, default=2, help="wrk -t")
    parser.add_argument("--duration", type=POSITIVE, default=10, help="wrk -d, seconds")
    parser.add_argument("--runs", type=POSITIVE, default=1, help="wrk runs on one relay")
    parser.add_argument("--nginx", action="store_true", help="also measure nginx's return 302")
    parser.add_argument("--rev", help="run the relay of this git revision (default: work tree)")
    parser.add_argument("--profile", type=Path, help="py-spy raw profile of the relay to PATH")
    parser.add_argument("--json", type=Path, help="write the figures as JSON to PATH")
    return parser.parse_args(argv)


# -- wrk ---------------------------------------------------------------------------------------


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    found = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if found is None:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(found.group(1)) * _UNITS[found.group(2)]


def run_wrk(url: str, *, threads: int, connections: int, duration: int) -> dict[str, Any]:
    """One wrk run: requests/s, p50/p99 in ms, requests, non-2xx/3xx answers, errors."""
    out = subprocess.run(
        [WRK, f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--latency", url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    figures: dict[str, Any] = {"load": os.getloadavg()[0]}
    for line in out.splitlines():
        words = line.split()
        if line.startswith("Requests/sec:"):
            figures["rps"] = float(words[1])
        elif len(words) == 2 and words[0] in {"50%", "99%"}:
            figures[f"p{words[0].rstrip('%')}_ms"] = _ms(words[1])
        elif "requests in" in line:
            figures["requests"] = int(words[0])
        elif line.strip().startswith("Non-2xx or 3xx responses:"):
            figures["bad_answers"] = int(words[-1])
        elif line.strip().startswith("Socket errors:"):
            figures["socket_errors"] = line.split(":", 1)[1].strip()
    return figures


# -- the relay ---------------------------------------------------------------------------------


@dataclass
class RelayUnderTest:
    process: subprocess.Popen[bytes]
    url: str  # a valid click URL of a recorded send
    metrics_port: int
    db: Path

    def metric(self, name: str, labels: str = "") -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics") as reply:
            text = reply.read().decode()
        wanted = f"{name}{{{labels}}}" if labels else name
        for line in text.splitlines():
            if line.startswith(wanted + " "):
                return float(line.split()[1])
        return 0.0

    def answered(self) -> float:
        return self.metric("txmail_relay_tracking_requests_total", 'kind="click",result="valid"')

    def dropped(self) -> float:
        return self.metric("txmail_relay_tracking_dropped_total", 'kind="click"')

    def recorded(self) -> int:
        with contextlib.closing(sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)) as db:
            db.execute("PRAGMA busy_timeout = 5000")
            row = db.execute("SELECT count(*) FROM events WHERE type = ?", (CLICK_TYPE,)).fetchone()
        return int(row[0])

    def rss_kib(self) -> int:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        found = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
        return int(found.group(1)) if found else 0


def _git(*args: str) -> str:
    out = subprocess.run(
        ["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise SystemExit(f"{PROG}: git {' '.join(args)}: {out.stderr.strip()}")
    return out.stdout.strip()


def _source(rev: str | None, work: Path) -> tuple[dict[str, str], str]:
    """The relay's environment (PYTHONPATH first on ``rev``'s relay/) and a description."""
    env = dict(os.environ)
    if rev is None:
        dirty = " (with uncommitted changes)" if _git("status", "--porcelain", "relay") else ""
        return env, f"work tree at {_git('rev-parse', '--short', 'HEAD')}{dirty}"
    commit = _git("rev-parse", "--verify", f"{rev}^{{commit}}")
    tree = work / "source"
    tree.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", commit, "relay"], capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(tree / "relay"), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])]
    )
    return env, f"{commit[:12]} ({_git('log', '-1', '--format=%s', commit)[:60]})"


@contextlib.contextmanager
def relay_with_a_click(rev: str | None = None) -> Iterator[tuple[RelayUnderTest, str]]:
    """A relay in file mode with tracking on, and a valid click URL of a message it sent
    (and recorded); yields it with a description of the code it runs."""
    work = Path(tempfile.mkdtemp(prefix="txmail-click-"))
    sink = Sink()
    relay: subprocess.Popen[bytes] | None = None
    try:
        env, source = _source(rev, work)
        password = secrets.token_urlsafe(32)
        write_credentials(work / "creds.json", "bench", password)
        tls = make_authority(work / "tls", "txmail bench", HOSTNAME)
        ports = {name: free_port() for name in ("submission", "tracking", "api", "metrics")}
        html = f'<p>Hi</p><p><a href="{TARGET}">go</a></p>'
        settings = {
            "relay": {
                **smarthost_relay(sink.port),
                "tracking": {"baseURL": "https://t.example.com"},
            },
            "credentialFiles": ["creds.json"],
            "listen": {"host": "127.0.0.1", "submissions": None, **ports},
            "tls": {"certFile": str(tls.cert_file), "keyFile": str(tls.key_file)},
            "spool": {"directory": str(work / "spool")},
            "limits": {"spoolMinFreeBytes": 0},
            "templates": [
                template_doc(
                    EMAIL_ID, track=True, html=html, subject="Hi", text="Hi\nEND-OF-MESSAGE\n"
                )
            ],
            "trackingKeysFile": str(tracking_keys_file(work, 1)),
            "logging": {"level": "WARNING"},
        }
        (work / "relay.yaml").write_text(yaml.safe_dump(settings))
        relay = subprocess.Popen(
            [sys.executable, "-m", "txmail_relay", "--config", str(work / "relay.yaml")],
            env=env,
            stdin=subprocess.DEVNULL,
        )

        def listening() -> bool:
            if relay is not None and relay.poll() is not None:
                raise SystemExit(f"{PROG}: the relay exited with status {relay.returncode}")
            try:
                return http(ports["metrics"], "GET", "/readyz").status == 200
            except OSError:
                return False

        wait_for(listening, 30, "the relay to be ready", every=0.1)
        doc = {"emailId": EMAIL_ID, "message": {"to": "ada@dest.test"}}
        reply = http(ports["api"], "POST", SEND_PATH, body=doc, headers=bearer(password))
        if reply.status != 200:
            raise SystemExit(f"{PROG}: the send API answered {reply.status}: {reply.body!r}")
        captured = wait_for(sink.messages, 30, "the tracked message at smtp-sink")[0]
        found = CLICK_LINK.search(parsed(captured).get_body(("html",)).get_content())
        if found is None:
            raise SystemExit(f"{PROG}: no click link in the delivered message")
        yield (
            RelayUnderTest(
                relay,
                f"http://127.0.0.1:{ports['tracking']}{found.group(1)}",
                ports["metrics"],
                work / "spool" / "txmail.db",
            ),
            source,
        )
    finally:
        if relay is not None:
            relay.terminate()
            relay.wait(60)
        sink.stop()
        shutil.rmtree(work, ignore_errors=True)


class _RssSampler(threading.Thread):
    def __init__(self, relay: RelayUnderTest, every: float = 0.2) -> None:
        super().__init__(daemon=True)
        self._relay, self._every = relay, every
        self.samples: list[int] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self._every):
            self.samples.append(self._relay.rss_kib())


def _check_click(url: str) -> None:
    """One click answers 302 to the target (wrk counts a 302 as a success either way)."""
    import http.client  # noqa: PLC0415
    from urllib.parse import urlsplit  # noqa: PLC0415

    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=10)
    try:
        conn.request("GET", parts.path, headers={"User-Agent": BROWSER})
        response = conn.getresponse()
        response.read()
        if response.status != 302 or response.getheader("Location") != TARGET:
            raise SystemExit(f"{PROG}: {url} answered {response.status}, not a redirect")
    finally:
        conn.close()


def measure_relay(
    relay: RelayUnderTest,
    *,
    threads: int = 2,
    connections: int = 64,
    duration: int = 10,
    profile: Path | None = None,
    drain_timeout: float = 120.0,
) -> dict[str, Any]:
    """One wrk run on ``relay.url``; wrk's figures, RSS (KiB) and the drain time (s)."""
    _check_click(relay.url)
    rss_before = relay.rss_kib()
    sampler = _RssSampler(relay)
    sampler.start()
    spy = None
    if profile is not None:
        spy = subprocess.Popen(
            [str(ROOT / ".venv/bin/py-spy"), "record", "-f", "raw", "-o", str(profile),
             "-d", str(duration), "-p", str(relay.process.pid)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
    figures = run_wrk(relay.url, threads=threads, connections=connections, duration=duration)
    stopped = time.monotonic()
    last = -1.0
    while True:
        answered = relay.answered()
        if relay.recorded() + relay.dropped() >= answered and answered == last:
            break
        if time.monotonic() - stopped > drain_timeout:
            figures["drain_timed_out"] = True
            break
        last = answered
        time.sleep(0.05)
    figures["drain_s"] = round(time.monotonic() - stopped, 2)
    sampler.done.set()
    sampler.join()
    if spy is not None:
        spy.wait(60)
    figures.update(
        rss_before_mib=round(rss_before / 1024, 1),
        rss_max_mib=round(max(sampler.samples or [0]) / 1024, 1),
        rss_after_mib=round(relay.rss_kib() / 1024, 1),
        answered=int(relay.answered()),
        recorded=relay.recorded(),
        dropped=int(relay.dropped()),
    )
    return figures


# -- nginx -------------------------------------------------------------------------------------


@contextlib.contextmanager
def nginx_302() -> Iterator[str]:
    """nginx answering ``return 302`` on a loopback port (private prefix and config)."""
    prefix = Path(tempfile.mkdtemp(prefix="txmail-nginx-"))
    port = free_port()
    (prefix / "logs").mkdir()
    user = "user nobody nogroup;" if os.geteuid() == 0 else ""
    temp = prefix / "temp"  # nginx's own, in its private prefix
    (prefix / "nginx.conf").write_text(
        f"""{user}
worker_processes auto;
pid {prefix}/nginx.pid;
error_log {prefix}/logs/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {temp};
    proxy_temp_path {temp};
    fastcgi_temp_path {temp};
    uwsgi_temp_path {temp};
    scgi_temp_path {temp};
    server {{
        listen 127.0.0.1:{port};
        location / {{ return 302 {TARGET}; }}
    }}
}}
"""
    )
    process = subprocess.Popen(
        [NGINX, "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-g", "daemon off;"],
        stdin=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: _answers(port), 10, "nginx to listen", every=0.05)
        yield f"http://127.0.0.1:{port}/c/token"
    finally:
        process.terminate()
        process.wait(10)
        shutil.rmtree(prefix, ignore_errors=True)


def _answers(port: int) -> bool:
    try:
        return http(port, "GET", "/c/token").status == 302
    except OSError:
        return False


def measure_nginx(*, threads: int = 2, connections: int = 64, duration: int = 10) -> dict[str, Any]:
    with nginx_302() as url:
        return run_wrk(url, threads=threads, connections=connections, duration=duration)


# -- main --------------------------------------------------------------------------------------


def _line(name: str, f: dict[str, Any]) -> str:
    text = (
        f"{name:<7} {f.get('rps', 0):>9.0f} req/s  p50 {f.get('p50_ms', 0):6.2f} ms"
        f"  p99 {f.get('p99_ms', 0):7.2f} ms  load {f['load']:.2f}"
    )
    if "rss_max_mib" in f:
        text += (
            f"  RSS {f['rss_before_mib']:.0f}/{f['rss_max_mib']:.0f}/{f['rss_after_mib']:.0f} MiB"
            f" (before/max/after)  drain {f['drain_s']:.2f} s"
            f"  answered {f['answered']} recorded {f['recorded']} dropped {f['dropped']}"
        )
    if f.get("bad_answers"):
        text += f"  non-3xx {f['bad_answers']}"
    return text


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    for tool in (SMTP_SINK, WRK, *((NGINX,) if args.nginx else ())):
        if not Path(tool).exists():
            print(f"{PROG}: {tool} is missing", file=sys.stderr)
            return 2
    shape = {"threads": args.threads, "connections": args.connections, "duration": args.duration}
    results: dict[str, Any] = {"wrk": shape, "relay": []}
    with relay_with_a_click(args.rev) as (relay, source):
        results["source"] = source
        print(f"relay: {source}; wrk -t{args.threads} -c{args.connections} -d{args.duration}s")
        for run in range(args.runs):
            profile = args.profile if run == 0 else None
            figures = measure_relay(relay, profile=profile, **shape)
            results["relay"].append(figures)
            print(_line("relay", figures), flush=True)
    if args.nginx:
        results["nginx"] = measure_nginx(**shape)
        print(_line("nginx", results["nginx"]))
        best = max(r.get("rps", 0) for r in results["relay"])
        print(f"relay/nginx: {best / results['nginx']['rps']:.3f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
