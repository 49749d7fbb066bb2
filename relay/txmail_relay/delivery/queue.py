"""The delivery queue: workers, exponential backoff, expiry and per-recipient outcomes.

Every spooled message with undelivered recipients is here, either ready or waiting for its
next attempt. An attempt sends only the recipients still pending; final outcomes
(delivered, bounced, expired) are crossed off in the spool before listeners hear of them.
Bounces are recorded and logged; no DSN message is generated yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import time
from collections.abc import Callable, Sequence

from txmail_relay.delivery.transport import RecipientResult, Transport
from txmail_relay.outcomes import Outcome, OutcomeEvent, OutcomeListener
from txmail_relay.settings import RetrySettings
from txmail_relay.spool.segments import Spool, SpooledMessage, SpoolError

log = logging.getLogger(__name__)


def backoff(attempts: int, retry: RetrySettings) -> float:
    """Delay after the ``attempts``-th failed attempt: doubling from min to max backoff."""
    return float(min(retry.max_backoff, retry.min_backoff * 2 ** max(0, attempts - 1)))


class DeliveryQueue:
    def __init__(
        self,
        spool: Spool,
        transport: Transport,
        retry: RetrySettings,
        *,
        concurrency: int,
        listeners: Sequence[OutcomeListener] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._spool = spool
        self._transport = transport
        self._retry = retry
        self._concurrency = concurrency
        self._listeners = list(listeners)
        self._clock = clock
        self._ready: asyncio.Queue[SpooledMessage] = asyncio.Queue()
        self._waiting: list[tuple[float, int, SpooledMessage]] = []
        self._order = itertools.count()
        self._wakeup = asyncio.Event()
        self._messages: dict[str, SpooledMessage] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._busy = 0
        self._idle = asyncio.Event()
        self._idle.set()
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
        self._messages[msg.id] = msg
        self._ready.put_nowait(msg)

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._timer(), name="queue-timer"))
        self._tasks += [
            loop.create_task(self._worker(), name=f"delivery-{i}") for i in range(self._concurrency)
        ]

    async def stop(self, grace: float) -> None:
        """Let attempts in flight finish within ``grace``, then cancel the rest.

        A cancelled attempt leaves its message in the spool; it is retried on restart.
        """
        self._stopping = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), grace)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    # -- scheduling ----------------------------------------------------------------------

    def _defer(self, msg: SpooledMessage, due: float) -> None:
        heapq.heappush(self._waiting, (due, next(self._order), msg))
        self._wakeup.set()

    async def _timer(self) -> None:
        while True:
            now = self._clock()
            while self._waiting and self._waiting[0][0] <= now:
                self._ready.put_nowait(heapq.heappop(self._waiting)[2])
            self._wakeup.clear()
            timeout = self._waiting[0][0] - now if self._waiting else None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout)

    async def _worker(self) -> None:
        while not self._stopping:
            msg = await self._ready.get()
            if self._stopping:
                return
            self._busy += 1
            self._idle.clear()
            try:
                await self._attempt(msg)
            finally:
                self._busy -= 1
                if not self._busy:
                    self._idle.set()

    async def _attempt(self, msg: SpooledMessage) -> None:
        pending = msg.pending()
        recipients = [msg.recipients[i] for i in pending]
        msg.attempts += 1
        try:
            body = await self._spool.read_body(msg)
            results = await self._transport.deliver(msg.mail_from, recipients, body)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug must not lose the message: defer it
            log.exception("delivery attempt failed", extra={"msg_id": msg.id})
            results = [RecipientResult(Outcome.DEFERRED, f"451 4.3.0 {type(exc).__name__}")] * (
                len(recipients)
            )
        now = self._clock()
        expired = now - msg.received_at >= self._retry.max_lifetime
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
                    attempts=msg.attempts,
                    received_at=msg.received_at,
                    at=now,
                )
            )
        if final:
            try:
                await self._spool.record(msg, final)
            except SpoolError:
                # Crossed off in memory only: after a crash these recipients get it again.
                log.exception("could not record outcomes", extra={"msg_id": msg.id})
        for event in events:
            self._publish(event)
        if msg.pending():
            due = min(
                now + backoff(msg.attempts, self._retry), msg.received_at + self._retry.max_lifetime
            )
            self._defer(msg, due)
        else:
            self._messages.pop(msg.id, None)

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
