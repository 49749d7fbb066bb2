"""The periodic check of every SmtpToken, spread evenly over the interval.

Each token has its own offset in the interval (from its uid), so 5,000 tokens are 5,000
checks spread over the interval rather than a burst each time kopf's timers fire together
(they all start at once at startup). A token reconciled for another reason less than half an
interval ago is skipped. One task; the checks themselves are ROUTINE work.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable, Iterable

log = logging.getLogger(__name__)
Ref = tuple[str, str]


def offset(uid: str, interval: float) -> float:
    """Where in the interval the token's check falls: stable, evenly spread."""
    digest = int.from_bytes(hashlib.sha256(uid.encode()).digest()[:8], "big")
    return digest / 2**64 * interval


def due(offsets: Iterable[tuple[Ref, float]], start: float, end: float) -> list[Ref]:
    """The refs whose offset is in the phase window (start, end], which may wrap around."""
    if start <= end:
        return [ref for ref, at in offsets if start < at <= end]
    return [ref for ref, at in offsets if at > start or at <= end]


class Sweep:
    def __init__(
        self,
        interval: float,
        tokens: Callable[[], list[tuple[Ref, str]]],
        check: Callable[[Ref], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval, self.tokens, self.check, self.clock = interval, tokens, check, clock
        self.tick = min(1.0, interval / 4)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="sweep")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        last = self.clock() % self.interval
        while True:
            await asyncio.sleep(self.tick)
            now = self.clock() % self.interval
            try:
                refs = [(ref, offset(uid, self.interval)) for ref, uid in self.tokens()]
                for ref in due(refs, last, now):
                    self.check(ref)
            except Exception:  # never let the sweep die; the next tick tries again
                log.exception("the periodic check failed")
            last = now
