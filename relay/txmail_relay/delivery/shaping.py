"""Per-destination shaping: MX rollup, connection and rate limits, pauses (docs/deliverability.md
"Per-destination shaping").

A *destination* (KumoMTA's "site") is where mail physically goes: in Direct mode the
recipient domains whose MX hosts match one pattern of a named destination (``*.google.com``
and ``*.googlemail.com`` are ``gmail``) share it, and a domain that matches none has a
destination of its own, named by its MX host set (so domains with the same MX hosts share it
too); in Smarthost mode the smarthost is the one destination. Each has limits: connections
open at once, messages per connection, a message rate (a token bucket).

A pause is caused by what a destination *answers*: ``421`` to a new connection (greeting,
EHLO or MAIL), or ``4xx`` replies only (a ``421`` closing a transaction included)
``pause.afterFailures`` attempts in a row. Paused: no new connection until the pause ends
(doubling from ``pause.initialSeconds`` to ``pause.maxSeconds`` while it keeps answering so),
then one probe at a time until one gets an answer that is not ``4xx`` (a delivery, or a
``5xx``: it answers, it is not refusing). A connection that fails (refused, timed out, a
TLS failure, lost before an answer) is no answer: it neither pauses, nor counts toward the
streak, nor resets it; the queue's retry backoff and its one-attempt-at-a-time probe of a
destination that delivered nothing handle a dead server, as without shaping. A delivery ends
a pause; a ``5xx`` answer resets the streak.

The queue (:mod:`.queue`) schedules per domain until the domain's destination is known (a
lookup learnt it), then per destination (within its connection limit); :mod:`.transport`
sends back to the queue, unattempted, what would have to wait (a paused destination, or one
with as many attempts in flight as its share), so no worker waits behind a probe, and
enforces the limits on its
connections. Time comes from an injectable :class:`Clock`.

Written by hand: the matching, the bucket and the backoff are a few lines each, and no
maintained library does MX rollup.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import hashlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Protocol

from txmail_relay.config.live import LiveConfig
from txmail_relay.contract import (
    PausedDestination,
    ShapingConfig,
    ShapingLimits,
    ShapingPause,
    rate_per_second,
)
from txmail_relay.metrics import RelayMetrics

log = logging.getLogger(__name__)

SMARTHOST = "smarthost"
OTHER = "other"  # the metric label of every destination without a name of its own
SITE_CACHE_SECONDS = 600.0  # how long a domain's destination (its MX hosts) is remembered
SITE_CACHE_SIZE = 10_000
MAX_REPORTED = 50  # paused destinations in the stats document
MAX_NAME = 100  # characters of a destination named by its MX hosts


def parse_rate(text: str) -> float:
    """``"N/s"``, ``"N/min"`` or ``"N/h"`` as messages per second (positive: the contract
    refuses zero too)."""
    return rate_per_second(text)


@dataclass(frozen=True)
class Limits:
    """The effective limits of a destination; None: no limit of its own."""

    connections: int | None = None
    messages_per_connection: int | None = None
    rate: float | None = None  # messages per second
    burst: int = 1

    def merged(self, override: ShapingLimits) -> Limits:
        return Limits(
            connections=override.connections or self.connections,
            messages_per_connection=override.messages_per_connection
            or self.messages_per_connection,
            rate=parse_rate(override.rate) if override.rate else self.rate,
            burst=override.burst or self.burst,
        )


@dataclass(frozen=True)
class Site:
    name: str
    patterns: tuple[str, ...]
    limits: Limits


# Built-in destinations. Connections and messages per connection are KumoMTA's shipped
# shaping file (assets/policy-extras/shaping.toml, KumoCorp/kumomta 016ebf4), which cites the
# providers' pages: Google support.google.com/mail/answer/81126, Yahoo
# senders.yahooinc.com/best-practices ("provided by Yahoo directly"), Microsoft
# sendersupport.olc.protection.outlook.com/pm/Policies, Apple support.apple.com/en-us/102322,
# Comcast spa.xfinity.com/postmaster, Orange messagerie.orange.fr/postmaster.html; Yahoo's
# connections are KumoMTA's default (10). The rates are NOT from a provider (none publishes
# one): conservative guesses, far above what a warming IP sends and below a burst a provider
# would notice; override them in spec.shaping.
BUILTIN_SITES: tuple[Site, ...] = (
    Site("gmail", ("*.google.com", "*.googlemail.com"), Limits(5, 50, 10.0, 10)),
    Site("outlook", ("*.olc.protection.outlook.com",), Limits(5, 50, 10.0, 10)),
    Site("office365", ("*.mail.protection.outlook.com", "*.mx.microsoft"), Limits(5, 50, 10.0, 10)),
    Site("yahoo", ("*.yahoodns.net",), Limits(10, 20, 10.0, 10)),
    Site("icloud", ("*.icloud.com",), Limits(10, 5, 5.0, 5)),
    Site("comcast", ("*.comcast.net",), Limits(25, 1000, 10.0, 10)),
    Site("orange", ("*.orange.fr",), Limits(3, None, 5.0, 5)),
)
# Everything else, and the smarthost: no limit beyond the queue's (destinationConcurrency,
# outbound.messagesPerConnection). KumoMTA's default (10 connections, 100/s) is looser than
# that share already for connections; a rate for unknown servers would only slow
# transactional mail to small company servers.
BUILTIN_DEFAULT = Limits()


@dataclass(frozen=True)
class Policy:
    """The built-in destinations with a RelayConfig's ``shaping`` applied."""

    enabled: bool
    sites: tuple[Site, ...]
    default: Limits
    smarthost: Limits
    pause: ShapingPause

    @classmethod
    def of(cls, config: ShapingConfig | None) -> Policy:
        config = config or ShapingConfig()
        builtin = {site.name: site for site in BUILTIN_SITES}
        own: list[Site] = []
        for entry in config.sites:
            base = builtin.pop(entry.name, None)
            if base is None and entry.name in (SMARTHOST, OTHER):
                continue  # not pattern sites: see below
            patterns = tuple(p.lower() for p in entry.mx) or (base.patterns if base else ())
            limits = (base.limits if base else BUILTIN_DEFAULT).merged(entry)
            own.append(Site(entry.name, patterns, limits))
        # The user's destinations match first (theirs win over a built-in pattern).
        sites = (*own, *(s for s in BUILTIN_SITES if s.name in builtin))
        default = BUILTIN_DEFAULT.merged(config.default)
        smarthost = BUILTIN_DEFAULT
        for entry in config.sites:
            if entry.name == SMARTHOST:
                smarthost = smarthost.merged(entry)
        return cls(config.enabled, sites, default, smarthost, config.pause)

    def site(self, hosts: Iterable[str]) -> Site:
        """The destination of a domain with these MX hosts (MX rollup)."""
        names = sorted({h.lower().rstrip(".") for h in hosts})
        for site in self.sites:
            if any(fnmatch.fnmatchcase(h, p) for h in names for p in site.patterns):
                return site
        return Site(mx_name(names), (), self.default)


def mx_name(hosts: Sequence[str]) -> str:
    """The name of a destination no pattern names: ``mx`` and its (sorted) MX hosts; past
    MAX_NAME characters the first host, how many more, and a digest of them all (so two sets
    never share a name): it goes into metrics, the stats document and the status."""
    full = "mx " + ",".join(hosts)
    if len(full) <= MAX_NAME:
        return full
    digest = hashlib.sha256(full.encode()).hexdigest()[:12]
    return f"mx {hosts[0][:60]} +{len(hosts) - 1} {digest}"


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up; starts full."""

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = max(1, burst)
        self._tokens = float(self.burst)
        self._at = now

    def take(self, now: float) -> float:
        """Take a token: 0.0 when there was one, else the seconds until there is (none taken)."""
        self._tokens = min(float(self.burst), self._tokens + max(0.0, now - self._at) * self.rate)
        self._at = max(self._at, now)
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) / self.rate


@dataclass
class Backoff:
    """Pause lengths: ``initial``, doubling each time, at most ``maximum``; reset on success."""

    initial: float
    maximum: float
    level: int = 0

    def next(self) -> float:
        delay = min(self.maximum, self.initial * 2.0 ** min(self.level, 62))
        self.level += 1
        return delay

    def reset(self) -> None:
        self.level = 0


class Clock(Protocol):
    def now(self) -> float:
        """Seconds on a monotonic scale."""

    async def sleep(self, seconds: float) -> None: ...


class MonotonicClock:
    def now(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


def _code(reply: str) -> int:
    head = reply[:3]
    return int(head) if head.isdigit() else 0


@dataclass(eq=False)
class SiteState:
    """One destination's counters: open connections, its bucket, its pause."""

    name: str
    label: str  # for metrics: the name, or OTHER
    limits: Limits
    backoff: Backoff
    bucket: TokenBucket | None = None
    open: int = 0
    attempts: int = 0  # deliveries in flight (delivery/transport.py holds them to a cap)
    used: float = 0.0  # when a delivery last looked it up (clock time)
    failures: int = 0  # answered attempts in a row that got only 4xx
    paused_until: float | None = None
    probing: bool = False  # paused before and not delivered since: one connection at a time
    reason: str = ""
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    @property
    def named(self) -> bool:
        return self.label != OTHER

    @property
    def connection_limit(self) -> int | None:
        return 1 if self.probing else self.limits.connections

    @property
    def max_uses(self) -> int | None:
        return self.limits.messages_per_connection

    def has_room(self) -> bool:
        limit = self.connection_limit
        return limit is None or self.open < limit

    def remaining(self, now: float) -> float:
        """Seconds the pause still lasts (0.0 when not paused)."""
        if self.paused_until is None:
            return 0.0
        return max(0.0, self.paused_until - now)


class Shaper:
    """The destinations of one relay and their state; see the module's docstring."""

    def __init__(
        self,
        store: LiveConfig,
        *,
        clock: Clock | None = None,
        metrics: RelayMetrics | None = None,
        wall: Callable[[], float] = time.time,
        max_backoff: float = 3600.0,
    ) -> None:
        self._store = store
        # The queue's longest retry backoff: a failing destination's mail comes back within
        # it (after its pause), so a state unused for longer has no mail left to shape.
        self.max_backoff = max_backoff
        self._next_forget = -math.inf
        self.clock: Clock = clock or MonotonicClock()
        self._metrics = metrics
        self._wall = wall
        self._seen: ShapingConfig | None = None
        self._policy = Policy.of(None)
        self._states: dict[str, SiteState] = {}
        self._domains: dict[str, tuple[str, float]] = {}  # domain -> (destination, until)
        self._tasks: set[asyncio.Task[None]] = set()  # wake-ups not run yet
        if metrics is not None:
            metrics.track_paused_destinations(self.paused_count)

    # -- the policy -----------------------------------------------------------------------

    def policy(self) -> Policy:
        current = self._store.current
        config = current.relay.shaping if current is not None else None
        if config is not self._seen:
            self._seen = config  # tried once: a configuration it cannot use is logged once
            try:
                policy = Policy.of(config)
            except ValueError:  # the contract validates it; should one slip through anyway
                log.exception("shaping configuration not usable, keeping the previous one")
                return self._policy
            self._policy = policy
            for state in self._states.values():  # limits follow the configuration
                self._apply(state, self._limits_of(state.name))
        return self._policy

    @property
    def enabled(self) -> bool:
        return self.policy().enabled

    def _limits_of(self, name: str) -> Limits:
        policy = self._policy
        if name == SMARTHOST:
            return policy.smarthost
        return next((s.limits for s in policy.sites if s.name == name), policy.default)

    def _apply(self, state: SiteState, limits: Limits) -> None:
        pause = self._policy.pause
        state.backoff.initial, state.backoff.maximum = pause.initial_seconds, pause.max_seconds
        if limits == state.limits and (state.bucket is not None) == (limits.rate is not None):
            return
        state.limits = limits
        if limits.rate is None:
            state.bucket = None
        elif state.bucket is None or (state.bucket.rate, state.bucket.burst) != (
            limits.rate,
            limits.burst,
        ):
            state.bucket = TokenBucket(limits.rate, limits.burst, self.clock.now())
        # More room now? Wake whoever waits for a connection.
        self.notify(state)

    def _state(self, name: str, limits: Limits, *, named: bool) -> SiteState:
        state = self._states.get(name)
        if state is None:
            pause = self._policy.pause
            state = self._states[name] = SiteState(
                name,
                name if named else OTHER,
                replace(limits),
                Backoff(pause.initial_seconds, pause.max_seconds),
                TokenBucket(limits.rate, limits.burst, self.clock.now()) if limits.rate else None,
            )
        return state

    # -- which destination ----------------------------------------------------------------

    def smarthost(self) -> SiteState:
        policy = self.policy()
        state = self._state(SMARTHOST, policy.smarthost, named=True)
        state.used = self.clock.now()
        return state

    def known(self, domain: str) -> SiteState | None:
        """The destination of ``domain`` if a lookup learnt it lately, else None."""
        entry = self._domains.get(domain)
        if entry is None:
            return None
        if entry[1] <= self.clock.now():
            del self._domains[domain]
            return None
        self.policy()
        return self._states.get(entry[0])

    def site(self, domain: str, hosts: Sequence[str]) -> SiteState:
        """The destination of ``domain``, whose MX hosts are ``hosts`` (remembered)."""
        site = self.policy().site(hosts)
        now = self.clock.now()
        if len(self._states) >= SITE_CACHE_SIZE and now >= self._next_forget:
            self._forget_idle()
            if len(self._states) >= SITE_CACHE_SIZE:  # all in use: look again in a minute,
                self._next_forget = now + 60.0  # not on every call
        state = self._state(site.name, site.limits, named=bool(site.patterns))
        state.used = now
        self._domains.pop(domain, None)
        if len(self._domains) >= SITE_CACHE_SIZE:
            del self._domains[next(iter(self._domains))]
        self._domains[domain] = (site.name, self.clock.now() + SITE_CACHE_SECONDS)
        return state

    def _forget_idle(self) -> None:
        """Drop destinations with no connection, pause, probe or failure to remember, and
        failing or probed ones no delivery looked up for longer than a pause and a retry
        backoff (their mail is gone) (only at SITE_CACHE_SIZE of them; a dropped one's
        bucket starts full again)."""
        now = self.clock.now()
        stale = now - (self._policy.pause.max_seconds + self.max_backoff)
        for name, state in list(self._states.items()):
            if state.open or state.attempts or state.remaining(now):
                continue
            if not (state.failures or state.probing) or state.used < stale:
                del self._states[name]
        known = set(self._states)
        self._domains = {d: e for d, e in self._domains.items() if e[0] in known}

    # -- limits -----------------------------------------------------------------------------

    def paused_for(self, state: SiteState) -> float:
        return state.remaining(self.clock.now())

    async def throttle(self, state: SiteState) -> None:
        """Wait for a token of the destination's rate."""
        while state.bucket is not None:
            wait = state.bucket.take(self.clock.now())
            if wait <= 0.0:
                return
            if self._metrics is not None:
                self._metrics.destination_throttle_waits.labels(state.label).inc()
            await self.clock.sleep(wait)

    async def wait_for_room(self, state: SiteState) -> None:
        """Wait until a connection closes or goes idle (the caller then looks again; at
        least once a second, should a wake-up ever be missed)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0), state.changed:
                await state.changed.wait()

    def opened(self, state: SiteState) -> None:
        state.open += 1
        if self._metrics is not None:
            self._metrics.destination_connections.labels(state.label).inc()

    def closed(self, state: SiteState) -> None:
        state.open = max(0, state.open - 1)
        self.notify(state)

    def notify(self, state: SiteState) -> None:
        task = asyncio.get_running_loop().create_task(self._notify(state))
        self._tasks.add(task)  # a reference until it ran (the loop keeps only a weak one)
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _notify(state: SiteState) -> None:
        async with state.changed:
            state.changed.notify_all()

    # -- outcomes -----------------------------------------------------------------------------

    def refused(self, state: SiteState, reply: str) -> None:
        """A new connection got 421 (greeting, EHLO, or MAIL): the destination refuses
        connections now; pause it at once."""
        self._pause(state, reply)

    def record(self, state: SiteState, replies: Sequence[tuple[bool, str, bool]]) -> None:
        """One attempt's results, ``(delivered, reply, answered)`` per recipient (answered:
        the reply is the destination's, not one the relay wrote for a failed connection).
        A delivery ends a pause and the probing; a 5xx answer resets the streak and ends the
        probing (once the pause is over: it answers, so it is not refusing; a destination
        that only ever answers 5xx is not held to one connection for good); 4xx answers only
        (a 421 closing a transaction included) ``afterFailures`` attempts in a row, or once
        while probed, pause. An attempt without an answer changes nothing here."""
        if not replies:
            return
        answers = [_code(reply) for _, reply, answered in replies if answered]
        delivered = sum(1 for ok, _, _ in replies if ok)
        if delivered and self._metrics is not None:
            self._metrics.destination_deliveries.labels(state.label).inc(delivered)
        if delivered or any(500 <= c < 600 for c in answers):  # it answers
            state.failures = 0
            if delivered:  # another of its servers took it: not refusing after all
                state.paused_until = None
            if state.probing and not state.remaining(self.clock.now()):  # the probe answered
                state.probing = False
                state.backoff.reset()
                self.notify(state)
        elif any(400 <= c < 500 for c in answers):  # it says: try later
            state.failures += 1
            if state.probing or state.failures >= self._policy.pause.after_failures:
                reason = next(r for _, r, answered in replies if answered)
                self._pause(state, reason)
        # else no answer at all (refused, timed out, TLS failure, lost): not the destination
        # pushing back; the queue's retry schedule and probe cover a dead server.

    def _pause(self, state: SiteState, reason: str) -> None:
        now = self.clock.now()
        if state.remaining(now) > 0.0:  # attempts in flight as it was paused: one pause
            return
        state.paused_until = now + state.backoff.next()
        state.probing = True
        state.failures = 0
        state.reason = reason[:200]

    # -- what metrics and stats see -------------------------------------------------------

    def paused(self) -> list[PausedDestination]:
        now, wall = self.clock.now(), self._wall()
        found = sorted(
            (s for s in self._states.values() if s.remaining(now) > 0.0),
            key=lambda s: s.paused_until or 0.0,
        )
        return [
            PausedDestination(
                name=s.name,
                until=datetime.fromtimestamp(math.ceil(wall + s.remaining(now)), UTC),
                reason=s.reason,
            )
            for s in found[:MAX_REPORTED]
        ]

    def paused_count(self) -> float:
        now = self.clock.now()
        return float(sum(1 for s in self._states.values() if s.remaining(now) > 0.0))
