"""The relay's webhook subscriptions: one :class:`Dispatcher` task each, following the live
configuration, woken when their token has new events, and their figures for the stats.

Subscriptions are the ``webhooks`` of the credential entries (SmtpToken ``spec.webhooks``).
When the configuration snapshot changes, new ones get a row (at the newest event) and a task,
removed ones lose their task (their row stays a while, records/webhooks.py), changed ones are
told. New events are found with one query for the whole relay (usernames with events after the
last seq seen), every ``pollInterval`` seconds or at once when :meth:`notify` is called (a
delivery outcome, say); only the dispatchers of those usernames look for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime

import aiohttp

from txmail_relay.config.live import DynamicConfig, LiveConfig
from txmail_relay.contract import WebhookSettings, WebhookStats
from txmail_relay.metrics import RelayMetrics
from txmail_relay.outcomes import OutcomeEvent
from txmail_relay.records.records import Records
from txmail_relay.webhooks.dispatcher import USER_AGENT, Dispatcher, Subscription, is_failing

log = logging.getLogger(__name__)

PRUNE_EVERY = 3600.0  # seconds between forgetting subscriptions removed long ago


def _time(at: float | None) -> datetime | None:
    return None if at is None else datetime.fromtimestamp(at, UTC)


class WebhookManager:
    """``start()`` (after the records are open and the first configuration is there), ``run()``
    as a task, ``stop()`` at the end. Also an OutcomeListener: an outcome wakes it."""

    def __init__(
        self,
        records: Records,
        config: LiveConfig,
        settings: WebhookSettings,
        metrics: RelayMetrics,
        *,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self._records = records
        self._config = config
        self._settings = settings
        self._metrics = metrics
        self._clock = clock
        self._rng = rng
        self._dispatchers: dict[str, tuple[Dispatcher, asyncio.Task[None]]] = {}
        self._seen_config: DynamicConfig | None = None  # the snapshot sync() last followed
        self._broken = False  # the last tick failed (logged once)
        self._seen_seq = 0
        self._wake = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None
        self._pruned = 0.0
        metrics.track_webhooks(
            lambda: len(self._dispatchers),
            lambda: sum(1 for d, _ in self._dispatchers.values() if d.failing()),
        )

    def notify(self) -> None:
        """Events may have been written: look now rather than at the next poll."""
        self._wake.set()

    def on_outcome(self, event: OutcomeEvent) -> None:
        self.notify()

    async def start(self) -> None:
        """The rows of the configured subscriptions (a new one starts at the newest event, so
        call this before mail is taken); rows of subscriptions no longer configured are marked
        removed. Delivery starts with :meth:`run`."""
        self._seen_seq = await self._records.webhooks.newest()
        wanted = self._wanted(self._config.current)
        for sub in wanted.values():
            await self._ensure(sub)
        for state in await self._records.webhooks.all():
            if state.id not in wanted and state.removed is None:
                await self._records.webhooks.remove(state.id)

    async def run(self) -> None:
        """Deliver until cancelled; the HTTP client lives as long as this task does."""
        self._session = aiohttp.ClientSession(
            # Cookies of one receiver must never reach another (nor the same one later).
            cookie_jar=aiohttp.DummyCookieJar(),
            headers={"user-agent": USER_AGENT},
            trust_env=False,
        )
        try:
            while True:
                try:
                    await self._tick()
                except asyncio.CancelledError:
                    raise
                except Exception:
                    # Logged once per run of failures (the records unreadable for a while
                    # would otherwise log every pollInterval); retried at the next poll.
                    if not self._broken:
                        log.exception("webhooks: looking for new events failed; retrying")
                    self._broken = True
                else:
                    if self._broken:
                        log.info("webhooks: looking for new events works again")
                    self._broken = False
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._settings.poll_interval)
                self._wake.clear()
        finally:
            await self.stop()

    async def _tick(self) -> None:
        if self._config.current is not self._seen_config or any(
            task.done() for _, task in self._dispatchers.values()
        ):
            await self.sync()
        newest, usernames = await self._records.webhooks.new_events(self._seen_seq)
        self._seen_seq = newest
        if usernames:
            for dispatcher, _ in self._dispatchers.values():
                if dispatcher.subscription.username in usernames:
                    dispatcher.wake()
        now = self._clock()
        if now - self._pruned >= PRUNE_EVERY:
            self._pruned = now
            await self._records.webhooks.prune_removed(now - self._settings.retry_for)

    def _wanted(self, config: DynamicConfig | None) -> dict[str, Subscription]:
        wanted: dict[str, Subscription] = {}
        if config is not None:
            for entry in config.credentials.values():
                for endpoint in entry.webhooks:
                    sub = Subscription.of(entry, endpoint)
                    wanted[sub.id] = sub
        return wanted

    async def _ensure(self, sub: Subscription) -> None:
        await self._records.webhooks.ensure(
            sub.id, sub.username, sub.endpoint.name, resume_within=self._settings.retry_for
        )

    async def sync(self) -> None:
        """Start, stop and update dispatchers to match the configuration now, and start again
        any that ended. The snapshot counts as followed only once this succeeded (a failure
        is tried again at the next poll)."""
        config = self._config.current
        wanted = self._wanted(config)
        for sub_id in [i for i in self._dispatchers if i not in wanted]:
            _, task = self._dispatchers[sub_id]
            task.cancel()
            await asyncio.wait({task})
            await self._records.webhooks.remove(sub_id)
            del self._dispatchers[sub_id]
            log.info("webhook stopped", extra={"webhook": sub_id})
        for sub_id, sub in wanted.items():
            running = self._dispatchers.get(sub_id)
            if running is not None and not running[1].done():
                if running[0].subscription != sub:
                    running[0].update(sub)
                continue
            if running is not None:
                log.warning("webhook dispatcher ended: started again", extra={"webhook": sub_id})
                del self._dispatchers[sub_id]
            await self._ensure(sub)
            self._start(sub)
        self._seen_config = config

    def _start(self, sub: Subscription) -> None:
        if self._session is None:
            raise RuntimeError("dispatchers run inside WebhookManager.run()")
        dispatcher = Dispatcher(
            sub,
            self._records,
            self._session,
            self._settings,
            self._metrics,
            clock=self._clock,
            rng=self._rng,
        )
        task = asyncio.get_running_loop().create_task(dispatcher.run(), name=f"webhook {sub.id}")
        task.add_done_callback(self._ended)
        self._dispatchers[sub.id] = (dispatcher, task)
        log.info("webhook started", extra={"webhook": sub.id, "origin": sub.origin})

    def _ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("webhook dispatcher ended", exc_info=task.exception())

    async def stats(self) -> dict[str, list[WebhookStats]]:
        """The figures of every configured subscription, per token username (StatsLoop)."""
        now = self._clock()
        found: dict[str, list[WebhookStats]] = {}
        states = {state.id: state for state in await self._records.webhooks.all()}
        for dispatcher, _ in sorted(self._dispatchers.values(), key=lambda d: d[0].subscription.id):
            sub = dispatcher.subscription
            state = states.get(sub.id)
            if state is None:
                continue
            failing = is_failing(state, self._settings, now)
            backlog = await self._records.webhooks.backlog(
                sub.username,
                # Past what its scans found nothing in: those events are not waiting.
                max(state.cursor, dispatcher.horizon),
                [t.value for t in sub.types],
            )
            found.setdefault(sub.username, []).append(
                WebhookStats(
                    name=sub.endpoint.name,
                    state="Failing" if failing else "Healthy",
                    last_error=state.last_error,
                    last_success_at=_time(state.last_success),
                    failing_since=_time(state.failing_since) if failing else None,
                    backlog=backlog,
                    dropped=state.dropped,
                )
            )
        self._metrics.webhook_backlog.set(sum(w.backlog for subs in found.values() for w in subs))
        return found

    async def stop(self) -> None:
        """Stop delivering (the subscriptions stay known for the last stats); idempotent."""
        tasks = [task for _, task in self._dispatchers.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()
