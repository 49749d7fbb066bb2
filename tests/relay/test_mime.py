"""MIME building: structure, encodings, line lengths and header injection."""

from __future__ import annotations

import email
import email.policy
from datetime import UTC, datetime, timedelta, timezone
from email.message import EmailMessage
from typing import Any

import pytest

from txmail_relay.mail.compose import (
    MAX_LINE_OCTETS,
    POLICY,
    HeaderInjectionError,
    MimeError,
    Outgoing,
    address,
    build_message,
    to_bytes,
)
from txmail_relay.templates.policy import Rendered, Templates

NOW = datetime(2025, 3, 1, 12, 30, tzinfo=UTC)


def build(rendered: Rendered | None = None, **kw: Any) -> Outgoing:
    args: dict[str, Any] = {
        "from_address": "shop@example.com",
        "to": ["alice@example.org"],
        "id_token": "0123456789abcdef",
        "now": NOW,
    }
    args.update(kw)
    return build_message(rendered or Rendered("Hi", "<p>Hi</p>", "Hi"), **args)


def parse(data: bytes) -> EmailMessage:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def body(msg: EmailMessage, kind: str) -> str:
    part = msg.get_body((kind,))
    assert part is not None and part.get_content_type() == f"text/{kind}"
    content: str = part.get_content()
    return content.replace("\r\n", "\n")


def lines(data: bytes) -> list[bytes]:
    assert data.endswith(b"\r\n")
    assert b"\n" not in data.replace(b"\r\n", b"")  # CRLF only, no bare CR or LF
    return data.split(b"\r\n")


def test_both_parts_parse_back_with_non_ascii() -> None:
    rendered = Rendered("Grüße, Jürgen ✓", "<p>Grüße — 東京</p>\n", "Grüße — 東京\n")
    out = build(rendered, from_name="Ünïcode Shop", cc=["carol@example.org"])
    msg = parse(to_bytes(out.message))
    assert msg.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in msg.iter_parts()] == ["text/plain", "text/html"]
    assert body(msg, "plain") == "Grüße — 東京\n"
    assert body(msg, "html") == "<p>Grüße — 東京</p>\n"
    assert msg["Subject"] == "Grüße, Jürgen ✓"
    assert msg["From"] == "Ünïcode Shop <shop@example.com>"
    assert msg["To"] == "alice@example.org"
    assert msg["Cc"] == "carol@example.org"
    assert msg["MIME-Version"] == "1.0"
    for part in msg.iter_parts():
        assert part.get_content_charset() == "utf-8"
        assert part["MIME-Version"] is None  # only on the top level


def test_wire_form_is_ascii_with_qp_or_base64() -> None:
    data = to_bytes(build(Rendered("Ünï", "<p>é</p>", "é")).message)
    assert data.isascii()
    encodings = {p["Content-Transfer-Encoding"] for p in parse(data).iter_parts()}
    assert encodings <= {"quoted-printable", "base64", "7bit"}
    assert "8bit" not in data.decode().lower()


@pytest.mark.parametrize(
    ("html", "text", "content_type"),
    [("<p>x</p>", None, "text/html"), (None, "x", "text/plain"), ("<p>x</p>", "", "text/html")],
)
def test_single_part_when_only_one_exists(
    html: str | None, text: str | None, content_type: str
) -> None:
    msg = parse(to_bytes(build(Rendered("s", html, text)).message))
    assert msg.get_content_type() == content_type
    assert not msg.is_multipart()


def test_no_content_is_an_error() -> None:
    with pytest.raises(MimeError):
        build(Rendered("s", None, ""))


@pytest.mark.parametrize("char", ["a", "é", "\u6771"])
def test_long_single_line_html_is_wrapped_to_998_octets(char: str) -> None:
    html = "<p>" + char * 5000 + "</p>"
    data = to_bytes(build(Rendered("s", html, "t" * 5000)).message)
    assert max(len(line) for line in lines(data)) <= MAX_LINE_OCTETS
    msg = parse(data)
    assert body(msg, "html") == html + "\n"
    assert body(msg, "plain") == "t" * 5000 + "\n"


def test_message_id_uses_the_sender_domain_and_injected_token() -> None:
    out = build(id_token=None, make_id_token=lambda: "feedc0ffee123456")
    assert out.message_id == "<feedc0ffee123456@example.com>"
    msg = parse(to_bytes(out.message))
    assert msg["Message-ID"] == out.message_id
    assert msg["Date"] == "Sat, 01 Mar 2025 12:30:00 +0000"


def test_random_message_ids_differ() -> None:
    first = build(id_token=None).message_id
    assert first != build(id_token=None).message_id
    assert first.endswith("@example.com>")


@pytest.mark.parametrize("token", ["short", "has space 123", "a>b@c<d12345", "x" * 200])
def test_bad_message_id_tokens_are_refused(token: str) -> None:
    with pytest.raises(MimeError):
        build(id_token=token)


def test_date_keeps_the_given_offset_and_must_be_aware() -> None:
    tz = timezone(timedelta(hours=2))
    msg = parse(to_bytes(build(now=datetime(2025, 3, 1, 14, 30, tzinfo=tz)).message))
    assert msg["Date"] == "Sat, 01 Mar 2025 14:30:00 +0200"
    with pytest.raises(MimeError):
        build(now=datetime(2025, 3, 1))


def test_bcc_is_only_in_the_envelope() -> None:
    out = build(
        to=["a@example.org", "b@example.org"],
        cc=["c@example.org", "a@example.org"],
        bcc=["secret@example.org"],
        reply_to=["help@example.com"],
    )
    assert out.recipients == (
        "a@example.org",
        "b@example.org",
        "c@example.org",
        "secret@example.org",
    )
    data = to_bytes(out.message)
    assert b"secret" not in data
    msg = parse(data)
    assert "Bcc" not in msg
    assert msg["Reply-To"] == "help@example.com"
    assert msg["To"] == "a@example.org, b@example.org"


# --- header injection (S8) -----------------------------------------------------------------


def header_names(data: bytes) -> list[str]:
    return [name.lower() for name in parse(data)]


INJECTIONS = [
    "Hello\r\nBcc: evil@attacker.example",
    "Hello\nBcc: evil@attacker.example",
    "Hello\rBcc: evil@attacker.example",
    "Hello\r\n\r\n<html>body</html>",
    "Hello\u2028Bcc: evil@attacker.example",
    "Hello\x85Bcc: evil@attacker.example",
    "Hello\x0bBcc: evil@attacker.example",
    "Grüße\r\nBcc: evil@attacker.example",
]


@pytest.mark.parametrize("subject", INJECTIONS)
def test_subject_cannot_add_a_header(subject: str) -> None:
    data = to_bytes(build(Rendered(subject, "<p>x</p>", None)).message)
    names = header_names(data)
    assert "bcc" not in names
    assert names.count("subject") == 1
    assert "\n" not in parse(data)["Subject"]
    assert b"evil" not in data.split(b"\r\n\r\n", 1)[1]  # nothing leaked into the body


@pytest.mark.parametrize("value", INJECTIONS)
def test_rendered_property_in_subject_cannot_add_a_header(value: str) -> None:
    rendered = Templates().render(
        Rendered("Order for {{ contact.name }}", "<p>x</p>", None), {"name": value}, {}
    )
    data = to_bytes(build(rendered).message)
    assert "bcc" not in header_names(data)


@pytest.mark.parametrize("name", INJECTIONS)
def test_sender_name_cannot_add_a_header(name: str) -> None:
    data = to_bytes(build(from_name=name).message)
    assert "bcc" not in header_names(data)
    assert header_names(data).count("from") == 1


@pytest.mark.parametrize(
    "addr",
    [
        "alice@example.org\r\nBcc: evil@attacker.example",
        "alice@example.org\nBcc: evil@attacker.example",
        "alice@example.org, evil@attacker.example",
        "Alice <alice@example.org>",
        "alice@example.org\x00",
        "alice @example.org",
        "alice",
        "@example.org",
        "alice@",
        "alïce@example.org",
    ],
)
def test_invalid_addresses_are_refused(addr: str) -> None:
    with pytest.raises(MimeError):
        address(addr)
    for field in ("to", "cc", "bcc", "reply_to"):
        kw: dict[str, Any] = {field: [addr]}
        with pytest.raises(MimeError):
            build(**kw)
    with pytest.raises(MimeError):
        build(from_address=addr)


def test_extra_headers_are_checked() -> None:
    msg = parse(to_bytes(build(headers={"X-Campaign": "spring"}).message))
    assert msg["X-Campaign"] == "spring"
    with pytest.raises(HeaderInjectionError):
        build(headers={"X-Campaign": "a\r\nBcc: evil@attacker.example"})
    for name in ("Bcc", "Subject", "Content-Type", "X Bad", "X:Bad", "X-\u00e9"):
        with pytest.raises(MimeError):
            build(headers={name: "v"})


def test_serialising_refuses_a_raw_header_with_a_line_break() -> None:
    msg = build().message
    msg.set_raw("X-Raw", "a\r\nBcc: evil@attacker.example")  # bypasses the value checks
    with pytest.raises(HeaderInjectionError):
        to_bytes(msg)
    with pytest.raises(HeaderInjectionError):
        msg.as_string(policy=POLICY)


def test_long_subject_is_folded() -> None:
    subject = "Your order " + "é" * 300
    data = to_bytes(build(Rendered(subject, "<p>x</p>", None)).message)
    head = data.split(b"\r\n\r\n", 1)[0]
    assert max(len(line) for line in head.split(b"\r\n")) <= 78
    assert parse(data)["Subject"] == subject


def test_unbreakable_long_header_is_encoded_not_overlong() -> None:
    msg = build().message
    msg.set_raw("X-Long", "x" * 1200)
    data = to_bytes(msg)
    assert max(len(line) for line in lines(data)) <= 78
    assert parse(data)["X-Long"] == "x" * 1200


def test_overlong_lines_are_refused_when_serialising() -> None:
    msg = build(Rendered("s", None, "x")).message
    msg.set_payload("y" * 1200)  # a 7bit body line nobody wrapped
    with pytest.raises(MimeError, match="998"):
        to_bytes(msg)
