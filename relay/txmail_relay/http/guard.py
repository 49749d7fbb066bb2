"""Connection limits for the aiohttp listeners: caps per address and overall, and deadlines
for a request's headers and body.

aiohttp 3 has neither a header nor a body read timeout. Its keep-alive timer (``keepalive``
below, set from ``limits.httpKeepaliveTimeout``) closes a connection idle between requests,
but a request whose headers trickle in, or whose body never ends, is not idle to it. So
each connection's aiohttp protocol is wrapped in :class:`_Guarded`, which

* asks the listener's :class:`ConnectionGate` when the connection is accepted, and answers
  ``429`` (this address has its share) or ``503`` (the listener is full) itself;
* gives each request ``header_timeout`` seconds from its first byte (or from the connection's
  start) until aiohttp has parsed its headers, then ``body_timeout`` seconds for its body,
  and answers ``408`` and closes past either.

The :meth:`HttpGuard.middleware` tells the wrapper when aiohttp has parsed the headers (the
handler runs) and when the handler is done. The replies written here are fixed bytes: there
is no aiohttp request yet (or no longer one) to answer through.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import cast

from aiohttp import web

from txmail_relay.ingress.connections import ConnectionGate, Refusal, Ticket, peer_ip

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _reply(status: str, *extra: str) -> bytes:
    head = [f"HTTP/1.1 {status}", "Connection: close", "Content-Length: 0", *extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode()


REPLY_TIMEOUT = _reply("408 Request Timeout")
REFUSALS = {
    Refusal.ADDRESS: _reply("429 Too Many Requests", "Retry-After: 1"),
    Refusal.FULL: _reply("503 Service Unavailable", "Retry-After: 1"),
}
LINGER = 1.0  # seconds a refused connection may stay to read its reply


@dataclass(frozen=True)
class HttpLimits:
    header_timeout: float
    body_timeout: float


class _State(enum.Enum):
    HEADERS = "headers"  # a request (or the connection) has begun, its headers are not parsed
    HANDLER = "handler"  # aiohttp runs the handler: the body is being read, or was
    IDLE = "idle"  # between requests (aiohttp's keep-alive timer applies)


class _Guarded(asyncio.Protocol):
    """Forwards everything to aiohttp's protocol; adds the gate and the deadlines."""

    def __init__(self, guard: HttpGuard, inner: asyncio.Protocol) -> None:
        self._guard = guard
        self._inner = inner
        self._transport: asyncio.Transport | None = None
        self._ticket: Ticket | None = None
        self._state = _State.HEADERS
        self._received = False  # any byte of the current request yet
        # One timer at a time, re-armed lazily: a request sets the deadline and what to do
        # past it (_late), and the timer, when it fires early, waits again for the rest. So
        # a keep-alive connection's requests cost no timer each (a call_later per request
        # was 5% of the click redirect's time).
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0  # loop time the timer fires at
        self._deadline = 0.0  # loop time past which _late runs
        self._late: Callable[[], None] | None = None

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's do not subclass asyncio.Transport: no isinstance).
        self._transport = transport = cast(asyncio.Transport, transport)
        verdict = self._guard.gate.admit(transport.get_extra_info("peername"))
        if not isinstance(verdict, Ticket):
            log.debug("HTTP connection refused", extra={"why": verdict.value})
            transport.write(REFUSALS[verdict])
            if transport.can_write_eof():
                transport.write_eof()  # the client reads the reply, then we close
            self._arm(LINGER, transport.close)
            return
        self._ticket = verdict
        self._arm(self._guard.limits.header_timeout, self._headers_late)
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._ticket is None:
            return  # refused: discarded
        if self._state is _State.IDLE:
            self._state = _State.HEADERS
            self._arm(self._guard.limits.header_timeout, self._headers_late)
        self._received = True
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        if self._ticket is None:
            return False
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._late = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._ticket is None:
            return
        self._ticket.release()
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._ticket is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._ticket is not None:
            self._inner.resume_writing()

    # -- told by the middleware ------------------------------------------------------------

    def request_started(self, request: web.BaseRequest) -> None:
        self._state = _State.HANDLER
        if request.body_exists:
            self._arm(self._guard.limits.body_timeout, lambda: self._body_late(request))
        else:
            self._late = None

    def request_done(self) -> None:
        self._state = _State.IDLE
        self._received = False
        self._late = None

    # -- deadlines -------------------------------------------------------------------------

    def _arm(self, seconds: float, then: Callable[[], None]) -> None:
        """Run ``then`` in ``seconds`` unless re-armed or disarmed (``_late = None``)."""
        loop = asyncio.get_running_loop()
        self._deadline = loop.time() + seconds
        self._late = then
        if self._timer is not None and self._timer_at > self._deadline:
            self._timer.cancel()  # fires too late for this deadline
            self._timer = None
        if self._timer is None:
            self._timer_at = self._deadline
            self._timer = loop.call_at(self._deadline, self._fire)

    def _fire(self) -> None:
        self._timer = None
        late = self._late
        if late is None:
            return  # disarmed since: the next _arm schedules again
        loop = asyncio.get_running_loop()
        if loop.time() < self._deadline:  # re-armed later since
            self._timer_at = self._deadline
            self._timer = loop.call_at(self._deadline, self._fire)
            return
        self._late = None
        late()

    def _headers_late(self) -> None:
        if self._state is _State.HEADERS:
            # A connection that never sent a byte is just closed (a browser's preconnect).
            self._close(REPLY_TIMEOUT if self._received else b"", "headers")

    def _body_late(self, request: web.BaseRequest) -> None:
        if self._state is _State.HANDLER and not request.content.is_eof():
            self._close(REPLY_TIMEOUT, "body")

    def _close(self, reply: bytes, what: str) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        log.info(
            "HTTP request too slow",
            extra={"what": what, "peer": peer_ip(transport.get_extra_info("peername"))},
        )
        if reply:
            transport.write(reply)
        transport.close()
        asyncio.get_running_loop().call_later(LINGER, transport.abort)


class HttpGuard:
    """The gate and deadlines of one HTTP listener: wrap its protocol factory with
    :meth:`protocol` and put :meth:`middleware` first in its application."""

    def __init__(self, gate: ConnectionGate, limits: HttpLimits) -> None:
        self.gate = gate
        self.limits = limits

    def protocol(self, factory: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        return lambda: _Guarded(self, factory())

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        # The listener's transports carry the _Guarded wrapper as their protocol (protocol()).
        protocol = request.transport.get_protocol() if request.transport else None
        guarded = protocol if isinstance(protocol, _Guarded) else None
        if guarded is not None:
            guarded.request_started(request)
        try:
            return await handler(request)
        finally:
            if guarded is not None:
                guarded.request_done()
