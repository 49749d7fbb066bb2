"""The HubSpot-compatible single-send API end to end: relay in a thread, smtp-sink upstream."""

from __future__ import annotations

import logging
import secrets
from pathlib import Path
from typing import Any

import pytest

from relay.relaykit import (
    ORDER,
    OTHER,
    HttpReply,
    RelayEnv,
    RelayThread,
    basic,
    bearer,
    credential,
    http,
    parsed,
    send_request,
    template_doc,
    two_namespace_credentials,
    wait_for,
)
from txmail_relay.http.api import SEND_PATH

STRICT = 303  # needs contact.firstname and custom.order_id
ESCAPE = 404  # a sandbox escape attempt


def _templates() -> list[dict[str, Any]]:
    return [
        template_doc(ORDER),
        template_doc(OTHER, namespace="other"),
        template_doc(
            STRICT,
            subject="For {{ contact.firstname }}",
            html=None,
            text="{{ custom.order_id }} {% for i in custom.items %}{{ i.k }}{% endfor %}\n"
            "END-OF-MESSAGE\n",
        ),
        template_doc(ESCAPE, subject="{{ ''.__class__.__mro__[1].__subclasses__() }}"),
    ]


def _start(env: RelayEnv, b_password: str, **overrides: Any) -> RelayThread:
    creds = two_namespace_credentials(env, b_password, b_domains=["tenant-b.com"])
    settings = env.settings(credentials=creds, overrides={"templates": _templates(), **overrides})
    return env.start(settings)


def _send(relay: RelayThread, doc: Any, headers: dict[str, str]) -> HttpReply:
    return http(relay.api_port, "POST", SEND_PATH, body=doc, headers=headers)


def _status(relay: RelayThread, status_id: str, headers: dict[str, str]) -> dict[str, Any]:
    reply = http(
        relay.api_port, "GET", f"/marketing/v3/email/send-statuses/{status_id}", headers=headers
    )
    assert reply.status == 200, reply.body
    doc: dict[str, Any] = reply.json()
    return doc


def test_hubspot_request_shape_is_rendered_spooled_and_delivered(
    env: RelayEnv, b_password: str
) -> None:
    relay = _start(env, b_password)
    # HubSpot's documented example, with this relay's domains and emailId.
    doc = {
        "emailId": ORDER,
        "message": {
            "to": "a@x.com",
            "from": "Name <s@example.com>",
            "sendId": "order-42",
            "replyTo": ["r@x.com"],
            "cc": ["c@x.com"],
            "bcc": ["b@x.com"],
        },
        "contactProperties": {"firstname": "Ada", "last_paid_date": "2022-03-01"},
        "customProperties": {"order_id": "42", "items": [{"k": "v"}]},
    }
    reply = _send(relay, doc, bearer(env.password))
    assert reply.status == 200, reply.body
    view = reply.json()
    # The answer reflects the send at that moment: queued, or already delivered on a fast run.
    assert (view["status"], view["sendResult"]) in {("PROCESSING", "QUEUED"), ("COMPLETE", "SENT")}
    assert view["requestedAt"].endswith("Z") and "startedAt" in view
    [captured] = env.sink.wait(1)
    assert captured.mail_from == "<s@example.com>"
    assert sorted(captured.rcpts) == ["<a@x.com>", "<b@x.com>", "<c@x.com>"]
    msg = parsed(captured)
    assert msg["Subject"] == "Order 42"
    assert msg["From"] == "Name <s@example.com>"
    assert msg["To"] == "a@x.com" and msg["Cc"] == "c@x.com" and msg["Reply-To"] == "r@x.com"
    assert "Bcc" not in msg and "b@x.com" not in captured.content.split("\n\n")[0]
    assert "Hi Ada, order 42" in captured.content
    final = wait_for(
        lambda: (
            (s := _status(relay, view["statusId"], bearer(env.password)))["status"] == "COMPLETE"
            and s
        ),
        what="COMPLETE status",
    )
    assert final["sendResult"] == "SENT"
    assert final["completedAt"] >= final["startedAt"]
    assert relay.metric("txmail_relay_messages_accepted_total", {"token": "app1"}) == 1


def test_basic_auth_and_v1_property_lists(env: RelayEnv, b_password: str) -> None:
    relay = _start(env, b_password)
    doc = send_request()
    doc["contactProperties"] = [{"name": "firstname", "value": "Bo"}]
    reply = _send(relay, doc, basic(env.username, env.password))
    assert reply.status == 200, reply.body
    [captured] = env.sink.wait(1)
    assert "Hi Bo, order 42" in captured.content


def test_send_id_is_idempotent_even_across_a_restart(env: RelayEnv, b_password: str) -> None:
    relay = _start(env, b_password)
    doc = send_request(sendId="once")
    first = _send(relay, doc, bearer(env.password)).json()
    again = _send(relay, doc, bearer(env.password))
    assert again.status == 200
    assert again.json()["statusId"] == first["statusId"]
    assert again.json()["sendResult"] == "IDEMPOTENT_IGNORE"
    # Another token may use the same sendId for its own send.
    b_doc = send_request(sendId="once", **{"from": "b@tenant-b.com"})
    b_doc["emailId"] = OTHER
    b_reply = _send(relay, b_doc, bearer(b_password))
    assert b_reply.status == 200 and b_reply.json()["statusId"] != first["statusId"]
    env.sink.wait(2)
    wait_for(
        lambda: _status(relay, first["statusId"], bearer(env.password))["status"] == "COMPLETE",
        what="first send complete",
    )
    relay.stop()
    env.threads.remove(relay)
    relay = env.start(relay.settings_path)
    after = _send(relay, doc, bearer(env.password)).json()
    assert after["statusId"] == first["statusId"]
    assert after["sendResult"] == "IDEMPOTENT_IGNORE" and after["status"] == "COMPLETE"
    # A marker send proves the queue is flowing: exactly one mail per sendId got out.
    _send(relay, send_request(sendId="marker"), bearer(env.password))
    messages = env.sink.wait(3)
    assert len(messages) == 3
    assert sum("buyer@dest.test" in "".join(m.rcpts) for m in messages) == 3


def test_tokens_are_isolated_by_namespace(env: RelayEnv, b_password: str) -> None:
    relay = _start(env, b_password)
    # B cannot use A's email (it looks exactly like an unknown email) ...
    b_doc = send_request(**{"from": "b@tenant-b.com"})
    reply = _send(relay, b_doc, bearer(b_password))
    assert reply.status == 400
    assert reply.json()["sendResult"] == "MISSING_CONTENT"
    assert reply.json()["errors"][0]["in"] == "emailId"
    unknown = _send(relay, {**b_doc, "emailId": 999_999}, bearer(b_password))
    assert unknown.json()["message"].replace("999999", str(ORDER)) == reply.json()["message"]
    # ... nor A's From domain, nor read A's statuses.
    a_status = _send(relay, send_request(), bearer(env.password)).json()["statusId"]
    other = http(
        relay.api_port,
        "GET",
        f"/marketing/v3/email/send-statuses/{a_status}",
        headers=bearer(b_password),
    )
    assert other.status == 404
    assert other.json()["category"] == "OBJECT_NOT_FOUND"
    spoof = _send(
        relay,
        {**b_doc, "emailId": OTHER, "message": {"to": "x@dest.test", "from": "boss@example.com"}},
        bearer(b_password),
    )
    assert spoof.status == 400 and spoof.json()["sendResult"] == "INVALID_FROM_ADDRESS"


def _mutate(**changes: Any) -> dict[str, Any]:
    doc = send_request()
    for key, value in changes.items():
        if key.startswith("message_"):
            doc["message"][key.removeprefix("message_").replace("_", "")] = value
        elif value is _DROP:
            doc.pop(key)
        else:
            doc[key] = value
    return doc


_DROP = object()

VALIDATION_CASES: list[tuple[str, Any, str, str]] = [
    ("not an object", [1, 2], "body", "VALIDATION_FAILED"),
    ("no emailId", _mutate(emailId=_DROP), "emailId", "VALIDATION_FAILED"),
    ("emailId not a number", _mutate(emailId="abc"), "emailId", "VALIDATION_FAILED"),
    ("emailId a boolean", _mutate(emailId=True), "emailId", "VALIDATION_FAILED"),
    ("unknown emailId", _mutate(emailId=999), "emailId", "MISSING_CONTENT"),
    ("no message", _mutate(message=_DROP), "message", "VALIDATION_FAILED"),
    ("no to", {"emailId": ORDER, "message": {}}, "message.to", "INVALID_TO_ADDRESS"),
    ("bad to", _mutate(message_to="not an address"), "message.to", "INVALID_TO_ADDRESS"),
    ("role abuse@", _mutate(message_to="abuse@dest.test"), "message.to", "INVALID_TO_ADDRESS"),
    ("role noreply@", _mutate(message_to="noreply@dest.test"), "message.to", "INVALID_TO_ADDRESS"),
    (
        "role no-reply@",
        _mutate(message_to="No-Reply@dest.test"),
        "message.to",
        "INVALID_TO_ADDRESS",
    ),
    (
        "role postmaster@",
        _mutate(message_to="postmaster@dest.test"),
        "message.to",
        "INVALID_TO_ADDRESS",
    ),
    (
        "from other domain",
        _mutate(message_from="x@evil.test"),
        "message.from",
        "INVALID_FROM_ADDRESS",
    ),
    ("from garbage", _mutate(message_from="<<>>"), "message.from", "INVALID_FROM_ADDRESS"),
    ("from not a string", _mutate(message_from=5), "message.from", "INVALID_FROM_ADDRESS"),
    ("bad cc", _mutate(message_cc=["x"]), "message.cc", "VALIDATION_FAILED"),
    ("bad bcc", _mutate(message_bcc="y@"), "message.bcc", "VALIDATION_FAILED"),
    ("bad replyTo", _mutate(message_replyTo=[3]), "message.replyTo", "VALIDATION_FAILED"),
    ("sendId not a string", _mutate(message_sendId=7), "message.sendId", "VALIDATION_FAILED"),
    ("sendId too long", _mutate(message_sendId="x" * 300), "message.sendId", "VALIDATION_FAILED"),
    (
        "contactProperties a string",
        _mutate(contactProperties="x"),
        "contactProperties",
        "VALIDATION_FAILED",
    ),
    (
        "customProperties a number",
        _mutate(customProperties=1),
        "customProperties",
        "VALIDATION_FAILED",
    ),
    (
        "missing contact property",
        {**_mutate(emailId=STRICT), "contactProperties": {}},
        "contactProperties",
        "MISSING_TEMPLATE_PROPERTIES",
    ),
    (
        "missing custom property",
        {**_mutate(emailId=STRICT), "customProperties": {}},
        "customProperties",
        "MISSING_TEMPLATE_PROPERTIES",
    ),
    ("sandbox escape", _mutate(emailId=ESCAPE), "emailId", "TEMPLATE_RENDER_EXCEPTION"),
    (
        "too many recipients",
        _mutate(message_bcc=[f"u{i}@dest.test" for i in range(100)]),
        "message",
        "TOO_MANY_RECIPIENTS",
    ),
]


def test_every_validation_error_is_a_400_naming_the_field(env: RelayEnv, b_password: str) -> None:
    relay = _start(env, b_password)
    for name, doc, field, result in VALIDATION_CASES:
        reply = _send(relay, doc, bearer(env.password))
        assert reply.status == 400, (name, reply.body)
        body = reply.json()
        assert body["status"] == "error" and body["category"] == "VALIDATION_ERROR", name
        assert body["errors"][0]["in"] == field, (name, body)
        assert body["sendResult"] == result, (name, body)
        assert body["correlationId"]
    raw = http(relay.api_port, "POST", SEND_PATH, raw=b"{nope", headers=bearer(env.password))
    assert raw.status == 400 and raw.json()["errors"][0]["in"] == "body"
    missing = _send(
        relay, {**_mutate(emailId=STRICT), "contactProperties": {}}, bearer(env.password)
    )
    assert "contact.firstname" in missing.json()["message"]
    # Nothing was sent, and a refused sendId is not burnt.
    ok = _send(relay, send_request(sendId="retry-me", to="x@dest.test"), bearer(env.password))
    assert ok.status == 200
    assert (
        _send(relay, send_request(sendId="retry-me"), bearer(env.password)).json()["sendResult"]
        == "IDEMPOTENT_IGNORE"
    )
    assert len(env.sink.wait(1)) == 1


def test_authentication_failures_and_throttling(env: RelayEnv, b_password: str) -> None:
    relay = _start(env, b_password, limits={"ipAuthFailures": 3, "ipAuthWindow": 60})
    for headers in ({}, bearer("wrong"), basic(env.username, "wrong"), {"Authorization": "x"}):
        reply = _send(relay, send_request(), headers)
        assert reply.status in (401, 429)
    reply = _send(relay, send_request(), bearer(env.password))
    assert reply.status == 429
    assert reply.json()["sendResult"] == "THROTTLED"
    assert relay.metric("txmail_relay_auth_failures_total") == 3


def test_unknown_status_is_404(env: RelayEnv, b_password: str) -> None:
    relay = _start(env, b_password)
    reply = http(
        relay.api_port,
        "GET",
        "/marketing/v3/email/send-statuses/nope",
        headers=bearer(env.password),
    )
    assert reply.status == 404


def test_no_secrets_or_bodies_in_logs(
    env: RelayEnv, b_password: str, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    caplog.set_level(logging.DEBUG)
    relay = _start(env, b_password)
    marker = secrets.token_hex(8)
    doc = send_request()
    doc["customProperties"] = {"order_id": marker}
    assert _send(relay, doc, bearer(env.password)).status == 200
    assert _send(relay, doc, basic(env.username, env.password)).status == 200
    _send(relay, doc, bearer("wrong-" + marker))
    env.sink.wait(2)
    relay.stop()
    env.threads.remove(relay)
    text = "\n".join(f"{r.getMessage()} {vars(r)}" for r in caplog.records)
    assert env.password not in text
    assert marker not in text
    assert "Bearer" not in text and "Basic " not in text


def test_concurrent_repeats_of_a_send_id_send_once(env: RelayEnv, b_password: str) -> None:
    from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415

    relay = _start(env, b_password)
    doc = send_request(sendId="race")
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda _: _send(relay, doc, bearer(env.password)), range(8)))
    assert all(r.status == 200 for r in replies)
    assert len({r.json()["statusId"] for r in replies}) == 1
    assert sum(r.json()["sendResult"] != "IDEMPOTENT_IGNORE" for r in replies) == 1
    _send(relay, send_request(sendId="after-race"), bearer(env.password))
    assert len(env.sink.wait(2)) == 2


def test_the_operators_scheduler_credential_sends_every_namespaces_template(
    env: RelayEnv, b_password: str
) -> None:
    """spec.send goes through this API with the operator's per-relay credential."""
    scheduler = secrets.token_urlsafe(32)
    creds = [
        credential(env.username, env.password),
        credential(
            "txmail-scheduler-relay", scheduler, domains=["example.com", "tenant-b.com"]
        ).model_copy(update={"namespace": "", "scheduler": True}),
    ]
    relay = env.start(env.settings(credentials=creds, overrides={"templates": _templates()}))
    for email_id, sender in ((ORDER, "s@example.com"), (OTHER, "s@tenant-b.com")):
        doc = {**send_request(sendId=f"s-{email_id}", **{"from": sender}), "emailId": email_id}
        reply = _send(relay, doc, bearer(scheduler))
        assert reply.status == 200, reply.body
    # An ordinary token still sees only its own namespace's emails.
    refused = _send(relay, {**send_request(), "emailId": OTHER}, bearer(env.password))
    assert refused.json()["sendResult"] == "MISSING_CONTENT"
    assert len(env.sink.wait(2)) == 2
