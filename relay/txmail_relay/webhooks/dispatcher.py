"""One subscription's delivery loop: batches of its token's events, in order, one request at
a time, retried with exponential backoff and full jitter until the retry period ends.

A round: if no batch is persisted, the events after the cursor (up to ``maxBatch``: one when
the receiver keeps up, more when events piled up while it was slow or down) become one, and
its range and ``webhook-id`` are written before the first attempt. Each attempt POSTs the
batch's body, signed afresh; a 2xx moves the cursor past it; anything else (another status,
a redirect: not followed, a connection error, no response within ``timeout``) is a failure,
retried after ``uniform(0, min(maxBackoff, minBackoff * 2**attempts))`` seconds ("full
jitter": receivers coming back are not hit by every relay at once) until ``retryFor`` has
passed since the batch's first attempt; the failure after that drops the batch (counted in
``dropped``, logged) and the next one is formed. ``failingAfterFailures`` failures in a row
(or failing for ``failingAfter`` seconds) make the subscription Failing until its next success.

A scan that finds nothing of the subscription's filter (a subscription to BOUNCE events while
the token sends and delivers) moves past what it looked at: the dispatcher keeps that horizon
and scans from it next time, and writes it as the cursor at most every
``HORIZON_SAVE_EVERY`` seconds (not a synced write per wake-up; after a crash the next scan
starts from the older cursor, which is only work again, never an event lost). A batch formed
from a scan covers its whole range too (up to what the scan looked at), so its success moves
the cursor past the non-matching events after its last one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp

from txmail_relay.contract import CredentialEntry, WebhookEndpoint, WebhookSettings
from txmail_relay.metrics import RelayMetrics
from txmail_relay.records.database import RecordsFullError
from txmail_relay.records.model import Event, EventType
from txmail_relay.records.records import Records
from txmail_relay.records.webhooks import SCAN_WINDOW, Batch, WebhookState, types_key
from txmail_relay.webhooks import format as fmt

log = logging.getLogger(__name__)

IDLE_FALLBACK = 60.0  # an idle dispatcher looks again this often even without a wake-up
HORIZON_SAVE_EVERY = 60.0  # seconds between writes of a scan's horizon as the cursor
USER_AGENT = "txmail-relay (webhooks)"


@dataclass(frozen=True)
class Subscription:
    """A webhook of a token, as the configuration has it now."""

    id: str  # <namespace>/<token>/<name>
    username: str
    endpoint: WebhookEndpoint

    @classmethod
    def of(cls, entry: CredentialEntry, endpoint: WebhookEndpoint) -> Subscription:
        return cls(f"{entry.namespace}/{entry.token}/{endpoint.name}", entry.username, endpoint)

    @property
    def types(self) -> list[EventType]:
        return [EventType(t.value) for t in self.endpoint.event_types]

    @property
    def types_key(self) -> str:
        return types_key([t.value for t in self.endpoint.event_types])

    @property
    def origin(self) -> str:
        """scheme://host[:port] of the URL: what logs say of it (a path or a query may carry
        a token)."""
        parts = urlsplit(self.endpoint.url)
        return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


@dataclass(frozen=True)
class Attempt:
    ok: bool
    result: str  # the metric label: 2xx, 3xx, 4xx, 5xx, timeout, connection, key
    error: str | None = None


MAX_DOUBLINGS = 64  # 2.0 ** 1024 overflows; any backoff is at its cap long before 2 ** 64


def backoff_cap(settings: WebhookSettings, attempts: int) -> float:
    """The upper bound of the delay after ``attempts`` failed attempts of a batch (its first
    failure: 0): ``min(maxBackoff, minBackoff * 2**attempts)``; the delay is drawn from
    ``[0, cap]`` (full jitter)."""
    doubled = settings.min_backoff * 2.0 ** min(max(attempts, 0), MAX_DOUBLINGS)
    return min(settings.max_backoff, doubled)


def is_failing(state: WebhookState, settings: WebhookSettings, now: float) -> bool:
    if state.failures >= settings.failing_after_failures:
        return True
    return state.failing_since is not None and now - state.failing_since >= settings.failing_after


class Dispatcher:
    """Delivers one subscription; :meth:`run` until cancelled (a request in flight is then
    abandoned: its batch is sent again, with the same ``webhook-id``, by the next run)."""

    def __init__(
        self,
        subscription: Subscription,
        records: Records,
        session: aiohttp.ClientSession,
        settings: WebhookSettings,
        metrics: RelayMetrics,
        *,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.subscription = subscription
        self.state: WebhookState | None = None  # as last read or written
        self._records = records
        self._session = session
        self._settings = settings
        self._metrics = metrics
        self._clock = clock
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not a secret
        self._wake = asyncio.Event()
        self._retry_now = False
        # Every event of the filter up to this seq is before the cursor: what scans found
        # nothing in, kept here and written now and then (module doc).
        self.horizon = 0
        self._horizon_saved = float("-inf")

    def failing(self) -> bool:
        return self.state is not None and is_failing(self.state, self._settings, self._clock())

    def wake(self) -> None:
        """New events of the token may be there."""
        self._wake.set()

    def update(self, subscription: Subscription) -> None:
        """The configuration changed the subscription (same id): a new URL or key is tried
        at once instead of at the batch's next backoff time; a new filter forms the batch
        again."""
        before, self.subscription = self.subscription, subscription
        old, new = before.endpoint, subscription.endpoint
        if old.url != new.url or old.secret != new.secret:
            self._retry_now = True
        if old.event_types != new.event_types or before.username != subscription.username:
            self.horizon = 0  # what it skipped may match now: from the cursor again
        self._wake.set()

    async def run(self) -> None:
        """Rounds until cancelled; a round that fails (the records, say) is logged once per
        run of failures and tried again after ``pollInterval``."""
        broken = False
        while True:
            extra = {"webhook": self.subscription.id}
            try:
                delay = await self.step()
            except asyncio.CancelledError:
                raise
            except RecordsFullError:
                if not broken:
                    log.warning("webhook waits for space on the records' volume", extra=extra)
                broken, delay = True, self._settings.poll_interval
            except Exception:
                if not broken:
                    log.exception("webhook round failed; retrying", extra=extra)
                broken, delay = True, self._settings.poll_interval
            else:
                if broken:
                    log.info("webhook rounds work again", extra=extra)
                broken = False
            await self._sleep(delay)

    async def _sleep(self, seconds: float) -> None:
        """Until ``seconds`` pass or a wake-up comes, whichever is first."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), max(0.0, seconds))

    async def step(self) -> float:
        """One round: form a batch or try the waiting one when due. Returns the seconds to
        wait before the next round (a wake-up cuts the wait short)."""
        sub, webhooks = self.subscription, self._records.webhooks
        if self.state is None:
            self.state = await webhooks.get(sub.id)
        state = self.state
        batch = state.batch
        if batch is not None and batch.types != sub.types_key:
            state = self.state = await webhooks.drop_batch(sub.id)  # formed again below
            batch = None
        self._wake.clear()  # a wake-up from now on makes another round
        if batch is None:
            found = await webhooks.scan(
                sub.username,
                max(state.cursor, self.horizon),
                sub.types,
                limit=self._settings.max_batch,
                window=SCAN_WINDOW,
            )
            if not found.events:
                self.horizon = max(self.horizon, found.upto)
                await self._save_horizon()
                # A window with nothing: look at the next one at once.
                return 0.0 if found.upto < found.newest else IDLE_FALLBACK
            events = found.events
            state = self.state = await webhooks.start_batch(
                sub.id,
                first=events[0].seq,
                last=found.upto,
                size=len(events),
                batch_id=fmt.new_webhook_id(),
                types=sub.types_key,
                at=self._clock(),
            )
            if state.batch is None:  # the row was just removed: the manager stops us
                return IDLE_FALLBACK
            batch = state.batch
        else:
            wait = batch.next_attempt - self._clock()
            if wait > 0 and not self._retry_now:
                return wait
            events = await webhooks.batch_events(sub.username, sub.types, batch)
            if not events:  # pruned meanwhile: nothing left to send of it
                self.state = await webhooks.skip_batch(sub.id, batch.id)
                return 0.0
        self._retry_now = False
        await self._attempt(batch, events)
        return 0.0

    async def _save_horizon(self) -> None:
        """Write the horizon as the cursor if it moved and the last write is old enough."""
        state, now = self.state, self._clock()
        if state is None or self.horizon <= state.cursor:
            return
        if now - self._horizon_saved < HORIZON_SAVE_EVERY:
            return
        self._horizon_saved = now
        self.state = await self._records.webhooks.advance(self.subscription.id, self.horizon)

    async def _attempt(self, batch: Batch, events: list[Event]) -> None:
        sub, webhooks, settings = self.subscription, self._records.webhooks, self._settings
        was_failing = self.failing()
        attempt = await self._post(batch, events)
        now = self._clock()
        self._metrics.webhook_requests.labels(attempt.result).inc()
        if attempt.ok:
            self.state = await webhooks.delivered_batch(sub.id, batch.id, now)
            self._metrics.webhook_events.labels("delivered").inc(len(events))
            if was_failing:
                log.info("webhook recovered", extra={"webhook": sub.id, "origin": sub.origin})
            return
        error = attempt.error or attempt.result
        next_attempt: float | None = None
        if now - batch.formed < settings.retry_for:
            next_attempt = now + self._rng.uniform(0.0, backoff_cap(settings, batch.attempts))
        self.state = await webhooks.failed_attempt(
            sub.id, batch.id, error=error, at=now, next_attempt=next_attempt
        )
        if next_attempt is None:
            self._metrics.webhook_events.labels("dropped").inc(len(events))
            log.warning(
                "webhook batch dropped after retrying for %g s: %d events",
                settings.retry_for,
                len(events),
                extra={"webhook": sub.id, "origin": sub.origin, "error": error},
            )
        if not was_failing and self.failing():
            log.warning(
                "webhook failing", extra={"webhook": sub.id, "origin": sub.origin, "error": error}
            )
        else:
            log.debug("webhook attempt failed", extra={"webhook": sub.id, "error": error})

    async def _post(self, batch: Batch, events: list[Event]) -> Attempt:
        sub, settings = self.subscription, self._settings
        try:
            key = sub.endpoint.key()
        except ValueError as e:
            return Attempt(ok=False, result="key", error=f"signing key unusable: {e}")
        payload = fmt.body(events, batch.formed)
        # The signature's timestamp is the wall clock's: receivers compare it with theirs.
        headers = fmt.signed_headers(batch.id, key, payload, time.time())
        headers["user-agent"] = USER_AGENT
        started = time.monotonic()
        try:
            async with self._session.post(
                sub.endpoint.url,
                data=payload,
                headers=headers,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=settings.timeout),
            ) as response:
                if 200 <= response.status < 300:
                    return Attempt(ok=True, result="2xx")
                # Its body is not read: nothing of it is shown (format.describe_status).
                return Attempt(
                    ok=False,
                    result=f"{response.status // 100}xx",
                    error=fmt.describe_status(response.status),
                )
        except (TimeoutError, aiohttp.ServerTimeoutError) as e:
            return Attempt(
                ok=False, result="timeout", error=fmt.describe_error(e, settings.timeout)
            )
        except aiohttp.ClientError as e:
            return Attempt(
                ok=False, result="connection", error=fmt.describe_error(e, settings.timeout)
            )
        finally:
            self._metrics.webhook_latency.observe(time.monotonic() - started)
