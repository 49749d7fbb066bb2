"""The webhook Dispatcher and WebhookManager, round by round, on an injected clock and rng.

Real parts only: the relay's records (SQLite in a temporary directory, written through the
records' own connection), an aiohttp receiver on 127.0.0.1 and aiohttp's client. The
dispatcher's :meth:`~txmail_relay.webhooks.dispatcher.Dispatcher.step` is driven by hand: it
returns how long it would wait, so no test sleeps.
"""

from __future__ import annotations

import asyncio
import base64
import random
import secrets
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import aiosqlite
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from txmail_relay.config.live import DynamicConfig, LiveConfig
from txmail_relay.contract import (
    CredentialEntry,
    PasswordDigest,
    RelayConfig,
    WebhookEndpoint,
    WebhookSettings,
    password_digest,
)
from txmail_relay.metrics import RelayMetrics
from txmail_relay.records.events import append
from txmail_relay.records.model import EventType, Recipient
from txmail_relay.records.records import Records
from txmail_relay.webhooks.dispatcher import HORIZON_SAVE_EVERY, Dispatcher, Subscription
from txmail_relay.webhooks.manager import WebhookManager

USERNAME = "txm-unit"
SUB_ID = "shop/orders/hook"


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Receiver:
    """An HTTP receiver on 127.0.0.1 answering ``status``; ``bodies`` of what it got."""

    status: int = 200
    reply: str = "ok"
    bodies: list[bytes] = field(default_factory=list)
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.bodies.append(await request.read())
        return web.Response(status=self.status, text=self.reply)

    def seqs(self) -> list[int]:
        import json  # noqa: PLC0415

        return [e["seq"] for b in self.bodies for e in json.loads(b)["data"]["events"]]


@dataclass
class Env:
    records: Records
    receiver: Receiver
    session: aiohttp.ClientSession
    clock: Clock
    statements: list[str]

    def endpoint(self, types: list[str] | None = None) -> WebhookEndpoint:
        return WebhookEndpoint.model_validate(
            {
                "name": "hook",
                "url": self.receiver.url,
                "eventTypes": types or [],
                "secret": "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode(),
            }
        )

    def dispatcher(
        self,
        types: list[str] | None = None,
        *,
        rng: random.Random | None = None,
        **settings: Any,
    ) -> Dispatcher:
        endpoint = self.endpoint(types)
        return Dispatcher(
            Subscription(SUB_ID, USERNAME, endpoint),
            self.records,
            self.session,
            WebhookSettings.model_validate(settings),
            RelayMetrics(CollectorRegistry()),
            clock=self.clock,
            rng=rng or random.Random(1),
        )

    async def add(self, kind: EventType, count: int = 1, username: str = USERNAME) -> None:
        """``count`` events of ``kind`` for ``username``, through the records' connection."""
        found = Recipient("spool1", "user@dest.test", username, 1, "shop", "orders")
        at = self.clock()

        async def write(db: aiosqlite.Connection) -> None:
            for _ in range(count):
                await append(db, kind, found, at)

        await self.records._db.write(write)  # the events' own writer

    def event_queries(self) -> list[str]:
        return [s for s in self.statements if "FROM events" in s]


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    clock = Clock()
    records = Records(tmp_path, clock=clock)
    await records.open()
    statements: list[str] = []
    connection = records._db._connection()  # tracing the real connection
    await connection.set_trace_callback(statements.append)
    receiver = Receiver()
    app = web.Application()
    app.router.add_post("/hook", receiver.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    receiver.url = f"http://127.0.0.1:{sock.getsockname()[1]}/hook"
    await web.SockSite(runner, sock).start()
    session = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar(), trust_env=False)
    try:
        await records.webhooks.ensure(SUB_ID, USERNAME, "hook", resume_within=60.0)
        yield Env(records, receiver, session, clock, statements)
    finally:
        await session.close()
        await runner.cleanup()
        await records.close()


async def cursor(env: Env) -> int:
    return (await env.records.webhooks.get(SUB_ID)).cursor


# -- a filtered subscription among many events it does not want ------------------------------


async def test_a_filtered_subscription_moves_past_what_it_does_not_want(env: Env) -> None:
    dispatcher = env.dispatcher(["BOUNCE", "SPAMREPORT"])
    await env.add(EventType.SENT, 2000)
    await env.add(EventType.DELIVERED, 2000)
    assert await dispatcher.step() > 0, "nothing to send: it waits"
    newest = await env.records.events.last_seq()
    assert newest == 4000
    assert await cursor(env) == newest, "the scan's horizon is the cursor now"
    assert await env.records.webhooks.backlog(USERNAME, dispatcher.horizon, ["BOUNCE"]) == 0

    # More of what it does not want: each scan starts where the last one stopped.
    env.statements.clear()
    for _ in range(5):
        await env.add(EventType.DELIVERED)
        assert await dispatcher.step() > 0
    scans = env.event_queries()
    assert len(scans) == 5
    for n, sql in enumerate(scans):
        assert f"seq > {newest + n} " in sql, sql
    assert dispatcher.horizon == newest + 5
    # ... and the horizon is written at most every HORIZON_SAVE_EVERY seconds, not per scan.
    assert await cursor(env) == newest
    env.clock.now += HORIZON_SAVE_EVERY
    await env.add(EventType.DELIVERED)
    await dispatcher.step()
    assert await cursor(env) == newest + 6

    # A match is sent, and its batch covers the non-matching events after it.
    await env.add(EventType.BOUNCE)
    await env.add(EventType.DELIVERED, 3)
    assert await dispatcher.step() == 0
    assert env.receiver.seqs() == [newest + 7]
    assert await cursor(env) == newest + 10
    assert env.receiver.bodies and env.receiver.status == 200


async def test_a_scan_looks_at_a_bounded_window(env: Env) -> None:
    from txmail_relay.records import webhooks  # noqa: PLC0415

    dispatcher = env.dispatcher(["BOUNCE"])
    await env.add(EventType.DELIVERED, 30)
    await env.add(EventType.BOUNCE)
    found = await env.records.webhooks.scan(USERNAME, 0, [EventType.BOUNCE], limit=10, window=12)
    assert (found.events, found.upto, found.newest) == ([], 12, 31)
    assert webhooks.SCAN_WINDOW <= 100_000
    assert await dispatcher.step() == 0, "more to look at: at once"
    while not env.receiver.bodies:
        await dispatcher.step()
    assert env.receiver.seqs() == [31]


async def test_a_new_filter_looks_again_from_the_cursor(env: Env) -> None:
    dispatcher = env.dispatcher(["BOUNCE"])
    await env.add(EventType.DELIVERED, 3)
    await dispatcher.step()
    assert await cursor(env) == 3, "the first horizon is written at once"
    await env.add(EventType.DELIVERED, 2)
    await dispatcher.step()
    assert (dispatcher.horizon, await cursor(env)) == (5, 3), "the next one a minute later"
    # Widened to DELIVERED: what the horizon skipped but the cursor did not is sent.
    dispatcher.update(env.dispatcher(["BOUNCE", "DELIVERED"]).subscription)
    assert dispatcher.horizon == 0
    assert await dispatcher.step() == 0
    assert env.receiver.seqs() == [4, 5]


# -- a batch retried after maxBatch changed ---------------------------------------------------


async def test_a_retried_batch_is_the_persisted_range_whatever_maxbatch_is_now(env: Env) -> None:
    env.receiver.status = 500
    await env.add(EventType.SENT, 5)
    await env.add(EventType.BOUNCE)
    await env.add(EventType.SENT, 2)
    first = env.dispatcher(["SENT"], maxBatch=5)
    assert await first.step() == 0
    batch = (await env.records.webhooks.get(SUB_ID)).batch
    assert batch is not None and (batch.first, batch.last, batch.size) == (1, 5, 5)
    # The relay restarts with a smaller maxBatch; the receiver is back.
    env.receiver.status = 200
    env.clock.now = batch.next_attempt + 1 if batch.next_attempt else env.clock.now + 3600
    second = env.dispatcher(["SENT"], maxBatch=2)
    assert await second.step() == 0
    failed, retried = env.receiver.bodies
    assert retried == failed, "the same events, the same body"
    assert env.receiver.seqs()[5:] == [1, 2, 3, 4, 5]
    assert await cursor(env) == 5
    # ... and what follows comes next, in batches of the new size.
    while await second.step() == 0:
        pass
    assert env.receiver.seqs()[10:] == [7, 8]
    assert await cursor(env) == 8


# -- the manager and a records error ------------------------------------------------------------


class CountingConfig(LiveConfig):
    """The live configuration, counting how often it is looked at (once per manager tick)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    @property
    def current(self) -> DynamicConfig | None:
        self.reads += 1
        return super().current


async def until(check: Callable[[], bool], what: str) -> None:
    """Polls ``check`` for up to 10 s."""
    deadline = asyncio.get_running_loop().time() + 10.0
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def test_the_manager_recovers_from_a_records_error_and_restarts_a_dispatcher(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="txmail_relay.webhooks")
    entry = CredentialEntry(
        username=USERNAME,
        namespace="shop",
        token="orders",
        digests=[PasswordDigest(sha256=password_digest("pw"), generation=1)],
        allowed_from_domains=["example.com"],
        email_campaign_id=1,
        webhooks=[env.endpoint()],
    )
    config = CountingConfig()
    relay = RelayConfig(
        dedicated_ip="203.0.113.7",
        address="203.0.113.7",
        hostname="mx.example.com",
        domains=["example.com"],
    )
    config.publish(DynamicConfig(relay=relay, credentials={USERNAME: entry}))
    manager = WebhookManager(
        env.records,
        config,
        WebhookSettings(poll_interval=0.02),
        RelayMetrics(CollectorRegistry()),
        clock=env.clock,
    )
    await manager.start()
    await env.records.close()  # the records fail under the manager's first sync
    task = asyncio.create_task(manager.run())
    try:
        reads = config.reads
        await until(lambda: config.reads >= reads + 6, "a few failed ticks")
        failed = [r for r in caplog.records if "looking for new events failed" in r.message]
        assert len(failed) == 1, "logged once, not at every poll"
        assert not task.done(), "the manager keeps trying"
        await env.records.open()
        await env.add(EventType.SENT)
        await until(lambda: len(env.receiver.bodies) == 1, "the event after the records came back")
        assert "looking for new events works again" in caplog.text
        # A dispatcher whose task ended is started again.
        running = manager._dispatchers[SUB_ID][1]
        running.cancel()
        await asyncio.wait({running})
        await env.add(EventType.DELIVERED)
        await until(lambda: len(env.receiver.bodies) == 2, "the event after the restart")
        assert "webhook dispatcher ended: started again" in caplog.text
        assert env.receiver.seqs() == [1, 2]
    finally:
        task.cancel()
        await asyncio.wait({task})


# -- backoff and jitter -------------------------------------------------------------------------


class Drawn(random.Random):
    """Answers each ``uniform(a, b)`` with the point ``pick`` of the way from a to b, and
    keeps the ranges asked for."""

    def __init__(self, pick: float) -> None:
        super().__init__(0)
        self.pick = pick
        self.ranges: list[tuple[float, float]] = []

    def uniform(self, a: float, b: float) -> float:
        self.ranges.append((a, b))
        return a + (b - a) * self.pick


async def next_attempt(env: Env) -> float:
    batch = (await env.records.webhooks.get(SUB_ID)).batch
    assert batch is not None
    return batch.next_attempt


@pytest.mark.parametrize("pick", [1.0, 0.5])
async def test_retries_back_off_exponentially_with_full_jitter(env: Env, pick: float) -> None:
    env.receiver.status = 503
    rng = Drawn(pick)
    dispatcher = env.dispatcher(rng=rng, minBackoff=10, maxBackoff=100)
    await env.add(EventType.SENT)
    caps = [10.0, 20.0, 40.0, 80.0, 100.0, 100.0]
    for n, cap in enumerate(caps, start=1):
        assert await dispatcher.step() == 0
        assert len(env.receiver.bodies) == n
        assert rng.ranges[-1] == (0.0, cap), "full jitter over [0, min(max, min * 2^n)]"
        due = await next_attempt(env)
        assert due - env.clock() == pytest.approx(cap * pick), "the drawn delay is the wait"
        # Before it is due a round waits (what is left) and sends nothing.
        env.clock.now += (due - env.clock()) / 2
        wait = await dispatcher.step()
        assert wait == pytest.approx(due - env.clock())
        assert wait > 0
        assert len(env.receiver.bodies) == n, "no retry before its time"
        env.clock.now = due
    env.receiver.status = 200
    assert await dispatcher.step() == 0
    assert (await env.records.webhooks.get(SUB_ID)).batch is None


async def test_jittered_delays_stay_within_their_bounds(env: Env) -> None:
    env.receiver.status = 500
    dispatcher = env.dispatcher(rng=random.Random(7), minBackoff=1, maxBackoff=8)
    await env.add(EventType.SENT)
    delays: list[float] = []
    for attempts in range(12):
        await dispatcher.step()
        delay = await next_attempt(env) - env.clock()
        assert 0 <= delay <= min(8.0, 2.0**attempts)
        delays.append(delay)
        env.clock.now += delay
    assert min(delays[3:]) > 0 and len(set(delays)) == len(delays), "random, not zero"


async def test_a_long_retry_period_with_a_small_max_backoff_does_not_overflow(env: Env) -> None:
    env.receiver.status = 500
    rng = Drawn(1.0)
    dispatcher = env.dispatcher(rng=rng, minBackoff=0.05, maxBackoff=0.2, retryFor=1e9)
    await env.add(EventType.SENT)
    await dispatcher.step()

    async def many(db: aiosqlite.Connection) -> None:
        await db.execute("UPDATE webhooks SET attempts = 1100 WHERE id = ?", (SUB_ID,))

    await env.records._db.write(many)  # 1100 failed attempts, as after 2 days of 0.2 s
    dispatcher.state = None  # read again
    env.clock.now = await next_attempt(env)
    assert await dispatcher.step() == 0
    assert rng.ranges[-1] == (0.0, 0.2)
    assert await next_attempt(env) - env.clock() == pytest.approx(0.2)
