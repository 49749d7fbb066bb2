"""The tracking endpoints ``GET /o/<token>.gif`` and ``GET /c/<token>``, and the key file.

A GET only records an event (link scanners prefetch). The pixel is served whatever the
token, so probing learns nothing; a click with a bad, tampered or unknown-key token gets a
fixed 400 page, never a redirect. Events are written to the store off the event loop.

The key file (``trackingKeysFile``, in Kubernetes the mounted tracking Secret) is read at
start and again whenever it changes (:class:`KeyFile`), so a rotation needs no restart.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from aiohttp import web

from txmail_relay.metrics import RelayMetrics
from txmail_relay.records.database import background
from txmail_relay.records.model import Kind
from txmail_relay.records.records import Records
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


class TrackingEndpoints:
    def __init__(self, keys: KeyFile, records: Records, metrics: RelayMetrics) -> None:
        self._keys = keys
        self._records = records
        self._metrics = metrics

    def install(self, app: web.Application) -> None:
        app.router.add_get("/o/{token}", self.pixel)
        app.router.add_get("/c/{token}", self.click)

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
            background(self._records.events.engagement(event_id, Kind.OPENED))
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
        background(self._records.events.engagement(found.event_id, Kind.CLICKED))
        return web.Response(status=302, headers={**CLICK_HEADERS, "Location": found.url})
