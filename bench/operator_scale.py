"""Operator at scale: N SmtpTokens against a real control plane, the operator a process of its own.

    .venv/bin/python bench/operator_scale.py --tokens 100 1000 --json out.json

For each N, a fresh control plane as the k8s tier starts it (etcd, kube-apiserver,
kube-controller-manager; tests/cluster/controlplane.py), with an audit log of the requests
made by txmail's ServiceAccounts. txmail's CRDs, the chart's ServiceAccount and RBAC, the
operator (``python -m txmail_operator``) with a token of that ServiceAccount and the chart's
default intervals, one DedicatedIP, and its relay as a local process in kubernetes mode with
its own ServiceAccount (as tests/k8s/test_relay_live.py runs it). Then:

1. create   N SmtpTokens over 10 namespaces: seconds to all Ready, and to every token's
            digest published in the credential shards the relay reads;
2. steady   ``--steady`` seconds (120: one drift interval) in which nothing changes;
3. revoke   ``--sample`` tokens one at a time (passwordGeneration raised, or deleted: they
            alternate): seconds from the patch to the relay answering 535 to the old password;
4. restart  SIGTERM, start again, nothing changed: at least ``--restart-window`` seconds of
            requests, longer (up to ``--restart-max``) until the operator has settled;
5. revoke   restart again, and 5 s after the start revoke ``--sample`` other tokens at once.

Requests (per verb and resource) come from the audit log, so they are the operator's own.
Peak RSS (VmHWM) and CPU seconds come from /proc/<pid> of the operator. Output: a table on
stdout, and everything as JSON with ``--json PATH``. ``--rev REV`` runs the operator and the
relay of a git revision (``git archive``) instead of the work tree, so a tree under edit
cannot break a run. Every process it starts is stopped at the end, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import datetime as dt
import json
import math
import os
import platform
import random
import shutil
import signal
import smtplib
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn, cast

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.append(str(ROOT))  # bench.apiaudit, last: nothing else is looked up there

import yaml  # noqa: E402
from bench.apiaudit import AuditLog, Summary, apiserver_args, policy, summarise  # noqa: E402
from kubernetes import client, config, watch  # noqa: E402
from kubernetes.client.exceptions import ApiException  # noqa: E402

from cluster.controlplane import control_plane  # noqa: E402
from cluster.crds import install_crds  # noqa: E402
from k8s.kit import GROUP, VERSION, Kit  # noqa: E402
from k8s.operator_process import (  # noqa: E402
    OperatorProcess,
    install_operator_identity,
    service_account_token,
    token_kubeconfig,
)
from peers import RelayProcess, free_port, wait_for  # noqa: E402
from txmail_relay import contract as c  # noqa: E402

PROG = "operator_scale.py"
OPERATOR_NAMESPACE = "txmail-system"
NAMESPACES = 10
ADDRESS = "127.0.0.4"  # the relay's loopback address (the k8s tier uses 127.0.0.2)
IP_NAME = "bench"
# The chart's default intervals (the tests run the operator with 1 s; a benchmark must not).
OPERATOR_ENV = {
    "TXMAIL_DRIFT_CHECK_INTERVAL": "120",
    "TXMAIL_STATS_INTERVAL": "30",
    "TXMAIL_SEND_CHECK_INTERVAL": "5",
    "MALLOC_ARENA_MAX": "2",  # as the chart's Deployment sets it
}
CLK_TCK = os.sysconf("SC_CLK_TCK")
MB = 1024 * 1024

Obj = dict[str, Any]


class BenchError(RuntimeError):
    pass


# -- goals ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Goal:
    what: str
    limit: float
    unit: str

    def met(self, value: float | None) -> bool | None:
        return None if value is None else value <= self.limit

    def text(self) -> str:
        return f"<= {self.limit:g} {self.unit}"


READY_GOALS = {1000: 30.0, 5000: 150.0}
RSS_GOALS = {1000: 150.0, 5000: 300.0}
READS_PER_TOKEN_HOUR = 1.0
REVOKE_STEADY_P99 = 2.0
REVOKE_RESTART_P99 = 5.0


# -- /proc ---------------------------------------------------------------------------------


@dataclass
class ProcFigures:
    """Peak RSS (VmHWM, the kernel's own high-water mark) and CPU seconds of one process."""

    pid: int
    peak_rss: int = 0  # bytes
    rss: int = 0  # bytes, at the last sample
    cpu: float = 0.0  # user + system seconds, at the last sample

    def sample(self) -> bool:
        try:
            status = Path(f"/proc/{self.pid}/status").read_text()
            stat = Path(f"/proc/{self.pid}/stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            return False
        for line in status.splitlines():
            key, _, value = line.partition(":")
            if key == "VmHWM":
                self.peak_rss = max(self.peak_rss, int(value.split()[0]) * 1024)
            elif key == "VmRSS":
                self.rss = int(value.split()[0]) * 1024
        # After the command (it may hold spaces) come fields 3...; utime, stime are 14, 15.
        fields = stat.rpartition(")")[2].split()
        self.cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK
        return True


class ProcWatch:
    """Samples the current operator process every ``every`` seconds in a thread."""

    def __init__(self, pid_of: Callable[[], int | None], every: float = 0.5) -> None:
        self.pid_of, self.every = pid_of, every
        self.figures: dict[int, ProcFigures] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="proc-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.sample()

    def sample(self) -> ProcFigures | None:
        pid = self.pid_of()
        if pid is None:
            return None
        with self._lock:
            figures = self.figures.setdefault(pid, ProcFigures(pid))
            figures.sample()
            return dataclasses.replace(figures)  # a copy: the figures at this moment


# -- SmtpTokens as the API server has them ---------------------------------------------------


@dataclass
class TokenState:
    uid: str
    ready: bool
    username: str | None
    generation: int


def _username(uid: str) -> str:
    # The operator's naming (builders.username_for); status.username wins when present.
    return "txm-" + uid.replace("-", "")


class TokenWatch:
    """Every SmtpToken's Ready condition, from a list then a watch (admin client), in a thread.

    ``all_ready_at`` is the monotonic time at which ``expected`` tokens were first Ready.
    """

    def __init__(self, api: client.ApiClient, expected: int) -> None:
        self.objs = client.CustomObjectsApi(api)
        self.expected = expected
        self.tokens: dict[tuple[str, str], TokenState] = {}
        self.first_ready_at: float | None = None
        self.all_ready_at: float | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="token-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=15)

    def ready_count(self) -> int:
        with self._lock:
            return sum(1 for t in self.tokens.values() if t.ready)

    def snapshot(self) -> dict[tuple[str, str], TokenState]:
        with self._lock:
            return dict(self.tokens)

    def _update(self, kind: str, body: Obj) -> None:
        meta = body["metadata"]
        key = (meta["namespace"], meta["name"])
        status = body.get("status") or {}
        ready = any(
            x.get("type") == "Ready" and x.get("status") == "True"
            for x in status.get("conditions") or []
        )
        with self._lock:
            if kind == "DELETED":
                self.tokens.pop(key, None)
                return
            self.tokens[key] = TokenState(
                uid=meta["uid"],
                ready=ready,
                username=status.get("username"),
                generation=int((body.get("spec") or {}).get("passwordGeneration", 1)),
            )
            count = sum(1 for t in self.tokens.values() if t.ready)
            now = time.monotonic()
            if count and self.first_ready_at is None:
                self.first_ready_at = now
            if count >= self.expected and self.all_ready_at is None:
                self.all_ready_at = now

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                listed = cast(
                    Obj, self.objs.list_cluster_custom_object(GROUP, VERSION, "smtptokens")
                )
                for item in listed["items"]:
                    self._update("ADDED", item)
                version = listed["metadata"]["resourceVersion"]
                while not self._stop.is_set():
                    # kubernetes' watch module has no annotations.
                    stream: Iterator[Obj] = (
                        cast(Any, watch)
                        .Watch()
                        .stream(
                            self.objs.list_cluster_custom_object,
                            GROUP,
                            VERSION,
                            "smtptokens",
                            resource_version=version,
                            timeout_seconds=5,
                            allow_watch_bookmarks=True,
                        )
                    )
                    for event in stream:
                        obj = event["object"]
                        version = obj["metadata"]["resourceVersion"]
                        if event["type"] != "BOOKMARK":
                            self._update(event["type"], obj)
            except ApiException as exc:
                if exc.status != 410:  # 410: our resourceVersion is too old, list again
                    time.sleep(1)
            except Exception:  # a dropped connection: list again
                time.sleep(1)


def shard_entries(core: client.CoreV1Api, ip: str) -> dict[str, c.CredentialEntry] | None:
    """Every credential entry of the relay of ``ip`` (None while a shard is missing)."""
    entries: dict[str, c.CredentialEntry] = {}
    for shard in range(c.CREDENTIAL_SHARDS):
        try:
            raw = core.read_namespaced_secret(
                c.credentials_secret_name(ip, shard), OPERATOR_NAMESPACE, _preload_content=False
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        body = json.loads(cast(Any, raw).data)  # the raw response: no model objects for 65 KB
        for username, value in (body.get("data") or {}).items():
            entries[username] = c.CredentialEntry.model_validate_json(base64.b64decode(value))
    return entries


def all_published(entries: dict[str, c.CredentialEntry], tokens: Sequence[TokenState]) -> bool:
    for token in tokens:
        entry = entries.get(token.username or _username(token.uid))
        if entry is None or not any(d.generation == token.generation for d in entry.digests):
            return False
    return True


# -- revocation ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    """One token to revoke and the credentials the relay must refuse afterwards."""

    namespace: str
    name: str
    secret: dict[str, str]


def revoke(objs: client.CustomObjectsApi, probe: Probe, mode: str) -> None:
    if mode == "bump":
        objs.patch_namespaced_custom_object(
            GROUP,
            VERSION,
            probe.namespace,
            "smtptokens",
            probe.name,
            {"spec": {"passwordGeneration": 2}},
        )
    else:
        objs.delete_namespaced_custom_object(
            GROUP, VERSION, probe.namespace, "smtptokens", probe.name
        )


def percentile(values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile (p in 0..100) of ``values``; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


@dataclass
class Revocations:
    mode: str  # "one at a time" or "at once"
    latencies: dict[str, list[float]] = field(default_factory=dict)  # mode -> seconds
    timed_out: int = 0

    def all(self) -> list[float]:
        return [x for values in self.latencies.values() for x in values]

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "how": self.mode,
            "samples": len(self.all()),
            "timedOut": self.timed_out,
            "p50": _round(percentile(self.all(), 50)),
            "p99": _round(percentile(self.all(), 99)),
            "max": _round(max(self.all(), default=None)),
        }
        for how, values in sorted(self.latencies.items()):
            out[how] = {
                "samples": len(values),
                "p50": _round(percentile(values, 50)),
                "p99": _round(percentile(values, 99)),
            }
        return out


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


class Relay:
    """The DedicatedIP's relay as a local process, and AUTH probes against it."""

    def __init__(self, process: RelayProcess, port: int) -> None:
        self.process, self.port = process, port

    def answer(self, secret: dict[str, str]) -> bool | None:
        """Whether the relay accepts ``secret``'s credentials (235) or refuses them (535);
        None for any other answer (a dropped connection, a 421 of the failure limiter)."""
        context = ssl.create_default_context(cadata=secret["ca.crt"])
        try:
            with smtplib.SMTP(ADDRESS, self.port, timeout=15) as smtp:
                smtp._host = secret["host"]  # type: ignore[attr-defined]  # TLS name check
                smtp.starttls(context=context)
                smtp.ehlo()
                smtp.user, smtp.password = secret["username"], secret["password"]
                # One AUTH PLAIN, not login(): it would try a second mechanism after a 535.
                code, _ = smtp.auth("PLAIN", smtp.auth_plain, initial_response_ok=True)
        except smtplib.SMTPAuthenticationError as exc:
            return False if exc.smtp_code == 535 else None
        except (OSError, smtplib.SMTPException):
            return None
        return True if code == 235 else None

    def accepts(self, secret: dict[str, str]) -> bool:
        return self.answer(secret) is True

    def wait_refused(self, secret: dict[str, str], deadline: float) -> float | None:
        """Probe until the relay answers 535 to ``secret``'s password: the monotonic time it
        answered, or None at ``deadline``."""
        while time.monotonic() < deadline:
            if self.answer(secret) is False:
                return time.monotonic()
            time.sleep(0.05)
        return None


def revoke_one_at_a_time(
    objs: client.CustomObjectsApi, relay: Relay, probes: Sequence[Probe], timeout: float
) -> Revocations:
    result = Revocations("one at a time")
    for i, probe in enumerate(probes):
        mode = "bump" if i % 2 == 0 else "delete"
        start = time.monotonic()
        revoke(objs, probe, mode)
        refused = relay.wait_refused(probe.secret, start + timeout)
        if refused is None:
            result.timed_out += 1
        else:
            result.latencies.setdefault(mode, []).append(refused - start)
    return result


def revoke_at_once(
    objs: client.CustomObjectsApi,
    relay: Relay,
    probes: Sequence[Probe],
    timeout: float,
    probers: int = 2,
) -> Revocations:
    """Revoke every token in ``probes`` back to back, then probe them round-robin with a few
    threads (one TLS handshake each: a thread per token would load the 2 cores itself)."""
    result = Revocations("at once")
    started: dict[int, tuple[str, float]] = {}
    for i, probe in enumerate(probes):
        mode = "bump" if i % 2 == 0 else "delete"
        started[i] = (mode, time.monotonic())
        revoke(objs, probe, mode)
    pending = list(range(len(probes)))
    lock = threading.Lock()
    deadline = time.monotonic() + timeout

    def work() -> None:
        while time.monotonic() < deadline:
            with lock:
                if not pending:
                    return
                i = pending.pop(0)
            if relay.answer(probes[i].secret) is not False:
                with lock:
                    pending.append(i)
                continue
            mode, start = started[i]
            with lock:
                result.latencies.setdefault(mode, []).append(time.monotonic() - start)

    with ThreadPoolExecutor(probers) as pool:
        for future in [pool.submit(work) for _ in range(probers)]:
            future.result()
    result.timed_out = len(pending)
    return result


# -- one run -------------------------------------------------------------------------------


@dataclass
class Options:
    tokens: list[int]
    steady: float
    restart_window: float
    restart_max: float
    sample: int
    ready_timeout: float
    revoke_timeout: float
    creators: int
    rev: str | None
    json_path: Path | None
    keep: bool


def _log(message: str) -> None:
    stamp = dt.datetime.now(dt.UTC).strftime("%H:%M:%S")
    print(f"[{stamp}] {message}", file=sys.stderr, flush=True)


def _loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _create_token(objs: client.CustomObjectsApi, namespace: str, name: str) -> None:
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "SmtpToken",
        "metadata": {"name": name},
        "spec": {"dedicatedIPRef": {"name": IP_NAME}},
    }
    for attempt in range(5):
        try:
            objs.create_namespaced_custom_object(GROUP, VERSION, namespace, "smtptokens", body)
        except ApiException as exc:
            if exc.status not in (429, 500, 503, 504) or attempt == 4:
                raise
            time.sleep(0.5 * (attempt + 1))
        else:
            return


def _app_secret(kit: Kit, namespace: str, name: str) -> dict[str, str] | None:
    data = kit.secret(namespace, f"{name}-smtp")
    return data if data and data.get("password") else None


def _cpu(figures: ProcFigures | None) -> float:
    return figures.cpu if figures else 0.0


def _namespace(core: client.CoreV1Api, name: str) -> None:
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))


def _admin_client(kubeconfig: Path, pool: int) -> client.ApiClient:
    # kubernetes' config module has no annotations (its API classes do).
    new_client: Callable[..., client.ApiClient] = cast(Any, config).new_client_from_config
    api = new_client(config_file=str(kubeconfig))
    api.configuration.connection_pool_maxsize = pool
    return api


class Run:
    """One N: the control plane and everything on it, stopped by :meth:`close`."""

    def __init__(self, n: int, opts: Options, workdir: Path, stack: contextlib.ExitStack) -> None:
        self.n, self.opts, self.workdir, self.stack = n, opts, workdir, stack
        self.result: dict[str, Any] = {"tokens": n, "namespaces": NAMESPACES}

    def go(self) -> dict[str, Any]:
        self._setup()
        self._create()
        self._steady()
        rng = random.Random(self.n)
        sample = rng.sample(self.names, min(len(self.names), 2 * self.opts.sample))
        probes = self._probes(sample)
        half = len(probes) // 2
        if probes[:half]:
            _log(f"N={self.n}: revoking {half} tokens one at a time")
            self.result["revokeSteady"] = revoke_one_at_a_time(
                self.objs, self.relay, probes[:half], self.opts.revoke_timeout
            ).to_json()
        first = self.procs.sample()
        self._restart()
        if probes[half:]:
            self._revoke_after_restart(probes[half:])
        last = self.procs.sample()
        stopped = self.procs.figures.get(first.pid) if first else None
        peaks = [f.peak_rss for f in self.procs.figures.values()]
        self.result["operator"] = {
            "peakRssMB": round(max(peaks, default=0) / MB, 1),
            "peakRssFirstProcessMB": round((stopped.peak_rss if stopped else 0) / MB, 1),
            "cpuSecondsFirstProcess": round(stopped.cpu if stopped else 0, 1),
            "rssAtEndMB": round((last.rss if last else 0) / MB, 1),
            "processes": len(self.procs.figures),
        }
        return self.result

    def _setup(self) -> None:
        """Control plane with an audit log, CRDs, the operator, the DedicatedIP and its relay."""
        workdir, stack = self.workdir, self.stack
        policy_file, audit_file = workdir / "audit-policy.json", workdir / "audit.log"
        policy_file.write_text(policy(OPERATOR_NAMESPACE))
        _log(f"N={self.n}: starting the control plane")
        cp = stack.enter_context(
            control_plane(apiserver_args=apiserver_args(policy_file, audit_file))
        )
        self.audit = AuditLog(audit_file)
        self.audit.start()
        stack.callback(self.audit.stop)
        self.api = _admin_client(cp.kubeconfig, max(16, self.opts.creators * 2))
        stack.callback(self.api.close)
        install_crds(self.api)
        self.core, self.objs = client.CoreV1Api(self.api), client.CustomObjectsApi(self.api)
        _namespace(self.core, OPERATOR_NAMESPACE)
        identity = install_operator_identity(
            self.api, cp.kubeconfig, workdir / "operator.kubeconfig"
        )
        sa = yaml.safe_load(identity.read_text())["users"][0]["name"]
        self.operator_user = f"system:serviceaccount:{OPERATOR_NAMESPACE}:{sa}"
        self.relay_user = f"system:serviceaccount:{OPERATOR_NAMESPACE}:{c.relay_name(IP_NAME)}"
        self.operator = OperatorProcess(
            identity, OPERATOR_NAMESPACE, workdir / "operator.log", **OPERATOR_ENV
        )
        self.operator.start()
        stack.callback(self.operator.stop)
        operator = self.operator
        self.procs = ProcWatch(lambda: operator.proc.pid if operator.proc else None)
        self.procs.start()
        stack.callback(self.procs.stop)
        self.operator.wait_ready(self.api)
        self.kit = Kit(self.api, OPERATOR_NAMESPACE)
        self.relay = self._relay(cp.kubeconfig)
        for i in range(NAMESPACES):
            _namespace(self.core, f"bench-{i}")
        self.names = [(f"bench-{i % NAMESPACES}", f"token-{i:05d}") for i in range(self.n)]

    def _create(self) -> None:
        n = self.n
        tokens = TokenWatch(self.api, n)
        tokens.start()
        self.stack.callback(tokens.stop)
        first = self.procs.sample()
        load_before = _loadavg()
        _log(f"N={n}: creating {n} SmtpTokens over {NAMESPACES} namespaces")
        wall0, t0 = time.time(), time.monotonic()
        with ThreadPoolExecutor(self.opts.creators) as pool:
            list(pool.map(lambda nn: _create_token(self.objs, *nn), self.names))
        created = time.monotonic() - t0
        published_at = self._wait_ready_and_published(tokens, t0)
        t1, wall1 = time.monotonic(), time.time()
        after = self.procs.sample()
        self.result["create"] = {
            "createdInSeconds": round(created, 1),
            "firstReadySeconds": _round((tokens.first_ready_at or t1) - t0, 1),
            "allReadySeconds": _round(tokens.all_ready_at - t0 if tokens.all_ready_at else None, 1),
            "readyAtEnd": tokens.ready_count(),
            "allPublishedSeconds": _round(published_at - t0 if published_at else None, 1),
            "cpuSeconds": round(_cpu(after) - _cpu(first), 1),
            "peakRssMB": round((after.peak_rss if after else 0) / MB, 1),
            "rssAfterMB": round((after.rss if after else 0) / MB, 1),
            "loadavg": [load_before, _loadavg()],
            "operatorRequests": self._window(self.operator_user, wall0, wall1).to_json(),
            "errorCodes": dict(self.audit.error_codes(self.operator_user, wall0, wall1)),
        }
        _log(f"N={n}: create: {json.dumps(_brief(self.result['create']))}")

    def _steady(self) -> None:
        settle, seconds = 10.0, self.opts.steady
        _log(f"N={self.n}: steady state for {seconds:.0f} s (after {settle:.0f} s)")
        time.sleep(settle)
        before = self.procs.sample()
        ws, load_before = time.time(), _loadavg()
        time.sleep(seconds)
        we = time.time()
        after = self.procs.sample()
        steady = self._window(self.operator_user, ws, we)
        reads_per_token_hour = steady.reads / self.n / (seconds / 3600)
        self.result["steady"] = {
            "operatorRequests": steady.to_json(),
            "readsPerTokenPerHour": round(reads_per_token_hour, 2),
            "cpuSeconds": round(_cpu(after) - _cpu(before), 1),
            "rssMB": round((after.rss if after else 0) / MB, 1),
            "relayRequests": self._window(self.relay_user, ws, we).to_json(),
            "loadavg": [load_before, _loadavg()],
        }
        _log(
            f"N={self.n}: steady: {steady.rate:.2f} req/s, {reads_per_token_hour:.2f} reads/token/h"
        )

    def _restart(self) -> None:
        """SIGTERM, start again, and nothing changes for ``--restart-window`` seconds, or
        longer while the operator is still busy: a window that ends before the restart's work
        even started would count nothing (at 5,000 tokens the old operator spent its first
        60 s listing)."""
        _log(f"N={self.n}: restart, {self.opts.restart_window:.0f} s window or until settled")
        steady_rate = self.result.get("steady", {}).get("operatorRequests", {})
        quiet = 10 + 1.5 * 10 * float(steady_rate.get("requestsPerSecond", 0.0))
        self.operator.stop()
        ws, load_before = time.time(), _loadavg()
        self.operator.start()
        time.sleep(self.opts.restart_window)
        while True:
            busy = self._window(self.operator_user, time.time() - 10, time.time()).total
            settled = busy <= quiet
            if settled or time.time() - ws >= self.opts.restart_max:
                break
            time.sleep(10)
        we = time.time()
        second = self.procs.sample()
        restart = self._window(self.operator_user, ws, we)
        self.result["restart"] = {
            "operatorRequests": restart.to_json(),
            "errorCodes": dict(self.audit.error_codes(self.operator_user, ws, we)),
            # settled: at most 10 + 1.5 x the steady rate in the window's last 10 s
            "settled": settled,
            "cpuSeconds": round(_cpu(second), 1),
            "peakRssMB": round((second.peak_rss if second else 0) / MB, 1),
            "loadavg": [load_before, _loadavg()],
        }
        _log(
            f"N={self.n}: restart: {restart.total} requests, {restart.writes} writes, "
            f"max {restart.max_gets_per_object} GETs of one object, "
            f"{'settled' if settled else 'NOT settled'} after {we - ws:.0f} s"
        )

    def _revoke_after_restart(self, probes: Sequence[Probe]) -> None:
        self.operator.stop()
        self.operator.start()
        started = time.monotonic()
        time.sleep(max(0.0, started + 5 - time.monotonic()))
        _log(f"N={self.n}: revoking {len(probes)} tokens at once, 5 s after a restart")
        self.result["revokeAfterRestart"] = revoke_at_once(
            self.objs, self.relay, probes, self.opts.revoke_timeout
        ).to_json()

    def _window(self, user: str, start: float, end: float) -> Summary:
        self.audit.wait_caught_up()
        return summarise(self.audit.requests(user, start, end), end - start, end)

    def _relay(self, admin: Path) -> Relay:
        """The DedicatedIP and its relay process, once the operator has set the relay up."""
        kit = self.kit
        tracking_port, api_port, port = free_port(ADDRESS), free_port(ADDRESS), free_port(ADDRESS)
        kit.dedicated_ip(
            name=IP_NAME,
            address=ADDRESS,
            relay={"apiURL": f"http://{ADDRESS}:{api_port}"},
            tracking={"baseURL": f"http://{ADDRESS}:{tracking_port}"},
            delivery={  # nothing is sent: the benchmark only authenticates
                "mode": "Smarthost",
                "smarthost": {"host": "127.0.0.1", "port": free_port(), "tls": "None"},
            },
        )
        ns = OPERATOR_NAMESPACE
        tls = wait_for(
            lambda: kit.secret(ns, c.tls_secret_name(IP_NAME)), 30, "the relay's TLS Secret"
        )
        wait_for(lambda: shard_entries(kit.core, IP_NAME) is not None, 30, "the credential shards")
        folder = self.workdir / "relay"
        folder.mkdir()
        (folder / "tls.crt").write_text(tls["tls.crt"])
        (folder / "tls.key").write_text(tls["tls.key"])
        (folder / "tracking-keys").write_text(f"1:{os.urandom(32).hex()}\n")
        name = c.relay_name(IP_NAME)
        wait_for(
            lambda: (
                name
                in {
                    sa.metadata.name if sa.metadata else ""
                    for sa in kit.core.list_namespaced_service_account(ns).items
                }
            ),
            30,
            "the relay's ServiceAccount",
        )
        token = service_account_token(kit.api, name, ns)
        identity = token_kubeconfig(admin, token, name, ns, folder / "relay.kubeconfig")
        process = RelayProcess(
            {
                "kubernetes": {
                    "namespace": ns,
                    "dedicatedIP": IP_NAME,
                    "kubeconfig": str(identity),
                },
                "listen": {
                    "host": ADDRESS,
                    "submission": port,
                    "submissions": None,
                    "tracking": tracking_port,
                    "api": api_port,
                    "metrics": None,
                },
                "tls": {"certFile": str(folder / "tls.crt"), "keyFile": str(folder / "tls.key")},
                "spool": {"directory": str(folder / "spool")},
                "trackingKeysFile": str(folder / "tracking-keys"),
                # Every probe comes from 127.0.0.1: the per-IP limit would answer 421 to all.
                "limits": {"ipAuthFailures": 1_000_000_000},
                "logging": {"level": "INFO"},
            },
            folder,
        )
        process.start(wait_port=(ADDRESS, port), timeout=60)
        self.stack.callback(process.stop)
        return Relay(process, port)

    def _wait_ready_and_published(self, tokens: TokenWatch, t0: float) -> float | None:
        deadline = t0 + self.opts.ready_timeout
        published_at: float | None = None
        last_log = 0.0
        while time.monotonic() < deadline:
            now = time.monotonic()
            known = tokens.snapshot()
            if published_at is None and len(known) >= self.n:
                entries = shard_entries(self.core, IP_NAME) or {}
                if all_published(entries, list(known.values())):
                    published_at = now
            if published_at is not None and tokens.all_ready_at is not None:
                return published_at
            if now - last_log > 10:
                _log(f"N={self.n}: {tokens.ready_count()}/{self.n} Ready after {now - t0:.0f} s")
                last_log = now
            time.sleep(1.0)
        _log(f"N={self.n}: not all Ready/published within {self.opts.ready_timeout:.0f} s")
        return published_at

    def _probes(self, sample: Sequence[tuple[str, str]]) -> list[Probe]:
        """The sampled tokens' app Secrets, each accepted by the relay before it is revoked."""
        kit, relay = self.kit, self.relay
        probes = []
        for namespace, name in sample:
            secret = _app_secret(kit, namespace, name)
            if secret is None:
                continue
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not relay.accepts(secret):
                time.sleep(0.2)
            if relay.accepts(secret):
                probes.append(Probe(namespace, name, secret))
        if len(probes) < len(sample):
            _log(
                f"N={self.n}: {len(sample) - len(probes)} sampled tokens never worked at the relay"
            )
        return probes


def _brief(create: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in create.items() if k not in ("operatorRequests", "errorCodes")}


# -- report --------------------------------------------------------------------------------


def _fmt(value: float | None, unit: str = "", digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}{unit}"


def _verdict(ok: bool | None) -> str:
    return {True: "met", False: "NOT met", None: ""}[ok]


def goals(run: dict[str, Any]) -> list[dict[str, Any]]:
    """Each goal the issue sets for this N, its figure and whether it is met."""
    n = run["tokens"]
    rows: list[tuple[Goal, float | None]] = []
    create = run.get("create", {})
    if n in READY_GOALS:
        rows.append((Goal(f"{n} tokens Ready", READY_GOALS[n], "s"), create.get("allReadySeconds")))
    if n in RSS_GOALS:
        peak = (run.get("operator") or {}).get("peakRssMB")
        rows.append((Goal(f"peak RSS at {n}", RSS_GOALS[n], "MB"), peak))
    steady = run.get("steady")
    if steady:
        rows.append(
            (
                Goal("steady-state reads", READS_PER_TOKEN_HOUR, "/token/h"),
                steady["readsPerTokenPerHour"],
            )
        )
    restart = (run.get("restart") or {}).get("operatorRequests")
    if restart:
        # Not settled at the window's end: the counts are a lower bound, the goal not shown met.
        settled = (run.get("restart") or {}).get("settled", True)
        rows.append((Goal("restart: writes", 0, ""), restart["writes"] if settled else None))
        rows.append(
            (
                Goal("restart: GETs per object", 1, ""),
                restart["maxGetsPerObject"] if settled else None,
            )
        )
    for key, limit, label in (
        ("revokeSteady", REVOKE_STEADY_P99, "revocation p99, steady"),
        ("revokeAfterRestart", REVOKE_RESTART_P99, "revocation p99, 5 s after restart"),
    ):
        figures = run.get(key)
        if figures:
            # A revocation that timed out fails the goal whatever the others did.
            p99 = None if figures["timedOut"] else figures["p99"]
            rows.append((Goal(label, limit, "s"), p99))
    return [
        {
            "goal": g.what,
            "limit": g.text(),
            "value": v,
            "met": g.met(v) if v is not None or "Ready" in g.what or "RSS" in g.what else False,
        }
        for g, v in rows
    ]


def _requests_table(summary: dict[str, Any], top: int = 8) -> list[str]:
    lines = []
    for key, figures in list(summary["perVerbResource"].items())[:top]:
        lines.append(f"      {key:<34} {figures['count']:>7}  {figures['perSecond']:>8.2f}/s")
    return lines


def report(runs: Sequence[dict[str, Any]], conditions: dict[str, Any]) -> str:
    out = [
        f"operator scale benchmark  {conditions['date']}  rev {conditions['revision']}",
        f"  {conditions['cores']} cores, load average at start {conditions['loadavgStart']}, "
        f"at end {conditions.get('loadavgEnd')}",
    ]
    for run in runs:
        n = run["tokens"]
        out.append("")
        out.append(f"N = {n} SmtpTokens over {run['namespaces']} namespaces, one DedicatedIP")
        if "error" in run:
            out.append(f"  FAILED: {run['error']}")
        create = run.get("create")
        if create:
            req = create["operatorRequests"]
            out += [
                f"  created (admin, {conditions['creators']} threads)  "
                f"{_fmt(create['createdInSeconds'], ' s')}",
                f"  all Ready                     {_fmt(create['allReadySeconds'], ' s')}"
                f"   (first {_fmt(create['firstReadySeconds'], ' s')}, "
                f"{create['readyAtEnd']}/{n} Ready at the end)",
                f"  all digests published         {_fmt(create['allPublishedSeconds'], ' s')}",
                f"  operator CPU while creating   {_fmt(create['cpuSeconds'], ' s')}, "
                f"peak RSS {_fmt(create['peakRssMB'], ' MB')}, "
                f"RSS after {_fmt(create['rssAfterMB'], ' MB')}",
                f"  operator requests             {req['requests']} "
                f"({req['requestsPerSecond']:.1f}/s, peak {req['peakPerSecond']}/s, "
                f"{req['writes']} writes), errors {create['errorCodes'] or 'none'}",
                *_requests_table(req),
            ]
        steady = run.get("steady")
        if steady:
            req = steady["operatorRequests"]
            out += [
                f"  steady state ({req['seconds']:.0f} s)          "
                f"{req['requestsPerSecond']:.2f} req/s, peak {req['peakPerSecond']}/s, "
                f"{steady['readsPerTokenPerHour']:.2f} reads/token/h, "
                f"CPU {steady['cpuSeconds']} s, RSS {steady['rssMB']} MB",
                *_requests_table(req),
                f"      (relay: {steady['relayRequests']['requests']} requests)",
            ]
        restart = run.get("restart")
        if restart:
            req = restart["operatorRequests"]
            out += [
                f"  restart ({req['seconds']:.0f} s from start)     "
                f"{req['requests']} requests ({req['requestsPerSecond']:.1f}/s, "
                f"peak {req['peakPerSecond']}/s), {req['writes']} writes, "
                f"GETs: {req['distinctObjectsGot']} objects, max {req['maxGetsPerObject']} "
                f"per object, {req['objectsGotMoreThanOnce']} read twice or more, "
                f"{req['requestsInLast10s']} requests in its last 10 s; "
                f"CPU {restart['cpuSeconds']} s, peak RSS {restart['peakRssMB']} MB",
                *_requests_table(req),
            ]
        for key, label in (
            ("revokeSteady", "revocation, steady"),
            ("revokeAfterRestart", "revocation, 5 s after restart"),
        ):
            rev = run.get(key)
            if rev:
                per = ", ".join(
                    f"{how} p50 {_fmt(rev[how]['p50'], ' s', 2)} "
                    f"p99 {_fmt(rev[how]['p99'], ' s', 2)}"
                    for how in ("bump", "delete")
                    if how in rev
                )
                out.append(
                    f"  {label:<30}p50 {_fmt(rev['p50'], ' s', 2)}, p99 {_fmt(rev['p99'], ' s', 2)}"
                    f" ({rev['samples']} tokens {rev['how']}, {rev['timedOut']} timed out; {per})"
                )
        op = run.get("operator")
        if op:
            out.append(
                f"  operator peak RSS             {op['peakRssMB']} MB over {op['processes']} "
                f"processes (first {op['peakRssFirstProcessMB']} MB, "
                f"CPU {op['cpuSecondsFirstProcess']} s); RSS at end {op['rssAtEndMB']} MB"
            )
        out.append("  goals:")
        for g in run.get("goals", []):
            value = g["value"]
            shown = "-" if value is None else f"{value:g}"
            if value is None and "restart:" in g["goal"]:
                shown = "unsettled"
            elif value is None and "revocation" in g["goal"]:
                shown = "timed out"
            out.append(f"    {g['goal']:<36} {g['limit']:<14} {shown:<10} {_verdict(g['met'])}")
    return "\n".join(out)


# -- main ----------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        print(f"{PROG}: error: {message}", file=sys.stderr)
        sys.exit(2)


def _positive(kind: type[int] | type[float]) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
        return value

    return parse


def parse_args(argv: Sequence[str] | None = None) -> Options:
    parser = _Parser(
        prog=PROG,
        description="Operator at scale: N SmtpTokens against a real control plane "
        "(see the module docstring for the phases).",
    )
    parser.add_argument(
        "--tokens",
        type=_positive(int),
        nargs="+",
        default=[100],
        metavar="N",
        help="token counts, one fresh control plane each (default: 100, a quick run)",
    )
    parser.add_argument(
        "--steady", type=_positive(float), default=120.0, help="steady-state window, s"
    )
    parser.add_argument(
        "--restart-window", type=_positive(float), default=60.0, help="shortest restart window, s"
    )
    parser.add_argument(
        "--restart-max",
        type=_positive(float),
        default=300.0,
        help="longest restart window (while the operator has not settled), s",
    )
    parser.add_argument(
        "--sample", type=_positive(int), default=20, help="tokens revoked per phase"
    )
    parser.add_argument(
        "--ready-timeout", type=_positive(float), default=900.0, help="give up creating, s"
    )
    parser.add_argument(
        "--revoke-timeout", type=_positive(float), default=60.0, help="give up one revocation, s"
    )
    parser.add_argument(
        "--creators", type=_positive(int), default=8, help="threads creating the tokens"
    )
    parser.add_argument(
        "--rev", help="run the operator and relay of this git revision (default: the work tree)"
    )
    parser.add_argument("--json", type=Path, dest="json_path", help="write the figures here")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs)")
    ns = parser.parse_args(argv)
    return Options(
        tokens=[int(x) for x in ns.tokens],
        steady=ns.steady,
        restart_window=ns.restart_window,
        restart_max=ns.restart_max,
        sample=int(ns.sample),
        ready_timeout=ns.ready_timeout,
        revoke_timeout=ns.revoke_timeout,
        creators=int(ns.creators),
        rev=ns.rev,
        json_path=ns.json_path,
        keep=ns.keep,
    )


def _git(*args: str) -> str:
    out = subprocess.run(
        ["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


@contextlib.contextmanager
def _source(rev: str | None, workdir: Path) -> Iterator[str]:
    """The code the operator and relay run: ``rev``'s operator/ and relay/ put first on the
    children's PYTHONPATH, or the work tree. Yields a description for the report."""
    if rev is None:
        dirty = (
            " (with uncommitted changes)"
            if _git("status", "--porcelain", "--", "operator", "relay")
            else ""
        )
        yield f"work tree at {_git('rev-parse', '--short', 'HEAD')}{dirty}"
        return
    try:
        commit = _git("rev-parse", "--verify", f"{rev}^{{commit}}")
    except subprocess.CalledProcessError:
        raise BenchError(f"--rev {rev}: not a revision of {ROOT}") from None
    tree = workdir / "source"
    tree.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", commit, "operator", "relay"],
        capture_output=True,
        check=True,
    )
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(tree / "operator"), str(tree / "relay"), *([saved] if saved else [])]
    )
    try:
        _check_source(tree)
        yield f"{commit[:12]} ({_git('log', '-1', '--format=%s', commit)[:70]})"
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved


_IMPORTS = """
import sys, txmail_operator.__main__, txmail_relay.__main__, txmail_relay.app
from txmail_operator import handlers, reconcile
print("\\n".join(m.__file__ or "" for n, m in sys.modules.items() if n.startswith("txmail_")))
"""


def _check_source(tree: Path) -> None:
    """Every txmail module the children import comes from ``tree``: the venv's editable
    install would otherwise fill a module missing at that revision from the work tree."""
    out = subprocess.run(
        [sys.executable, "-c", _IMPORTS], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise BenchError(f"the revision does not import: {out.stderr.strip().splitlines()[-1]}")
    outside = [f for f in out.stdout.split() if not f.startswith(str(tree))]
    if outside:
        raise BenchError(f"the revision lacks modules it imports, e.g. {outside[0]}")


def _terminate(signum: int, frame: FrameType | None) -> NoReturn:
    raise SystemExit(128 + signum)  # unwinds the ExitStacks: every process is stopped


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    base = Path(os.environ.get("TXMAIL_TEST_TMP", tempfile.gettempdir()))
    top = Path(tempfile.mkdtemp(prefix="txmail-bench-", dir=base))
    runs: list[dict[str, Any]] = []
    conditions: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cores": os.cpu_count(),
        "loadavgStart": _loadavg(),
        "python": platform.python_version(),
        "creators": opts.creators,
        "operatorEnv": OPERATOR_ENV,
        "command": " ".join(
            [".venv/bin/python", "bench/operator_scale.py", *(argv or sys.argv[1:])]
        ),
    }
    status = 0
    try:
        with _source(opts.rev, top) as revision:
            conditions["revision"] = revision
            _log(f"running {revision}")
            for n in opts.tokens:
                workdir = top / f"n{n}"
                workdir.mkdir()
                run: dict[str, Any] = {"tokens": n, "namespaces": NAMESPACES}
                with contextlib.ExitStack() as stack:
                    bench = Run(n, opts, workdir, stack)
                    try:
                        run = bench.go()
                    except Exception as exc:  # a run that fails is reported; the next runs
                        status = 1
                        run = bench.result
                        run["error"] = f"{type(exc).__name__}: {str(exc)[:2000]}"
                        _log(f"N={n}: failed: {run['error']}")
                        log = workdir / "operator.log"
                        if log.exists():
                            tail = log.read_text(errors="replace")[-3000:]
                            _log(f"operator log (tail):\n{tail}")
                run["goals"] = goals(run)
                runs.append(run)
                _write_json(opts.json_path, conditions, runs)  # each run as soon as it is done
    except BenchError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        conditions["loadavgEnd"] = _loadavg()
        if opts.keep:
            _log(f"work folder kept: {top}")
        else:
            shutil.rmtree(top, ignore_errors=True)
    print(report(runs, conditions))
    _write_json(opts.json_path, conditions, runs)
    return status


def _write_json(path: Path | None, conditions: dict[str, Any], runs: list[dict[str, Any]]) -> None:
    if path is not None:
        doc = {"conditions": conditions, "runs": runs}
        path.write_text(json.dumps(doc, indent=2, default=str) + "\n")


if __name__ == "__main__":
    sys.exit(main())
