"""Deliverability wiring: tracking keys reloaded live, suppression opt-in, complaints address.

The relay runs in a thread with smtp-sink upstream; configuration changes are made by
rewriting the settings file, as a ConfigMap update reaches the Kubernetes source.
"""

from __future__ import annotations

import base64
import contextlib
import secrets
import smtplib
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from peers import free_port
from relay.relaykit import (
    HttpReply,
    Recorder,
    RelayEnv,
    RelayThread,
    arf_report,
    bearer,
    http,
    message,
    parsed,
    template_doc,
    tracking_keys_file,
    wait_for,
)
from txmail_relay.http.api import SEND_PATH

ORDER = 21
TRACKED = 22
BASE = "https://t.example.com"
FBL = "fbl@relay.test"


def _request(to: str, **message_fields: Any) -> dict[str, Any]:
    return {
        "emailId": ORDER,
        "message": {"to": to, **message_fields},
        "contactProperties": {"firstname": "Ada"},
        "customProperties": {"order_id": "42"},
    }


def _send(relay: RelayThread, password: str, doc: dict[str, Any]) -> HttpReply:
    return http(relay.api_port, "POST", SEND_PATH, body=doc, headers=bearer(password))


def _relay_doc(**extra: Any) -> dict[str, Any]:
    return {"templates": [template_doc(ORDER), template_doc(TRACKED, track=True)], **extra}


def _rcpt_replies(env: RelayEnv, relay: RelayThread, *rcpts: str) -> list[tuple[int, str]]:
    """RCPT replies of one transaction (then RSET: nothing is sent)."""
    with env.client(relay) as smtp:
        smtp.mail("app@example.com")
        replies = [(code, text.decode()) for code, text in (smtp.rcpt(r) for r in rcpts)]
        smtp.rset()
    return replies


# -- tracking keys ---------------------------------------------------------------------------


def _kid(link_path: str) -> int:
    token = link_path.rsplit("/", 1)[1].removesuffix(".gif")
    raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    return raw[2]  # version | kind | key id | ...


def _click_link(env: RelayEnv, relay: RelayThread, count: int) -> str:
    before = {m.content for m in env.sink.messages()}
    reply = _send(relay, env.password, {**_request("ada@dest.test"), "emailId": TRACKED})
    assert reply.status == 200, reply.body
    [captured] = [m for m in env.sink.wait(count) if m.content not in before]
    body = parsed(captured).get_body(("html",))
    assert body is not None
    html = str(body.get_content())
    start = html.index(f"{BASE}/c/") + len(BASE)
    return html[start : html.index('"', start)]


def test_tracking_keys_are_reloaded_when_the_file_changes(
    env: RelayEnv, caplog: pytest.LogCaptureFixture
) -> None:
    keys = tracking_keys_file(env.directory, 1)
    relay = env.start(
        env.settings(
            overrides=_relay_doc(relay={"tracking": {"baseURL": BASE}}, trackingKeysFile=str(keys))
        )
    )
    old_link = _click_link(env, relay, 1)
    assert _kid(old_link) == 1

    # Rotation as docs/relay.md describes it: add a line with a higher kid (atomic replace,
    # as the kubelet updates a mounted Secret).
    rotated = keys.with_suffix(".new")
    rotated.write_text(keys.read_text() + f"2:{secrets.token_hex(32)}\n")
    rotated.replace(keys)
    assert relay.relay is not None
    key_file = relay.relay.tracking_keys
    wait_for(lambda: key_file.current is not None and key_file.current.current == 2, what="reload")
    new_link = _click_link(env, relay, 2)
    assert _kid(new_link) == 2
    for link in (old_link, new_link):  # mail already delivered keeps working
        reply = http(relay.tracking_port, "GET", link)
        assert reply.status == 302, link
        assert reply.headers["location"].startswith("https://shop.example.com/")

    # A broken edit is logged (without key material) and the keys in force stay.
    secret_hex = secrets.token_hex(32)
    keys.write_text(f"{secret_hex}\n")
    wait_for(lambda: "tracking keys not reloaded" in caplog.text, what="the reload error")
    assert secret_hex not in caplog.text
    assert key_file.current is not None and key_file.current.current == 2
    assert http(relay.tracking_port, "GET", old_link).status == 302


# -- suppression: bounces ----------------------------------------------------------------------


class _UnknownUsers:
    """An upstream (aiosmtpd on loopback) that refuses every RCPT as an unknown user, the
    bounce that suppresses (smtp-sink's 5xx is ``5.3.0``, which does not)."""

    async def handle_RCPT(  # noqa: N802 - aiosmtpd's hook name
        self, server: object, session: object, envelope: object, address: str, options: object
    ) -> str:
        return f"550 5.1.1 <{address}>: Recipient address rejected: User unknown"


@pytest.fixture
def unknown_users() -> Iterator[Controller]:
    controller = Controller(_UnknownUsers(), hostname="127.0.0.1", port=free_port())
    controller.start()
    try:
        yield controller
    finally:
        controller.stop()


def test_bounced_recipients_are_refused_when_the_ip_opts_in(
    env: RelayEnv, unknown_users: Controller
) -> None:
    refusing = unknown_users  # 550 5.1.1 to every RCPT: every recipient bounces
    recorder = Recorder()
    upstream = {"delivery": {"smarthost": {"port": refusing.port}}}
    opted_in = {**upstream, "suppression": {"bounces": True}}
    relay = env.start(env.settings(overrides=_relay_doc(relay=opted_in)), listeners=[recorder])

    with env.client(relay) as smtp:
        smtp.sendmail("app@example.com", ["gone@dest.test"], message(1))
    wait_for(lambda: recorder.outcomes("gone@dest.test") == ["bounced"], what="the bounce")
    assert relay.relay is not None
    db_path = relay.relay.records.path
    wait_for(
        lambda: _reasons(db_path, "gone@dest.test") == ["HARD_BOUNCE"], what="the bounce stored"
    )

    # API: HubSpot's sendResult, naming the field; nothing is spooled.
    reply = _send(relay, env.password, _request("Gone@Dest.test"))
    assert reply.status == 400, reply.body
    body = reply.json()
    assert body["sendResult"] == "PREVIOUSLY_BOUNCED"
    assert body["errors"][0]["in"] == "message.to"
    assert relay.metric(
        "txmail_relay_api_sends_total", {"token": "app1", "result": "PREVIOUSLY_BOUNCED"}
    )
    # A different recipient is still accepted (it is queued, then bounces upstream).
    assert _send(relay, env.password, _request("fresh@dest.test")).status == 200

    # SMTP: per recipient at RCPT, case-insensitive; the others in the transaction go on.
    gone, fresh, upper = _rcpt_replies(
        env, relay, "gone@dest.test", "other@dest.test", "GONE@dest.test"
    )
    assert gone[0] == 550 and gone[1].startswith("5.7.1 <gone@dest.test>")
    assert "bounced" in gone[1] and "PREVIOUSLY_BOUNCED" in gone[1]
    assert fresh[0] == 250
    assert upper[0] == 550
    assert relay.metric("txmail_relay_smtp_rejections_total", {"reason": "suppressed"}) == 2

    # Opting out applies live, to the next RCPT.
    env.settings(overrides=_relay_doc(relay=upstream))
    wait_for(lambda: _rcpt_replies(env, relay, "gone@dest.test")[0][0] == 250, what="opt-out")


def _reasons(db_path: Path, address: str) -> list[str]:
    """What the relay's store holds for ``address`` (a second reader; the store is in WAL)."""
    with contextlib.closing(sqlite3.connect(db_path)) as db:
        rows = db.execute("SELECT reason FROM suppressions WHERE address = ?", (address,))
        return [r[0] for r in rows]


# -- suppression: complaints, and the complaints address from the RelayConfig ------------------


def test_complainers_are_refused_when_the_ip_opts_in(env: RelayEnv) -> None:
    # The complaints address comes from the RelayConfig (DedicatedIP spec.feedback), live.
    relay = env.start(
        env.settings(overrides=_relay_doc(relay={"feedback": {"complaintsAddress": FBL}}))
    )
    assert _send(relay, env.password, _request("ada@dest.test")).status == 200
    [captured] = env.sink.wait(1)
    report = arf_report(FBL, parsed(captured)["Message-ID"], "ada@dest.test")
    with env.client(relay) as smtp:
        smtp.sendmail("reports@example.com", [FBL.upper()], report)
    wait_for(
        lambda: relay.metric("txmail_relay_complaint_reports_total", {"result": "recorded"}),
        what="the complaint",
    )
    assert len(env.sink.messages()) == 1  # the report was consumed, not relayed

    # Off by default: transactional mail still reaches the complainer.
    assert _send(relay, env.password, _request("ada@dest.test")).status == 200
    env.sink.wait(2)
    assert _rcpt_replies(env, relay, "ada@dest.test")[0][0] == 250

    env.settings(
        overrides=_relay_doc(
            relay={"feedback": {"complaintsAddress": FBL}, "suppression": {"complaints": True}}
        )
    )
    wait_for(lambda: _rcpt_replies(env, relay, "ada@dest.test")[0][0] == 550, what="opt-in")
    [(code, text)] = _rcpt_replies(env, relay, "ada@dest.test")
    assert code == 550 and text.startswith("5.7.1 <ada@dest.test>")
    assert "spam" in text and "PREVIOUS_SPAM" in text
    # The complaints address itself is never suppressed.
    assert _rcpt_replies(env, relay, FBL)[0][0] == 250

    reply = _send(relay, env.password, _request("ada@dest.test"))
    assert reply.status == 400 and reply.json()["sendResult"] == "PREVIOUS_SPAM"
    # A suppressed cc is left out; the send goes to the others.
    before = {m.content for m in env.sink.messages()}
    reply = _send(relay, env.password, _request("bob@dest.test", cc=["ada@dest.test"]))
    assert reply.status == 200, reply.body
    [last] = [m for m in env.sink.wait(3) if m.content not in before]
    assert last.rcpts == ["<bob@dest.test>"]
    assert "ada@dest.test" not in (parsed(last)["Cc"] or "")
    # A bounce opt-in alone does not suppress complainers.
    env.settings(
        overrides=_relay_doc(
            relay={"feedback": {"complaintsAddress": FBL}, "suppression": {"bounces": True}}
        )
    )
    wait_for(lambda: _rcpt_replies(env, relay, "ada@dest.test")[0][0] == 250, what="opt-out")


def test_complaints_address_changes_apply_live(env: RelayEnv) -> None:
    relay = env.start(env.settings(overrides=_relay_doc()))
    report = arf_report(FBL, "<unknown@example.com>", "x@dest.test")
    env.settings(overrides=_relay_doc(relay={"feedback": {"complaintsAddress": FBL}}))
    assert relay.relay is not None
    store = relay.relay.store

    def live() -> bool:
        return store.current is not None and (
            store.current.relay.feedback.complaints_address == FBL
        )

    wait_for(live, what="the new complaints address")
    with env.client(relay) as smtp:
        smtp.sendmail("reports@example.com", [FBL], report)
        with pytest.raises(smtplib.SMTPDataError) as mixed:
            smtp.sendmail("reports@example.com", [FBL, "x@dest.test"], report)
    assert mixed.value.smtp_code == 550
    assert relay.metric("txmail_relay_complaint_reports_total", {"result": "unknown"}) == 1
