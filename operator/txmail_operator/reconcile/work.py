"""The threads that run reconciles, urgent work first.

Spec changes, creations and deletions are URGENT; resumes at startup, fan-outs to the
dependents of a DedicatedIP or namespace, and the periodic checks are ROUTINE. A fixed number
of threads take the most urgent job first, so a token deleted while 5,000 others resume is
revoked at once, and the operator never holds more API connections than it has threads.
kopf's own executor serves one queue in arrival order, which is why this is by hand.

ROUTINE jobs are keyed: a job already waiting is not queued twice (a token's resume and its
DedicatedIP's fan-out are one reconcile). A routine job that fails is tried again later.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException

log = logging.getLogger(__name__)
URGENT, ROUTINE = 0, 1
RETRIES = 5


@dataclass(order=True)
class _Job:
    priority: int
    seq: int
    fn: Callable[[], Any] = field(compare=False)
    key: Hashable | None = field(compare=False, default=None)
    future: concurrent.futures.Future[Any] | None = field(compare=False, default=None)
    tries: int = field(compare=False, default=0)
    dropped: bool = field(compare=False, default=False)
    later: bool = field(compare=False, default=False)


class Work:
    def __init__(self, threads: int = 8, routine_threads: int = 2) -> None:
        # ROUTINE work on a few threads only: a backlog of 5,000 resumes then leaves the GIL
        # to kopf's event loop and to URGENT work, which may use every thread.
        self.threads, self.routine_threads = threads, routine_threads
        self._routine_running = 0
        self._cond = threading.Condition()
        self._ready: list[_Job] = []
        self._later: list[tuple[float, int, _Job]] = []
        self._keys: dict[Hashable, _Job] = {}  # keyed jobs waiting (ready or later)
        self._seq = itertools.count()
        self._stopping = False
        self._workers: list[threading.Thread] = []

    def start(self) -> None:
        for i in range(self.threads):
            thread = threading.Thread(target=self._work, name=f"reconcile-{i}", daemon=True)
            thread.start()
            self._workers.append(thread)

    def stop(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stopping = True
            for job in self._ready:
                if job.future is not None:
                    job.future.cancel()
            self._cond.notify_all()
        for thread in self._workers:
            thread.join(timeout)

    def call(
        self, fn: Callable[..., Any], *args: Any, priority: int = URGENT, **kwargs: Any
    ) -> asyncio.Future[Any]:
        """Run ``fn(*args, **kwargs)`` on a worker and await its result (for kopf's handlers)."""
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._cond:
            heapq.heappush(
                self._ready,
                _Job(priority, next(self._seq), lambda: fn(*args, **kwargs), future=future),
            )
            self._cond.notify()
        return asyncio.wrap_future(future)

    def submit(
        self,
        key: Hashable,
        fn: Callable[..., Any],
        *args: Any,
        after: float = 0.0,
        priority: int = ROUTINE,
    ) -> bool:
        """Queue ``fn(*args)`` (ROUTINE unless told) unless a job with ``key`` already waits.

        A job with ``key`` waiting to be retried later is replaced when this one is due sooner,
        and a waiting ROUTINE job by an URGENT one. Nothing awaits the job: one that fails is
        tried again later, a few times.
        """
        with self._cond:
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
        with self._cond:
            return len(self._ready) + len(self._later)

    def _push(self, job: _Job, after: float) -> None:
        job.later = after > 0
        if after > 0:
            heapq.heappush(self._later, (time.monotonic() + after, job.seq, job))
        else:
            heapq.heappush(self._ready, job)
        self._cond.notify()

    def _next(self) -> _Job | None:
        with self._cond:
            while not self._stopping:
                now = time.monotonic()
                while self._later and self._later[0][0] <= now:
                    due = heapq.heappop(self._later)[2]
                    due.later = False
                    heapq.heappush(self._ready, due)
                busy = self._routine_running >= self.routine_threads
                if self._ready and not (busy and self._ready[0].priority == ROUTINE):
                    job = heapq.heappop(self._ready)
                    if job.dropped:
                        continue
                    if job.key is not None:
                        self._keys.pop(job.key, None)  # from now on a new request queues again
                    if job.priority == ROUTINE:
                        self._routine_running += 1
                    return job
                wait = self._later[0][0] - now if self._later else None
                self._cond.wait(wait)
            return None

    def _finish(self, job: _Job) -> None:
        if job.priority == ROUTINE:
            with self._cond:
                self._routine_running -= 1
                self._cond.notify()

    def _work(self) -> None:
        while (job := self._next()) is not None:
            try:
                self._run(job)
            finally:
                self._finish(job)

    def _run(self, job: _Job) -> None:
        if job.future is not None:
            if not job.future.set_running_or_notify_cancel():
                return
            try:
                job.future.set_result(job.fn())
            except BaseException as exc:  # handed to the awaiting handler, which reports it
                job.future.set_exception(exc)
            return
        try:
            job.fn()
        except Exception as exc:
            self._retry(job, exc)

    def _retry(self, job: _Job, exc: Exception) -> None:
        """A job nobody awaits failed: try again later, a few times (the periodic check goes on)."""
        if isinstance(exc, kopf.TemporaryError):
            delay = float(exc.delay or 5.0)
        elif isinstance(exc, ApiException | OSError):
            delay = 2.0 * 2**job.tries
        else:
            log.exception("%s failed", job.key)
            return
        if job.tries + 1 >= RETRIES:
            log.warning(
                "%s failed %d times (%s): left to the periodic check", job.key, RETRIES, exc
            )
            return
        log.info("%s will be retried in %.0f s: %s", job.key, delay, type(exc).__name__)
        with self._cond:
            if job.key in self._keys or self._stopping:
                return  # requested again meanwhile: that job runs instead
            again = _Job(job.priority, next(self._seq), job.fn, key=job.key, tries=job.tries + 1)
            self._keys[job.key] = again
            self._push(again, delay)
