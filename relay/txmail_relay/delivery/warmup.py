"""IP warm-up: the daily budget in front of the delivery queue (docs/deliverability.md).

The queue asks :meth:`WarmupGate.admit` before it makes a new message's recipients ready.
While the day's budget (:class:`~txmail_relay.contract.WarmupConfig`) has room they pass and
are counted; the rest are held here, in arrival order, and stay in the spool: nothing is
refused or lost, and holding is not an attempt (no backoff, no retry counted). When a new day
starts, or the configuration raises the budget, the held recipients are released to the queue
up to the new room, oldest first; once warm-up is off or done every held recipient goes.

What counts: each recipient the first time it is handed to delivery. A retry after a 4xx is
the same message and is not counted again (its job has attempts), nor is a recipient that
comes back without an attempt (a destination paused by shaping), nor after a restart: the
recipients counted are kept in the records per spooled message until it is finished.

The day's count is kept in the records (:mod:`txmail_relay.records.warmup`) and read at
start, so a restart keeps what the day already used. A charge is written without waiting
(the queue's scheduling is synchronous): a crash in the few milliseconds before it lands
forgets those recipients, the spool's own at-least-once window.

Queue lifetime: a held message's ``maxLifetime`` counts from its release, not from its
reception (:meth:`WarmupGate.lifetime_start`): a message held for days still gets the whole
retry period once it is allowed out. The release time is kept in the records with the rest,
so it holds after a restart too (and a message held before one starts its lifetime when the
restarted relay lets it out).

Until the operator records ``startedAt`` the relay counts days from when it first ran with
warm-up on (kept in the records; forgotten when warm-up is turned off), so held mail still
goes out on later days' budgets; the operator's start replaces it once known.

The clock is a constructor argument (``clock``, seconds since the epoch like ``time.time``):
tests move it a day instead of sleeping. :meth:`WarmupGate.run` looks at it every
``check_interval`` seconds (and at each new day's start).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from txmail_relay.contract import WarmupConfig, WarmupStats
from txmail_relay.records.database import background
from txmail_relay.records.warmup import AdmittedMessage, WarmupCounts
from txmail_relay.spool.segments import SpooledMessage

log = logging.getLogger(__name__)

Release = Callable[[SpooledMessage, tuple[int, ...]], None]
_OFF = WarmupConfig()


@dataclass(eq=False)
class _Held:
    msg: SpooledMessage
    indices: tuple[int, ...]


class WarmupGate:
    def __init__(
        self,
        config: Callable[[], WarmupConfig | None],
        counts: WarmupCounts,
        *,
        clock: Callable[[], float] = time.time,
        check_interval: float = 30.0,
    ) -> None:
        self._config = config
        self._counts = counts
        self._clock = clock
        self._check_interval = check_interval
        self._key: tuple[str, int] | None = None  # (start, day) that _sent counts
        self._sent = 0
        self._held: deque[_Held] = deque()
        self._held_recipients = 0
        self._held_messages: dict[str, int] = {}  # spool id -> recipients held
        self._release: Release | None = None
        self._lifetime_clock: Callable[[], float] = time.time
        # Per spool id: recipients already counted, held or not, released when (kept in the
        # records too, until the queue says the message is finished).
        self._messages: dict[str, AdmittedMessage] = {}
        self._local_start: float | None = None  # day 1 while startedAt is unknown

    def bind(self, release: Release, lifetime_clock: Callable[[], float]) -> None:
        """The queue's entry for released recipients, and its clock (lifetimes)."""
        self._release = release
        self._lifetime_clock = lifetime_clock

    # -- the day ------------------------------------------------------------------------

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock(), UTC)

    def _warmup(self) -> WarmupConfig:
        return self._config() or _OFF

    def _current(self) -> tuple[WarmupConfig, tuple[str, int], int | None]:
        """The schedule, today's key and today's budget (None: no limit); changes nothing.

        Without the operator's ``startedAt`` the relay's own start stands in for it (the
        key's start stays ``""``)."""
        cfg = self._warmup()
        start = cfg.started_at.isoformat() if cfg.started_at is not None else ""
        if cfg.started_at is None and cfg.active and self._local_start is not None:
            own = datetime.fromtimestamp(self._local_start, UTC)
            cfg = cfg.model_copy(update={"started_at": own})
        day = cfg.day(self._now())
        return cfg, (start, day), cfg.budget(day)

    def _own_clock(self) -> None:
        """Start the relay's own day 1 (warm-up on, no startedAt), or forget it (off)."""
        configured = self._config()
        if configured is None:
            return  # not configured yet: nothing to decide
        if configured.active and configured.started_at is None:
            if self._local_start is None:
                self._local_start = self._clock()
                background(self._counts.set_clock(self._local_start))
        elif not configured.active and self._local_start is not None:
            self._local_start = None
            background(self._counts.set_clock(None))

    def _today(self) -> tuple[WarmupConfig, tuple[str, int], int | None]:
        """:meth:`_current`, moving the count to a new day (which starts at 0)."""
        self._own_clock()
        cfg, key, budget = self._current()
        day = key[1]
        if key != self._key:
            # The start recorded while day 1 ran keeps what day 1 used before it was known.
            if not (self._key == ("", 1) and day == 1):
                self._sent = 0
            self._key = key
        return cfg, key, budget

    async def load(self, queued: Collection[str] = ()) -> None:
        """Read today's count and what is known of the ``queued`` messages (the spool's)
        from the records, at start once the configuration is known; forget the others.

        Never raises (the relay must start): what cannot be read (an odd record, a bug) is
        logged once and the gate runs with the rest, never above the schedule: without the
        relay's own start it starts a new day 1, without the recipients counted they count
        again, and without today's count the day is taken as full (new mail is held for the
        next day's budget)."""
        failed: list[tuple[str, Exception]] = []
        try:
            self._local_start = await self._counts.clock()
        except Exception as e:
            failed.append(("the relay's own start", e))
        try:
            known = await self._counts.messages()
        except Exception as e:
            failed.append(("the recipients counted per message", e))
        else:
            self._messages = {i: known[i] for i in queued if i in known}
            gone = [i for i in known if i not in self._messages]
            try:
                if gone:
                    await self._counts.forget(gone)
            except Exception as e:
                failed.append(("forgetting finished messages", e))
        try:
            cfg, key, budget = self._today()
            if cfg.active:
                try:
                    self._sent = await self._counts.sent(*key)
                except Exception as e:
                    failed.append(("today's count, the day is taken as full", e))
                    self._sent = max(self._sent, budget or 0)
                log.info("warm-up: day %d, %d sent", key[1], self._sent, extra={"budget": budget})
        except Exception as e:  # the day itself: admit() meets the same (the queue's guard)
            failed.append(("the day", e))
        if failed:
            log.error(
                "warm-up records unreadable, going on without: %s",
                "; ".join(what for what, _ in failed),
                exc_info=failed[0][1],
            )

    # -- what the queue asks ------------------------------------------------------------

    def admit(self, msg: SpooledMessage, indices: Sequence[int], attempts: int) -> tuple[int, ...]:
        """The recipients of ``msg`` that may go now; the rest are held (and counted)."""
        if attempts > 0:  # a retry: counted when it was first admitted
            return tuple(indices)
        # Admitted before and back without an attempt (a destination paused by shaping, say):
        # counted already.
        state = self._messages.get(msg.id)
        seen = state.admitted if state is not None else set()
        again = tuple(i for i in indices if i in seen)
        wanted = tuple(i for i in indices if i not in seen)
        if not wanted:
            return again
        _cfg, key, budget = self._today()
        if budget is None:
            self._release_all()
            return (*again, *wanted)
        if self._held:  # the budget was raised: the waiting ones first
            self._drain(budget)
        room = max(0, budget - self._sent)
        if self._held:  # still waiting: this one queues behind them
            room = 0
        take, rest = wanted[:room], wanted[room:]
        if take or rest:
            self._note(msg, take, key, held=bool(rest))
        if rest:
            self._held.append(_Held(msg, rest))
            self._held_recipients += len(rest)
            self._held_messages[msg.id] = self._held_messages.get(msg.id, 0) + len(rest)
            if self._held_recipients == len(rest):
                log.warning(
                    "warm-up: day %d budget of %d used, holding mail for the next day",
                    key[1],
                    budget,
                )
        return (*again, *take)

    def lifetime_start(self, msg: SpooledMessage) -> float:
        """Where ``msg``'s queue lifetime starts (its release, if it was held)."""
        state = self._messages.get(msg.id)
        if state is None or state.released_at is None:
            return msg.received_at
        return max(msg.received_at, state.released_at)

    def finished(self, msg: SpooledMessage) -> None:
        """The queue is done with ``msg``: forget what is kept of it."""
        if self._messages.pop(msg.id, None) is not None:
            background(self._counts.forget([msg.id]))

    def holding(self) -> bool:
        """Whether anything is held now (the send API looks a send's messages up only then)."""
        return bool(self._held_messages)

    def held(self, spool_id: str) -> bool:
        return spool_id in self._held_messages

    def next_day(self) -> datetime | None:
        """When the next day's budget starts (None while the start is unknown, or no limit)."""
        cfg, key, budget = self._today()
        if budget is None:
            return None
        return cfg.day_start(key[1] + 1)

    def snapshot(self) -> WarmupStats | None:
        """Today's figures; None when warm-up is off and nothing is held."""
        cfg, key, budget = self._today()
        if not cfg.active and not self._held:
            return None
        return WarmupStats(
            day=key[1], budget=budget, sent=self._sent, deferred=self._held_recipients
        )

    # The metrics read without changing anything: a scrape may come from another thread.

    def budget_metric(self) -> float:
        _cfg, _key, budget = self._current()
        return -1.0 if budget is None else float(budget)

    def sent_metric(self) -> float:
        _cfg, key, _budget = self._current()
        same = key == self._key or (self._key == ("", 1) and key[1] == 1)
        return float(self._sent) if same else 0.0

    def deferred_metric(self) -> float:
        return float(self._held_recipients)

    # -- releasing ----------------------------------------------------------------------

    def tick(self) -> None:
        """Release what today's budget (or its absence) allows."""
        if not self._held:
            self._today()
            return
        _cfg, _key, budget = self._today()
        if budget is None:
            self._release_all()
        else:
            self._drain(budget)

    async def run(self) -> None:
        while True:
            try:
                self.tick()
                pause = self._pause()
            except Exception:  # a bug must not stop the releases: try again later
                log.exception("warm-up release failed")
                pause = self._check_interval
            await asyncio.sleep(pause)

    def _pause(self) -> float:
        upcoming = self.next_day()
        if upcoming is None:
            return self._check_interval
        left = (upcoming - self._now()).total_seconds()
        return max(0.01, min(self._check_interval, left))

    def _note(
        self,
        msg: SpooledMessage,
        counted: Sequence[int],
        key: tuple[str, int] | None,
        *,
        held: bool = False,
    ) -> None:
        """Count ``counted`` recipients of ``msg`` on ``key`` (None: no limit, no count) and
        keep it in the records: a message ever held starts its lifetime when some of it goes."""
        state = self._messages.setdefault(msg.id, AdmittedMessage())
        state.admitted.update(counted)
        if counted and state.held:
            state.released_at = self._lifetime_clock()
        state.held = state.held or held
        if key is not None:
            self._sent += len(counted)
        background(self._counts.note(key, len(counted), msg.id, state))

    def _drain(self, budget: int) -> None:
        key = self._key
        while self._held and self._sent < budget and key is not None:
            entry = self._held[0]
            room = budget - self._sent
            take, rest = entry.indices[:room], entry.indices[room:]
            if rest:
                entry.indices = rest
            else:
                self._held.popleft()
            self._let_go(entry.msg, take, key)

    def _release_all(self) -> None:
        while self._held:
            entry = self._held.popleft()
            self._let_go(entry.msg, entry.indices, None)

    def _let_go(
        self, msg: SpooledMessage, indices: tuple[int, ...], key: tuple[str, int] | None
    ) -> None:
        self._held_recipients -= len(indices)
        left = self._held_messages.get(msg.id, 0) - len(indices)
        if left > 0:
            self._held_messages[msg.id] = left
        else:
            self._held_messages.pop(msg.id, None)
        self._note(msg, indices, key)
        if self._release is not None:
            self._release(msg, indices)
