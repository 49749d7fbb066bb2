"""Per-destination shaping (delivery/shaping.py, docs/deliverability.md): destinations rolled
up by MX host pattern, their connection, per-connection and rate limits, and pauses.

Direct delivery routed by the real local DNS server (Knot, tests/dns_server.py): each
destination is a small aiosmtpd server on its own loopback address, all on one port (the
relay's ``delivery.mxPort``). They count what a user of shaping relies on: transactions in
progress at once (across servers of one destination), messages per connection, and the
connections a refusing server gets. The rate and pause tests move an injected clock, not
wall time.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from relay.relaykit import DnsServer, Recorder, RelayEnv, RelayThread, free_port, message, wait_for

REFUSAL = "421 4.7.0 Too many connections from your IP, try again later"


class Activity:
    """Transactions in progress at once, across every server that shares it: from MAIL to
    the end of DATA (counted down before the reply goes out, so the relay cannot have begun
    the next one yet)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.active = 0
        self.most = 0

    def enter(self) -> None:
        with self.lock:
            self.active += 1
            self.most = max(self.most, self.active)

    def leave(self) -> None:
        with self.lock:
            self.active -= 1


class _Handler:
    def __init__(self, server: MailServer) -> None:
        self._server = server

    async def handle_MAIL(  # noqa: N802 (aiosmtpd hook name)
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: Any
    ) -> str:
        self._server.activity.enter()
        envelope.mail_from = address
        return "250 OK"

    async def handle_DATA(  # noqa: N802 (aiosmtpd hook name)
        self, server: SMTP, session: Session, envelope: Envelope
    ) -> str:
        try:
            await asyncio.sleep(self._server.data_delay)
            if not self._server.release.is_set():  # held until the test lets it go
                await asyncio.to_thread(self._server.release.wait)
            with self._server.lock:
                connection = getattr(server, "connection_number", -1)
                self._server.messages.append((connection, list(envelope.rcpt_tos)))
        finally:
            self._server.activity.leave()
        return "250 2.0.0 OK queued"


class _SMTP(SMTP):
    def __init__(self, owner: MailServer, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._owner = owner
        self._refused = False
        self.connection_number = -1

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        owner = self._owner
        with owner.lock:
            self.connection_number = owner.connections
            owner.connections += 1
            refusing = owner.refusing
            if refusing:
                owner.refused.append(time.monotonic())
        if owner.tarpitting:  # accepts and never says a word (the greeting never comes)
            self._refused = True
            with owner.lock:
                owner.held.append(transport)
            return
        if refusing:  # a greeting of 421 (RFC 5321 3.1), then the connection is closed
            self._refused = True
            assert isinstance(transport, asyncio.WriteTransport)
            transport.write(f"{REFUSAL}\r\n".encode())
            transport.close()
            return
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if not self._refused:
            super().connection_lost(error)


class _Controller(Controller):
    def __init__(self, owner: MailServer, **kwargs: Any) -> None:
        super().__init__(_Handler(owner), **kwargs)
        self._owner = owner

    def factory(self) -> SMTP:
        return _SMTP(self._owner, self.handler, **self.SMTP_kwargs)


class MailServer:
    """A destination's SMTP server on ``host:port``; ``refusing`` answers 421 and closes."""

    def __init__(
        self, host: str, port: int, *, activity: Activity | None = None, data_delay: float = 0.0
    ) -> None:
        self.lock = threading.Lock()
        self.activity = activity or Activity()
        self.data_delay = data_delay
        self.release = threading.Event()  # cleared: transactions wait at DATA until set
        self.release.set()
        self.refusing = False
        self.tarpitting = False  # accepts, then silence
        self.held: list[asyncio.BaseTransport] = []  # the tarpitted connections
        self.connections = 0
        self.refused: list[float] = []
        self.messages: list[tuple[int, list[str]]] = []  # (connection number, recipients)
        self._controller = _Controller(
            self, hostname=host, port=port, server_hostname=f"mx.{host}", ready_timeout=10.0
        )
        self._controller.start()
        with self.lock:  # start() connected once to check
            self.connections = 0

    def recipients(self) -> list[str]:
        with self.lock:
            return sorted(r for _, rcpts in self.messages for r in rcpts)

    def per_connection(self) -> dict[int, int]:
        with self.lock:
            counts: dict[int, int] = {}
            for connection, _ in self.messages:
                counts[connection] = counts.get(connection, 0) + 1
            return counts

    def stop(self) -> None:
        self.release.set()
        with self.lock:
            held, self.held = self.held, []
        for transport in held:
            self._controller.loop.call_soon_threadsafe(transport.close)
        self._controller.stop()


class FakeClock:
    """The shaper's clock (delivery/shaping.py ``Clock``): moves only when the test says."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._now = 1000.0
        self._order = itertools.count()
        self._sleepers: list[
            tuple[float, int, asyncio.AbstractEventLoop, asyncio.Future[None]]
        ] = []

    def now(self) -> float:
        with self._lock:
            return self._now

    async def sleep(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        with self._lock:
            heapq.heappush(self._sleepers, (self._now + seconds, next(self._order), loop, future))
        await future

    def sleeping(self) -> int:
        """Sleepers not yet woken: messages waiting for a token."""
        with self._lock:
            return len(self._sleepers)

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += seconds
            due = []
            while self._sleepers and self._sleepers[0][0] <= self._now:
                due.append(heapq.heappop(self._sleepers))
        for _, _, loop, future in due:
            loop.call_soon_threadsafe(_wake, future)


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


PORT = free_port("127.0.0.2")
TAR_DOMAINS = 16  # twice the test relay's 8 workers


@pytest.fixture
def servers() -> Iterator[Callable[..., MailServer]]:
    made: list[MailServer] = []

    def make(host: str, **kwargs: Any) -> MailServer:
        server = MailServer(host, PORT, **kwargs)
        made.append(server)
        return server

    yield make
    for server in made:
        server.stop()


@pytest.fixture
def dns() -> Iterator[DnsServer]:
    server = DnsServer(
        {
            # Two domains whose MX hosts match one pattern: one destination.
            "alpha.test": {"MX": ["10 mx1.rollup.test."]},
            "beta.test": {"MX": ["10 mx2.rollup.test."]},
            "gamma.test": {"MX": ["10 mx2.rollup.test."]},
            "mx1.rollup.test": {"A": ["127.0.0.2"]},
            "mx2.rollup.test": {"A": ["127.0.0.3"]},
            # A destination that refuses, and one that works.
            "down.test": {"MX": ["10 mx.down.test."]},
            "mx.down.test": {"A": ["127.0.0.4"]},
            "up.test": {"MX": ["10 mx.up.test."]},
            "mx.up.test": {"A": ["127.0.0.5"]},
            # Many domains with one MX host that no pattern names: one destination.
            **{f"tar{i}.test": {"MX": ["10 mx.tar.test."]} for i in range(TAR_DOMAINS)},
            "mx.tar.test": {"A": ["127.0.0.7"]},
            # A destination whose server is not up yet (its connections are refused).
            "late.test": {"MX": ["10 mx.late.test."]},
            "mx.late.test": {"A": ["127.0.0.6"]},
        }
    )
    yield server
    server.stop()


def _start(
    env: RelayEnv,
    dns: DnsServer,
    shaping: dict[str, Any],
    *,
    dkim: dict[str, Any] | None = None,
    **kwargs: Any,
) -> RelayThread:
    delivery = {"mode": "Direct", "resolver": [dns.address], "mxPort": PORT, "smarthost": None}
    relay: dict[str, Any] = {"delivery": delivery, "shaping": shaping}
    if dkim is not None:
        relay["dkim"] = dkim
    overrides = {
        "relay": relay,
        "shutdownGrace": 1.0,
        "statsInterval": 0.2,
        "statsFile": str(env.directory / "stats.json"),
    }
    return env.start(env.settings(overrides=overrides), **kwargs)


def _submit(env: RelayEnv, relay: RelayThread, domain: str, count: int, first: int = 0) -> None:
    with env.client(relay) as smtp:
        for seq in range(first, first + count):
            smtp.sendmail("app@example.com", [f"user{seq}@{domain}"], message(seq))


def _expected(domain: str, count: int, first: int = 0) -> list[str]:
    return sorted(f"user{seq}@{domain}" for seq in range(first, first + count))


ROLLUP = {"name": "rollup", "mx": ["*.rollup.test"]}


def _deliveries_reach(relay: RelayThread, destination: str, count: int) -> None:
    """The destination's deliveries metric reaches ``count`` and stays there: the relay
    counts one when the reply after the dot reaches it, just after the server has the
    message, so it is polled (the last one can lag the server's count)."""
    name = "txmail_relay_destination_deliveries_total"
    labels = {"destination": destination}
    wait_for(
        lambda: relay.metric(name, labels) >= count, what=f"{count} deliveries to {destination}"
    )
    assert relay.metric(name, labels) == pytest.approx(count)


def test_domains_rolled_up_by_mx_share_one_connection_limit(
    env: RelayEnv, dns: DnsServer, servers: Callable[..., MailServer]
) -> None:
    """alpha.test and beta.test have different MX hosts matching *.rollup.test: one
    destination, so their transactions together never exceed its 2 connections (each domain
    alone would get 2 of the test relay's 8 workers: 4 without the rollup)."""
    activity = Activity()
    one = servers("127.0.0.2", activity=activity, data_delay=0.2)
    two = servers("127.0.0.3", activity=activity, data_delay=0.2)
    relay = _start(env, dns, {"sites": [{**ROLLUP, "connections": 2}]})
    _submit(env, relay, "alpha.test", 8)
    _submit(env, relay, "beta.test", 8, first=8)
    wait_for(
        lambda: (
            one.recipients() == _expected("alpha.test", 8)
            and two.recipients() == _expected("beta.test", 8, first=8)
        ),
        timeout=20,
        what="every message at its destination's servers",
    )
    assert activity.most == 2
    _deliveries_reach(relay, "rollup", 16)
    opened = relay.metric("txmail_relay_destination_connections_total", {"destination": "rollup"})
    assert 2 <= opened <= 16


class _Part(Activity):
    """One server's transactions at once, counted in its destination's ``whole`` too."""

    def __init__(self, whole: Activity) -> None:
        super().__init__()
        self.whole = whole

    def enter(self) -> None:
        super().enter()
        self.whole.enter()

    def leave(self) -> None:
        super().leave()
        self.whole.leave()


def _dkim_block(directory: Path) -> dict[str, Any]:
    """A DKIM key for example.com (the test messages' From domain)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    keys_dir = directory / "dkim"
    keys_dir.mkdir(parents=True)
    (keys_dir / "example.com.s1.key").write_bytes(pem)
    key_entry = {"selector": "s1", "algorithm": "rsa-sha256", "keyFile": "example.com.s1.key"}
    return {"keysDir": str(keys_dir), "domains": [{"domain": "example.com", "keys": [key_entry]}]}


def test_mail_sent_back_busy_keeps_full_concurrency_and_is_signed_only_when_sent(
    env: RelayEnv,
    dns: DnsServer,
    servers: Callable[..., MailServer],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """rollup has 2 connections. A message to beta.test and one to gamma.test, each scheduled
    under its own domain before a lookup told its destination, take both; alpha.test's 2
    messages (known to be rollup) are then sent back busy, unattempted. That is not a failure:
    once the others are through, alpha's go 2 at once, not one at a time as to a failing
    destination. And mail is DKIM-signed only when a transaction carries it: one signature
    per delivered message, none for an attempt sent back."""
    caplog.set_level(logging.DEBUG, logger="txmail_relay.delivery.queue")
    rollup = Activity()
    alpha, others = _Part(rollup), _Part(rollup)
    one = servers("127.0.0.2", activity=alpha)
    two = servers("127.0.0.3", activity=others)
    relay = _start(
        env, dns, {"sites": [{**ROLLUP, "connections": 2}]}, dkim=_dkim_block(env.directory)
    )
    _submit(env, relay, "alpha.test", 1)  # from now on alpha.test is known to be rollup
    wait_for(lambda: one.recipients() == _expected("alpha.test", 1), what="alpha.test's first")
    one.data_delay = 1.0  # alpha.test's next ones overlap if they go together
    two.release.clear()
    _submit(env, relay, "beta.test", 1, first=10)
    wait_for(lambda: others.active == 1, what="beta.test's transaction holding rollup")
    _submit(env, relay, "gamma.test", 1, first=20)
    wait_for(lambda: others.active == 2, what="gamma.test's too")
    _submit(env, relay, "alpha.test", 2, first=1)
    wait_for(
        lambda: caplog.text.count("destination rollup busy") >= 2,
        what="alpha.test's 2 sent back busy",
    )
    two.release.set()
    wait_for(
        lambda: (
            one.recipients() == _expected("alpha.test", 3)
            and two.recipients() == ["user10@beta.test", "user20@gamma.test"]
        ),
        timeout=20,
        what="every message at its destination's servers",
    )
    assert rollup.most == 2
    assert alpha.most == 2  # both at once after being sent back: the full concurrency
    signed = {"domain": "example.com", "result": "signed"}
    assert relay.metric("txmail_relay_dkim_signatures_total", signed) == 5  # none sent back


def test_messages_per_connection(
    env: RelayEnv, dns: DnsServer, servers: Callable[..., MailServer]
) -> None:
    server = servers("127.0.0.2")
    relay = _start(env, dns, {"sites": [{**ROLLUP, "connections": 1, "messagesPerConnection": 3}]})
    _submit(env, relay, "alpha.test", 9)
    wait_for(lambda: server.recipients() == _expected("alpha.test", 9), what="9 messages")
    counts = server.per_connection()
    assert max(counts.values()) <= 3
    assert sum(counts.values()) == 9
    assert len(counts) >= 3


def test_a_rate_limit_spreads_delivery_on_the_clock(
    env: RelayEnv, dns: DnsServer, servers: Callable[..., MailServer]
) -> None:
    """'2/min' with a burst of 2: two messages at once, then one per 30 s of the (injected)
    clock, however long the test waits in wall time."""
    server = servers("127.0.0.2")
    clock = FakeClock()
    relay = _start(
        env, dns, {"sites": [{**ROLLUP, "rate": "2/min", "burst": 2}]}, shaping_clock=clock
    )
    _submit(env, relay, "alpha.test", 6)

    def delivered_then_waiting(count: int) -> None:
        wait_for(lambda: len(server.recipients()) >= count, what=f"{count} delivered")
        # The next message waits for a token on the clock...
        wait_for(clock.sleeping, what="a message waiting for the rate")
        assert len(server.recipients()) == count  # ...and nothing more went

    delivered_then_waiting(2)
    clock.advance(30)  # one token
    delivered_then_waiting(3)
    clock.advance(15)  # half a token: the waiting message sleeps on
    assert len(server.recipients()) == 3
    clock.advance(15 + 30)  # the rest of that token and one more
    delivered_then_waiting(5)
    clock.advance(30)
    wait_for(lambda: server.recipients() == _expected("alpha.test", 6), what="the last one")
    waits = relay.metric("txmail_relay_destination_throttle_waits_total", {"destination": "rollup"})
    assert waits >= 4


def _stats(env: RelayEnv) -> dict[str, Any]:
    path = env.directory / "stats.json"
    return json.loads(path.read_text()) if path.exists() else {}


def test_a_destination_answering_421_is_paused_not_hammered_and_recovers(
    env: RelayEnv, dns: DnsServer, servers: Callable[..., MailServer]
) -> None:
    """Pauses run on the injected shaping clock: each one ends only when the test moves it,
    so the connections a pause lets through are counted, not timed."""
    down = servers("127.0.0.4")
    up = servers("127.0.0.5")
    down.refusing = True
    recorder = Recorder()
    clock = FakeClock()
    relay = _start(
        env,
        dns,
        {
            "sites": [{"name": "down", "mx": ["*.down.test"]}],
            "pause": {"initialSeconds": 1, "maxSeconds": 4},
        },
        listeners=[recorder],
        shaping_clock=clock,
    )
    _submit(env, relay, "down.test", 10)
    _submit(env, relay, "up.test", 10, first=10)
    # The other destination keeps flowing while this one is paused.
    wait_for(lambda: up.recipients() == _expected("up.test", 10, first=10), what="up.test")
    paused = ("txmail_relay_destinations_paused", None)
    wait_for(lambda: relay.metric(paused[0]) == 1, what="the paused-destinations gauge")
    shown = wait_for(lambda: _stats(env).get("destinations"), what="the stats' destinations")
    assert shown[0]["name"] == "down"
    assert shown[0]["reason"] == REFUSAL
    assert "until" in shown[0]

    shaper = relay.relay.shaper if relay.relay is not None else None
    assert shaper is not None

    def pause_left() -> float:
        def left() -> float:
            site = shaper.known("down.test")
            assert site is not None
            return shaper.paused_for(site)

        return float(relay.call(left))

    def pause_is(seconds: float) -> Callable[[], bool]:
        return lambda: pause_left() == seconds

    def deferrals() -> int:
        return sum(recorder.outcomes(f"user{seq}@down.test").count("deferred") for seq in range(10))

    # Not hammered: after the attempts in flight when the first 421 came (at most the
    # destination's share, 2), one probe per pause, each pause twice the last (1, 2, 4, 4 s
    # of the shaping clock, which stands still between the steps).
    assert pause_left() == 1
    for probe, (length, following) in enumerate([(1, 2), (2, 4), (4, 4)], start=1):
        clock.advance(length)  # the pause is over: one probe, refused, the next pause
        wait_for(pause_is(following), timeout=15, what=f"a {following} s pause")
        assert probe + 1 <= len(down.refused) <= probe + 2

    # Each refused connection is one counted attempt for one message; the mail that waited
    # for the pause was not attempted (no deferral counted for it).
    wait_for(lambda: deferrals() == len(down.refused), what="one deferral per refusal")
    assert all("delivered" not in recorder.outcomes(f"user{seq}@down.test") for seq in range(10))

    # It recovers: its mail is delivered, nothing lost, and the pause is gone.
    down.refusing = False
    clock.advance(4)
    wait_for(lambda: down.recipients() == _expected("down.test", 10), timeout=20, what="down.test")
    wait_for(lambda: relay.metric(paused[0]) == 0, what="no paused destination")
    wait_for(lambda: _stats(env).get("destinations") == [], what="stats: none paused")
    queue = relay.relay.queue if relay.relay is not None else None
    assert queue is not None
    wait_for(lambda: relay.call(queue.depth) == 0, what="an empty queue")


def test_a_probe_caught_in_a_tarpit_holds_one_worker_not_all(
    env: RelayEnv, dns: DnsServer, servers: Callable[..., MailServer]
) -> None:
    """16 domains share one MX host no pattern names (one destination, named by it). It
    answers 421, so it is paused; when the pause ends its probe meets a tarpit (no greeting
    for the relay's 30 s connect timeout). Its other domains' mail must wait in the queue,
    not in workers waiting for the probe's one connection: mail to another destination
    still goes at once."""
    tar = servers("127.0.0.7")
    up = servers("127.0.0.5")
    tar.refusing = True
    relay = _start(env, dns, {"pause": {"initialSeconds": 2, "maxSeconds": 2}})
    with env.client(relay) as smtp:
        for seq in range(TAR_DOMAINS):
            smtp.sendmail("app@example.com", [f"user{seq}@tar{seq}.test"], message(seq))
    wait_for(lambda: tar.refused, what="a 421 from the destination")
    tar.refusing, tar.tarpitting = False, True  # before the pause (2 s) ends
    wait_for(lambda: tar.held, timeout=15, what="the probe in the tarpit")
    _submit(env, relay, "up.test", 10, first=100)
    wait_for(
        lambda: up.recipients() == _expected("up.test", 10, first=100),
        timeout=8,
        what="mail to another destination while the probe hangs",
    )
    assert len(tar.held) == 1  # one probe, not one per domain
    assert tar.recipients() == []


def test_refused_connections_are_retried_on_schedule_not_paused(
    env: RelayEnv, dns: DnsServer, servers: Callable[..., MailServer]
) -> None:
    """Nothing listens at late.test's MX yet: its connections are refused, which is no
    answer, so shaping does not pause it (afterFailures 2, a 600 s pause here); the queue
    retries it on its schedule (the test relay's backoff, 0.2 s to 1 s), and once its server
    is up the mail is delivered at the next retries."""
    recorder = Recorder()
    relay = _start(
        env,
        dns,
        {
            "sites": [{"name": "late", "mx": ["*.late.test"]}],
            "pause": {"afterFailures": 2, "initialSeconds": 600},
        },
        listeners=[recorder],
    )
    _submit(env, relay, "late.test", 6)

    def deferrals() -> int:
        return sum(recorder.outcomes(f"user{seq}@late.test").count("deferred") for seq in range(6))

    wait_for(lambda: deferrals() >= 8, timeout=20, what="refused attempts, retried")
    assert relay.metric("txmail_relay_destinations_paused") == 0
    assert not _stats(env).get("destinations")
    server = servers("127.0.0.6")  # the server comes up
    wait_for(lambda: server.recipients() == _expected("late.test", 6), timeout=15, what="late.test")
    _deliveries_reach(relay, "late", 6)


def test_shaping_can_be_turned_off(
    env: RelayEnv, dns: DnsServer, servers: Callable[..., MailServer]
) -> None:
    """enabled: false: domains are scheduled as before (each its share), no pause."""
    activity = Activity()
    one = servers("127.0.0.2", activity=activity, data_delay=0.2)
    two = servers("127.0.0.3", activity=activity, data_delay=0.2)
    relay = _start(env, dns, {"enabled": False, "sites": [{**ROLLUP, "connections": 1}]})
    _submit(env, relay, "alpha.test", 6)
    _submit(env, relay, "beta.test", 6, first=6)
    wait_for(lambda: len(one.recipients()) + len(two.recipients()) == 12, timeout=20, what="all")
    assert activity.most > 1
    assert (
        relay.metric("txmail_relay_destination_connections_total", {"destination": "rollup"}) == 0
    )


def test_the_smarthost_is_one_destination_with_limits(
    env: RelayEnv, servers: Callable[..., MailServer]
) -> None:
    """Smarthost mode: every domain goes to the smarthost, shaped as 'smarthost' (without
    shaping it gets all 8 workers of the test relay)."""
    smarthost = servers("127.0.0.2", data_delay=0.1)
    delivery = {
        "mode": "Smarthost",
        "smarthost": {"host": "127.0.0.2", "port": PORT, "tls": "None"},
    }
    shaping = {"sites": [{"name": "smarthost", "connections": 1, "messagesPerConnection": 2}]}
    overrides = {"relay": {"delivery": delivery, "shaping": shaping}, "shutdownGrace": 1.0}
    relay = env.start(env.settings(overrides=overrides))
    _submit(env, relay, "alpha.test", 4)
    _submit(env, relay, "up.test", 4, first=4)
    wait_for(lambda: len(smarthost.recipients()) == 8, what="8 messages at the smarthost")
    assert smarthost.activity.most == 1
    assert max(smarthost.per_connection().values()) <= 2
    _deliveries_reach(relay, "smarthost", 8)
