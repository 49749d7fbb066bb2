"""Stats: outcomes into the records, the per-token figures, Prometheus, and publishing.

:class:`OutcomeRecorder` writes an attempt's outcomes to the records before the spool
crosses them off (:meth:`OutcomeRecorder.record`, awaited by delivery), and is the
:class:`~txmail_relay.outcomes.OutcomeListener` of those it could not write then (without
waiting): an outcome the full volume refused, or that came while the records' queue was full
(:meth:`Records.has_room`), is kept and written again, in order, until the records take it (so
the figures and the send statuses are right once space is back). :class:`StatsLoop` computes a
:class:`~txmail_relay.contract.RelayStats` every ``statsInterval`` seconds, keeps its counts
for the Prometheus collector and hands it to a :class:`StatsPublisher`: the ConfigMap the
operator copies into ``SmtpToken.status.stats``
(:class:`~txmail_relay.config.kube.KubernetesStatsPublisher`) or a file
(:class:`FileStatsPublisher`). Only configured tokens are published and become metric labels.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from txmail_relay.config.live import LiveConfig
from txmail_relay.contract import (
    PausedDestination,
    RecordsSettings,
    RelayStats,
    TokenStats,
    WarmupStats,
    WebhookStats,
)
from txmail_relay.metrics import PREFIX
from txmail_relay.outcomes import OutcomeEvent
from txmail_relay.records.database import RecordsFullError
from txmail_relay.records.model import Kind, Totals
from txmail_relay.records.records import Records

log = logging.getLogger(__name__)

#: How long the events log keeps an event by default (the events API's window; the webhooks
#: retry a delivery for 24 hours, well within it): ``records.eventsRetention``. Older ones, and
#: the oldest beyond ``records.maxEvents``, are deleted at each stats refresh.
EVENTS_RETENTION = RecordsSettings().events_retention


class OutcomeRecorder:
    """Writes an attempt's outcomes when delivery asks (:meth:`record`, before the spool's
    DONE), or as they come (:meth:`on_outcome`, after it); keeps those a full volume refused,
    and those that come while the records' queue is full (at most ``max_kept`` in all, in
    memory: beyond, the oldest are dropped and said so), and writes them again, in order and
    ``chunk`` at a time (one transaction), once the queue has room, every ``retry_interval``
    seconds while the volume is full. A refused write was rolled back, and every write is keyed
    by its attempt, so writing it again counts it once."""

    def __init__(
        self,
        records: Records,
        *,
        retry_interval: float = 1.0,
        max_kept: int = 100_000,
        chunk: int = 500,
    ) -> None:
        self._records = records
        self._retry_interval = retry_interval
        self._max_kept = max_kept
        self._chunk = chunk
        self._kept: deque[OutcomeEvent] = deque()
        self._retrying: asyncio.Task[None] | None = None
        self._dropped = 0
        self._full = False  # the last write refused was refused for space
        self._finished: list[str] = []  # messages whose attempt keys are to be forgotten

    def kept(self) -> int:
        return len(self._kept)

    async def record(self, events: Sequence[OutcomeEvent]) -> list[OutcomeEvent]:
        """Write one attempt's outcomes now, asked for together (one transaction, no fsync of
        their own: records/database.py), and wait for them; returns those not written, for
        :meth:`on_outcome` (after the spool has them): all of them while outcomes wait for
        room or the records' queue is full (a full or slow volume never holds delivery), and
        those the full volume refused. An outcome that failed otherwise is logged, as in
        :meth:`on_outcome`. Each write is keyed by its attempt (records/events.py
        ``Events.outcome``), so one asked for again after a crash is not counted twice."""
        if self._kept or not self._records.has_room():
            return list(events)
        writes = [self._write(event) for event in events]
        if self._finished:  # in the same transaction as this attempt's
            writes.append(asyncio.ensure_future(self._forget()))
        results = await asyncio.gather(*writes, return_exceptions=True)
        if len(results) > len(events) and isinstance(results[-1], BaseException):
            log.warning("attempt keys not deleted: %s", type(results[-1]).__name__)
        refused = []
        for event, result in zip(events, results, strict=False):
            if _full(result):
                refused.append(event)
            elif isinstance(result, BaseException):
                log.error("outcome not recorded: %s", type(result).__name__, exc_info=result)
        return refused

    def finished(self, spool_id: str) -> None:
        """``spool_id`` is crossed off for good: its attempt keys go with the next outcomes'
        write (or on their own once 500 wait)."""
        self._finished.append(spool_id)
        if len(self._finished) >= self._chunk and self._records.has_room():
            future = asyncio.ensure_future(self._forget())
            future.add_done_callback(_forgotten)

    def _forget(self) -> Awaitable[None]:
        ids, self._finished = self._finished, []
        return self._records.events.forget_outcomes(ids)

    def on_outcome(self, event: OutcomeEvent) -> None:
        if self._kept or not self._records.has_room():  # behind the ones waiting, in order
            self._keep(event)
            return
        future = asyncio.ensure_future(self._write(event))
        future.add_done_callback(lambda f: self._written(event, f))

    def _write(self, event: OutcomeEvent) -> asyncio.Future[None]:
        return asyncio.ensure_future(
            self._records.events.outcome(
                event.message_id,
                event.username,
                event.recipient,
                event.outcome,
                event.at,
                reply=event.reply,
                attempt=event.attempts,
            )
        )

    def _written(self, event: OutcomeEvent, future: asyncio.Future[None]) -> None:
        if future.cancelled():
            return
        error = future.exception()
        if isinstance(error, RecordsFullError):
            self._full = True
            self._keep(event)
        elif error is not None:
            log.error("outcome not recorded: %s", type(error).__name__, exc_info=error)

    def _keep(self, event: OutcomeEvent) -> None:
        if len(self._kept) >= self._max_kept:
            self._kept.popleft()
            self._dropped += 1
            if self._dropped == 1:
                log.error("too many outcomes waiting for space: the oldest are dropped")
        self._kept.append(event)
        if self._retrying is None or self._retrying.done():
            if self._full:
                log.warning("outcomes wait for space on the records' volume")
            self._retrying = asyncio.get_running_loop().create_task(
                self._retry(), name="outcomes-retry"
            )

    async def _retry(self) -> None:
        while self._kept:
            if self._full:
                await asyncio.sleep(self._retry_interval)
            await self._records.room()
            chunk = [self._kept.popleft() for _ in range(min(self._chunk, len(self._kept)))]
            # Asked for together, in order: they share a transaction (records/database.py).
            results = await asyncio.gather(
                *(self._write(event) for event in chunk), return_exceptions=True
            )
            refused = [e for e, r in zip(chunk, results, strict=True) if _full(r)]
            for result in results:
                if isinstance(result, BaseException) and not _full(result):
                    log.error("outcome not recorded: %s", type(result).__name__, exc_info=result)
            self._kept.extendleft(reversed(refused))  # still full: first, later
            if self._full and not refused:
                self._full = False
                log.info("outcomes waiting for space recorded")
            self._full = self._full or bool(refused)


def _full(result: object) -> bool:
    return isinstance(result, RecordsFullError)


def _forgotten(future: asyncio.Future[None]) -> None:
    if not future.cancelled() and (error := future.exception()) is not None:
        # Rows of finished messages left behind, harmless (a full volume, say).
        log.warning("attempt keys not deleted: %s", type(error).__name__)


def _rate(part: int, whole: int) -> float:
    return round(part / whole, 4) if whole else 0.0


def token_stats(counts: Mapping[Kind, int], last_sent: float | None, contacts: int) -> TokenStats:
    delivered = counts.get(Kind.DELIVERED, 0)
    unique_opens = counts.get(Kind.UNIQUE_OPENED, 0)
    unique_clicks = counts.get(Kind.UNIQUE_CLICKED, 0)
    return TokenStats(
        sent=counts.get(Kind.SENT, 0),
        delivered=delivered,
        bounced=counts.get(Kind.BOUNCED, 0) + counts.get(Kind.EXPIRED, 0),
        soft_bounces=counts.get(Kind.SOFT_BOUNCED, 0),
        opens=counts.get(Kind.OPENED, 0),
        clicks=counts.get(Kind.CLICKED, 0),
        machine_opens=counts.get(Kind.MACHINE_OPENED, 0),
        machine_clicks=counts.get(Kind.MACHINE_CLICKED, 0),
        dropped=counts.get(Kind.DROPPED, 0),
        unique_opens=unique_opens,
        unique_clicks=unique_clicks,
        complaints=counts.get(Kind.COMPLAINED, 0),
        open_rate=_rate(unique_opens, delivered),
        click_rate=_rate(unique_clicks, delivered),
        last_sent_at=None if last_sent is None else datetime.fromtimestamp(last_sent, UTC),
        contacts=contacts,
    )


def relay_stats(totals: Totals, usernames: frozenset[str], now: datetime) -> RelayStats:
    return RelayStats(
        tokens={
            name: token_stats(
                totals.counts.get(name, {}),
                totals.last_sent.get(name),
                totals.contacts.get(name, 0),
            )
            for name in sorted(usernames)
        },
        updated_at=now,
    )


class StatsPublisher(Protocol):
    async def publish(self, stats: RelayStats) -> None: ...


class FileStatsPublisher:
    """Writes the stats JSON to a file, atomically (write, fsync, rename)."""

    def __init__(self, path: Path) -> None:
        self._path = path

    async def publish(self, stats: RelayStats) -> None:
        await asyncio.to_thread(self._write, stats.to_json())

    def _write(self, text: str) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._path.with_name(self._path.name + ".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(self._path)


_METRIC_KINDS = (
    ("sent", Kind.SENT),
    ("delivered", Kind.DELIVERED),
    ("deferred", Kind.DEFERRED),
    ("bounced", Kind.BOUNCED),
    ("expired", Kind.EXPIRED),
    ("opened", Kind.OPENED),
    ("clicked", Kind.CLICKED),
    ("unique_opened", Kind.UNIQUE_OPENED),
    ("unique_clicked", Kind.UNIQUE_CLICKED),
    ("complained", Kind.COMPLAINED),
    ("unsubscribed", Kind.UNSUBSCRIBED),
    ("soft_bounced", Kind.SOFT_BOUNCED),
    ("machine_opened", Kind.MACHINE_OPENED),
    ("machine_clicked", Kind.MACHINE_CLICKED),
    ("dropped", Kind.DROPPED),
)


class StatsLoop:
    """Refreshes the figures every ``interval`` seconds and publishes them."""

    def __init__(
        self,
        records: Records,
        config: LiveConfig,
        publisher: StatsPublisher | None,
        interval: float,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        warmup: Callable[[], WarmupStats | None] = lambda: None,
        destinations: Callable[[], list[PausedDestination]] = list,
        webhooks: Callable[[], Awaitable[dict[str, list[WebhookStats]]]] | None = None,
        retention: RecordsSettings | None = None,
    ) -> None:
        self._retention = retention or RecordsSettings()  # the events log's bounds
        self._destinations = destinations  # paused destinations (delivery/shaping.py)
        self._webhooks = webhooks  # subscriptions' figures (webhooks/manager.py)
        self._warmup = warmup  # the warm-up gate's figures (delivery/warmup.py)
        self._records = records
        self._config = config
        self._publisher = publisher
        self._interval = interval
        self._clock = clock
        self._counts: dict[str, dict[Kind, int]] = {}
        self._contacts: dict[str, int] = {}

    def register(self, registry: CollectorRegistry) -> None:
        registry.register(_Collector(self))

    async def refresh(self) -> RelayStats:
        config = self._config.current
        names = frozenset(config.credentials) if config is not None else frozenset()
        now = self._clock()
        try:
            retention = self._retention
            pruned = await self._records.events.prune(
                now.timestamp() - retention.events_retention, keep=retention.max_events
            )
            if pruned:
                log.info("events pruned", extra={"events": pruned})
        except RecordsFullError:
            log.warning("old events not pruned: the records' volume is full")
        totals = await self._records.counters.totals()
        stats = relay_stats(totals, names, now)
        warmup = self._warmup()
        if warmup is not None:
            stats = stats.model_copy(update={"warmup": warmup})
        stats = stats.model_copy(update={"destinations": self._destinations()})
        if self._webhooks is not None:
            stats = stats.model_copy(update={"webhooks": await self._webhooks()})
        self._counts = {n: dict(totals.counts.get(n, {})) for n in names}
        self._contacts = {n: totals.contacts.get(n, 0) for n in names}
        if self._publisher is not None:
            try:
                await self._publisher.publish(stats)
            except Exception as e:  # publishing again at the next interval
                log.warning("stats not published: %s", type(e).__name__)
        return stats

    async def run(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception:
                log.exception("stats refresh failed")
            await asyncio.sleep(self._interval)

    def samples(self) -> Iterator[tuple[str, str, int]]:
        for token, counts in sorted(self._counts.items()):
            for label, kind in _METRIC_KINDS:
                yield token, label, counts.get(kind, 0)

    def contacts(self) -> Mapping[str, int]:
        return self._contacts


class _Collector(Collector):
    """``txmail_relay_token_events_total{token, event}`` and ``token_contacts{token}`` from the
    store (persistent across restarts), as of the last refresh."""

    def __init__(self, loop: StatsLoop) -> None:
        self._loop = loop

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        events = CounterMetricFamily(
            f"{PREFIX}token_events",
            "Recorded events per token (persistent; as of the last stats refresh)",
            labels=["token", "event"],
        )
        for token, label, value in self._loop.samples():
            events.add_metric([token, label], value)
        yield events
        contacts = GaugeMetricFamily(
            f"{PREFIX}token_contacts", "Contacts per token (createContacts)", labels=["token"]
        )
        for token, value in sorted(self._loop.contacts().items()):
            contacts.add_metric([token], value)
        yield contacts
