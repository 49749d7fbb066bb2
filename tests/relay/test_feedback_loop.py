"""The issue's "Done means", end to end, with a real far MTA (tests/postfix.py).

An app sends through the single-send API; the relay delivers to a private Postfix (smarthost
mode: the relay's envelope sender is its VERP return path ``bounces+<spool id>@<domain>``).
Postfix accepts the mail, then bounces it (unknown user at bounce.test) or keeps deferring it
(defer.test): the RFC 3464 DSNs its bounce daemon writes go, by transport_maps, to the relay's
inbound listener. From there: the send status, the token's stats, an event POSTed to the
token's webhook (an aiohttp receiver verifying it with the standardwebhooks library), the
namespace's suppression list, and the next send to the address refused.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import smtplib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from postfix import BOUNCE_DOMAIN, DEFER_DOMAIN, KNOWN_USER, Postfix, postfix_factory
from relay.relaykit import (
    RETURN_PATH_DOMAIN,
    HttpReply,
    RelayEnv,
    RelayThread,
    bearer,
    credential,
    free_port,
    http,
    return_path_overrides,
    template_doc,
    token_stats,
    verp,
    wait_for,
)
from txmail_relay.contract import WebhookEndpoint
from txmail_relay.http.api import SEND_PATH

__all__ = ["postfix_factory"]

ORDER = 101
B_USER = "app2"
B_PASSWORD = secrets.token_urlsafe(32)
SUPPRESSIONS = "/txmail/v1/suppressions"


# -- a webhook receiver ------------------------------------------------------------------------


@dataclass
class Delivery:
    webhook_id: str
    payload: dict[str, Any]


@dataclass
class WebhookReceiver:
    """An aiohttp server in a thread that verifies every POST with standardwebhooks (as any
    receiver of Standard Webhooks would) and keeps the verified ones; 204, or 400 when the
    signature does not verify (kept in ``rejected``)."""

    secret: str
    port: int = field(default_factory=free_port)
    deliveries: list[Delivery] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    _loop: asyncio.AbstractEventLoop | None = None
    _stop: asyncio.Event | None = None
    _thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/txmail-events"

    def events(self) -> list[dict[str, Any]]:
        return [e for d in list(self.deliveries) for e in d.payload["data"]["events"]]

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        try:
            payload = Webhook(self.secret).verify(body, dict(request.headers))
        except WebhookVerificationError as e:
            self.rejected.append(str(e))
            return web.Response(status=400)
        self.deliveries.append(Delivery(request.headers["webhook-id"], payload))
        return web.Response(status=204)

    def start(self) -> WebhookReceiver:
        ready = threading.Event()

        async def main() -> None:
            app = web.Application()
            app.router.add_post("/txmail-events", self._handle)
            runner = web.AppRunner(app)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", self.port).start()
            self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
            ready.set()
            await self._stop.wait()
            await runner.cleanup()

        self._thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
        self._thread.start()
        assert ready.wait(10), "the webhook receiver did not start"
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(10)


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    key = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    started = WebhookReceiver(key).start()
    yield started
    started.stop()


# -- the loop ----------------------------------------------------------------------------------


@dataclass
class Loop:
    env: RelayEnv
    relay: RelayThread
    postfix: Postfix
    receiver: WebhookReceiver

    def send(self, to: str) -> HttpReply:
        doc = {
            "emailId": ORDER,
            "message": {"to": to},
            "contactProperties": {"firstname": "Ada"},
            "customProperties": {"order_id": secrets.token_hex(4)},
        }
        return http(self.relay.api_port, "POST", SEND_PATH, body=doc, headers=self.auth)

    @property
    def auth(self) -> dict[str, str]:
        return bearer(self.env.password)

    def get(self, path: str, auth: dict[str, str] | None = None) -> HttpReply:
        """GET ``path`` from the relay's HTTP API, as the env's token unless ``auth``."""
        return http(self.relay.api_port, "GET", path, headers=auth or self.auth)

    def status(self, status_id: str) -> dict[str, Any]:
        reply = self.get(f"/marketing/v3/email/send-statuses/{status_id}")
        assert reply.status == 200, reply.body
        doc: dict[str, Any] = reply.json()
        return doc

    def token_stats(self) -> dict[str, Any]:
        return token_stats(self.env)

    def wait(self, probe: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
        """``wait_for`` that shows the far MTA's log and the relay's last events on failure."""
        try:
            return wait_for(probe, timeout, what, every=0.05)
        except AssertionError as e:
            raise AssertionError(
                f"{e}\n--- webhook events ---\n{json.dumps(self.receiver.events(), indent=1)}"
                f"\n--- Postfix log ---\n{self.postfix.log()[-5000:]}"
            ) from None

    def hook_event(self, recipient: str, kind: str, **fields: Any) -> dict[str, Any] | None:
        for event in self.receiver.events():
            if (
                event["type"] == kind
                and event["recipient"] == recipient
                and all(event.get(k) == v for k, v in fields.items())
            ):
                return event
        return None


@pytest.fixture
def loop(env: RelayEnv, postfix_factory: Callable[..., Postfix], receiver: WebhookReceiver) -> Loop:
    # Deferred mail: a delay warning after 1 s; given up only after the test (one DSN).
    postfix = postfix_factory(delay_warning=1, lifetime=600)
    hook = WebhookEndpoint.model_validate(
        {"name": "events", "url": receiver.url, "secret": receiver.secret}
    )
    token = credential(env.username, env.password).model_copy(update={"webhooks": [hook]})
    # A second token in another namespace, without webhooks (SMTP submission, pull API).
    other = credential(B_USER, B_PASSWORD).model_copy(update={"namespace": "other"})
    overrides = return_path_overrides()
    overrides["relay"].update(
        delivery={"smarthost": {"host": postfix.host, "port": postfix.port}},
        suppression={"bounces": True},  # opted in: hard bounces are enforced
    )
    overrides.update(
        templates=[template_doc(ORDER)],
        statsFile="stats.json",
        statsInterval=0.1,
        webhooks={"pollInterval": 0.1, "minBackoff": 0.1, "maxBackoff": 0.5},
    )
    relay = env.start(env.settings(credentials=[token, other], overrides=overrides))
    # The DSNs' next hop: the relay's inbound listener (its port is known once it listens).
    postfix.route(RETURN_PATH_DOMAIN, "127.0.0.1", relay.inbound_port)
    return Loop(env, relay, postfix, receiver)


def test_an_address_the_far_mta_bounces_later_is_bounced_everywhere_and_then_refused(
    loop: Loop,
) -> None:
    address = f"nobody-{secrets.token_hex(4)}@{BOUNCE_DOMAIN}"
    reply = loop.send(address)
    assert reply.status == 200, reply.body
    status_id = reply.json()["statusId"]

    # Postfix accepted it (delivered, as far as the relay's own SMTP session goes) and then
    # bounced it with a DSN to the VERP return path, which came back to the relay.
    loop.postfix.wait_log("status=bounced")
    bounced = loop.wait(lambda: loop.hook_event(address, "BOUNCE"), "a BOUNCE event at the webhook")

    # The webhook event: hard, from a DSN, tied to the message, its token and send status.
    assert bounced["bounceType"] == "HARD"
    assert bounced["source"] == "DSN"
    assert bounced["status"] == "5.1.1"
    assert bounced["statusId"] == status_id
    assert bounced["namespace"] == "apps" and bounced["token"] == loop.env.username
    assert bounced["emailId"] == ORDER
    # The envelope sender Postfix saw was that message's return path.
    assert f"from=<{verp(bounced['spoolId'])}>" in loop.postfix.log()
    assert loop.receiver.rejected == []
    # Earlier events of the message came in order before it (SENT, DELIVERED, BOUNCE).
    kinds = [e["type"] for e in loop.receiver.events() if e["recipient"] == address]
    assert kinds[: kinds.index("BOUNCE") + 1] == ["SENT", "DELIVERED", "BOUNCE"]

    # The send status: COMPLETE, UNDELIVERABLE, with the bounce.
    status = loop.wait(
        lambda: s if (s := loop.status(status_id)).get("sendResult") == "UNDELIVERABLE" else None,
        "the send status to show the bounce",
    )
    assert status["status"] == "COMPLETE"
    assert status["bounce"]["bounceType"] == "HARD"
    assert status["bounce"]["status"] == "5.1.1"

    # The token's stats count it as a (hard) bounce.
    loop.wait(lambda: loop.token_stats().get("bounced") == 1, "stats: bounced 1")
    assert loop.token_stats().get("softBounces", 0) == 0

    # The namespace's suppression list has the address, as a hard bounce.
    listed = loop.get(SUPPRESSIONS)
    assert listed.status == 200, listed.body
    [entry] = [r for r in listed.json()["results"] if r["address"] == address]
    assert entry["suppressed"] and entry["sendResult"] == "PREVIOUSLY_BOUNCED", entry
    assert [(e["reason"], e["enforced"], e["relayWide"]) for e in entry["entries"]] == [
        ("HARD_BOUNCE", True, False)
    ]
    # The pull API has the very event the webhook got (the same shape, the same id).
    pulled = loop.get(f"/email/public/v1/events?eventType=BOUNCE&recipient={address}")
    assert pulled.status == 200, pulled.body
    assert pulled.json()["events"] == [bounced]

    # The next send to it is refused before spooling, as HubSpot does.
    again = loop.send(address)
    assert again.status == 400, again.body
    assert again.json()["sendResult"] == "PREVIOUSLY_BOUNCED"
    loop.wait(
        lambda: loop.hook_event(address, "DROPPED", dropReason="PREVIOUSLY_BOUNCED"),
        "a DROPPED event at the webhook",
    )


def test_a_deferral_at_the_far_mta_is_a_soft_bounce_from_its_delay_warning(loop: Loop) -> None:
    address = f"later-{secrets.token_hex(4)}@{DEFER_DOMAIN}"
    reply = loop.send(address)
    assert reply.status == 200, reply.body
    status_id = reply.json()["statusId"]

    soft = loop.wait(lambda: loop.hook_event(address, "BOUNCE"), "a BOUNCE event at the webhook")
    assert soft["bounceType"] == "SOFT"
    assert soft["source"] == "DSN"
    assert soft["status"].startswith("4.")
    assert soft["statusId"] == status_id
    assert "status=deferred" in loop.postfix.log()

    loop.wait(lambda: loop.token_stats().get("softBounces") == 1, "stats: softBounces 1")
    assert loop.token_stats().get("bounced", 0) == 0
    # A soft bounce neither ends the send nor suppresses the address.
    assert loop.status(status_id).get("sendResult") != "UNDELIVERABLE"
    listed = loop.get(SUPPRESSIONS)
    assert listed.status == 200, listed.body
    assert [r for r in listed.json()["results"] if r["address"] == address] == []
    assert loop.send(address).status == 200


def test_one_smtp_message_to_a_known_and_an_unknown_user_bounces_only_the_unknown_one(
    loop: Loop,
) -> None:
    """Submitted over SMTP by the token of namespace "other": Postfix delivers one recipient
    and bounces the other; the DSN is recorded for that recipient and that token only, and
    suppresses it in that namespace only."""
    tag = secrets.token_hex(4)
    known, unknown = f"{KNOWN_USER}@{BOUNCE_DOMAIN}", f"gone-{tag}@{BOUNCE_DOMAIN}"
    body = (
        f"From: App <app@example.com>\r\nTo: {known}, {unknown}\r\nSubject: {tag}\r\n"
        f"Message-ID: <{tag}@example.com>\r\n\r\nhello\r\n"
    ).encode()
    with smtplib.SMTP("127.0.0.1", loop.relay.port, timeout=10) as smtp:
        smtp.starttls(context=loop.env.tls.client_context())
        smtp.login(B_USER, B_PASSWORD)
        smtp.sendmail("app@example.com", [known, unknown], body)

    # The far side: the known user has it, with the VERP return path as its Return-Path.
    [copy] = loop.wait(loop.postfix.delivered, "the known user's copy")
    assert copy["Message-ID"] == f"<{tag}@example.com>"
    assert copy["From"] == "App <app@example.com>"  # the header From stays the app's
    return_path = copy["Return-Path"].strip("<>")
    assert return_path.startswith("bounces+") and return_path.endswith(f"@{RETURN_PATH_DOMAIN}")

    b_auth = bearer(B_PASSWORD)

    def pulled(recipient: str) -> list[dict[str, Any]]:
        reply = loop.get(f"/email/public/v1/events?eventType=BOUNCE&recipient={recipient}", b_auth)
        assert reply.status == 200, reply.body
        events: list[dict[str, Any]] = reply.json()["events"]
        return events

    [bounce] = loop.wait(lambda: pulled(unknown), "the BOUNCE event in namespace other")
    assert (bounce["bounceType"], bounce["source"], bounce["status"]) == ("HARD", "DSN", "5.1.1")
    assert bounce["token"] == B_USER and bounce["namespace"] == "other"
    assert bounce["messageId"] == f"<{tag}@example.com>"
    assert verp(bounce["spoolId"]) == return_path
    assert pulled(known) == []
    # Namespace "apps" sees none of it: no event, no webhook delivery, no suppression.
    assert loop.hook_event(unknown, "BOUNCE") is None
    apps = loop.get(f"{SUPPRESSIONS}/{unknown}")
    assert apps.status == 404, apps.body  # this address is not suppressed (in "apps")
    other = loop.get(f"{SUPPRESSIONS}/{unknown}", b_auth)
    assert other.status == 200 and other.json()["suppressed"] is True, other.body
    assert loop.send(unknown).status == 200  # a token of "apps" may still send to it
