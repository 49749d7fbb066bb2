"""Drift repair of a relay's own objects: a watch in the operator's namespace, then re-apply.

The same watch keeps the operator's cache of its namespace (see cache.py).

A relay Deployment scaled to 0, a deleted Role, an edited Service or ConfigMap is put back
without waiting for the DedicatedIP to change. The watch sees the operator's own writes too;
those are recognised by the resourceVersion the apply returned and skipped, and each
DedicatedIP is repaired at most once per ``spacing`` seconds, so repairs never feed each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable
from enum import Enum

from txmail_relay import contract as c

from ..kube import Change, Watches, owned_watches
from .context import Context, Written

log = logging.getLogger(__name__)

SELECTOR = f"{c.LABEL_MANAGED_BY}={c.MANAGED_BY},{c.LABEL_NAME}={c.RELAY_APP_NAME}"
# Components whose content is the operator's alone: any edit by someone else is drift. The
# others (credential and template shards, the stats report) are written entry by entry, or
# by the relay; only their deletion is drift.
WHOLE_COMPONENTS = frozenset({"relay", "config"})
# Watched only to be served from memory (see cache.py), never repaired from the watch.
CACHED_ONLY = frozenset({"Secret", "PersistentVolumeClaim"})


class Action(Enum):
    STATUS = "status"  # the relay Deployment's status moved: refresh the DedicatedIP status
    REPAIR = "repair"  # re-apply every child of the DedicatedIP


def classify(change: Change, written: Written) -> tuple[str, Action] | None:
    """What a change to an owned object calls for, for which DedicatedIP (None: nothing)."""
    ip = change.labels.get(c.LABEL_INSTANCE)
    if not ip or change.kind in CACHED_ONLY:
        return None
    if change.type == "DELETED":
        return ip, Action.REPAIR
    ours = written.get(change.kind, change.name)
    if ours is not None and ours[0] == change.resource_version:
        return None  # our own write coming back
    if change.kind == "Deployment":
        # The controllers write status (same generation); a person changes the spec.
        if ours is not None and ours[1] == change.generation:
            return ip, Action.STATUS
        return ip, Action.REPAIR if change.type != "ADDED" else Action.STATUS
    if change.type == "ADDED":
        return None  # created by the operator (an apply in flight)
    if change.labels.get(c.LABEL_COMPONENT) in WHOLE_COMPONENTS:
        return ip, Action.REPAIR
    return None


class Repairs:
    """Debounced work per DedicatedIP, in one task on the event loop.

    A request runs after ``delay`` (so a burst of events is one run), never sooner than
    ``spacing`` after the previous run for the same DedicatedIP; a repair wins over a status
    refresh. A run that fails is requested again after ``retry`` seconds.
    """

    def __init__(
        self,
        run: Callable[[str, Action], Awaitable[None]],
        *,
        delay: float = 0.2,
        spacing: float = 1.0,
        retry: float = 5.0,
        ready: asyncio.Event | None = None,
    ) -> None:
        self.run, self.delay, self.spacing, self.retry = run, delay, spacing, retry
        self.ready = ready  # no run before it is set (requests are kept until then)
        self._wake = asyncio.Event()
        self._due: dict[str, tuple[float, Action]] = {}
        self._last: dict[str, float] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._work(), name="drift-repairs")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def request(self, ip: str, action: Action, after: float | None = None) -> None:
        """Called on the event loop."""
        now = time.monotonic()
        due = max(
            now + (self.delay if after is None else after),
            self._last.get(ip, -math.inf) + self.spacing,
        )
        if ip in self._due:
            old_due, old_action = self._due[ip]
            due = min(old_due, due)
            if old_action is Action.REPAIR:
                action = Action.REPAIR
        self._due[ip] = (due, action)
        self._wake.set()

    async def _next(self) -> tuple[str, Action]:
        while True:
            self._wake.clear()
            if not self._due:
                await self._wake.wait()
                continue
            ip, (due, action) = min(self._due.items(), key=lambda item: item[1][0])
            now = time.monotonic()
            if due > now:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), due - now)
                continue
            del self._due[ip]
            self._last = {k: t for k, t in self._last.items() if t > now - self.spacing}
            self._last[ip] = now
            return ip, action

    async def _work(self) -> None:
        if self.ready is not None:
            await self.ready.wait()
        while True:
            ip, action = await self._next()
            try:
                await self.run(ip, action)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the API may be briefly away: try again later
                log.warning(
                    "DedicatedIP %s: %s failed (%s), retrying", ip, action.value, type(exc).__name__
                )
                self.request(ip, action, after=self.retry)


class DriftRepair:
    """The watch on the operator's own objects, wired to the repairs it calls for."""

    def __init__(self, ctx: Context, run: Callable[[str, Action], Awaitable[None]]) -> None:
        self.ctx = ctx
        self.repairs = Repairs(run, ready=ctx.indexed)

    def on_change(self, change: Change) -> None:
        self.ctx.cache.on_change(change)  # first: a repair it calls for reads the cache
        what = classify(change, self.ctx.written)
        if what is not None:
            log.debug("%s %s/%s: %s", change.type, change.kind, change.name, what[1].value)
            self.repairs.request(*what)

    def start(self, watches: Watches) -> None:
        """The repairs and the watches: tasks on the running event loop."""
        self.repairs.start()
        owned_watches(
            watches,
            self.ctx.settings.namespace,
            SELECTOR,
            self.on_change,
            on_error=self.ctx.kube.on_error,
            on_list=self.ctx.cache.on_list,
        )

    async def stop(self) -> None:
        await self.repairs.stop()
