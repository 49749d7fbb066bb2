"""What every reconcile needs, built once at startup and kept in kopf's memo."""

from __future__ import annotations

import asyncio
import datetime as dt
import math
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from ..kube import Kube
from ..relayclient import RelayClient
from ..settings import Settings
from .cache import Cache
from .dns import DnsChecks, Resolver
from .metrics import Metrics
from .tokens import TokenIndex
from .work import Work


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def new_password() -> str:
    return secrets.token_urlsafe(32)


@dataclass
class Locks:
    """One lock per object, so two triggers never reconcile the same object at once."""

    _locks: dict[str, asyncio.Lock] = field(default_factory=dict)

    @asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            yield


@dataclass
class LabelMemory:
    """The labels last seen on each namespace, so only real changes fan out."""

    _guard: threading.Lock = field(default_factory=threading.Lock)
    _labels: dict[str, dict[str, str]] = field(default_factory=dict)

    def changed(self, namespace: str, labels: dict[str, str] | None) -> bool:
        """Record the labels; True when they differ from a previous sighting."""
        with self._guard:
            before = self._labels.get(namespace)
            now = dict(labels or {})
            if labels is None:
                self._labels.pop(namespace, None)
            else:
                self._labels[namespace] = now
            return before is not None and before != now


@dataclass
class StatsMemory:
    """The stats last written to each token's status, so unchanged figures are not re-sent."""

    _guard: threading.Lock = field(default_factory=threading.Lock)
    _seen: dict[str, object] = field(default_factory=dict)

    def changed(self, key: str, value: object) -> bool:
        with self._guard:
            if self._seen.get(key) == value:
                return False
            self._seen[key] = value
            return True


@dataclass
class Written:
    """The resourceVersion and generation of each object as the operator last applied it."""

    _guard: threading.Lock = field(default_factory=threading.Lock)
    _seen: dict[tuple[str, str], tuple[str, int | None]] = field(default_factory=dict)

    def record(self, kind: str, name: str, version: str, generation: int | None) -> None:
        with self._guard:
            self._seen[(kind, name)] = (version, generation)

    def get(self, kind: str, name: str) -> tuple[str, int | None] | None:
        with self._guard:
            return self._seen.get((kind, name))


@dataclass
class Checked:
    """When each object was last reconciled in full, so a periodic check soon after skips."""

    _guard: threading.Lock = field(default_factory=threading.Lock)
    _at: dict[str, float] = field(default_factory=dict)

    def mark(self, key: str) -> None:
        with self._guard:
            self._at[key] = time.monotonic()

    def since(self, key: str) -> float:
        with self._guard:
            at = self._at.get(key)
        return math.inf if at is None else time.monotonic() - at

    def forget(self, key: str) -> None:
        with self._guard:
            self._at.pop(key, None)


@dataclass
class Handled:
    """What was done for each SmtpToken (by uid) in this process, by whichever path came first.

    Two paths handle a token's spec change or deletion: the urgent watch (urgent.py) and
    kopf's own handlers, which after a restart come much later. The second one skips what
    the first did; and a view older than what was done (kopf's index before kopf has seen
    the change) never undoes it.
    """

    _guard: threading.Lock = field(default_factory=threading.Lock)
    _generation: dict[str, int] = field(default_factory=dict)
    _revoked: set[str] = field(default_factory=set)

    def reconciled(self, uid: str, generation: int) -> None:
        with self._guard:
            if generation > self._generation.get(uid, 0):
                self._generation[uid] = generation

    def generation(self, uid: str) -> int | None:
        """The newest generation reconciled in full (None: none yet in this process)."""
        with self._guard:
            return self._generation.get(uid)

    def revoke(self, uid: str) -> None:
        """Record a revocation that is done (the credential is out of the relay)."""
        with self._guard:
            self._revoked.add(uid)

    def revoked(self, uid: str) -> bool:
        with self._guard:
            return uid in self._revoked

    def forget(self, uid: str) -> None:
        """The object is gone from the API: nothing more will be asked about it."""
        with self._guard:
            self._generation.pop(uid, None)
            self._revoked.discard(uid)


@dataclass
class Context:
    kube: Kube
    settings: Settings
    now: Callable[[], dt.datetime] = utcnow
    password: Callable[[], str] = new_password
    locks: Locks = field(default_factory=Locks)
    namespaces: LabelMemory = field(default_factory=LabelMemory)
    stats: StatsMemory = field(default_factory=StatsMemory)
    relay: RelayClient = field(default_factory=RelayClient)
    metrics: Metrics = field(default_factory=Metrics)
    written: Written = field(default_factory=Written)
    work: Work = field(default_factory=Work)
    checked: Checked = field(default_factory=Checked)
    handled: Handled = field(default_factory=Handled)
    cache: Cache = field(init=False)
    dns: DnsChecks = field(init=False)  # the DNS readiness reports, per DedicatedIP
    # DedicatedIPs whose relay waits for the operator's namespace to be created.
    waiting_for_namespace: set[str] = field(default_factory=set)
    # Set once kopf runs its first handler, which it does only when every index is filled:
    # before that a DedicatedIP's token and email counts would read as 0 (and be written).
    indexed: asyncio.Event = field(default_factory=asyncio.Event)
    tokens: TokenIndex = field(default_factory=TokenIndex)
    # status.warmup.startedAt as this process recorded or read it, per DedicatedIP uid: a
    # body from kopf's index can lag the operator's own status write (reconcile/warmup.py).
    warmup_starts: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.cache = Cache(self.kube, self.settings.namespace, self.tokens)
        self.dns = DnsChecks(Resolver.of(self.settings))
