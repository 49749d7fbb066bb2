"""The tracking endpoints ``GET /o/<token>.gif`` and ``GET /c/<token>``, and the key file.

A GET only records an event (link scanners prefetch). The pixel is served whatever the
token, so probing learns nothing; a click with a bad, tampered or unknown-key token gets a
fixed 400 page, never a redirect. Events are written to the store off the event loop.

Machine hits (:mod:`.machine`: scanners, prefetching proxies, HEAD, a click right after
delivery, a burst of links) get the same answer as anyone's and are recorded as machine
engagement. The answer never waits for the verdict: the verdict and the write happen after
it. A click that looks like a person's is recorded :attr:`Policy.burst_window` after it
arrived, once the other clicks of its message in that window are known (the first click of
a scanner's burst is a machine's too); a stopping relay records what is pending at once.

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
from pathlib import Path
from typing import Final

from aiohttp import web

from txmail_relay.metrics import RelayMetrics
from txmail_relay.records.database import background
from txmail_relay.records.model import Kind
from txmail_relay.records.records import Records
from txmail_relay.tracking.machine import Hit, HitKind, Policy, Verdict, classify
from txmail_relay.tracking.tokens import (
    CLICK_HEADERS,
    PIXEL_HEADERS,
    TRANSPARENT_GIF,
    Click,
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
MAX_WAITING: Final = 10_000  # clicks waiting for their burst window; past it: decided at once


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
    """The last clicks of each message (time, link index), for the burst rule; bounded both
    in messages (the least recently clicked are forgotten) and in time."""

    def __init__(self, keep: float, max_messages: int = MAX_MESSAGES) -> None:
        self._keep = keep
        self._max = max_messages
        self._clicks: OrderedDict[bytes, deque[tuple[float, int]]] = OrderedDict()

    def add(self, event_id: bytes, at: float, link: int) -> None:
        clicks = self._clicks.pop(event_id, None) or deque(maxlen=64)
        while clicks and clicks[0][0] < at - self._keep:
            clicks.popleft()
        clicks.append((at, link))
        self._clicks[event_id] = clicks
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


class TrackingEndpoints:
    def __init__(
        self,
        keys: KeyFile,
        records: Records,
        metrics: RelayMetrics,
        *,
        policy: Policy | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._keys = keys
        self._records = records
        self._metrics = metrics
        self._policy = policy or Policy()
        self._clock = clock
        self._recent = RecentClicks(2 * self._policy.burst_window)
        self._waiting: set[asyncio.Task[None]] = set()
        self._closing = asyncio.Event()

    def install(self, app: web.Application) -> None:
        app.router.add_get("/o/{token}", self.pixel)  # HEAD too (aiohttp's allow_head)
        app.router.add_get("/c/{token}", self.click)
        app.on_cleanup.append(self._flush)

    async def pixel(self, request: web.Request) -> web.Response:
        token = request.match_info["token"]
        event_id = None
        keys = self._keys.current
        if keys is not None and token.endswith(".gif"):
            event_id = keys.verify_open(token)
        if event_id is None:
            self._metrics.tracking_requests.labels("open", "invalid").inc()
        else:
            self._metrics.tracking_requests.labels("open", "valid").inc()
            agent = _user_agent(request)
            verdict = classify(Hit(HitKind.OPEN, request.method, agent, self._clock()))
            self._record(event_id, Kind.OPENED, verdict, None, agent)
        return web.Response(body=TRANSPARENT_GIF, headers=dict(PIXEL_HEADERS))

    async def click(self, request: web.Request) -> web.Response:
        keys = self._keys.current
        found = keys.click(request.match_info["token"]) if keys is not None else None
        if found is None:
            self._metrics.tracking_requests.labels("click", "invalid").inc()
            return web.Response(
                status=400,
                text=BAD_LINK_PAGE,
                content_type="text/html",
                headers=BAD_LINK_HEADERS,
            )
        self._metrics.tracking_requests.labels("click", "valid").inc()
        at = self._clock()
        self._recent.add(found.event_id, at, found.link_index)
        task = asyncio.ensure_future(self._judge(found, request.method, _user_agent(request), at))
        self._waiting.add(task)
        task.add_done_callback(self._waiting.discard)
        return web.Response(status=302, headers={**CLICK_HEADERS, "Location": found.url})

    def _record(
        self, event_id: bytes, kind: Kind, verdict: Verdict, url: str | None, agent: str | None
    ) -> None:
        if verdict.machine:
            log.debug("machine %s: %s", kind.value, verdict.reason)
            label = "open" if kind is Kind.OPENED else "click"
            self._metrics.tracking_machine.labels(label, verdict.rule or "").inc()
        background(
            self._records.events.engagement(
                event_id, kind, machine=verdict.machine, url=url, user_agent=agent
            )
        )

    async def _judge(self, click: Click, method: str, agent: str | None, at: float) -> None:
        """Decide on one click (after its burst window unless a machine's already) and
        record it; never raises (a failure is logged and the click recorded as a person's)."""
        policy = self._policy
        verdict: Verdict | None = None
        try:
            delivered = None
            if policy.click_window > 0:
                delivered = await self._records.engagement.delivered_at(click.event_id)
            hit = Hit(HitKind.CLICK, method, agent, at, delivered, click.link_index)
            verdict = classify(hit, policy)
            if not verdict.machine and policy.burst_links >= 2:
                if len(self._waiting) <= MAX_WAITING and not self._closing.is_set():
                    remaining = at + policy.burst_window - self._clock()
                    if remaining > 0:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._closing.wait(), remaining)
                nearby = self._recent.around(click.event_id, at, click.link_index)
                verdict = classify(
                    Hit(HitKind.CLICK, method, agent, at, delivered, click.link_index, nearby),
                    policy,
                )
        except Exception:
            log.exception("classifying a click failed; recorded as a person's")
        finally:
            # Recorded even if cancelled: the redirect was answered, the click happened.
            try:
                self._record(
                    click.event_id, Kind.CLICKED, verdict or Verdict(False), click.url, agent
                )
            except Exception:  # the records are closed already (a bug in the stop order)
                log.exception("a click could not be recorded")

    async def _flush(self, _app: web.Application | None = None) -> None:
        """Record the clicks waiting for their burst window now (the relay is stopping)."""
        self._closing.set()
        if self._waiting:
            await asyncio.wait(set(self._waiting))
