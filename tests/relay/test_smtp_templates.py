"""SMTP template sends: X-Txmail-Email-Id + X-Txmail-Properties (or a JSON body)."""

from __future__ import annotations

import json
import secrets
import smtplib
from typing import Any

import pytest

from relay.relaykit import RelayEnv, RelayThread, credential, parsed, template_doc

MINE = 7
THEIRS = 8


@pytest.fixture
def relay(env: RelayEnv) -> RelayThread:
    settings = env.settings(
        credentials=[credential(env.username, env.password)],
        overrides={"templates": [template_doc(MINE), template_doc(THEIRS, namespace="other")]},
    )
    return env.start(settings)


def _message(email_id: int, *, header: dict[str, Any] | None, body: str = "ignored") -> bytes:
    lines = [
        "From: Shop <shop@example.com>",
        "To: Ada <ada@dest.test>",
        "Cc: carl@dest.test",
        "Subject: not used",
        f"X-Txmail-Email-Id: {email_id}",
    ]
    if header is not None:
        lines.append(f"X-Txmail-Properties: {json.dumps(header)}")
    return ("\r\n".join(lines) + "\r\n\r\n" + body + "\r\n").encode()


PROPS = {"contactProperties": {"firstname": "Ada"}, "customProperties": {"order_id": "9"}}


def test_header_properties_render_the_template(env: RelayEnv, relay: RelayThread) -> None:
    with env.client(relay) as smtp:
        smtp.sendmail(
            "shop@example.com",
            ["ada@dest.test", "carl@dest.test", "hidden@dest.test"],
            _message(MINE, header=PROPS),
        )
    [captured] = env.sink.wait(1)
    msg = parsed(captured)
    assert msg["Subject"] == "Order 9"
    assert msg["To"] == "ada@dest.test" and msg["Cc"] == "carl@dest.test"
    assert "hidden@dest.test" not in str(msg)  # the third recipient is a Bcc
    assert sorted(captured.rcpts) == ["<ada@dest.test>", "<carl@dest.test>", "<hidden@dest.test>"]
    assert "X-Txmail" not in captured.content and "not used" not in captured.content
    assert "Hi Ada, order 9" in captured.content
    assert (
        relay.metric(
            "txmail_relay_smtp_template_sends_total", {"token": "app1", "result": "QUEUED"}
        )
        == 1
    )


def test_json_body_carries_the_properties(env: RelayEnv, relay: RelayThread) -> None:
    with env.client(relay) as smtp:
        smtp.sendmail(
            "shop@example.com",
            ["ada@dest.test"],
            _message(MINE, header=None, body=json.dumps(PROPS)),
        )
    [captured] = env.sink.wait(1)
    assert "Hi Ada, order 9" in captured.content


@pytest.mark.parametrize(
    ("email_id", "header", "reply"),
    [
        (THEIRS, PROPS, "MISSING_CONTENT"),  # another namespace's email
        (999, PROPS, "MISSING_CONTENT"),
        (MINE, {"customProperties": {"order_id": "1"}}, "MISSING_TEMPLATE_PROPERTIES"),
        (MINE, ["not", "an", "object"], "VALIDATION_FAILED"),
    ],
)
def test_refused_template_sends(
    env: RelayEnv, relay: RelayThread, email_id: int, header: Any, reply: str
) -> None:
    with env.client(relay) as smtp, pytest.raises(smtplib.SMTPDataError) as refused:
        smtp.sendmail("shop@example.com", ["ada@dest.test"], _message(email_id, header=header))
    assert refused.value.smtp_code == 550
    error = refused.value.smtp_error
    assert reply in (error.decode() if isinstance(error, bytes) else error)


def test_role_recipient_is_refused(env: RelayEnv, relay: RelayThread) -> None:
    body = _message(MINE, header=PROPS).replace(b"To: Ada <ada@dest.test>", b"To: abuse@dest.test")
    with env.client(relay) as smtp, pytest.raises(smtplib.SMTPDataError) as refused:
        smtp.sendmail("shop@example.com", ["abuse@dest.test"], body)
    assert refused.value.smtp_code == 550
    assert b"INVALID_TO_ADDRESS" in refused.value.smtp_error
    # Plain (non-template) mail is unaffected and still relayed as is.
    marker = secrets.token_hex(4)
    with env.client(relay) as smtp:
        smtp.sendmail(
            "shop@example.com",
            ["x@dest.test"],
            f"From: shop@example.com\r\nTo: x@dest.test\r\nSubject: {marker}\r\n\r\n"
            f"hi\r\nEND-OF-MESSAGE\r\n".encode(),
        )
    [captured] = env.sink.wait(1)
    assert marker in captured.content


def test_a_template_send_over_smtp_is_received_with_esmtpsa(
    env: RelayEnv, relay: RelayThread
) -> None:
    with env.client(relay) as smtp:
        smtp.sendmail("shop@example.com", ["ada@dest.test"], _message(MINE, header=PROPS))
    [captured] = env.sink.wait(1)
    [received] = [
        " ".join(str(v).split()) for v in parsed(captured).get_all("Received") if "txmail" in v
    ]
    assert "([127.0.0.1]) by relay.test (txmail) with ESMTPSA;" in received
