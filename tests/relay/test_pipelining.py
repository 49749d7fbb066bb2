"""Outbound PIPELINING (RFC 2920): MAIL, every RCPT and DATA in one write where the upstream
offers it, the replies read in order, the same per-recipient outcomes as one command at a time.

The upstream is a real SMTP server (aiosmtpd) that records what arrived in which read, so a
test sees the command groups as the relay wrote them, and answers MAIL or RCPT as scripted.
"""

from __future__ import annotations

import asyncio
import smtplib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from peers import free_port
from postfix import BOUNCE_DOMAIN, KNOWN_USER, Postfix, postfix_factory
from relay.relaykit import Recorder, RelayEnv, RelayThread, message, wait_for

__all__ = ["postfix_factory"]

SENDER = "app@example.com"
_VERBS = {b"EHLO", b"HELO", b"MAIL", b"RCPT", b"DATA", b"RSET", b"NOOP", b"QUIT"}


@dataclass
class _Seen:
    lock: threading.Lock = field(default_factory=threading.Lock)
    reads: list[tuple[int, bytes]] = field(default_factory=list)  # (connection, one read)
    delivered: list[tuple[list[str], bytes]] = field(default_factory=list)
    connections: int = 0


class _Handler:
    def __init__(self, server: PipeliningServer) -> None:
        self._server = server

    async def handle_EHLO(  # noqa: N802 (aiosmtpd hook name)
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: Any
    ) -> list[str]:
        session.host_name = hostname
        if self._server.pipelining:
            return [*responses[:-1], "250-PIPELINING", responses[-1]]
        return list(responses)

    async def handle_MAIL(  # noqa: N802 (aiosmtpd hook name)
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: Any
    ) -> str:
        reply = self._server.take("MAIL " + address)
        if reply is not None:
            return _closing(server, reply)
        envelope.mail_from = address
        return "250 OK"

    async def handle_RCPT(  # noqa: N802 (aiosmtpd hook name)
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: Any
    ) -> str:
        reply = self._server.take("RCPT " + address)
        if reply == "hang":  # no answer for longer than the relay waits
            await asyncio.sleep(5)
            return "250 OK"
        if reply is not None:
            return _closing(server, reply)
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(  # noqa: N802 (aiosmtpd hook name)
        self, server: SMTP, session: Session, envelope: Envelope
    ) -> str:
        with self._server.seen.lock:
            self._server.seen.delivered.append(
                (list(envelope.rcpt_tos), envelope.original_content or b"")
            )
        return "250 2.0.0 OK queued"


def _closing(server: SMTP, reply: str) -> str:
    if reply.startswith("421"):  # the reply, then the connection is closed
        transport = server.transport
        assert transport is not None
        asyncio.get_running_loop().call_soon(transport.close)
    return reply


class _RecordingSMTP(SMTP):
    def __init__(self, server: PipeliningServer, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._server = server
        with server.seen.lock:
            server.seen.connections += 1
            self._number = server.seen.connections

    def data_received(self, data: bytes) -> None:
        with self._server.seen.lock:
            self._server.seen.reads.append((self._number, bytes(data)))
        super().data_received(data)


class _Controller(Controller):
    def __init__(self, server: PipeliningServer, **kwargs: Any) -> None:
        super().__init__(_Handler(server), **kwargs)
        self._server = server

    def factory(self) -> SMTP:
        return _RecordingSMTP(self._server, self.handler, **self.SMTP_kwargs)


class PipeliningServer:
    """aiosmtpd offering PIPELINING (or not), with scripted replies to ``"MAIL addr"`` or
    ``"RCPT addr"``, each used once."""

    def __init__(self, *, pipelining: bool) -> None:
        self.pipelining = pipelining
        self.seen = _Seen()
        self._script: dict[str, list[str]] = {}
        self.port = free_port()
        self._controller = _Controller(
            self, hostname="127.0.0.1", port=self.port, ready_timeout=10.0
        )
        self._controller.start()
        with self.seen.lock:  # Controller.start() connected once to check
            self.seen.reads.clear()
            self.seen.connections = 0

    def script(self, command: str, reply: str) -> None:
        with self.seen.lock:
            self._script.setdefault(command, []).append(reply)

    def take(self, command: str) -> str | None:
        with self.seen.lock:
            replies = self._script.get(command)
            return replies.pop(0) if replies else None

    def reads(self) -> list[tuple[int, bytes]]:
        with self.seen.lock:
            return list(self.seen.reads)

    def delivered(self) -> list[tuple[list[str], bytes]]:
        with self.seen.lock:
            return list(self.seen.delivered)

    def commands(self) -> list[bytes]:
        """The verbs of every command that arrived, in order (reads of a body left out)."""
        verbs = []
        for _, data in self.reads():
            lines = [line.split(b" ")[0].upper() for line in data.split(b"\r\n") if line]
            if lines and lines[0] in _VERBS:
                verbs += lines
        return verbs

    def stop(self) -> None:
        self._controller.stop()


@pytest.fixture
def pipelining() -> Iterator[PipeliningServer]:
    server = PipeliningServer(pipelining=True)
    yield server
    server.stop()


@pytest.fixture
def plain() -> Iterator[PipeliningServer]:
    server = PipeliningServer(pipelining=False)
    yield server
    server.stop()


def _start(
    env: RelayEnv, server: PipeliningServer, **overrides: Any
) -> tuple[RelayThread, Recorder]:
    recorder = Recorder()
    smarthost = {"relay": {"delivery": {"smarthost": {"port": server.port}}}}
    settings = env.settings(overrides={**smarthost, **overrides})
    return env.start(settings, listeners=[recorder]), recorder


def _send(env: RelayEnv, relay: RelayThread, recipients: list[str], seq: int = 1) -> None:
    """NOTIFY=NEVER: a bounce sends no DSN, whose transaction would be in the way here."""
    with env.client(relay) as smtp:
        smtp.sendmail(SENDER, recipients, message(seq), rcpt_options=["NOTIFY=NEVER"])


def _group_read(server: PipeliningServer) -> bytes:
    [group] = [data for _, data in server.reads() if data.startswith(b"MAIL FROM:")]
    return group


def _wait_delivered(recorder: Recorder, recipient: str) -> list[str]:
    """The recipient's outcomes once the last is ``delivered``."""

    def probe() -> list[str] | None:
        outcomes = recorder.outcomes(recipient)
        return outcomes if outcomes[-1:] == ["delivered"] else None

    return wait_for(probe, what=f"{recipient} delivered")


def _replies(recorder: Recorder, recipient: str) -> list[str]:
    return [e.reply for e in list(recorder.events) if e.recipient == recipient]


def test_mail_every_rcpt_and_data_go_in_one_write_then_the_body(
    env: RelayEnv, pipelining: PipeliningServer
) -> None:
    relay, recorder = _start(env, pipelining)
    rcpts = ["a@dest.test", "b@dest.test", "c@dest.test"]
    _send(env, relay, rcpts)
    for rcpt in rcpts:
        assert _wait_delivered(recorder, rcpt) == ["delivered"]
    # One read held the whole group: MAIL, the three RCPTs and DATA, nothing else.
    assert _group_read(pipelining) == (
        b"MAIL FROM:<app@example.com>\r\n"
        b"RCPT TO:<a@dest.test>\r\nRCPT TO:<b@dest.test>\r\nRCPT TO:<c@dest.test>\r\n"
        b"DATA\r\n"
    )
    [(got, content)] = pipelining.delivered()
    assert got == rcpts
    assert b"hello" in content
    assert _replies(recorder, "a@dest.test") == ["250 2.0.0 OK queued"]


def test_a_refused_rcpt_among_accepted_ones_bounces_alone(
    env: RelayEnv, pipelining: PipeliningServer
) -> None:
    pipelining.script("RCPT b@dest.test", "550 5.1.1 <b@dest.test>: no such user")
    relay, recorder = _start(env, pipelining)
    _send(env, relay, ["a@dest.test", "b@dest.test", "c@dest.test"])
    wait_for(lambda: recorder.outcomes("c@dest.test") == ["delivered"], what="c delivered")
    assert recorder.outcomes("a@dest.test") == ["delivered"]
    assert recorder.outcomes("b@dest.test") == ["bounced"]
    assert _replies(recorder, "b@dest.test") == ["550 5.1.1 <b@dest.test>: no such user"]
    [(got, _)] = pipelining.delivered()
    assert got == ["a@dest.test", "c@dest.test"]
    assert b"RCPT TO:<c@dest.test>\r\nDATA\r\n" in _group_read(pipelining)


def test_every_rcpt_refused_sends_no_body_and_the_connection_is_reset(
    env: RelayEnv, pipelining: PipeliningServer
) -> None:
    pipelining.script("RCPT a@dest.test", "550 5.1.1 no such user")
    pipelining.script("RCPT b@dest.test", "450 4.2.0 mailbox busy")
    relay, recorder = _start(env, pipelining)
    _send(env, relay, ["a@dest.test", "b@dest.test"])
    wait_for(lambda: recorder.outcomes("b@dest.test"), what="an outcome for b")
    assert recorder.outcomes("a@dest.test") == ["bounced"]
    assert recorder.outcomes("b@dest.test")[0] == "deferred"
    assert _replies(recorder, "b@dest.test")[0] == "450 4.2.0 mailbox busy"
    # DATA went with the group (and was refused: no valid recipient); no body followed,
    # then RSET, and the connection carried the retry, which delivered b.
    wait_for(lambda: recorder.outcomes("b@dest.test")[-1:] == ["delivered"], what="b retried")
    [(got, _)] = pipelining.delivered()
    assert got == ["b@dest.test"]
    first = pipelining.commands()[: pipelining.commands().index(b"RSET") + 1]
    assert first == [b"EHLO", b"MAIL", b"RCPT", b"RCPT", b"DATA", b"RSET"]
    assert {number for number, _ in pipelining.reads()} == {1}  # one connection throughout


def test_a_refused_mail_is_answered_for_the_whole_group_then_reset(
    env: RelayEnv, pipelining: PipeliningServer
) -> None:
    pipelining.script("MAIL app@example.com", "553 5.7.1 sender not allowed")
    relay, recorder = _start(env, pipelining)
    _send(env, relay, ["a@dest.test", "b@dest.test"])
    wait_for(lambda: recorder.outcomes("b@dest.test"), what="an outcome for b")
    assert recorder.outcomes("a@dest.test") == ["bounced"]
    assert recorder.outcomes("b@dest.test") == ["bounced"]
    assert _replies(recorder, "a@dest.test") == ["553 5.7.1 sender not allowed"]
    # The RCPTs' and DATA's replies (503s) were read before RSET; no body was sent.
    wait_for(lambda: b"RSET" in pipelining.commands(), what="RSET")
    assert pipelining.commands() == [b"EHLO", b"MAIL", b"RCPT", b"RCPT", b"DATA", b"RSET"]
    assert pipelining.delivered() == []
    # The connection is still good: the next message goes over it.
    _send(env, relay, ["c@dest.test"], seq=2)
    wait_for(lambda: recorder.outcomes("c@dest.test") == ["delivered"], what="c delivered")
    assert {number for number, _ in pipelining.reads()} == {1}


def test_a_421_in_the_middle_of_the_group_defers_all_then_they_are_delivered_once(
    env: RelayEnv, pipelining: PipeliningServer
) -> None:
    pipelining.script("RCPT b@dest.test", "421 4.3.2 shutting down")
    relay, recorder = _start(env, pipelining)
    _send(env, relay, ["a@dest.test", "b@dest.test", "c@dest.test"])
    for rcpt in ("a@dest.test", "b@dest.test", "c@dest.test"):
        # Nothing was delivered at the 421: a (accepted before it) and c (never answered)
        # were deferred with it, as b was.
        assert _wait_delivered(recorder, rcpt) == ["deferred", "delivered"]
        assert _replies(recorder, rcpt)[0] == "421 4.3.2 shutting down"
    # Delivered once, by a new connection (the first was closed after the 421).
    [(got, _)] = pipelining.delivered()
    assert got == ["a@dest.test", "b@dest.test", "c@dest.test"]
    assert {number for number, _ in pipelining.reads()} == {1, 2}


def test_a_reply_that_never_comes_defers_the_message_and_drops_the_connection(
    env: RelayEnv, pipelining: PipeliningServer
) -> None:
    pipelining.script("RCPT b@dest.test", "hang")
    retry = {"minBackoff": 0.2, "maxBackoff": 1.0, "maxLifetime": 60.0, "commandTimeout": 0.5}
    relay, recorder = _start(env, pipelining, retry=retry)
    _send(env, relay, ["a@dest.test", "b@dest.test"])
    for rcpt in ("a@dest.test", "b@dest.test"):
        assert _wait_delivered(recorder, rcpt) == ["deferred", "delivered"]
        assert "Timed out waiting for server response" in _replies(recorder, rcpt)[0]
    [(got, _)] = pipelining.delivered()  # once, by the second connection
    assert got == ["a@dest.test", "b@dest.test"]
    assert {number for number, _ in pipelining.reads()} == {1, 2}


def test_without_pipelining_each_command_waits_for_its_reply(
    env: RelayEnv, plain: PipeliningServer
) -> None:
    plain.script("RCPT b@dest.test", "550 5.1.1 no such user")
    relay, recorder = _start(env, plain)
    _send(env, relay, ["a@dest.test", "b@dest.test"])
    wait_for(lambda: recorder.outcomes("a@dest.test") == ["delivered"], what="a delivered")
    assert recorder.outcomes("b@dest.test") == ["bounced"]
    commands = [data for _, data in plain.reads() if not data.startswith(b"EHLO")]
    assert commands[:4] == [
        b"MAIL FROM:<app@example.com>\r\n",
        b"RCPT TO:<a@dest.test>\r\n",
        b"RCPT TO:<b@dest.test>\r\n",
        b"DATA\r\n",
    ]


def test_a_real_postfix_gets_pipelined_mail_as_it_expects_it(
    env: RelayEnv, postfix_factory: Callable[..., Postfix]
) -> None:
    """Postfix offers PIPELINING and logs "improper command pipelining" when a client sends
    ahead where it must wait (before the 354, or without PIPELINING offered)."""
    postfix = postfix_factory()
    with smtplib.SMTP(postfix.host, postfix.port, timeout=10) as smtp:
        smtp.ehlo("probe.test")
        assert smtp.has_extn("pipelining")
    recorder = Recorder()
    overrides = {"relay": {"delivery": {"smarthost": {"host": postfix.host, "port": postfix.port}}}}
    relay = env.start(env.settings(overrides=overrides), listeners=[recorder])
    rcpt = f"{KNOWN_USER}@{BOUNCE_DOMAIN}"
    with env.client(relay) as smtp:
        for seq in range(5):
            smtp.sendmail(SENDER, [rcpt], message(seq))
    wait_for(lambda: recorder.outcomes(rcpt) == ["delivered"] * 5, timeout=20, what="outcomes")
    wait_for(lambda: len(postfix.delivered()) == 5, timeout=20, what="five in the maildir")
    assert sorted(str(m["Subject"]) for m in postfix.delivered()) == [
        f"seq {seq}" for seq in range(5)
    ]
    assert "improper command pipelining" not in postfix.log()
