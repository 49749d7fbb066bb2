"""The relay's HTTP endpoint: /metrics, /healthz (the process serves) and /readyz, plus the
routes other components install (the single-send API, tracking)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest


def make_app(
    registry: CollectorRegistry,
    ready: Callable[[], bool],
    installers: Sequence[Callable[[web.Application], None]] = (),
    *,
    client_max_size: int = 1024 * 1024,
) -> web.Application:
    async def metrics(_: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(_: web.Request) -> web.Response:
        if ready():
            return web.Response(text="ready\n")
        return web.Response(status=503, text="not ready\n")

    app = web.Application(client_max_size=client_max_size)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    for install in installers:
        install(app)
    return app
