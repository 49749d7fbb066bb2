"""The tracking endpoints ``GET /o/<token>.gif`` and ``GET /c/<token>``, and the key file.

A GET only records an event (link scanners prefetch). The pixel is served whatever the
token, so probing learns nothing; a click with a bad, tampered or unknown-key token gets a
fixed 400 page, never a redirect.

The answer never waits for the records. A valid hit is put in a bounded queue in memory and
the request is answered at once; a writer task takes the hits that are due, up to
:data:`BATCH_HITS` at a time, and records them in one records write
(:meth:`~txmail_relay.records.engagement.EngagementRecords.record`): a batch goes once its
oldest hit has waited :data:`BATCH_DELAY` (so other hits can share its transaction) or once
it is full, and the next waits for the previous one's write, so a slow disk makes batches
bigger, never more writes. Past :data:`MAX_PENDING` hits waiting, a hit is not recorded:
it is counted in ``txmail_relay_tracking_dropped_total`` and the drops are logged once a
minute; its request is answered as any other (a redirect never waits, and memory stays
bounded under any load).

Machine hits (:mod:`.machine`: scanners, prefetching proxies, HEAD, a click right after
delivery, a burst of links) get the same answer as anyone's and are recorded as machine
engagement; the verdict is made when the hit is recorded, from what the batch's read of its
message says (when it was delivered). A click is due :attr:`Policy.burst_window` after it
arrived, once the other clicks of its message in that window are known (the first click of
a scanner's burst is a machine's too); an open at once. A stopping relay records what is
pending at once (the tracking listener's cleanup, before the records close).

The key file (``trackingKeysFile``, in Kubernetes the mounted tracking Secret) is read at
start and again whenever it changes (:class:`KeyFile`), so a rotation needs no restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from txmail_relay.metrics import RelayMetrics
from txmail_relay.records.engagement import Hit as Engagement
from txmail_relay.records.model import Kind
from txmail_relay.records.records import Records
from txmail_relay.tracking.machine import Hit, HitKind, Policy, classify
from txmail_relay.tracking.tokens import (
    CLICK_HEADERS,
    PIXEL_HEADERS,
    TRANSPARENT_GIF,
    TrackingKeys,
)

log = logging.getLogger(__name__)

BAD_LINK_PAGE = (
    "<!doctype html><meta charset=utf-8><title>Invalid link</title><p>This link is not valid.</p>\n"
)
BAD_LINK_HEADERS = {
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'none'",
}
MAX_USER_AGENT: Final = 512  # characters of a user agent kept in an event
MAX_MESSAGES: Final = 10_000  # messages whose recent clicks are remembered (burst rule)
RECENT_PER_MESSAGE: Final = 8  # clicks kept per message for the burst rule (3 distinct links)
# What the hits waiting to be recorded may hold (their URLs and user agents, and HIT_BYTES
# each for the rest): past it a hit is dropped (counted, logged once a minute), so memory
# stays bounded whatever the load. 16 MiB is ~40,000 hits of a 200-character URL.
MAX_PENDING_BYTES: Final = 16 * 1024 * 1024
HIT_BYTES: Final = 250  # a queued hit without its strings (objects, event id, deque slot)
BATCH_HITS: Final = 1000  # hits per records write at most
BATCH_DELAY: Final = 0.05  # seconds a due hit waits for others to share its write
DROPS_LOGGED_EVERY: Final = 60.0  # seconds

# The answers, built once (aiohttp copies the headers into each response).
_BAD_LINK_BODY = BAD_LINK_PAGE.encode()
_BAD_LINK_HEADERS = CIMultiDictProxy(
    CIMultiDict({**BAD_LINK_HEADERS, "Content-Type": "text/html; charset=utf-8"})
)
_PIXEL_HEADERS = CIMultiDictProxy(CIMultiDict(PIXEL_HEADERS))


def load_keys(path: Path) -> TrackingKeys:
    """``kid:hexkey`` per line (``#`` comments allowed); the last key signs, all verify."""
    keys: dict[int, bytes] = {}
    current: int | None = None
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        kid, sep, hexkey = line.partition(":")
        # Errors name the line, never its text: a malformed line may hold a key.
        if not sep:
            raise ValueError(f"{path}, line {number}: expected kid:hexkey")
        try:
            current = int(kid)
            keys[current] = bytes.fromhex(hexkey.strip())
        except ValueError:
            raise ValueError(f"{path}, line {number}: expected kid:hexkey") from None
    if current is None:
        raise ValueError(f"{path}: no tracking key")
    return TrackingKeys(keys, current)


def _fingerprint(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()  # follows the symlinks of a mounted Secret to the current file
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


class KeyFile:
    """The tracking keys of a ``kid:hexkey`` file, re-read when the file changes.

    The first read happens at construction and its errors propagate (a relay with a broken
    key file does not start). Later, a file that cannot be read or parsed is logged and the
    keys in force stay: a half-edited rotation never takes tracking down. Readers take
    :attr:`current` each time, so new mail is signed with the new last key at once.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._seen = _fingerprint(path) if path is not None else None
        self._keys = load_keys(path) if path is not None else None

    @property
    def current(self) -> TrackingKeys | None:
        return self._keys

    def refresh(self) -> bool:
        """Re-read the file if it changed; whether new keys are in force."""
        if self.path is None:
            return False
        seen = _fingerprint(self.path)
        if seen == self._seen:
            return False
        self._seen = seen  # taken before reading: a change made meanwhile is seen next time
        try:
            keys = load_keys(self.path)
        except (OSError, ValueError) as e:
            log.error(  # noqa: TRY400 - the reason is enough, and holds no key material
                "tracking keys not reloaded, keeping the previous ones: %s",
                type(e).__name__ if isinstance(e, OSError) else e,
            )
            return False
        self._keys = keys
        log.info("tracking keys reloaded", extra={"signing_key": keys.current})
        return True

    async def watch(self, interval: float) -> None:
        """Poll the file every ``interval`` seconds until cancelled."""
        while True:
            await asyncio.sleep(interval)
            await asyncio.to_thread(self.refresh)


class RecentClicks:
    """The last clicks of each message (time, link index), for the burst rule; bounded in
    messages (the least recently clicked are forgotten), in clicks per message and in time:
    at most MAX_MESSAGES x RECENT_PER_MESSAGE clicks, ~9 MiB (tracemalloc). A short list per
    message, not a deque: a deque allocates a 64-slot block, whatever its maxlen."""

    def __init__(self, keep: float, max_messages: int = MAX_MESSAGES) -> None:
        self._keep = keep
        self._max = max_messages
        self._clicks: OrderedDict[bytes, list[tuple[float, int]]] = OrderedDict()

    def add(self, event_id: bytes, at: float, link: int) -> None:
        clicks = [c for c in self._clicks.pop(event_id, ()) if c[0] >= at - self._keep]
        clicks.append((at, link))
        self._clicks[event_id] = clicks[-RECENT_PER_MESSAGE:]
        while len(self._clicks) > self._max:
            self._clicks.popitem(last=False)

    def around(self, event_id: bytes, at: float, link: int) -> list[tuple[float, int]]:
        """The message's other clicks within ``keep`` of ``at`` (itself left out once)."""
        found = [c for c in self._clicks.get(event_id, ()) if abs(c[0] - at) <= self._keep]
        if (at, link) in found:
            found.remove((at, link))
        return found


def _user_agent(request: web.Request) -> str | None:
    value = request.headers.get("User-Agent")
    return value[:MAX_USER_AGENT] if value is not None else None


@dataclass(slots=True)
class Pending(Engagement):
    """A hit waiting to be recorded: what the records write, and what its verdict needs."""

    method: str = "GET"
    link: int = 0  # the link's index in its message (clicks)
    due: float = 0.0  # when it may be decided and recorded (the relay's clock)


def _size(hit: Pending) -> int:
    return HIT_BYTES + len(hit.url or "") + len(hit.user_agent or "")


class TrackingEndpoints:
    def __init__(
        self,
        keys: KeyFile,
        records: Records,
        metrics: RelayMetrics,
        *,
        policy: Policy | None = None,
        clock: Callable[[], float] = time.time,
        max_pending_bytes: int | None = None,
    ) -> None:
        self._keys = keys
        self._records = records
        self._metrics = metrics
        self._policy = policy or Policy()
        self._clock = clock
        self._max_pending = MAX_PENDING_BYTES if max_pending_bytes is None else max_pending_bytes
        self._pending = 0  # bytes held by the hits in _now and _later (HIT_BYTES + strings)
        self._recent = RecentClicks(2 * self._policy.burst_window)
        # Hits due now (opens, and clicks when the burst rule is off), and clicks waiting
        # for their burst window: both in the order they are due.
        self._now: deque[Pending] = deque()
        self._later: deque[Pending] = deque()
        self._wake = asyncio.Event()
        self._closing = False
        self._writer: asyncio.Task[None] | None = None
        self._dropped = 0  # since the last log line
        self._drops_logged = 0.0
        requests = metrics.tracking_requests
        self._counted = {
            (kind, result): requests.labels(kind, result)
            for kind in ("open", "click")
            for result in ("valid", "invalid")
        }
        self._drops = {k: metrics.tracking_dropped.labels(k) for k in ("open", "click")}

    def install(self, app: web.Application) -> None:
        app.router.add_get("/o/{token}", self.pixel)  # HEAD too (aiohttp's allow_head)
        app.router.add_get("/c/{token}", self.click)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._flush)

    async def pixel(self, request: web.Request) -> web.Response:
        token = request.match_info["token"]
        event_id = None
        keys = self._keys.current
        if keys is not None and token.endswith(".gif"):
            event_id = keys.verify_open(token)
        if event_id is None:
            self._counted["open", "invalid"].inc()
        else:
            self._counted["open", "valid"].inc()
            at = self._clock()
            agent = _user_agent(request)
            hit = Pending(event_id, Kind.OPENED, at, None, agent, request.method, due=at)
            self._queue(hit, self._now, "open")
        return web.Response(body=TRANSPARENT_GIF, headers=_PIXEL_HEADERS)

    async def click(self, request: web.Request) -> web.Response:
        keys = self._keys.current
        found = keys.click(request.match_info["token"]) if keys is not None else None
        if found is None:
            self._counted["click", "invalid"].inc()
            return web.Response(status=400, body=_BAD_LINK_BODY, headers=_BAD_LINK_HEADERS)
        self._counted["click", "valid"].inc()
        at = self._clock()
        self._recent.add(found.event_id, at, found.link_index)
        policy = self._policy
        waits = policy.burst_links >= 2  # decided once the burst window's clicks are known
        hit = Pending(
            found.event_id,
            Kind.CLICKED,
            at,
            found.url,
            _user_agent(request),
            request.method,
            found.link_index,
            at + policy.burst_window if waits else at,
        )
        self._queue(hit, self._later if waits else self._now, "click")
        headers = CIMultiDict(CLICK_HEADERS)
        headers["Location"] = found.url
        return web.Response(status=302, headers=headers)

    # -- the queue and its writer ----------------------------------------------------------

    def _queue(self, hit: Pending, into: deque[Pending], kind: str) -> None:
        size = _size(hit)
        if self._pending + size > self._max_pending:
            self._drop(kind)
            return
        if self._writer is None or self._writer.done():
            # Not started, or stopped already (a hit in the last moments of a stop): this
            # hit gets its own write now, which the records wait for when they close.
            self._write_now([hit])
            return
        idle = not self._now and not self._later
        into.append(hit)
        self._pending += size
        if idle or len(self._now) == BATCH_HITS or self._closing:
            self._wake.set()

    def _drop(self, kind: str) -> None:
        self._drops[kind].inc()
        self._dropped += 1
        now = time.monotonic()
        if now - self._drops_logged >= DROPS_LOGGED_EVERY:
            log.warning(
                "tracking: %d opens or clicks not recorded: too many (%d bytes) were waiting"
                " for the records (counted in txmail_relay_tracking_dropped_total)",
                self._dropped,
                self._max_pending,
            )
            self._dropped = 0
            self._drops_logged = now

    def _write_now(self, batch: list[Pending]) -> None:
        """Start recording ``batch`` at once (the records' write is asked for before this
        returns, so closing the records waits for it)."""
        try:
            write = asyncio.ensure_future(self._records.engagement.record(batch, self._judge))
        except Exception as e:  # the records are closed already (a bug in the stop order)
            self._failed(batch, e)
            return

        def done(future: asyncio.Future[int]) -> None:
            error = None if future.cancelled() else future.exception()
            if error is not None:
                self._failed(batch, error)
            else:
                self._metrics.tracking_batch.observe(len(batch))

        write.add_done_callback(done)

    def _take(self, now: float) -> list[Pending]:
        """The hits due (all of them when closing), the oldest first, BATCH_HITS at most."""
        batch: list[Pending] = []
        for queue in (self._now, self._later):
            while queue and len(batch) < BATCH_HITS and (self._closing or queue[0].due <= now):
                hit = queue.popleft()
                self._pending -= _size(hit)
                batch.append(hit)
        return batch

    async def _start(self, _app: web.Application | None = None) -> None:
        self._closing = False
        self._writer = asyncio.create_task(self._run(), name="tracking-writer")

    async def _run(self) -> None:
        """Until closed: records the due hits in batches, one write at a time."""
        while True:
            if not self._now and not self._later:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            now = self._clock()
            first = min(q[0].due for q in (self._now, self._later) if q)
            wait = first + BATCH_DELAY - now
            if wait > 0 and not self._closing and len(self._now) < BATCH_HITS:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), wait)
                continue
            batch = self._take(now)
            if batch:
                await self._write(batch)

    async def _write(self, batch: list[Pending]) -> None:
        """Record ``batch``; never raises (a failure is logged, its hits counted dropped)."""
        try:
            await self._records.engagement.record(batch, self._judge)
        except Exception as e:
            self._failed(batch, e)
        else:
            self._metrics.tracking_batch.observe(len(batch))

    def _failed(self, batch: list[Pending], error: BaseException) -> None:
        log.error(  # the reason is enough; a hit's fields (URL, user agent) are not logged
            "tracking: %d opens or clicks could not be recorded: %s",
            len(batch),
            type(error).__name__,
        )
        for hit in batch:
            self._drops["open" if hit.kind is Kind.OPENED else "click"].inc()

    def _judge(self, hit: Pending, delivered: float | None) -> bool:
        """Whether ``hit`` is a machine's (counted in the metrics, logged at DEBUG)."""
        kind = HitKind.OPEN if hit.kind is Kind.OPENED else HitKind.CLICK
        nearby: list[tuple[float, int]] = []
        if kind is HitKind.CLICK and self._policy.burst_links >= 2:
            nearby = self._recent.around(hit.event_id, hit.at, hit.link)
        try:
            verdict = classify(
                Hit(kind, hit.method, hit.user_agent, hit.at, delivered, hit.link, nearby),
                self._policy,
            )
        except Exception:  # classify is total: a bug; the hit is then a person's
            log.exception("classifying a hit failed; recorded as a person's")
            return False
        if verdict.machine:
            log.debug("machine %s: %s", kind.value, verdict.reason)
            self._metrics.tracking_machine.labels(kind.value, verdict.rule or "").inc()
        return verdict.machine

    async def _flush(self, _app: web.Application | None = None) -> None:
        """Record every hit pending now, burst windows or not (the relay is stopping)."""
        self._closing = True
        self._wake.set()
        if self._writer is not None:
            await asyncio.wait({self._writer})
