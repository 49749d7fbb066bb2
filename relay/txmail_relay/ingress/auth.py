"""AUTH: token credentials checked in constant time, failed attempts limited per client IP."""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Protocol

from txmail_relay.config.live import LiveConfig
from txmail_relay.contract import CredentialEntry, PasswordDigest, password_digest
from txmail_relay.ingress.connections import client_key


class CredentialChecker(Protocol):
    def check(self, username: str, password: str) -> CredentialEntry | None:
        """The entry the password opens, or None. Unknown, expired and revoked look alike."""


class Authenticator:
    """Checks a username/password against the credentials of the current snapshot."""

    def __init__(
        self, store: LiveConfig, clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    ) -> None:
        self._store = store
        self._clock = clock
        # Checked for unknown usernames so that they cost the same time as known ones.
        self._decoy = CredentialEntry(
            username="",
            namespace="",
            token="",
            digests=[PasswordDigest(sha256=password_digest(secrets.token_hex(32)), generation=0)],
            allowed_from_domains=[],
            email_campaign_id=0,
        )

        self._index: tuple[object, dict[str, CredentialEntry]] | None = None

    def check(self, username: str, password: str) -> CredentialEntry | None:
        config = self._store.current
        entry = config.credentials.get(username) if config is not None else None
        ok = (entry or self._decoy).accepts(password, self._clock())
        return entry if ok and entry is not None else None

    def check_password(self, password: str) -> CredentialEntry | None:
        """The entry a password alone opens (``Authorization: Bearer``).

        Passwords are 256-bit random values, so the digest identifies the token: it is
        looked up in an index of the current snapshot's digests, then checked with the
        same constant-time :meth:`CredentialEntry.accepts` (expiry, grace periods)."""
        config = self._store.current
        if config is None:
            return None
        if self._index is None or self._index[0] is not config:
            index = {d.sha256: e for e in config.credentials.values() for d in e.digests}
            self._index = (config, index)
        entry = self._index[1].get(password_digest(password))
        ok = (entry or self._decoy).accepts(password, self._clock())
        return entry if ok and entry is not None else None


class FailureLimiter:
    """Sliding-window count of failed AUTH attempts per client address (bounded memory).

    An IPv6 client counts per /64 (:func:`client_key`), so that a host cannot rotate through
    its own addresses. While an address is blocked every attempt is refused, the right
    password too: a guesser learns nothing from a success. :meth:`retry_after` says when the
    block lifts, for the reply."""

    def __init__(
        self,
        limit: int,
        window: float,
        *,
        max_clients: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._limit = limit
        self._window = window
        self._max_clients = max_clients
        self._clock = clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def _recent(self, ip: str) -> deque[float] | None:
        ip = client_key(ip)
        failures = self._failures.get(ip)
        if failures is None:
            return None
        horizon = self._clock() - self._window
        while failures and failures[0] <= horizon:
            failures.popleft()
        if not failures:
            del self._failures[ip]
            return None
        return failures

    def blocked(self, ip: str) -> bool:
        failures = self._recent(ip)
        return failures is not None and len(failures) >= self._limit

    def retry_after(self, ip: str) -> float:
        """Seconds until ``ip`` is no longer blocked (0 when it is not)."""
        failures = self._recent(ip)
        if failures is None or len(failures) < self._limit:
            return 0.0
        return max(0.0, failures[0] + self._window - self._clock())

    def record_failure(self, ip: str) -> None:
        ip = client_key(ip)
        failures = self._recent(ip)
        if failures is None:
            failures = self._failures[ip] = deque(maxlen=self._limit)
            if len(self._failures) > self._max_clients:
                self._failures.popitem(last=False)
        failures.append(self._clock())
        self._failures.move_to_end(ip)
