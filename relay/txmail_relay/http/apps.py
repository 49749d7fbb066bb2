"""The relay's three HTTP listeners, each an aiohttp application of its own.

* ``tracking`` (public, behind an Ingress): only the open pixel and click redirect routes.
* ``api`` (authenticated): the single-send API, send statuses and contacts.
* ``metrics`` (cluster-internal): ``/metrics``, ``/healthz`` (the process serves) and
  ``/readyz`` (configuration loaded, spool healthy, SMTP listening); the probes use it.

Being separate sockets, no path on one can reach a route of another, whatever a proxy in
front forwards. Unknown paths are a bare 404; no response carries a ``Server`` banner.
Each listener's connections are capped and its requests have deadlines (:mod:`.guard`,
whose middleware comes first in each application).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from aiohttp import hdrs, web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

Installer = Callable[[web.Application], None]
Middleware = Callable[..., Any]
SMALL_BODY = 64 * 1024


async def _no_banner(_: web.Request, response: web.StreamResponse) -> None:
    response.headers.pop(hdrs.SERVER, None)


def _app(
    installers: Sequence[Installer], client_max_size: int, middlewares: Sequence[Middleware]
) -> web.Application:
    app = web.Application(client_max_size=client_max_size, middlewares=middlewares)
    app.on_response_prepare.append(_no_banner)
    for install in installers:
        install(app)
    return app


def make_tracking_app(
    installers: Sequence[Installer], *, middlewares: Sequence[Middleware] = ()
) -> web.Application:
    """The public listener: whatever ``installers`` add (the tracking routes), nothing else."""
    return _app(installers, SMALL_BODY, middlewares)


def make_api_app(
    installers: Sequence[Installer],
    *,
    client_max_size: int,
    middlewares: Sequence[Middleware] = (),
) -> web.Application:
    """The authenticated API listener; bodies up to ``client_max_size`` (the message limit)."""
    return _app(installers, client_max_size, middlewares)


def make_metrics_app(
    registry: CollectorRegistry,
    ready: Callable[[], bool],
    *,
    middlewares: Sequence[Middleware] = (),
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

    def install(app: web.Application) -> None:
        app.router.add_get("/metrics", metrics)
        app.router.add_get("/healthz", healthz)
        app.router.add_get("/readyz", readyz)

    return _app([install], SMALL_BODY, middlewares)
