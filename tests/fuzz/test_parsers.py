"""Fuzz targets for the relay's parsers (hypothesis): whatever the input, no exception but the
documented refusal, and the From policy never accepts what a receiver would read as another
domain. Profiles: tests/fuzz/conftest.py (``make fuzz`` runs thousands of examples).
"""

from __future__ import annotations

import email.policy
import json
import re
import secrets
from email.headerregistry import AddressHeader
from email.message import EmailMessage
from email.parser import BytesParser
from email.utils import getaddresses
from typing import Any

from hypothesis import assume, example, given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from txmail_relay.config.live import DynamicConfig
from txmail_relay.contract import CredentialEntry, PasswordDigest, RelayConfig
from txmail_relay.http.api import _Invalid, parse_send
from txmail_relay.ingress.complaints import InvalidReportError, parse_report
from txmail_relay.mail.addresses import (
    MAX_VALUE_LENGTH,
    AddressError,
    _parse_mailboxes,
    addr_specs,
    mailboxes,
)
from txmail_relay.mail.compose import MimeError, address, build_message, to_bytes
from txmail_relay.mail.headers import header_fields
from txmail_relay.mail.submission import ORIGINATOR_FIELDS, parse_submission
from txmail_relay.metrics import RelayMetrics
from txmail_relay.sending.composer import Composer
from txmail_relay.sending.model import SendRequest
from txmail_relay.sending.policy import (
    Accepted,
    Rejected,
    SendError,
    check_content,
    check_header_from,
    property_refusal,
)
from txmail_relay.sending.smtp_templates import template_request
from txmail_relay.templates.policy import Rendered, RenderError, Templates, validate
from txmail_relay.tracking.links import rewrite_html, rewrite_message
from txmail_relay.tracking.tokens import MAX_URL_BYTES, TrackingKeys, trackable_url

ALLOWED = "example.com"  # the token's one domain; tenant-b.com is the relay's too, not its
CONFIG = DynamicConfig(
    relay=RelayConfig.model_validate(
        {
            "dedicatedIP": "127.0.0.1",
            "address": "127.0.0.1",
            "hostname": "relay.test",
            "domains": [ALLOWED, "tenant-b.com"],
        }
    )
)
ENTRY = CredentialEntry(
    username="app1",
    namespace="apps",
    token="app1",
    digests=[PasswordDigest(sha256="0" * 64, generation=1)],
    allowed_from_domains=[ALLOWED],
    email_campaign_id=1,
)
KEYS = TrackingKeys({1: secrets.token_bytes(32), 2: secrets.token_bytes(32)}, current=2)
EVENT_ID = secrets.token_bytes(16)

# -- strategies: fragments that hostile headers are made of -----------------------------------

ADDRESSES = [
    "app@example.com",
    "app@EXAMPLE.com",
    "boss@evil.test",
    "boss@tenant-b.com",
    "0@",
    "@evil.test",
    "a@evil.test@example.com",
    "app@example.com.",
    "app@[127.0.0.1]",
]
PUNCTUATION = [
    *(",", ";", ":", "<", ">", '"', "(", ")", "\\", "@", ".", "[", "]", " ", "\t", ""),
    *("=?utf-8?q?", "=40", "?=", "=?utf-8?b?", "Ö", "\x00", "\x7f", "\u2028"),
]
BREAKS = ["\r\n", "\r", "\n", "\r\n ", "\r\n\t", "\n ", "\r\n\r\n"]
NAMES = [
    *("From", "from", "FROM", "From ", "From\t", " From", "Sender", "Resent-From"),
    *("Resent-Sender", "To", "Cc", "Reply-To", "Subject", "Message-ID", "X-Txmail-Email-Id"),
    *("Fr om", "From\x00", "DKIM-Signature", "X-Txmail-Properties", ">From"),
]
SEPARATORS = [":", " :", "\t:", ": ", "", "::"]

fragment = st.one_of(
    st.sampled_from(ADDRESSES),
    st.sampled_from(PUNCTUATION),
    st.text(st.characters(codec="utf-8"), max_size=4),
)
value = st.lists(fragment, max_size=12).map("".join)
field = st.tuples(
    st.sampled_from(NAMES), st.sampled_from(SEPARATORS), value, st.sampled_from(BREAKS)
)
header_section = st.lists(field, min_size=1, max_size=6).map(
    lambda fields: "".join(n + s + v + b for n, s, v, b in fields)
)
message_bytes = st.one_of(
    st.binary(max_size=400),
    st.tuples(header_section, st.sampled_from(BREAKS), st.text(max_size=40)).map(
        lambda t: ("".join(t)).encode("utf-8", "surrogateescape")
    ),
)


def _receiver_domains(content: bytes) -> list[str] | None:
    """The originator domains a receiver reads, modelled on the stdlib's lenient parser run
    on what the upstream gets (line endings made CRLF, as aiosmtplib does); None: it cannot
    read them at all."""
    normalised = re.sub(rb"\r\n|\n|\r(?!\n)", b"\r\n", content)
    try:
        msg = BytesParser(policy=email.policy.default).parsebytes(normalised, headersonly=True)
        found = []
        for name, raw in msg.raw_items():
            if name.strip().lower() not in {n.lower() for n in ORIGINATOR_FIELDS}:
                continue
            unfolded = re.sub(r"\r\n(?=[ \t])", "", raw)  # as a reader does
            header = email.policy.default.header_factory(name.strip(), unfolded)
            if isinstance(header, AddressHeader):
                found += [a.domain.lower() for a in header.addresses]
            found += [a.rpartition("@")[2].lower() for _, a in getaddresses([unfolded]) if "@" in a]
    except Exception:
        return None
    return found


# -- addresses ---------------------------------------------------------------------------------


@given(value)
@example('"')
@example("<")
@example(":;\x00")
@example("(" * 3_000)
@example("app@example.com; boss@evil.test")
def test_mailboxes_parse_cleanly_or_refuse(text: str) -> None:
    try:
        found = mailboxes(text)
    except AddressError:
        return
    assert found
    for mailbox in found:
        assert mailbox.domain == mailbox.domain.lower() and mailbox.domain.isascii()
        assert "@" not in mailbox.domain and mailbox.local_part
        # the second opinion agrees, by construction
        assert mailbox.addr_spec.lower() in [a.lower() for _, a in getaddresses([text])]


def _outcome(parse: Any, text: str) -> tuple[Any, ...] | str:
    try:
        return tuple(parse(text))
    except AddressError as e:
        return f"refused: {e}"


@given(value)
@example("App <app@example.com>")
@example("app@example.com; boss@evil.test")
def test_the_cached_verdict_is_the_parsers(text: str) -> None:
    """mailboxes() keeps its verdicts by value: the first and a repeated call give what the
    parsers give, a refusal included."""
    fresh = _outcome(_parse_mailboxes, text) if len(text) <= MAX_VALUE_LENGTH else None
    first, again = _outcome(mailboxes, text), _outcome(mailboxes, text)
    assert first == again
    if fresh is not None:
        assert first == fresh


@given(st.lists(value, max_size=3))
def test_addr_specs_never_raise(values: list[str]) -> None:
    assert all(isinstance(a, str) and a for a in addr_specs(values))


@given(st.one_of(value, st.sampled_from(ADDRESSES)))
@example("0@[@0")
def test_compose_address_validates_or_refuses(text: str) -> None:
    try:
        parsed = address(text)
    except MimeError:
        return
    assert parsed.addr_spec == text and parsed.domain


# -- header parsing and the From policy --------------------------------------------------------


@given(message_bytes)
@example(b"From: app@example.com\r\nFrom : boss@evil.test\r\n\r\nx")
@example(b"From: app@example.com; boss@evil.test\r\n\r\nx")
@example(b"From: <app@example.com> boss@evil.test\r\n\r\nx")
@example(b"From: app@example.com\rFrom: boss@tenant-b.com\r\n\r\nx")
def test_the_from_policy_never_accepts_another_domain(content: bytes) -> None:
    submission = parse_submission("app@example.com", ["user@dest.test"], content)
    verdict = check_header_from(CONFIG, ENTRY, submission.headers)
    assert isinstance(verdict, Accepted | Rejected)
    if isinstance(verdict, Rejected):
        assert verdict.reply[:3] in {"550", "553"}
        return
    assert submission.headers.from_domains
    assert set(submission.headers.from_domains) == {ALLOWED}
    fields = header_fields(content)
    assert fields.malformed is None and len(fields.get_all("From")) == 1
    receiver = _receiver_domains(content)
    if receiver is not None:  # what a lenient receiver reads is allowed too
        assert set(receiver) <= {ALLOWED}, (content, receiver)


@given(message_bytes)
def test_parsing_a_submission_never_raises(content: bytes) -> None:
    submission = parse_submission("app@example.com", ["ada@dest.test"], content)
    assert isinstance(check_content(content), Accepted | Rejected)
    if submission.headers.template is not None:
        try:
            request = template_request(submission)
        except SendError as e:
            assert e.rejected.reply.startswith("550 ")
        else:
            assert isinstance(request, SendRequest) and request.to


@given(st.binary(max_size=200))
def test_nul_is_refused_wherever_it_is(data: bytes) -> None:
    verdict = check_content(data)
    assert isinstance(verdict, Rejected) == (b"\x00" in data)


# -- ARF reports -------------------------------------------------------------------------------

ARF_TEMPLATE = (
    "From: feedback@isp.test\r\nMIME-Version: 1.0\r\n"
    'Content-Type: multipart/report; report-type=feedback-report; boundary="{b}"\r\n\r\n'
    "--{b}\r\nContent-Type: text/plain\r\n\r\n{text}\r\n"
    "--{b}\r\nContent-Type: message/feedback-report\r\n\r\n{fields}\r\n"
    "--{b}\r\nContent-Type: {original_type}\r\n\r\n{original}\r\n--{b}--\r\n"
)


@given(
    st.one_of(
        st.binary(max_size=600),
        st.builds(
            lambda b, text, fields, original_type, original: ARF_TEMPLATE.format(
                b=b, text=text, fields=fields, original_type=original_type, original=original
            ).encode("utf-8", "surrogateescape"),
            st.sampled_from(["b", "", '"', "b\r\n"]),
            st.text(max_size=20),
            st.lists(
                st.tuples(st.sampled_from([*NAMES, "Original-Rcpt-To", "Feedback-Type"]), value)
            ).map(lambda kv: "\r\n".join(f"{k}: {v}" for k, v in kv)),
            st.sampled_from(["message/rfc822", "text/rfc822-headers", "multipart/mixed"]),
            header_section,
        ),
    )
)
@example(
    b"Content-Type: multipart/report; report-type=feedback-report; boundary=a\r\n\r\n"
    + b"--a\r\nContent-Type: multipart/mixed; boundary=a\r\n\r\n" * 2_000
)
def test_arf_reports_parse_or_are_invalid(data: bytes) -> None:
    try:
        report = parse_report(data)
    except InvalidReportError:
        return
    assert report.original_message_id
    assert all(isinstance(r, str) and r for r in report.recipients)


# -- the single-send request model -------------------------------------------------------------

json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True),
    st.text(max_size=12),
    st.sampled_from(["²", "٣", "7", "0@[@0", "a@dest.test", "App <app@example.com>", "\ud800"]),
)


def _containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    )


json_value = st.recursive(json_leaf, _containers, max_leaves=20)
request_doc = st.fixed_dictionaries(
    {},
    optional={
        "emailId": st.one_of(json_leaf, st.just(7)),
        "message": st.fixed_dictionaries(
            {},
            optional={
                k: st.one_of(json_value, st.sampled_from(ADDRESSES))
                for k in ("to", "from", "cc", "bcc", "replyTo", "sendId")
            },
        ),
        "contactProperties": json_value,
        "customProperties": json_value,
    },
)


@given(st.one_of(json_value, request_doc))
@example({"emailId": "²", "message": {"to": "a@dest.test"}})
@example({"emailId": 7, "message": {"to": "0@[@0"}})
@example(json.loads("[" * 100 + "]" * 100))
def test_send_requests_parse_or_name_the_field(doc: Any) -> None:
    try:
        request = parse_send(doc, 100)
    except _Invalid as e:
        assert e.field and e.message
        return
    assert isinstance(request, SendRequest)
    assert 0 < request.email_id < 2**63 and len(request.to) == 1
    for props, where in (
        (request.contact_properties, "contactProperties"),
        (request.custom_properties, "customProperties"),
    ):
        assert property_refusal(dict(props), where) is None
        json.dumps(dict(props)).encode("utf-8")  # storable: no surrogates, not too deep


# -- the template validator and renderer -------------------------------------------------------

template_fragment = st.one_of(
    st.sampled_from(
        [
            *("{{", "}}", "{%", "%}", "{#", "#}", "(", ")", "[", "]", "{", "}", "|", "~", "-"),
            *(" if ", " for x in ", " endfor ", " endif ", " set ", "contact.", "custom.", "x"),
            *("'", '"', "__class__", "range(", ".format(", "*", "**", "%", "\n", "not ", "1"),
        ]
    ),
    st.text(max_size=3),
)
template_source = st.lists(template_fragment, max_size=30).map("".join)
TEMPLATES = Templates(cache_size=64)


@given(template_source, st.one_of(st.none(), template_source))
@example("{{ " + "(" * 3_000 + "1" + ")" * 3_000 + " }}", None)
@example("{% if " + "not " * 3_000 + "1 %}{% endif %}", None)
def test_the_template_validator_never_raises(subject: str, html: str | None) -> None:
    errors = validate(subject, html, "text")
    assert all(e.part in {"subject", "html"} and e.message for e in errors)


@given(template_source, st.dictionaries(st.text(max_size=6), json_value, max_size=3))
def test_rendering_raises_only_render_errors(source: str, custom: dict[str, Any]) -> None:
    class Source:
        subject = source
        html: str | None = source
        text: str | None = None

    try:
        rendered = TEMPLATES.render(Source(), {"firstname": "Ada"}, custom)
    except RenderError as e:
        assert e.send_result in {"TEMPLATE_RENDER_EXCEPTION", "MISSING_TEMPLATE_PROPERTIES"}
        return
    assert "\n" not in rendered.subject and "\r" not in rendered.subject


# -- link rewriting and tracking tokens --------------------------------------------------------

url_fragment = st.one_of(
    st.sampled_from(
        [
            *("https://", "http://", "HTTPS://", "javascript:", "//", "shop.example.com", "/"),
            *("?", "#", "&", "=", "%", "%2", " ", "\t", "\x00", "\u00e9", "unsubscribe", "@"),
            *("[::1]", ":8080", ":99999", "\\", '"', "'", "<", ">"),
        ]
    ),
    st.text(max_size=4),
)
url = st.lists(url_fragment, max_size=10).map("".join)


@given(url)
@example("https://shop.example.com/a b")
@example("https://[::1")
def test_trackable_urls_are_normalised_and_stable(href: str) -> None:
    target = trackable_url(href)
    if target is None:
        return
    assert target.isascii() and len(target) <= MAX_URL_BYTES
    assert trackable_url(target) == target  # signing requires a fixed point
    token = KEYS.sign_click(EVENT_ID, 3, target)
    assert KEYS.verify_click(token) == target


@given(st.text(max_size=120))
def test_tokens_that_were_not_signed_are_refused(token: str) -> None:
    assert KEYS.verify_click(token) is None
    assert KEYS.verify_open(token) is None


@given(st.integers(min_value=0, max_value=400), st.integers(min_value=0, max_value=255))
def test_a_tampered_token_is_refused(position: int, flip: int) -> None:
    token = KEYS.sign_click(EVENT_ID, 1, "https://shop.example.com/o/1")
    if position >= len(token) or not flip:
        return
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    changed = alphabet[(alphabet.index(token[position]) + flip) % len(alphabet)]
    tampered = token[:position] + changed + token[position + 1 :]
    if tampered != token:
        assert KEYS.verify_click(tampered) is None


html_fragment = st.one_of(
    st.sampled_from(
        [
            *("<a ", "<A ", "href=", "HREF=", '"', "'", ">", "</a>", "<body>", "</body>", "<"),
            *("<![x", "<!--", "-->", "<script>", "data-txmail-track=", "false", "&amp;", "/>"),
            *(" ", "\n", "\x00"),
        ]
    ),
    url,
)
html = st.lists(html_fragment, max_size=20).map("".join)


@given(html)
@example('<a href="https://shop.example.com/x">x</a><![bogus[')
def test_link_rewriting_refuses_or_tracks(source: str) -> None:
    try:
        rewritten, links = rewrite_html(source, "https://t.example.com", KEYS, EVENT_ID)
    except ValueError:
        return
    for link in links:
        assert trackable_url(link.url) == link.url
    for token in re.findall(r"https://t\.example\.com/c/([A-Za-z0-9_-]+)", rewritten):
        assert KEYS.verify_click(token) is not None


@given(html)
def test_rewriting_a_message_never_raises(source: str) -> None:
    msg = EmailMessage(policy=email.policy.default)
    msg["From"] = "app@example.com"
    msg["To"] = "ada@dest.test"
    try:
        msg.set_content(source, subtype="html")
    except ValueError:  # the email package refuses some bodies: not one the relay could get
        assume(False)
    result = rewrite_message(msg, "https://t.example.com", KEYS, EVENT_ID)
    assert result.failed or result.message is not msg


# -- tracked plain mail: the rewritten copy still passes the From policy -----------------------

TRACKING_CONFIG = DynamicConfig(
    relay=RelayConfig.model_validate(
        {
            **CONFIG.relay.model_dump(by_alias=True),
            "tracking": {"baseURL": "https://t.example.com"},
        }
    )
)


class _Keys:
    current = KEYS


COMPOSER = Composer(TEMPLATES, _Keys(), RelayMetrics(CollectorRegistry()))
HTML_PART = (
    "MIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
    '<p><a href="https://shop.example.com/o/1">order</a></p>\r\n'
)


comment_text = st.lists(
    st.one_of(
        st.sampled_from(["x" * 40, " ", "<boss@evil.test>", "boss@evil.test", "\\(", "\\)", ","]),
        st.sampled_from(["App", "=?utf-8?q?J=C3=B6?=", "\r\n ", ";", ":", "@"]),
        st.text(
            st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="()\\"),
            max_size=8,
        ),
    ),
    max_size=12,
).map("".join)
tracked_head = st.one_of(
    comment_text.map(lambda c: f"From: app@example.com ({c})\r\n"),
    comment_text.map(lambda c: f"From: App ({c}) <app@example.com>\r\n"),
    comment_text.map(lambda c: f'From: "{c}" <app@example.com>\r\n'),
    header_section,
)


@given(tracked_head)
@example("From : App <app@example.com>\r\n")
@example("From: app@example.com (" + "x" * 200 + ")\r\nTo: ada@dest.test\r\n")
def test_a_tracked_copy_passes_the_from_policy_like_the_original(head: str) -> None:
    content = (head + "To: ada@dest.test\r\n" + HTML_PART).encode("utf-8", "surrogateescape")
    submission = parse_submission("app@example.com", ["ada@dest.test"], content)
    assume(isinstance(check_header_from(CONFIG, ENTRY, submission.headers), Accepted))
    assume(check_content(content) == Accepted())
    for copy in COMPOSER.plain(TRACKING_CONFIG, submission):
        again = parse_submission("app@example.com", list(copy.recipients), copy.body)
        assert isinstance(check_header_from(CONFIG, ENTRY, again.headers), Accepted), copy.body
        assert set(again.headers.from_domains or ()) == {ALLOWED}
        receiver = _receiver_domains(copy.body)
        if receiver is not None:
            assert set(receiver) <= {ALLOWED}, (copy.body, receiver)


# -- composed mail: the From the relay writes reads as exactly the checked sender ------------

display_name = st.one_of(
    comment_text,
    st.text(max_size=120),
    st.lists(st.sampled_from(['"', "<boss@evil.test>", "x" * 30, ", ", "(", ")", " "])).map(
        "".join
    ),
)


@given(display_name)
@example("x" * 80 + " <boss@evil.test> " + "y" * 80)
@example("=?utf-8?q?boss=40evil.test?= ;" + "z" * 90)
def test_a_composed_from_reads_as_the_sender_only(name: str) -> None:
    rendered = Rendered("subject", None, "text")
    try:
        out = build_message(
            rendered, from_address="app@example.com", from_name=name, to=["u@d.test"]
        )
    except MimeError:
        return
    data = to_bytes(out.message)
    headers = parse_submission("app@example.com", ["u@d.test"], data).headers
    assert headers.from_domains == (ALLOWED,), (name, headers.from_problem)
    receiver = _receiver_domains(data)
    assert receiver is not None and set(receiver) == {ALLOWED}, (data[:300], receiver)
