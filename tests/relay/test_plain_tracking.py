"""Plain SMTP mail gets the same tracking as template sends when its relay has tracking on."""

from __future__ import annotations

import json
import re
from email.message import EmailMessage
from typing import Any

import pytest

from relay.relaykit import (
    RelayEnv,
    RelayThread,
    credential,
    http,
    parsed,
    tracking_keys_file,
    wait_for,
)

BASE = "https://t.example.com"
LINK = re.compile(r"https://t\.example\.com(/[co]/[A-Za-z0-9_-]+(?:\.gif)?)")


@pytest.fixture
def relay(env: RelayEnv) -> RelayThread:
    keys = tracking_keys_file(env.directory, 1)
    settings = env.settings(
        credentials=[credential(env.username, env.password)],
        overrides={
            "relay": {"tracking": {"baseURL": BASE}},
            "trackingKeysFile": str(keys),
            "statsFile": "stats.json",
            "statsInterval": 0.1,
        },
    )
    return env.start(settings)


def mail(n: int, *, cc: str | None = None, **headers: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "App <app@example.com>"
    msg["To"] = "ada@dest.test"
    if cc:
        msg["Cc"] = cc
    msg["Subject"] = f"order {n}"
    msg["Message-ID"] = f"<plain-{n}@example.com>"
    for key, value in headers.items():
        msg[key.replace("_", "-")] = value
    msg.set_content(f"order {n}\nEND-OF-MESSAGE {n}\n")
    msg.add_alternative(
        f'<p>Order {n}: <a href="https://shop.example.com/o/{n}">see it</a></p>', subtype="html"
    )
    return msg


def send(env: RelayEnv, relay: RelayThread, msg: EmailMessage, rcpts: list[str]) -> None:
    with env.client(relay) as smtp:
        smtp.send_message(msg, to_addrs=rcpts)


def html_of(captured: Any) -> str:
    body = parsed(captured).get_body(("html",))
    assert body is not None
    text: str = body.get_content()
    return text


def test_to_recipients_get_tracked_copies_and_cc_does_not(
    env: RelayEnv, relay: RelayThread
) -> None:
    send(env, relay, mail(1, cc="cat@dest.test"), ["ada@dest.test", "cat@dest.test"])
    got = env.sink.wait(2)
    by_rcpt = {m.rcpts[0]: m for m in got}
    assert set(by_rcpt) == {"<ada@dest.test>", "<cat@dest.test>"}
    tracked, untracked = html_of(by_rcpt["<ada@dest.test>"]), html_of(by_rcpt["<cat@dest.test>"])
    paths = LINK.findall(tracked)
    assert any(p.startswith("/o/") for p in paths) and any(p.startswith("/c/") for p in paths)
    assert "https://shop.example.com/o/1" not in tracked
    assert LINK.findall(untracked) == [] and "https://shop.example.com/o/1" in untracked

    pixel = next(p for p in paths if p.startswith("/o/"))
    assert http(relay.tracking_port, "GET", pixel).status == 200

    def opens() -> int:
        path = env.directory / "stats.json"
        doc = json.loads(path.read_text()) if path.exists() else {"tokens": {}}
        figures = doc["tokens"].get(env.username, {})
        return int(figures.get("uniqueOpens", 0))

    wait_for(lambda: opens() == 1, 10, "the open in the token's stats")


@pytest.mark.parametrize(
    ("headers", "why"),
    [
        ({"DKIM_Signature": "v=1; a=rsa-sha256; d=example.com; s=s1; b=abc"}, "signed by the app"),
        ({"X_Txmail_Track": "off"}, "opted out"),
    ],
)
def test_signed_or_opted_out_mail_is_left_alone(
    env: RelayEnv, relay: RelayThread, headers: dict[str, str], why: str
) -> None:
    send(env, relay, mail(2, **headers), ["ada@dest.test"])
    got = env.sink.wait(1)[0]
    assert LINK.findall(html_of(got)) == [], why


def test_text_only_mail_is_left_alone(env: RelayEnv, relay: RelayThread) -> None:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "app@example.com", "ada@dest.test", "plain"
    msg.set_content("see https://shop.example.com/o/3\nEND-OF-MESSAGE 3\n")
    send(env, relay, msg, ["ada@dest.test"])
    assert "https://shop.example.com/o/3" in env.sink.wait(1)[0].content


def test_mail_without_a_content_type_is_text_and_left_alone(
    env: RelayEnv, relay: RelayThread
) -> None:
    """No Content-Type field: text/plain (RFC 2045 §5.2), even if it reads like HTML; relayed
    as it came (read on the event loop, no body parse)."""
    html = '<p><a href="https://shop.example.com/o/5">see it</a></p>'
    raw = (
        "From: app@example.com\r\nTo: ada@dest.test\r\nSubject: bare\r\n\r\n"
        f"{html}\r\nEND-OF-MESSAGE 5\r\n"
    )
    with env.client(relay) as smtp:
        smtp.sendmail("app@example.com", ["ada@dest.test"], raw.encode())
    got = env.sink.wait(1)[0].content
    assert html in got and not LINK.findall(got)


def test_no_tracking_without_a_tracking_url(env: RelayEnv) -> None:
    relay = env.start(env.settings(credentials=[credential(env.username, env.password)]))
    send(env, relay, mail(4), ["ada@dest.test"])
    assert LINK.findall(html_of(env.sink.wait(1)[0])) == []
