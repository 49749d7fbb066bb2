"""Webhooks: a token's events POSTed to a real HTTP receiver, signed as Standard Webhooks do.

The receiver is an aiohttp server on 127.0.0.1 in a thread of its own; it verifies every
request with ``standardwebhooks`` (``Webhook(secret).verify``) and answers what the test says
(2xx, 500, or nothing: its port closed). The relay sends mail to smtp-sink, which makes the
events (SENT when spooled, DELIVERED when smtp-sink took it).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import secrets
import signal
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from relay.relaykit import (
    RelayEnv,
    RelayThread,
    credential,
    free_port,
    kill_relay_process,
    message,
    start_relay_process,
    submission_only,
    wait_for,
    write_credentials,
)
from txmail_relay.contract import (
    CredentialEntry,
    WebhookEndpoint,
    WebhookEventType,
    webhook_key_bytes,
)
from txmail_relay.records.model import EventType

FAST_WEBHOOKS: dict[str, Any] = {
    "minBackoff": 0.05,
    "maxBackoff": 0.2,
    "pollInterval": 0.1,
    "timeout": 10.0,
    "failingAfter": 3600.0,
}
FAST: dict[str, Any] = {
    "webhooks": FAST_WEBHOOKS,
    "statsFile": "stats.json",
    "statsInterval": 0.2,
}


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    verified: bool
    answered: int

    @property
    def webhook_id(self) -> str:
        return self.headers["webhook-id"]

    @property
    def doc(self) -> Any:
        return json.loads(self.body)

    @property
    def events(self) -> list[dict[str, Any]]:
        return list(self.doc["data"]["events"])


@dataclass
class Receiver:
    """A webhook receiver; ``status`` is what it answers, ``hold`` (when cleared) keeps a
    request waiting, :meth:`down` closes its port (connection refused) and :meth:`up` opens
    it again."""

    secret: str
    port: int = field(default_factory=free_port)
    status: int = 200
    reply: str = "ok"
    reason: str | None = None  # the status line's reason phrase (aiohttp's default if None)
    location: str | None = None  # a Location header to answer with (redirects)
    requests: list[Received] = field(default_factory=list)
    hold: threading.Event = field(default_factory=threading.Event)
    waiting: int = 0
    _loop: asyncio.AbstractEventLoop | None = None
    _runner: web.AppRunner | None = None
    _thread: threading.Thread | None = None

    def __post_init__(self) -> None:
        self.hold.set()
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name="webhook-receiver", daemon=True)
        self._thread.start()
        ready.wait(5)

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        try:
            Webhook(self.secret).verify(body, headers)
            verified = True
        except WebhookVerificationError:
            verified = False
        status = self.status
        self.waiting += 1
        try:
            await asyncio.get_running_loop().run_in_executor(None, self.hold.wait, 30)
        finally:
            self.waiting -= 1
        self.requests.append(Received(request.path, headers, body, verified, status))
        extra = {"Location": self.location} if self.location else None
        return web.Response(status=status, reason=self.reason, text=self.reply, headers=extra)

    def _run(self, coro: Any) -> Any:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    def up(self) -> Receiver:
        async def start() -> None:
            app = web.Application()
            app.router.add_post("/{tail:.*}", self._handle)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", self.port).start()
            self._runner = runner

        self._run(start())
        return self

    def down(self) -> None:
        async def stop() -> None:
            if self._runner is not None:
                runner, self._runner = self._runner, None
                await runner.cleanup()

        self._run(stop())

    def close(self) -> None:
        self.hold.set()
        self.down()
        assert self._loop is not None and self._thread is not None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def accepted(self, path: str | None = None) -> list[Received]:
        """Requests answered 2xx, in the order they came."""
        return [
            r
            for r in list(self.requests)
            if 200 <= r.answered < 300 and (path is None or r.path == path)
        ]

    def events(self, path: str | None = None) -> list[dict[str, Any]]:
        return [e for r in self.accepted(path) for e in r.events]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    made = Receiver(new_secret()).up()
    yield made
    made.close()


def with_webhooks(entry: CredentialEntry, *endpoints: WebhookEndpoint) -> CredentialEntry:
    return entry.model_copy(update={"webhooks": list(endpoints)})


def endpoint(
    receiver: Receiver, name: str = "hook", *, path: str = "/hook", types: list[str] | None = None
) -> WebhookEndpoint:
    return WebhookEndpoint.model_validate(
        {
            "name": name,
            "url": receiver.url(path),
            "eventTypes": types or [],
            "secret": receiver.secret,
        }
    )


def start(env: RelayEnv, *endpoints: WebhookEndpoint, **relay_kwargs: Any) -> RelayThread:
    entry = with_webhooks(credential(env.username, env.password), *endpoints)
    return env.start(env.settings(credentials=[entry], overrides=FAST), **relay_kwargs)


def send(env: RelayEnv, relay: RelayThread, count: int, first: int = 1) -> None:
    with env.client(relay) as smtp:
        for seq in range(first, first + count):
            smtp.sendmail("app@example.com", [f"user{seq}@dest.test"], message(seq))


def webhook_stats(env: RelayEnv) -> list[dict[str, Any]]:
    path = env.directory / "stats.json"
    if not path.exists():
        return []
    return list(json.loads(path.read_text()).get("webhooks", {}).get(env.username, []))


def stat(env: RelayEnv, key: str, value: Any) -> dict[str, Any] | None:
    """The first webhook's stats once ``key`` has ``value``."""
    found = webhook_stats(env)
    return found[0] if found and found[0].get(key) == value else None


def by_recipient(events: list[dict[str, Any]]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for event in events:
        found.setdefault(event["recipient"], []).append(event["type"])
    return found


def all_delivered(receiver: Receiver, count: int, first: int = 1, path: str | None = None) -> bool:
    seen = by_recipient(receiver.events(path))
    return all(
        "DELIVERED" in seen.get(f"user{seq}@dest.test", []) for seq in range(first, first + count)
    )


def assert_in_order(events: list[dict[str, Any]]) -> None:
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(seqs), "events out of order"
    assert len(set(seqs)) == len(seqs), "an event delivered twice after a 2xx"


def _db_uri(env: RelayEnv) -> str:
    return f"file:{env.directory / 'spool' / 'txmail.db'}?mode=ro"


def db_batches(env: RelayEnv) -> list[tuple[str, str | None, int]]:
    """(subscription id, persisted batch webhook-id, cursor) read from the relay's records."""
    with contextlib.closing(sqlite3.connect(_db_uri(env), uri=True)) as db:
        return [tuple(r) for r in db.execute("SELECT id, batch_id, cursor FROM webhooks")]


def db_events(env: RelayEnv) -> int:
    with contextlib.closing(sqlite3.connect(_db_uri(env), uri=True)) as db:
        return int(db.execute("SELECT count(*) FROM events").fetchone()[0])


# -- the contract ----------------------------------------------------------------------------


def test_the_signing_key_stays_out_of_reprs_dumps_and_errors() -> None:
    secret = new_secret()
    hook = WebhookEndpoint(name="orders", url="https://hooks.example.com/txmail", secret=secret)
    entry = with_webhooks(credential("u1", "pw"), hook)
    for text in (repr(hook), str(hook), repr(entry), str(entry), str(entry.model_dump())):
        assert secret not in text
        assert secret.removeprefix("whsec_") not in text
    # The JSON form is what the operator writes into the credentials Secret: the key is there.
    back = CredentialEntry.model_validate_json(entry.to_json())
    assert back.webhooks[0].secret.get_secret_value() == secret
    assert back.webhooks[0].key() == webhook_key_bytes(secret)
    with pytest.raises(ValueError, match="24 to 64 bytes") as short:
        WebhookEndpoint(name="x", url="https://h.test/", secret="whsec_c2hvcnQ=").key()
    assert "c2hvcnQ" not in str(short.value)
    with pytest.raises(ValueError, match="http"):
        WebhookEndpoint(name="x", url="ftp://h.test/", secret=secret)


def test_the_contract_names_every_event_type() -> None:
    assert [t.value for t in WebhookEventType] == [t.value for t in EventType]


# -- delivery --------------------------------------------------------------------------------


def test_events_arrive_signed_and_in_order(env: RelayEnv, receiver: Receiver) -> None:
    relay = start(env, endpoint(receiver))
    send(env, relay, 5)
    wait_for(lambda: all_delivered(receiver, 5), 20, "DELIVERED events of 5 messages")
    assert all(r.verified for r in receiver.requests), "a request failed verification"
    events = receiver.events()
    assert_in_order(events)
    seen = by_recipient(events)
    for seq in range(1, 6):
        assert seen[f"user{seq}@dest.test"] == ["SENT", "DELIVERED"]
    first = receiver.accepted()[0]
    assert first.webhook_id.startswith("msg_")
    assert first.doc["type"] == "txmail.events"
    assert first.doc["timestamp"].endswith("Z")
    assert first.headers["content-type"] == "application/json"
    event = events[0]
    assert event["id"].startswith("evt_")
    assert event["username"] == env.username
    assert {"createdAt", "created", "recipient", "messageId", "emailId", "type"} <= set(event)
    assert len({r.webhook_id for r in receiver.accepted()}) == len(receiver.accepted())
    wait_for(lambda: stat(env, "backlog", 0), 10, "backlog 0 in the stats")
    assert stat(env, "state", "Healthy")
    wait_for(
        lambda: relay.metric("txmail_relay_webhook_events_total", {"result": "delivered"}) == 10,
        10,
        "10 events counted delivered",
    )


def test_receiver_down_then_back_gets_everything_with_the_persisted_id(
    env: RelayEnv, receiver: Receiver
) -> None:
    receiver.down()
    relay = start(env, endpoint(receiver))
    send(env, relay, 3)
    wait_for(
        lambda: relay.metric("txmail_relay_webhook_requests_total", {"result": "connection"}) >= 3,
        20,
        "failed attempts while the receiver is down",
    )
    ((_, batch_id, _),) = db_batches(env)
    assert batch_id is not None, "the batch and its id are written before the first attempt"
    failing = wait_for(lambda: stat(env, "state", "Failing"), 10, "Failing in the stats")
    assert failing["lastError"] == "cannot connect: connection refused"
    assert failing["failingSince"] is not None
    receiver.up()
    wait_for(lambda: all_delivered(receiver, 3), 20, "the events after the receiver came back")
    assert receiver.accepted()[0].webhook_id == batch_id
    assert_in_order(receiver.events())
    assert sorted(by_recipient(receiver.events())) == [f"user{i}@dest.test" for i in (1, 2, 3)]
    assert all(r.verified for r in receiver.requests)
    healthy = wait_for(lambda: stat(env, "state", "Healthy"), 10, "Healthy again")
    assert healthy["lastSuccessAt"] is not None
    assert healthy["failingSince"] is None


def test_500s_make_it_failing_with_the_last_error_and_it_recovers(
    env: RelayEnv, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    # What an internal service would answer if a token's author pointed the URL at it.
    receiver.status, receiver.reply = 500, "database unavailable: admin:hunter2@10.0.0.5\n"
    receiver.reason = "Internal Server Error redis-7.2 10.0.0.5"
    relay = start(env, endpoint(receiver))
    send(env, relay, 1)
    failing = wait_for(lambda: stat(env, "state", "Failing"), 20, "Failing after 500s")
    # The status code only: nothing the receiver sent reaches the status (nor its Event).
    assert failing["lastError"] == "HTTP 500"
    stats_text = (env.directory / "stats.json").read_text()
    for leak in ("database unavailable", "hunter2", "10.0.0.5", "redis"):
        assert leak not in stats_text
    assert failing["failingSince"] is not None
    failed_ids = {r.webhook_id for r in receiver.requests if r.answered == 500}
    receiver.status = 200
    wait_for(lambda: all_delivered(receiver, 1), 20, "delivery after the receiver recovered")
    healthy = wait_for(lambda: stat(env, "state", "Healthy"), 10, "Healthy after a 2xx")
    assert healthy["lastSuccessAt"] is not None
    # The batch that got 500s was sent again with the same webhook-id and the same body.
    first_ok = receiver.accepted()[0]
    assert first_ok.webhook_id in failed_ids
    assert {r.body for r in receiver.requests if r.webhook_id == first_ok.webhook_id} == {
        first_ok.body
    }
    assert all(r.verified for r in receiver.requests)
    assert relay.metric("txmail_relay_webhook_requests_total", {"result": "5xx"}) >= 3
    # The key is in no log line, no stats and no metric.
    key_b64 = receiver.secret.removeprefix("whsec_")
    metrics = relay.relay.registry if relay.relay is not None else None
    assert metrics is not None
    from prometheus_client import generate_latest  # noqa: PLC0415

    for text in (
        caplog.text,
        (env.directory / "stats.json").read_text(),
        generate_latest(metrics).decode(),
    ):
        assert key_b64 not in text
    assert "webhook failing" in caplog.text
    assert "webhook recovered" in caplog.text


def test_batches_when_the_receiver_is_slow(env: RelayEnv, receiver: Receiver) -> None:
    receiver.hold.clear()  # the first request waits
    overrides = {**FAST, "webhooks": {**FAST_WEBHOOKS, "maxBatch": 8}}
    entry = with_webhooks(credential(env.username, env.password), endpoint(receiver))
    relay = env.start(env.settings(credentials=[entry], overrides=overrides))
    send(env, relay, 1)
    wait_for(lambda: receiver.waiting == 1, 10, "the first request to wait")
    send(env, relay, 15, first=2)
    wait_for(lambda: len(env.sink.messages()) >= 16, 20, "the mail delivered")
    receiver.hold.set()
    wait_for(lambda: all_delivered(receiver, 16), 20, "every event")
    sizes = [len(r.events) for r in receiver.accepted()]
    assert sizes[0] <= 2, "caught up: what there is (SENT, maybe DELIVERED already)"
    assert max(sizes) == 8, "behind: batches of up to maxBatch events"
    assert len(sizes) < 32 / 2
    assert_in_order(receiver.events())


def test_event_type_filter(env: RelayEnv, receiver: Receiver) -> None:
    relay = start(
        env,
        endpoint(receiver, "delivered-only", path="/delivered", types=["DELIVERED"]),
        endpoint(receiver, "everything", path="/all"),
    )
    send(env, relay, 3)
    wait_for(lambda: all_delivered(receiver, 3, path="/delivered"), 20, "the filtered hook")
    wait_for(lambda: all_delivered(receiver, 3, path="/all"), 20, "the unfiltered hook")
    assert {e["type"] for e in receiver.events("/delivered")} == {"DELIVERED"}
    assert {e["type"] for e in receiver.events("/all")} == {"SENT", "DELIVERED"}
    assert all(r.verified for r in receiver.requests)


def test_the_configuration_is_followed(env: RelayEnv, receiver: Receiver) -> None:
    other = Receiver(receiver.secret).up()
    try:
        receiver.down()
        relay = start(env, endpoint(receiver))
        send(env, relay, 1)
        wait_for(lambda: stat(env, "state", "Failing"), 20, "Failing while the URL is wrong")
        ((_, batch_id, _),) = db_batches(env)
        # A person fixes the URL: the waiting batch goes there at once, with its id.
        moved = WebhookEndpoint.model_validate(
            {"name": "hook", "url": other.url(), "secret": receiver.secret}
        )
        entry = with_webhooks(credential(env.username, env.password), moved)
        write_credentials(env.directory / "credentials.json", [entry])
        wait_for(lambda: all_delivered(other, 1), 20, "delivery to the new URL")
        assert other.accepted()[0].webhook_id == batch_id
        # The subscription removed: no more requests; back: it resumes where it was.
        write_credentials(
            env.directory / "credentials.json", [credential(env.username, env.password)]
        )
        wait_for(lambda: relay.metric("txmail_relay_webhook_subscriptions") == 0, 10, "removed")
        before = len(other.requests)
        send(env, relay, 1, first=2)
        wait_for(lambda: len(env.sink.messages()) >= 2, 20, "the second mail delivered")
        write_credentials(env.directory / "credentials.json", [entry])
        wait_for(lambda: all_delivered(other, 1, first=2), 20, "the events kept while removed")
        assert len(other.requests) > before
        assert_in_order(other.events())
    finally:
        other.close()


def test_a_batch_failing_for_the_retry_period_is_dropped(env: RelayEnv, receiver: Receiver) -> None:
    offset = [0.0]
    receiver.status = 503
    relay = start(env, endpoint(receiver), webhook_clock=lambda: time.time() + offset[0])
    send(env, relay, 1)
    wait_for(lambda: len(receiver.requests) >= 2, 20, "retries")
    ((_, first_batch, _),) = db_batches(env)
    offset[0] = 86400.0 + 60  # a day later (the default retryFor)
    wait_for(lambda: stat(env, "dropped", 2) or stat(env, "dropped", 1), 20, "the batch dropped")
    assert relay.metric("txmail_relay_webhook_events_total", {"result": "dropped"}) >= 1
    receiver.status = 200
    send(env, relay, 1, first=2)
    wait_for(lambda: all_delivered(receiver, 1, first=2), 20, "the next events")
    assert first_batch not in {r.webhook_id for r in receiver.accepted()}


def test_redirects_are_not_followed_and_slow_answers_time_out(
    env: RelayEnv, receiver: Receiver
) -> None:
    receiver.status, receiver.location = 307, receiver.url("/elsewhere")
    overrides = {**FAST, "webhooks": {**FAST_WEBHOOKS, "timeout": 0.5}}
    entry = with_webhooks(credential(env.username, env.password), endpoint(receiver))
    relay = env.start(env.settings(credentials=[entry], overrides=overrides))
    send(env, relay, 1)
    failing = wait_for(lambda: stat(env, "state", "Failing"), 20, "Failing on redirects")
    assert failing["lastError"] == "HTTP 307: redirects are not followed"
    assert {r.path for r in receiver.requests} == {"/hook"}
    receiver.status, receiver.location = 200, None
    receiver.hold.clear()  # answers after the relay's timeout
    wait_for(
        lambda: relay.metric("txmail_relay_webhook_requests_total", {"result": "timeout"}) >= 1,
        20,
        "a timed-out attempt",
    )
    wait_for(
        lambda: (
            (found := stat(env, "state", "Failing"))
            and found["lastError"] == "no response within 0.5 s"
        ),
        10,
        "the timeout as the last error",
    )
    receiver.hold.set()
    # (The requests it held count as answered 200 here, but the relay had given up on them.)
    wait_for(lambda: stat(env, "state", "Healthy"), 20, "Healthy once it answers in time")
    wait_for(lambda: stat(env, "backlog", 0), 10, "every event delivered")


def test_an_unusable_key_fails_that_webhook_only(env: RelayEnv, receiver: Receiver) -> None:
    short = WebhookEndpoint.model_validate(
        {"name": "hook", "url": receiver.url(), "secret": "whsec_" + "A" * 16}
    )
    relay = start(env, short)
    send(env, relay, 1)  # the token still authenticates and sends
    failing = wait_for(lambda: stat(env, "state", "Failing"), 20, "Failing with a bad key")
    assert failing["lastError"].startswith("signing key unusable: ")
    assert "A" * 16 not in failing["lastError"]
    assert receiver.requests == [], "nothing is sent unsigned"
    assert relay.metric("txmail_relay_webhook_requests_total", {"result": "key"}) >= 3


# -- a relay killed with events in its outbox --------------------------------------------------


def test_sigkill_with_events_in_the_outbox(env: RelayEnv, receiver: Receiver) -> None:
    port = free_port()
    receiver.down()
    entry = with_webhooks(credential(env.username, env.password), endpoint(receiver))
    settings = env.settings(
        credentials=[entry],
        overrides={
            **FAST,
            "logging": {"level": "DEBUG", "json": True},
            "listen": submission_only(port),
        },
    )
    log = env.directory / "relay.log"
    process = start_relay_process(settings, port, log)
    try:
        import smtplib  # noqa: PLC0415

        with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
            smtp.starttls(context=env.tls.client_context())
            smtp.login(env.username, env.password)
            for seq in (1, 2, 3):
                smtp.sendmail("app@example.com", [f"user{seq}@dest.test"], message(seq))
        # Killed once the 6 events (SENT, DELIVERED per message) are in the records.
        wait_for(lambda: db_events(env) == 6, 20, "the events recorded")
        wait_for(lambda: db_batches(env)[0][1], 10, "a batch persisted")
        ((_, batch_id, _),) = db_batches(env)
        kill_relay_process(process)
        receiver.up()
        process = start_relay_process(settings, port, log)
        wait_for(lambda: all_delivered(receiver, 3), 30, "the outbox delivered after restart")
        assert receiver.accepted()[0].webhook_id == batch_id
        assert_in_order(receiver.events())
        assert all(r.verified for r in receiver.requests)
        assert receiver.secret.removeprefix("whsec_") not in log.read_text()
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(20)
