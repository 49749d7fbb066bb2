"""The delivery queue: workers, exponential backoff, expiry and per-recipient outcomes.

Every spooled message with undelivered recipients is here, either ready or waiting for its
next attempt. An attempt sends only the recipients still pending; final outcomes
(delivered, bounced, expired) are crossed off in the spool before listeners hear of them.
Recipients the relay gives up on (bounced, expired) are handed to ``on_failed`` first (the DSN
to the sender, delivery/dsn.py). A deferred job's attempts and next attempt go into the spool
(a STATE record), and a recovered message waits for that time (``next_attempt``).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from txmail_relay.delivery.transport import Destination, RecipientResult, Transport
from txmail_relay.delivery.warmup import WarmupGate
from txmail_relay.mail.dsn import FailedRecipient
from txmail_relay.outcomes import Outcome, OutcomeEvent, OutcomeListener
from txmail_relay.settings import RetrySettings
from txmail_relay.spool.segments import Spool, SpooledMessage

log = logging.getLogger(__name__)


def backoff(attempts: int, retry: RetrySettings) -> float:
    """Delay after the ``attempts``-th failed attempt: doubling from min to max backoff."""
    return float(min(retry.max_backoff, retry.min_backoff * 2 ** max(0, attempts - 1)))


class OutcomeWriter(Protocol):
    """Where outcomes are recorded (records/stats.py ``OutcomeRecorder``)."""

    async def record(self, events: Sequence[OutcomeEvent]) -> list[OutcomeEvent]:
        """Write ``events`` now; returns those not written (for :meth:`on_outcome`)."""
        ...

    def on_outcome(self, event: OutcomeEvent) -> None:
        """Write ``event`` in the background (it is crossed off in the spool already)."""

    def finished(self, spool_id: str) -> None:
        """The message is crossed off for good (its attempt keys may go)."""


@dataclass(eq=False)
class _Job:
    """Pending recipients of one message that go to one destination: attempted together."""

    msg: SpooledMessage
    indices: tuple[int, ...]
    attempts: int
    key: str  # the destination it is scheduled under


@dataclass(eq=False)
class _Destination:
    """Scheduling state of one destination (see :class:`~txmail_relay.delivery.transport.
    Destination`): its ready jobs in arrival order and its attempts in flight."""

    limit: int
    ready: deque[_Job] = field(default_factory=deque)
    active: int = 0
    failing: bool = False  # its last attempt delivered nothing: one attempt at a time

    def has_room(self) -> bool:
        return self.active < (1 if self.failing else self.limit)


class DeliveryQueue:
    """Schedules attempts per destination, so a destination that hangs (a tarpit, a server
    that answers nothing or slowly, an MX lookup without answer) holds at most its share of
    the ``concurrency`` workers and never the rest:

    * a message's pending recipients are split by :meth:`Transport.destination` into jobs;
    * destinations take turns for free workers (round robin); within one, jobs go in
      arrival order; a destination never has more than its ``concurrency`` in flight, and
      only one while its last attempt delivered nothing (a dead or refusing server is
      probed, not flooded, while its backlog waits);
    * a message's jobs at different destinations run independently (the spool records each
      attempt's outcomes on its own);
    * a deferred job waits for its backoff outside the workers.
    """

    def __init__(
        self,
        spool: Spool,
        transport: Transport,
        retry: RetrySettings,
        *,
        concurrency: int,
        listeners: Sequence[OutcomeListener] = (),
        recorder: OutcomeWriter | None = None,
        clock: Callable[[], float] = time.time,
        warmup: WarmupGate | None = None,
        sign: Callable[[bytes], Awaitable[bytes]] | None = None,
        return_path: Callable[[SpooledMessage], str] | None = None,
        on_failed: Callable[
            [SpooledMessage, Sequence[FailedRecipient], bytes | None], Awaitable[object]
        ]
        | None = None,
    ) -> None:
        self._spool = spool
        # The envelope sender of an attempt (VERP, mail/return_path.py); None: the app's own.
        self._return_path = return_path
        # Told of the recipients of an attempt the relay gives up on, before they are crossed
        # off (a DSN spooled then is never lost; a crash in between may send it twice).
        self._on_failed = on_failed
        self._sign = sign  # DKIM at delivery time (delivery/dkim.py: why then); never raises
        self._transport = transport
        self._retry = retry
        self._concurrency = concurrency
        self._listeners = list(listeners)
        self._recorder = recorder  # told before the spool and the listeners
        self._clock = clock
        self._warmup = warmup  # IP warm-up: holds new mail past the day's budget
        self._warmup_failed = False  # its failure is logged once
        if warmup is not None:
            warmup.bind(self._released, clock)
        self._waiting: list[tuple[float, int, _Job]] = []
        self._order = itertools.count()
        self._wakeup = asyncio.Event()
        self._messages: dict[str, SpooledMessage] = {}
        self._early: list[SpooledMessage] = []  # enqueued before start()
        self._destinations: dict[str, _Destination] = {}
        self._rotation: deque[str] = deque()  # destinations that have ready jobs, in turn
        self._tasks: set[asyncio.Task[None]] = set()  # the attempts in flight
        self._timer_task: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self._started = False
        self._stopping = False

    # -- what metrics and health see -----------------------------------------------------

    def depth(self) -> int:
        return len(self._messages)

    def oldest_age(self) -> float:
        if not self._messages:
            return 0.0
        return max(0.0, self._clock() - min(m.received_at for m in self._messages.values()))

    # -- lifecycle -----------------------------------------------------------------------

    def enqueue(self, msg: SpooledMessage) -> None:
        pending = msg.pending()
        if not pending:
            return
        self._messages[msg.id] = msg
        if self._started:
            self._make_ready(msg, pending, msg.attempts, not_before=self._resume_at(msg))
        else:  # recovered before the first configuration: destinations are not known yet
            self._early.append(msg)

    def start(self) -> None:
        self._timer_task = asyncio.get_running_loop().create_task(self._timer(), name="queue-timer")
        self._started = True
        early, self._early = self._early, []
        for msg in early:
            # A recovered deferral waits for its time (a restart does not retry all at once).
            self._make_ready(msg, msg.pending(), msg.attempts, not_before=self._resume_at(msg))
        self._dispatch()

    def _resume_at(self, msg: SpooledMessage) -> float:
        """When a recovered message is tried again: its persisted next attempt, but never
        later than ``retry.maxBackoff`` from now. No backoff is longer, so a later time means
        the clock was stepped back since it was written (or the settings shrank): without the
        cap the mail would wait for as long as the step, up to ``retry.maxLifetime``."""
        return min(msg.next_attempt, self._clock() + self._retry.max_backoff)

    def waiting(self) -> list[tuple[float, str, int]]:
        """(due, message id, attempts so far) of every job waiting for its time, soonest
        first."""
        return [(due, job.msg.id, job.attempts) for due, _, job in sorted(self._waiting)]

    async def stop(self, grace: float) -> None:
        """Let attempts in flight finish within ``grace``, then cancel the rest.

        A cancelled attempt leaves its message in the spool; it is retried on restart.
        """
        self._stopping = True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                await self._idle.wait()
        tasks = [*self._tasks, *([self._timer_task] if self._timer_task else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        self._timer_task = None

    # -- scheduling ----------------------------------------------------------------------

    def _destination(self, recipient: str) -> Destination:
        try:
            return self._transport.destination(recipient)
        except Exception:  # a bug must not lose the message: schedule it somewhere
            log.exception("no destination for a recipient")
            return Destination("unknown", 1)

    def _make_ready(
        self,
        msg: SpooledMessage,
        indices: Sequence[int],
        attempts: int,
        *,
        gated: bool = True,
        not_before: float = 0.0,
    ) -> None:
        """Queue ``indices`` of ``msg`` as one job per destination (as configured now), not
        before ``not_before`` (epoch seconds)."""
        if gated and self._warmup is not None:
            try:
                indices = self._warmup.admit(msg, indices, attempts)
            except Exception:  # a bug in the gate must not hold mail: let it all go
                if not self._warmup_failed:
                    log.exception("warm-up gate failed, delivering without it")
                self._warmup_failed = True
        groups: dict[Destination, list[int]] = {}
        for index in indices:
            groups.setdefault(self._destination(msg.recipients[index]), []).append(index)
        for dest, members in groups.items():
            now = self._clock()
            lifetime_end = msg.received_at + self._retry.max_lifetime
            due = min(max(now + dest.delay, not_before), lifetime_end)
            if due > now:  # a paused destination (shaping): wait outside the workers
                self._defer(_Job(msg, tuple(members), attempts, dest.key), due)
                continue
            state = self._destinations.get(dest.key)
            if state is None:
                state = self._destinations[dest.key] = _Destination(dest.concurrency)
            state.limit = dest.concurrency  # follows configuration changes
            if not state.ready:
                self._rotation.append(dest.key)
            state.ready.append(_Job(msg, tuple(members), attempts, dest.key))
        self._dispatch()

    def _released(self, msg: SpooledMessage, indices: tuple[int, ...]) -> None:
        """Recipients the warm-up gate held, now within a day's budget."""
        pending = [i for i in indices if i not in msg.final]
        if pending and msg.id in self._messages and not self._stopping:
            self._make_ready(msg, pending, 0, gated=False)

    def _next_job(self) -> _Job | None:
        """The next job to start: destinations in turn, skipping those at their limit."""
        for _ in range(len(self._rotation)):
            key = self._rotation[0]
            self._rotation.rotate(-1)  # its turn is taken: to the back
            state = self._destinations[key]
            if not state.has_room():
                continue
            job = state.ready.popleft()
            if not state.ready:
                self._rotation.pop()  # the key just rotated to the back
            return job
        return None

    def _dispatch(self) -> None:
        """Start attempts while workers are free."""
        if not self._started or self._stopping:
            return
        while len(self._tasks) < self._concurrency:
            job = self._next_job()
            if job is None:
                return
            self._destinations[job.key].active += 1
            self._idle.clear()
            task = asyncio.get_running_loop().create_task(self._run(job), name="delivery")
            self._tasks.add(task)

    async def _run(self, job: _Job) -> None:
        state = self._destinations[job.key]
        tried = job.indices
        attempted = True
        try:
            attempted = await self._attempt(job)
        except Exception:  # a bug must not lose the message: try it again later
            log.exception("delivery attempt failed", extra={"msg_id": job.msg.id})
            self._defer(job, self._clock() + backoff(job.attempts, self._retry))
        finally:
            state.active -= 1
            if attempted:  # sent back unattempted (paused, busy): it tells nothing
                state.failing = not any(i in job.msg.final for i in tried)
            if not (state.active or state.ready or state.failing):
                self._destinations.pop(job.key, None)
            task = asyncio.current_task()
            if task is not None:
                self._tasks.discard(task)
            if not self._tasks:
                self._idle.set()
            self._dispatch()

    def _defer(self, job: _Job, due: float) -> None:
        heapq.heappush(self._waiting, (due, next(self._order), job))
        self._wakeup.set()

    async def _timer(self) -> None:
        while True:
            now = self._clock()
            while self._waiting and self._waiting[0][0] <= now:
                job = heapq.heappop(self._waiting)[2]
                pending = [i for i in job.indices if i not in job.msg.final]
                if pending:
                    self._make_ready(job.msg, pending, job.attempts)
            self._wakeup.clear()
            timeout = self._waiting[0][0] - now if self._waiting else None
            # asyncio.timeout, not wait_for: Python 3.11's wait_for loses a cancellation that
            # comes as the event is set (an attempt deferring as stop() cancels), and this
            # loop would then wait forever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wakeup.wait()

    async def _attempt(self, job: _Job) -> bool:
        """One attempt of ``job``; False: the transport sent it back without trying."""
        msg = job.msg
        pending = [i for i in job.indices if i not in msg.final]
        recipients = [msg.recipients[i] for i in pending]
        counted = msg.attempts
        job.attempts += 1
        msg.attempts = max(msg.attempts, job.attempts)
        body: bytes | None = None
        try:
            body = await self._spool.read_body(msg)
            # Signed by the transport only when it is about to send it (not for a destination
            # it finds paused or busy), once per attempt.
            mail_from = self._return_path(msg) if self._return_path else msg.mail_from
            results = await self._transport.deliver(mail_from, recipients, body, sign=self._sign)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug must not lose the message: defer it
            log.exception("delivery attempt failed", extra={"msg_id": msg.id})
            results = [RecipientResult(Outcome.DEFERRED, f"451 4.3.0 {type(exc).__name__}")] * (
                len(recipients)
            )
        now = self._clock()
        born = msg.received_at if self._warmup is None else self._warmup.lifetime_start(msg)
        expired = now - born >= self._retry.max_lifetime
        if results and not expired and not any(r.attempted for r in results):
            # Its destination is paused (shaping): nothing was sent, so no attempt counts and
            # no outcome is published; the job waits for the pause to end (at least 1 s).
            log.debug("attempt sent back: %s", results[0].reply, extra={"msg_id": msg.id})
            job.attempts -= 1
            msg.attempts = counted
            pause = self._destination(recipients[0]).delay
            self._defer(job, min(now + max(1.0, pause), born + self._retry.max_lifetime))
            return False
        final: dict[int, Outcome] = {}
        events = []
        for index, result in zip(pending, results, strict=True):
            outcome = result.outcome
            if outcome is Outcome.DEFERRED and expired:
                outcome = Outcome.EXPIRED
            if outcome.final:
                final[index] = outcome
            events.append(
                OutcomeEvent(
                    message_id=msg.id,
                    username=msg.username,
                    recipient=msg.recipients[index],
                    outcome=outcome,
                    reply=result.reply,
                    attempts=job.attempts,
                    received_at=msg.received_at,
                    at=now,
                )
            )
        await self._notify_failed(msg, final, dict(zip(pending, results, strict=True)), body, now)
        # The records first: a crash before the spool's DONE sends the mail again and the
        # records count it once; the other order would lose the outcome (docs/feedback.md).
        later = await self._record(msg, events)
        done = True
        if final and not (done := await self._spool.record(msg, final)):
            # Crossed off in memory; the spool writes them again until they land (or deletes
            # the finished segment). Only a crash before then sends them again.
            log.warning(
                "outcomes not recorded yet (spool full or failing), retrying",
                extra={"msg_id": msg.id, "recipients": len(final)},
            )
        self._record_later(later)  # before the webhooks look for them
        for event in events:
            self._publish(event)
        left = tuple(i for i in pending if i not in msg.final)
        if left:
            due = min(now + backoff(job.attempts, self._retry), born + self._retry.max_lifetime)
            job.indices = left
            self._defer(job, due)
            # Survives a restart (a STATE record): best effort, the attempt is over anyway.
            await self._spool.defer(msg, due)
        elif not msg.pending():
            self._finish(msg, durable=done)
        return any(r.attempted for r in results)

    def _finish(self, msg: SpooledMessage, *, durable: bool) -> None:
        """``msg`` has no recipient left (``durable``: crossed off in the spool already)."""
        self._messages.pop(msg.id, None)
        if self._warmup is not None:
            self._warmup.finished(msg)
        if self._recorder is not None and durable:  # never delivered again: its keys may go
            self._recorder.finished(msg.id)

    async def _notify_failed(
        self,
        msg: SpooledMessage,
        final: dict[int, Outcome],
        results: dict[int, RecipientResult],
        body: bytes | None,
        now: float,
    ) -> None:
        """Hand the recipients given up on in one attempt to ``on_failed`` (one DSN), unless
        the message never gets one (no DSN parameters, or the null reverse path: a DSN)."""
        if self._on_failed is None or msg.dsn is None or not msg.mail_from:
            return
        failed = [
            FailedRecipient(
                recipient=msg.recipients[index],
                reply=results[index].reply,
                expired=outcome is Outcome.EXPIRED,
                params=msg.dsn.recipient(index),
                at=now,
            )
            for index, outcome in final.items()
            if outcome in (Outcome.BOUNCED, Outcome.EXPIRED)
        ]
        if not failed:
            return
        try:
            await self._on_failed(msg, failed, body)
        except Exception:  # the outcomes are recorded whatever happens to the DSN
            log.exception("DSN not sent", extra={"msg_id": msg.id})

    async def _record(self, msg: SpooledMessage, events: list[OutcomeEvent]) -> list[OutcomeEvent]:
        """Write ``events`` to the records; those not written yet (handed to the recorder in
        the background by :meth:`_record_later`)."""
        if self._recorder is None:
            return []
        try:
            return await self._recorder.record(events)
        except Exception:  # a bug must not hold delivery: in the background, as before
            log.exception("outcomes not recorded", extra={"msg_id": msg.id})
            return events

    def _record_later(self, events: Sequence[OutcomeEvent]) -> None:
        """Hand ``events`` (not written by :meth:`_record`) to the recorder's background."""
        recorder = self._recorder
        if recorder is None:
            return
        for event in events:
            try:
                recorder.on_outcome(event)
            except Exception:
                log.exception("outcome recorder failed", extra={"msg_id": event.message_id})

    def _publish(self, event: OutcomeEvent) -> None:
        level = logging.INFO if event.outcome is Outcome.DELIVERED else logging.WARNING
        log.log(
            level,
            "recipient %s",
            event.outcome.value,
            extra={
                "msg_id": event.message_id,
                "token": event.username,
                "rcpt": event.recipient,
                "reply": event.reply,
                "attempts": event.attempts,
            },
        )
        for listener in self._listeners:
            try:
                listener.on_outcome(event)
            except Exception:
                log.exception("outcome listener failed", extra={"msg_id": event.message_id})
