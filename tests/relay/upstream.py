"""A real upstream SMTP server for smarthost tests: aiosmtpd with TLS and AUTH, in a thread.

It speaks STARTTLS (required before anything else), implicit TLS (port 465 style) or plain
SMTP, checks AUTH against one username and password, and records what it saw: the
connections (by client address), every AUTH attempt, and every accepted transaction with
whether it came over TLS and under which login. Failures can be scripted per transaction.
Everything binds 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from peers import free_port


@dataclass(frozen=True)
class Received:
    peer: Any  # (host, port); aiosmtpd types Session.peer as a str
    tls: bool
    login: str | None
    mail_from: str
    rcpts: list[str]
    content: bytes


@dataclass
class Recording:
    """What the upstream saw; written on its loop thread, read by the test thread."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    peers: list[Any] = field(default_factory=list)
    auth: list[tuple[str, str, bool]] = field(default_factory=list)  # login, password, tls
    mail_commands: int = 0
    received: list[Received] = field(default_factory=list)


class _Handler:
    def __init__(self, upstream: Upstream) -> None:
        self._upstream = upstream

    async def handle_MAIL(  # noqa: N802 (aiosmtpd hook name)
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: Any
    ) -> str:
        with self._upstream.recording.lock:
            self._upstream.recording.mail_commands += 1
        if not session.authenticated:
            return "530 5.7.0 Authentication required"
        reply = self._upstream.take_failure("MAIL")
        if reply is not None:
            return _closing(server, reply)
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_DATA(  # noqa: N802 (aiosmtpd hook name)
        self, server: SMTP, session: Session, envelope: Envelope
    ) -> str:
        reply = self._upstream.take_failure("DATA")
        if reply is not None:
            return _closing(server, reply)
        auth = session.auth_data
        content = envelope.original_content or b""
        with self._upstream.recording.lock:
            self._upstream.recording.received.append(
                Received(
                    peer=session.peer,
                    tls=_over_tls(server),
                    login=auth.login.decode() if isinstance(auth, LoginPassword) else None,
                    mail_from=envelope.mail_from or "",
                    rcpts=list(envelope.rcpt_tos),
                    content=content,
                )
            )
        return "250 2.0.0 OK queued"


def _over_tls(server: SMTP) -> bool:
    """Works for implicit TLS too (aiosmtpd's ``session.ssl`` is only set by STARTTLS)."""
    return server.transport is not None and bool(server.transport.get_extra_info("ssl_object"))


def _closing(server: SMTP, reply: str) -> str:
    """``reply``, then the connection is closed, as a server shutting down does after 421."""
    if reply.startswith("421"):
        transport = server.transport
        assert transport is not None
        # Runs after aiosmtpd has written the reply; close() flushes it first.
        asyncio.get_running_loop().call_soon(transport.close)
    return reply


class _RecordingSMTP(SMTP):
    def __init__(self, upstream: Upstream, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._upstream = upstream

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        starttls_done = self._original_transport is not None
        super().connection_made(transport)
        if not starttls_done and self.session is not None:
            with self._upstream.recording.lock:
                self._upstream.recording.peers.append(self.session.peer)
            self._upstream.live.add(self)

    def connection_lost(self, error: Exception | None) -> None:
        self._upstream.live.discard(self)
        super().connection_lost(error)
        if not self._upstream.live and self._upstream.on_all_closed is not None:
            self._upstream.on_all_closed()


class _Controller(Controller):
    def __init__(self, upstream: Upstream, **kwargs: Any) -> None:
        super().__init__(_Handler(upstream), **kwargs)
        self._upstream = upstream

    def factory(self) -> SMTP:
        return _RecordingSMTP(self._upstream, self.handler, **self.SMTP_kwargs)


class Upstream:
    """``mode``: ``starttls`` (required), ``implicit`` or ``plain``."""

    def __init__(
        self,
        mode: str,
        *,
        cert_file: Path | None = None,
        key_file: Path | None = None,
        username: str,
        password: str,
    ) -> None:
        self.mode = mode
        self.username = username
        self.password = password
        self.recording = Recording()
        self._failures: dict[str, list[str]] = {"MAIL": [], "DATA": []}
        self.live: set[SMTP] = set()  # open connections; only touched on the server's loop
        self.on_all_closed: Callable[[], None] | None = None
        self.port = free_port()
        kwargs: dict[str, Any] = {
            "hostname": "127.0.0.1",
            "port": self.port,
            "server_hostname": "upstream.test",
            "authenticator": self._authenticate,
            # AUTH is required by handle_MAIL. aiosmtpd only knows about STARTTLS, so with
            # implicit TLS its "AUTH only over TLS" check would hide AUTH altogether.
            "auth_require_tls": mode != "implicit",
            "ready_timeout": 10.0,
        }
        if mode != "plain":
            assert cert_file is not None and key_file is not None
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(cert_file, key_file)
            if mode == "starttls":
                kwargs.update(tls_context=context, require_starttls=True)
            elif mode == "implicit":
                kwargs.update(ssl_context=context)
            else:
                raise ValueError(mode)
        self._controller = _Controller(self, **kwargs)
        self._controller.start()
        with self.recording.lock:  # Controller.start() opened one connection to check
            self.recording.peers.clear()

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        assert isinstance(data, LoginPassword)
        login, password = data.login.decode(), data.password.decode()
        ok = login == self.username and password == self.password
        with self.recording.lock:
            self.recording.auth.append((login, password, _over_tls(server)))
        return AuthResult(success=ok, handled=False, auth_data=data if ok else None)

    def fail_next(self, command: str, reply: str) -> None:
        """Answer the next ``command`` (MAIL or DATA) with ``reply`` (421 also closes)."""
        with self.recording.lock:
            self._failures[command].append(reply)

    def take_failure(self, command: str) -> str | None:
        with self.recording.lock:
            failures = self._failures[command]
            return failures.pop(0) if failures else None

    def received(self) -> list[Received]:
        with self.recording.lock:
            return list(self.recording.received)

    def peers(self) -> list[Any]:
        with self.recording.lock:
            return list(self.recording.peers)

    def auth_attempts(self) -> list[tuple[str, str, bool]]:
        with self.recording.lock:
            return list(self.recording.auth)

    def mail_commands(self) -> int:
        with self.recording.lock:
            return self.recording.mail_commands

    def open_connections(self) -> int:
        return len(self.live)

    def drop_connections(self) -> None:
        """Close every open connection without a word, as a server's idle timeout might."""
        self._controller.loop.call_soon_threadsafe(self._drop)

    def _drop(self) -> None:
        for server in list(self.live):
            if server.transport is not None:
                server.transport.close()

    async def _drop_all(self) -> None:
        closed = asyncio.Event()
        self.on_all_closed = closed.set
        if not self.live:
            closed.set()
        self._drop()
        await closed.wait()  # connection_lost() comes a loop iteration after close()

    def stop(self) -> None:
        # Close connections first: the Controller stops its loop with them still open.
        asyncio.run_coroutine_threadsafe(self._drop_all(), self._controller.loop).result(10)
        self._controller.stop()


# -- a second, unrelated CA ----------------------------------------------------------------------
