"""The API server's audit log, read as it grows: who made which request, when.

Used by ``operator_scale.py`` to attribute API requests to the operator's ServiceAccount,
which the API server's own metrics cannot do (they have no user label). The policy logs
request metadata (never bodies: no Secret data reaches the file) of the ServiceAccounts in
one namespace and nothing else.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

WRITE_VERBS = frozenset({"create", "update", "patch", "delete", "deletecollection"})
READ_VERBS = frozenset({"get", "list"})


def policy(namespace: str) -> str:
    """An audit policy: metadata of requests by the ServiceAccounts of ``namespace``, once
    when received and once when complete (for the response code); nothing else."""
    return json.dumps(
        {
            "apiVersion": "audit.k8s.io/v1",
            "kind": "Policy",
            "omitStages": ["ResponseStarted"],
            "rules": [
                {"level": "Metadata", "userGroups": [f"system:serviceaccounts:{namespace}"]},
                {"level": "None"},
            ],
        }
    )


def apiserver_args(policy_file: Path, log_file: Path) -> list[str]:
    return [
        f"--audit-policy-file={policy_file}",
        f"--audit-log-path={log_file}",
        "--audit-log-maxsize=0",  # one file, never rotated while we read it
        "--audit-log-mode=blocking",  # each event is in the file when the request is answered
    ]


@dataclass(frozen=True)
class Request:
    at: float  # epoch seconds, when the API server received it
    user: str
    verb: str
    resource: str  # "secrets", "smtptokens/status", "events"
    namespace: str
    name: str

    @property
    def key(self) -> str:
        return f"{self.verb} {self.resource}"


def _epoch(stamp: str) -> float:
    return dt.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


class AuditLog:
    """Follows the audit log file in a thread; keeps one :class:`Request` per request."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._requests: list[Request] = []
        self._codes: dict[str, int] = {}
        self._ids: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="audit-log", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _follow(self) -> None:
        while not self.path.exists() and not self._stop.is_set():
            time.sleep(0.2)
        buffer = b""
        with self.path.open("rb") as log:
            while True:
                chunk = log.read(1 << 20)
                if not chunk:
                    if self._stop.is_set():
                        return
                    time.sleep(0.2)
                    continue
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                self._add(lines)

    def _add(self, lines: Iterable[bytes]) -> None:
        received: list[tuple[str, Request]] = []
        codes: dict[str, int] = {}
        for line in lines:
            if not line.strip():
                continue
            event = json.loads(line)
            if event.get("stage") == "ResponseComplete":
                codes[event["auditID"]] = int((event.get("responseStatus") or {}).get("code", 0))
                continue
            if event.get("stage") != "RequestReceived":
                continue
            ref = event.get("objectRef") or {}
            resource = ref.get("resource", event.get("requestURI", "?"))
            if ref.get("subresource"):
                resource += "/" + ref["subresource"]
            request = Request(
                at=_epoch(event["requestReceivedTimestamp"]),
                user=event["user"]["username"],
                verb=event["verb"],
                resource=resource,
                namespace=ref.get("namespace", ""),
                name=ref.get("name", ""),
            )
            received.append((event["auditID"], request))
        with self._lock:
            for audit_id, request in received:
                self._ids.append(audit_id)
                self._requests.append(request)
            self._codes.update(codes)

    def wait_caught_up(self, timeout: float = 10.0) -> None:
        """Until the reader has read the file to its current end (or ``timeout``)."""
        deadline = time.monotonic() + timeout
        size = self.path.stat().st_size if self.path.exists() else 0
        while time.monotonic() < deadline:
            time.sleep(0.3)
            with self._lock:
                seen = len(self._requests)
            if self.path.stat().st_size == size and seen == len(self._requests):
                return
            size = self.path.stat().st_size

    def requests(self, user: str, start: float, end: float) -> list[Request]:
        """Requests of ``user`` received in [start, end) (epoch seconds)."""
        with self._lock:
            return [r for r in self._requests if r.user == user and start <= r.at < end]

    def error_codes(self, user: str, start: float, end: float) -> Counter[int]:
        """Response codes >= 400 of ``user``'s requests in the window (404 included)."""
        with self._lock:
            pairs = list(zip(self._ids, self._requests, strict=True))
            codes = dict(self._codes)
        return Counter(
            codes[i]
            for i, r in pairs
            if r.user == user and start <= r.at < end and codes.get(i, 0) >= 400
        )


@dataclass(frozen=True)
class Summary:
    """What one client asked of the API server during one window."""

    seconds: float
    total: int
    reads: int  # get + list
    writes: int
    watches: int  # watch requests started (each one stays open)
    per_key: dict[str, int]  # "get secrets" -> count
    peak_per_second: int
    distinct_gets: int  # objects read by a GET
    max_gets_per_object: int
    objects_read_twice: int  # objects read by more than one GET
    last_10s: int  # requests in the window's last 10 s: is the client still busy at its end?

    @property
    def rate(self) -> float:
        return self.total / self.seconds if self.seconds else 0.0

    def to_json(self) -> dict[str, object]:
        return {
            "seconds": round(self.seconds, 1),
            "requests": self.total,
            "requestsPerSecond": round(self.rate, 3),
            "reads": self.reads,
            "writes": self.writes,
            "watchesStarted": self.watches,
            "peakPerSecond": self.peak_per_second,
            "perVerbResource": {
                k: {"count": v, "perSecond": round(v / self.seconds, 3) if self.seconds else 0}
                for k, v in sorted(self.per_key.items(), key=lambda kv: -kv[1])
            },
            "distinctObjectsGot": self.distinct_gets,
            "maxGetsPerObject": self.max_gets_per_object,
            "objectsGotMoreThanOnce": self.objects_read_twice,
            "requestsInLast10s": self.last_10s,
        }


def summarise(requests: Sequence[Request], seconds: float, end: float) -> Summary:
    """The requests of one window of ``seconds`` ending at ``end`` (epoch seconds)."""
    per_key = Counter(r.key for r in requests)
    per_second = Counter(int(r.at) for r in requests)
    gets = Counter(
        (r.resource, r.namespace, r.name) for r in requests if r.verb == "get" and r.name
    )
    return Summary(
        seconds=seconds,
        total=len(requests),
        reads=sum(1 for r in requests if r.verb in READ_VERBS),
        writes=sum(1 for r in requests if r.verb in WRITE_VERBS),
        watches=sum(1 for r in requests if r.verb == "watch"),
        per_key=dict(per_key),
        peak_per_second=max(per_second.values(), default=0),
        distinct_gets=len(gets),
        max_gets_per_object=max(gets.values(), default=0),
        objects_read_twice=sum(1 for n in gets.values() if n > 1),
        last_10s=sum(1 for r in requests if r.at >= end - 10),
    )
