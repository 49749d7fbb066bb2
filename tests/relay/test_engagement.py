"""Tracking, stats (store, file publisher, metrics), contacts and ARF complaints, end to end."""

from __future__ import annotations

import re
import secrets
import smtplib
from pathlib import Path
from typing import Any

import pytest

from relay.relaykit import (
    RelayEnv,
    RelayThread,
    arf_report,
    bearer,
    credential,
    http,
    parsed,
    template_doc,
    tracking_keys_file,
    wait_for,
    wait_token_stats,
)
from txmail_relay.http.api import SEND_PATH
from txmail_relay.tracking.tokens import TRANSPARENT_GIF

TRACKED = 11
BROKEN_HTML = 12
BASE = "https://t.example.com"
COMPLAINTS = "fbl@relay.test"
LINK = re.compile(r"https://t\.example\.com(/[co]/[A-Za-z0-9_-]+(?:\.gif)?)")


@pytest.fixture
def relay(env: RelayEnv) -> RelayThread:
    keys = tracking_keys_file(env.directory, 1, 2)
    creds = [
        credential(env.username, env.password).model_copy(update={"create_contacts": True}),
    ]
    settings = env.settings(
        credentials=creds,
        overrides={
            "relay": {"tracking": {"baseURL": BASE}},
            "templates": [
                template_doc(TRACKED, track=True),
                template_doc(
                    BROKEN_HTML, track=True, html='<![bogus[ <a href="https://a.example/">x</a>'
                ),
            ],
            "trackingKeysFile": str(keys),
            "statsFile": "stats.json",
            "statsInterval": 0.1,
            "complaintsAddress": COMPLAINTS,
        },
    )
    return env.start(settings)


def _send(relay: RelayThread, password: str, email_id: int = TRACKED, **message: Any) -> Any:
    doc = {
        "emailId": email_id,
        "message": {"to": "ada@dest.test", **message},
        "contactProperties": {"firstname": "Ada"},
        "customProperties": {"order_id": "42"},
    }
    reply = http(relay.api_port, "POST", SEND_PATH, body=doc, headers=bearer(password))
    assert reply.status == 200, reply.body
    return reply.json()


def test_tracked_send_opens_clicks_stats_metrics_and_contacts(
    env: RelayEnv, relay: RelayThread
) -> None:
    view = _send(relay, env.password, cc=["carl@dest.test"])
    messages = env.sink.wait(2)
    by_rcpt = {m.rcpts[0]: m for m in messages}
    tracked, plain = by_rcpt["<ada@dest.test>"], by_rcpt["<carl@dest.test>"]
    html = parsed(tracked).get_body(("html",)).get_content()
    paths = LINK.findall(html)
    assert any(p.startswith("/c/") for p in paths) and any(p.endswith(".gif") for p in paths)
    assert "shop.example.com" not in html
    # The CC'd recipient gets an untracked copy with the same visible headers.
    plain_html = parsed(plain).get_body(("html",)).get_content()
    assert "t.example.com" not in plain_html and "shop.example.com/o/42" in plain_html
    assert parsed(plain)["Cc"] == "carl@dest.test" and parsed(tracked)["Cc"] == "carl@dest.test"

    pixel = next(p for p in paths if p.endswith(".gif"))
    click = next(p for p in paths if p.startswith("/c/"))
    for _ in range(2):
        reply = http(relay.tracking_port, "GET", pixel)
        assert reply.status == 200 and reply.body == TRANSPARENT_GIF and len(reply.body) == 43
        assert reply.headers["cache-control"] == "no-store"
        assert reply.headers["referrer-policy"] == "no-referrer"
        reply = http(relay.tracking_port, "GET", click)
        assert reply.status == 302
        assert reply.headers["location"] == "https://shop.example.com/o/42"
        assert reply.headers["referrer-policy"] == "no-referrer"
    # A tampered token never redirects.
    token = click.removeprefix("/c/")
    tampered = token[:-2] + ("AA" if token[-2:] != "AA" else "BB")
    bad = http(relay.tracking_port, "GET", f"/c/{tampered}")
    assert bad.status == 400 and "location" not in bad.headers
    assert bad.headers["referrer-policy"] == "no-referrer"
    assert http(relay.tracking_port, "GET", "/c/https%3A%2F%2Fevil.test").status == 400
    # Unknown pixels still get the GIF and record nothing.
    assert http(relay.tracking_port, "GET", "/o/nothing.gif").body == TRANSPARENT_GIF

    stats = wait_token_stats(
        env, sent=2, delivered=2, opens=2, uniqueOpens=1, clicks=2, uniqueClicks=1, contacts=2
    )
    assert stats["openRate"] == 0.5 and stats["clickRate"] == 0.5
    assert stats["bounced"] == 0 and stats["lastSentAt"]
    wait_for(
        lambda: (
            relay.metric(
                "txmail_relay_token_events_total", {"token": "app1", "event": "unique_opened"}
            )
            == 1
        ),
        what="token events metric",
    )
    assert relay.metric("txmail_relay_token_contacts", {"token": "app1"}) == 2

    contacts = http(relay.api_port, "GET", "/txmail/v1/contacts", headers=bearer(env.password))
    assert contacts.status == 200
    results = contacts.json()["results"]
    assert [c["email"] for c in results] == ["ada@dest.test", "carl@dest.test"]
    assert results[0]["properties"] == {"firstname": "Ada"}
    assert http(relay.api_port, "GET", "/txmail/v1/contacts").status == 401
    page = http(
        relay.api_port, "GET", "/txmail/v1/contacts?limit=1", headers=bearer(env.password)
    ).json()
    assert page["paging"]["next"]["after"] == "ada@dest.test"
    final = wait_for(
        lambda: (
            (
                s := http(
                    relay.api_port,
                    "GET",
                    f"/marketing/v3/email/send-statuses/{view['statusId']}",
                    headers=bearer(env.password),
                ).json()
            )["status"]
            == "COMPLETE"
            and s
        ),
        what="complete",
    )
    assert final["sendResult"] == "SENT"


def test_stats_survive_a_restart(env: RelayEnv, relay: RelayThread) -> None:
    _send(relay, env.password)
    env.sink.wait(1)
    wait_token_stats(env, sent=1, delivered=1)
    relay.stop()
    env.threads.remove(relay)
    (env.directory / "stats.json").unlink()
    again = env.start(relay.settings_path)
    stats = wait_token_stats(env, sent=1, delivered=1)
    assert stats["contacts"] == 1
    assert again.metric("txmail_relay_token_events_total", {"token": "app1", "event": "sent"})


def test_tracking_failure_sends_untracked(env: RelayEnv, relay: RelayThread) -> None:
    _send(relay, env.password, email_id=BROKEN_HTML)
    [captured] = env.sink.wait(1)
    assert "t.example.com" not in captured.content
    assert relay.metric("txmail_relay_tracking_failures_total") == 1


def _submit(env: RelayEnv, relay: RelayThread, rcpts: list[str], body: bytes) -> None:
    with env.client(relay) as smtp:
        smtp.sendmail("reports@example.com", rcpts, body)


def test_arf_report_records_a_complaint_once(env: RelayEnv, relay: RelayThread) -> None:
    _send(relay, env.password)
    [captured] = env.sink.wait(1)
    message_id = parsed(captured)["Message-ID"]
    report = arf_report(COMPLAINTS, message_id, "ada@dest.test")
    _submit(env, relay, [COMPLAINTS], report)
    _submit(env, relay, [COMPLAINTS], report)  # the same report again counts once
    stats = wait_token_stats(env, complaints=1)
    assert relay.metric("txmail_relay_complaint_reports_total", {"result": "recorded"}) == 2
    wait_for(
        lambda: (
            relay.metric(
                "txmail_relay_token_events_total", {"token": "app1", "event": "unsubscribed"}
            )
            == 1
        ),
        what="unsubscribe metric",
    )
    contacts = http(relay.api_port, "GET", "/txmail/v1/contacts", headers=bearer(env.password))
    assert contacts.json()["results"][0]["unsubscribed"] is True
    # Reports are consumed, never relayed; transactional mail still reaches the recipient.
    _send(relay, env.password)
    assert len(env.sink.wait(2)) == 2
    assert stats["sent"] == 1
    # Unknown message, not a report, mixed recipients.
    _submit(
        env, relay, [COMPLAINTS], arf_report(COMPLAINTS, "<unknown@example.com>", "x@dest.test")
    )
    assert relay.metric("txmail_relay_complaint_reports_total", {"result": "unknown"}) == 1
    _submit(env, relay, [COMPLAINTS], b"From: a@example.com\r\nSubject: hi\r\n\r\nhello\r\n")
    assert relay.metric("txmail_relay_complaint_reports_total", {"result": "invalid"}) == 1
    with pytest.raises(smtplib.SMTPDataError) as refused:
        _submit(env, relay, [COMPLAINTS, "x@dest.test"], report)
    assert refused.value.smtp_code == 550


def test_key_rotation_keeps_old_links_working(env: RelayEnv, tmp_path: Path) -> None:
    from txmail_relay.tracking.endpoints import load_keys  # noqa: PLC0415

    path = tracking_keys_file(tmp_path, 1)
    old = load_keys(path)
    token = old.sign_click(b"e" * 16, 0, "https://shop.example.com/x")
    path.write_text(path.read_text() + f"2:{secrets.token_hex(32)}\n")
    rotated = load_keys(path)
    assert rotated.current == 2
    assert rotated.verify_click(token) == "https://shop.example.com/x"
    path.write_text("1:abcd\n")
    with pytest.raises(ValueError, match="shorter"):
        load_keys(path)
    path.write_text("nonsense\n")
    with pytest.raises(ValueError, match="line 1"):
        load_keys(path)
