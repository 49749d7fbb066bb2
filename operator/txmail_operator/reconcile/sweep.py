"""The periodic check of every SmtpToken, spread evenly over the interval.

Each token has its own offset in the interval (from its uid), so 5,000 tokens are 5,000
checks spread over the interval rather than a burst each time kopf's timers fire together
(they all start at once at startup). A token reconciled for another reason less than half an
interval ago is skipped. One task; the checks themselves are ROUTINE work.
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping

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


def window(offsets: list[tuple[float, str]], start: float, end: float) -> list[str]:
    """``due`` over offsets sorted once: the uids in the phase window (start, end]."""
    lo, hi = (
        bisect.bisect_right(offsets, (start, "\uffff")),
        bisect.bisect_right(offsets, (end, "\uffff")),
    )
    if start <= end:
        return [uid for _, uid in offsets[lo:hi]]
    return [uid for _, uid in offsets[lo:]] + [uid for _, uid in offsets[:hi]]


class Sweep:
    """``tokens()`` is (a version that changes with the set, uid -> ref); the offsets are
    sorted again only when the version changes, so a tick costs the tokens due, not all."""

    def __init__(
        self,
        interval: float,
        tokens: Callable[[], tuple[int, Mapping[str, Ref]]],
        check: Callable[[Ref], None],
        clock: Callable[[], float] = time.monotonic,
        ready: asyncio.Event | None = None,
    ) -> None:
        self.interval, self.tokens, self.check, self.clock = interval, tokens, check, clock
        self.tick = min(1.0, interval / 4)
        self.ready = ready  # the first tick after it is set
        self._version: int | None = None
        self._offsets: list[tuple[float, str]] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="sweep")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def due(self, start: float, end: float) -> list[Ref]:
        version, refs = self.tokens()
        if version != self._version:
            self._offsets = sorted((offset(uid, self.interval), uid) for uid in refs)
            self._version = version
        return [refs[uid] for uid in window(self._offsets, start, end) if uid in refs]

    async def _run(self) -> None:
        if self.ready is not None:
            await self.ready.wait()
        last = self.clock() % self.interval
        while True:
            await asyncio.sleep(self.tick)
            now = self.clock() % self.interval
            try:
                for ref in self.due(last, now):
                    self.check(ref)
            except Exception:  # never let the sweep die; the next tick tries again
                log.exception("the periodic check failed")
            last = now
