"""The tracking endpoints ``GET /o/<token>.gif`` and ``GET /c/<token>``, and the key file.

A GET only records an event (link scanners prefetch). The pixel is served whatever the
token, so probing learns nothing; a click with a bad, tampered or unknown-key token gets a
fixed 400 page, never a redirect. Events are written to the store off the event loop.
"""

from __future__ import annotations

import logging
from pathlib import Path

from aiohttp import web

from txmail_relay.metrics import RelayMetrics
from txmail_relay.store import Kind, Store
from txmail_relay.tracking import (
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
        try:
            current = int(kid)
            keys[current] = bytes.fromhex(hexkey.strip())
        except ValueError as e:
            raise ValueError(f"{path}, line {number}: expected kid:hexkey ({e})") from None
        if not sep:
            raise ValueError(f"{path}, line {number}: expected kid:hexkey")
    if current is None:
        raise ValueError(f"{path}: no tracking key")
    return TrackingKeys(keys, current)


class TrackingEndpoints:
    def __init__(self, keys: TrackingKeys | None, store: Store, metrics: RelayMetrics) -> None:
        self._keys = keys
        self._store = store
        self._metrics = metrics

    def install(self, app: web.Application) -> None:
        app.router.add_get("/o/{token}", self.pixel)
        app.router.add_get("/c/{token}", self.click)

    async def pixel(self, request: web.Request) -> web.Response:
        token = request.match_info["token"]
        event_id = None
        if self._keys is not None and token.endswith(".gif"):
            event_id = self._keys.verify_open(token)
        if event_id is None:
            self._metrics.tracking_requests.labels("open", "invalid").inc()
        else:
            self._metrics.tracking_requests.labels("open", "valid").inc()
            self._store.submit(self._store.record_engagement, event_id, Kind.OPENED)
        return web.Response(body=TRANSPARENT_GIF, headers=dict(PIXEL_HEADERS))

    async def click(self, request: web.Request) -> web.Response:
        found = self._keys.click(request.match_info["token"]) if self._keys else None
        if found is None:
            self._metrics.tracking_requests.labels("click", "invalid").inc()
            return web.Response(
                status=400,
                text=BAD_LINK_PAGE,
                content_type="text/html",
                headers=BAD_LINK_HEADERS,
            )
        self._metrics.tracking_requests.labels("click", "valid").inc()
        self._store.submit(self._store.record_engagement, found.event_id, Kind.CLICKED)
        return web.Response(status=302, headers={**CLICK_HEADERS, "Location": found.url})
