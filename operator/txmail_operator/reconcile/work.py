"""The tasks that run reconciles, urgent work first.

Spec changes, creations and deletions are URGENT; resumes at startup, fan-outs to the
dependents of a DedicatedIP or namespace, and the periodic checks are ROUTINE. A fixed number
of worker tasks on the event loop take the most urgent job first, so a token deleted while
5,000 others are checked is revoked at once, and the operator never runs more reconciles
(nor holds more API connections) than it has workers. kopf runs each object's handlers in
arrival order, which is why this is by hand.

ROUTINE jobs are keyed: a job already waiting is not queued twice (a token's periodic check
and its DedicatedIP's fan-out are one reconcile). A job nobody awaits that fails is tried
again later.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import kopf
from kubernetes_asyncio.client.exceptions import ApiException

log = logging.getLogger(__name__)
URGENT, ROUTINE = 0, 1
RETRIES = 5


@dataclass(order=True)
class _Job:
    priority: int
    seq: int
    fn: Callable[[], Awaitable[Any]] = field(compare=False)
    key: Hashable | None = field(compare=False, default=None)
    future: asyncio.Future[Any] | None = field(compare=False, default=None)
    tries: int = field(compare=False, default=0)
    dropped: bool = field(compare=False, default=False)
    later: bool = field(compare=False, default=False)


class Work:
    def __init__(self, workers: int = 8, routine_workers: int = 2) -> None:
        # ROUTINE work on a few workers only: a backlog of 5,000 checks then leaves the loop
        # to kopf and to URGENT work, which may use every worker.
        self.workers, self.routine_workers = workers, routine_workers
        self._routine_running = 0
        self._wake: asyncio.Event | None = None
        self._ready: list[_Job] = []
        self._later: list[tuple[float, int, _Job]] = []
        self._keys: dict[Hashable, _Job] = {}  # keyed jobs waiting (ready or later)
        self._seq = itertools.count()
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        """The worker tasks, on the running event loop."""
        loop = asyncio.get_running_loop()
        for i in range(self.workers):
            self._tasks.append(loop.create_task(self._work(), name=f"reconcile-{i}"))

    async def stop(self) -> None:
        self._stopping = True
        for job in self._ready:
            if job.future is not None:
                job.future.cancel()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    def _notify(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def call(
        self,
        fn: Callable[..., Awaitable[Any]],
        *args: Any,
        priority: int = URGENT,
        **kwargs: Any,
    ) -> asyncio.Future[Any]:
        """Run ``fn(*args, **kwargs)`` on a worker; await the result (kopf's handlers do)."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        job = _Job(priority, next(self._seq), lambda: fn(*args, **kwargs), future=future)
        heapq.heappush(self._ready, job)
        self._notify()
        return future

    def submit(
        self,
        key: Hashable,
        fn: Callable[..., Awaitable[Any]],
        *args: Any,
        after: float = 0.0,
        priority: int = ROUTINE,
    ) -> bool:
        """Queue ``fn(*args)`` (ROUTINE unless told) unless a job with ``key`` already waits.

        A job with ``key`` waiting to be retried later is replaced when this one is due sooner,
        and a waiting ROUTINE job by an URGENT one. Nothing awaits the job: one that fails is
        tried again later, a few times. Called on the event loop only.
        """
        if self._stopping:
            return False
        waiting = self._keys.get(key)
        if waiting is not None:
            sooner = waiting.later and after <= 0
            if not (sooner or priority < waiting.priority):
                return False
            waiting.dropped = True
        job = _Job(priority, next(self._seq), lambda: fn(*args), key=key)
        self._keys[key] = job
        self._push(job, after)
        return True

    def pending(self) -> int:
        return len(self._ready) + len(self._later)

    def _push(self, job: _Job, after: float) -> None:
        job.later = after > 0
        if after > 0:
            heapq.heappush(self._later, (time.monotonic() + after, job.seq, job))
        else:
            heapq.heappush(self._ready, job)
        self._notify()

    def take(self) -> tuple[_Job | None, float | None]:
        """The next job a worker may run now, else how long until one may be due."""
        now = time.monotonic()
        while self._later and self._later[0][0] <= now:
            due = heapq.heappop(self._later)[2]
            due.later = False
            heapq.heappush(self._ready, due)
        while self._ready:
            busy = self._routine_running >= self.routine_workers
            if busy and self._ready[0].priority == ROUTINE:
                break
            job = heapq.heappop(self._ready)
            if job.dropped:
                continue
            if job.key is not None:
                self._keys.pop(job.key, None)  # from now on a new request queues again
            if job.priority == ROUTINE:
                self._routine_running += 1
            return job, None
        return None, (self._later[0][0] - now if self._later else None)

    def finish(self, job: _Job) -> None:
        if job.priority == ROUTINE:
            self._routine_running -= 1
            self._notify()

    async def _next(self) -> _Job:
        if self._wake is None:
            self._wake = asyncio.Event()
        while True:
            job, wait = self.take()
            if job is not None:
                return job
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)

    async def _work(self) -> None:
        while not self._stopping:
            job = await self._next()
            try:
                await self._run(job)
            finally:
                self.finish(job)

    async def _run(self, job: _Job) -> None:
        if job.future is not None:
            if job.future.done():  # the awaiting handler was cancelled
                return
            try:
                result = await job.fn()
            except asyncio.CancelledError:
                job.future.cancel()
                raise
            except BaseException as exc:  # handed to the awaiting handler, which reports it
                if not job.future.done():
                    job.future.set_exception(exc)
                return
            if not job.future.done():
                job.future.set_result(result)
            return
        try:
            await job.fn()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._retry(job, exc)

    def _retry(self, job: _Job, exc: Exception) -> None:
        """A job nobody awaits failed: try again later, a few times (the periodic check goes on)."""
        if isinstance(exc, kopf.TemporaryError):
            delay = float(exc.delay or 5.0)
        elif isinstance(exc, ApiException | OSError | aiohttp.ClientError | TimeoutError):
            delay = 2.0 * 2**job.tries
        else:
            log.exception("%s failed", job.key, exc_info=exc)
            return
        if job.tries + 1 >= RETRIES:
            log.warning(
                "%s failed %d times (%s): left to the periodic check", job.key, RETRIES, exc
            )
            return
        log.info("%s will be retried in %.0f s: %s", job.key, delay, type(exc).__name__)
        if job.key in self._keys or self._stopping:
            return  # requested again meanwhile: that job runs instead
        again = _Job(job.priority, next(self._seq), job.fn, key=job.key, tries=job.tries + 1)
        self._keys[job.key] = again
        self._push(again, delay)
