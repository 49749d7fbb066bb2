"""A transaction that fails with something other than an SMTP or network error (an address
aiosmtplib will not quote: ValueError) closes its pooled connection, with PIPELINING and
without: it is not left open outside the pool, holding a socket and its destination's
connection count for good. Upstream: a real aiosmtpd server that counts open sessions."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from peers import free_port
from relay.relaykit import RelayEnv, wait_for
from txmail_relay.delivery.transport import RecipientResult
from txmail_relay.outcomes import Outcome

BODY = b"From: app@example.com\r\nTo: a@dest.test\r\nSubject: x\r\n\r\nhello\r\n"


class _Handler:
    def __init__(self, pipelining: bool) -> None:
        self.pipelining = pipelining
        self.delivered: list[list[str]] = []

    async def handle_EHLO(  # noqa: N802 (aiosmtpd hook name)
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: Any
    ) -> list[str]:
        session.host_name = hostname
        if self.pipelining:
            return [*responses[:-1], "250-PIPELINING", responses[-1]]
        return list(responses)

    async def handle_DATA(  # noqa: N802 (aiosmtpd hook name)
        self, server: SMTP, session: Session, envelope: Envelope
    ) -> str:
        self.delivered.append(list(envelope.rcpt_tos))
        return "250 2.0.0 OK queued"


class Upstream(Controller):
    """aiosmtpd offering PIPELINING or not; ``open`` counts the sessions not closed yet."""

    def __init__(self, pipelining: bool) -> None:
        self.port = free_port()
        self.lock = threading.Lock()
        self.open = 0
        super().__init__(_Handler(pipelining), hostname="127.0.0.1", port=self.port)

    def factory(self) -> SMTP:
        upstream = self

        class Counted(SMTP):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                with upstream.lock:
                    upstream.open += 1
                super().connection_made(transport)

            def connection_lost(self, exc: Exception | None) -> None:
                with upstream.lock:
                    upstream.open -= 1
                super().connection_lost(exc)

        return Counted(self.handler, **self.SMTP_kwargs)

    def sessions(self) -> int:
        with self.lock:
            return self.open


@pytest.fixture(params=[True, False], ids=["pipelining", "one-command-at-a-time"])
def upstream(request: pytest.FixtureRequest) -> Iterator[Upstream]:
    server = Upstream(pipelining=request.param)
    server.start()
    wait_for(lambda: server.sessions() == 0, 10, "the controller's own check closed")
    yield server
    server.stop()


@pytest.mark.parametrize(
    ("mail_from", "recipients"),
    [
        ("app@example.com", ["a@dest.test", "b c@dest.test"]),  # after MAIL and a first RCPT
        ("app@example.com", ["\u00fc@dest.test"]),  # 8-bit: UnicodeEncodeError
        ("a b@example.com", ["a@dest.test"]),  # the sender
        ("app@example.com", ['"a\x00b"@dest.test']),  # a control character quoting keeps
    ],
)
def test_an_unquotable_address_closes_its_connection(
    env: RelayEnv, upstream: Upstream, mail_from: str, recipients: list[str]
) -> None:
    smarthost = {"relay": {"delivery": {"smarthost": {"port": upstream.port}}}}
    relay = env.start(env.settings(overrides=smarthost))
    assert relay.relay is not None
    transport = relay.relay.transport

    def deliver(sender: str, rcpts: list[str]) -> list[Outcome]:
        """``transport.deliver`` on the relay's loop; its outcomes, or what it raised."""
        task: asyncio.Future[list[RecipientResult]] = relay.call(
            lambda: asyncio.ensure_future(transport.deliver(sender, rcpts, BODY))
        )
        wait_for(task.done, 15, "the transaction")
        return [r.outcome for r in task.result()]

    with pytest.raises(ValueError, match=r"."):
        deliver(mail_from, recipients)
    wait_for(lambda: upstream.sessions() == 0, 10, "the relay to close the connection")
    # The next transaction gets a connection of its own and goes through.
    assert deliver("app@example.com", ["a@dest.test"]) == [Outcome.DELIVERED]
