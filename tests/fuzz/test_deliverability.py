"""Fuzz targets for the deliverability parsers (hypothesis): the relay's DKIM signing helpers
(what they sign verifies, From always covered), the operator's DKIM/DMARC record parsers and
SPF verdict, and the contract's rate and warm-up math. Profiles: tests/fuzz/conftest.py
(``make fuzz`` runs thousands of examples).
"""

from __future__ import annotations

import base64
import math
import quopri
import re
from datetime import UTC, datetime, timedelta

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from dkim.util import parse_tag_value
from hypothesis import example, given
from hypothesis import strategies as st
from pydantic import ValidationError

from txmail_operator.api.dns import RecordPurpose, RecordResult, RecordType
from txmail_operator.api.shaping import ShapingLimits as SpecShapingLimits
from txmail_operator.builders.dkim import RSA, public_record
from txmail_operator.builders.dns_records import TXT_STRING_MAX, DnsRecord, txt_strings
from txmail_operator.reconcile.dns import Answer, RecordCheck, dkim_tags, dmarc_tags, spf_verdict
from txmail_relay.contract import (
    SHAPING_RATE,
    DkimAlgorithm,
    ShapingLimits,
    WarmupConfig,
    rate_per_second,
)
from txmail_relay.delivery.dkim import sign_message
from txmail_relay.mail.dkim import (
    SigningKey,
    canonical,
    crlf,
    from_domain,
    include_headers,
    signed_for,
)

# ONE key for the module: RSA generation is slow. 2048 bits, the operator's default.
_PRIVATE = rsa.generate_private_key(public_exponent=65537, key_size=2048)
KEY = SigningKey(
    "fuzz",
    DkimAlgorithm.RSA_SHA256,
    _PRIVATE.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    ),
)
SPKI = _PRIVATE.public_key().public_bytes(
    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
)


# -- DKIM signing: arbitrary bytes ---------------------------------------------------------------

raw_messages = st.one_of(
    st.binary(max_size=600),
    st.lists(
        st.sampled_from(
            [
                *(b"From", b"From :", b"from\t:", b"DKIM-Signature:", b"Subject :", b"To:"),
                *(b" a@b.test", b" d=example.com;", b" v=1; d=", b"\r\n", b"\n", b"\r", b" "),
                *(b"\r\n\r\n", b"\n\n", b":", b";", b"=", b"\x00", b"\xff", b"\xc3\xa9", b"."),
            ]
        )
        | st.binary(max_size=8),
        max_size=40,
    ).map(b"".join),
)


@given(raw_messages, st.sampled_from(["example.com", "EXAMPLE.com.", "", "b.test"]))
@example(b"From : a@b.test\r\n\r\n", "b.test")
@example(b"DKIM-Signature: d=\xff\r\n\r\n", "example.com")
def test_dkim_helpers_never_raise(message: bytes, domain: str) -> None:
    found = from_domain(message)
    assert found is None or found == found.lower()
    signed_for(message, domain)
    assert all(name == name.lower() for name in include_headers(message))
    assert include_headers(message).count(b"from") >= 1  # always oversigned
    lines = crlf(message)
    assert re.search(rb"\r(?!\n)|(?<!\r)\n", lines) is None
    once = canonical(message)
    assert canonical(once) == once


# -- DKIM signing: what the relay signs verifies ------------------------------------------------

LABEL = st.from_regex(r"\A[a-zA-Z0-9]([a-zA-Z0-9-]{0,20}[a-zA-Z0-9])?\Z")
DOMAIN = st.lists(LABEL, min_size=1, max_size=3).map(lambda ls: ".".join([*ls, "test"]))
LOCAL = st.from_regex(r"\A[a-zA-Z0-9!#$%&'*+/=?^_`{|}~-]{1,20}(\.[a-zA-Z0-9_-]{1,8})?\Z")
# Field names (RFC 5322 ftext) that are none of the ones the test places itself.
OTHER_NAME = st.from_regex(r"\A[!-9;-~]{1,20}\Z").filter(
    lambda n: (
        n.lower() not in {"from", "dkim-signature", "sender", "resent-from"}
        and not n.startswith(">")
    )
)
TEXT = st.text(
    st.characters(codec="utf-8", exclude_categories=["Cc", "Cs", "Zl", "Zp"]), max_size=60
)
SEPARATOR = st.sampled_from([":", ": ", " :", "\t:", "  : "])
EOL = st.sampled_from(["\r\n", "\n"])


@st.composite
def header_field(draw: st.DrawFn, name: str | st.SearchStrategy[str], value: str) -> str:
    title = name if isinstance(name, str) else draw(name)
    text = draw(SEPARATOR) + value
    if draw(st.booleans()) and " " in value.strip():  # folded at a space
        at = value.strip().index(" ")
        text = draw(SEPARATOR) + value.strip()[:at] + draw(EOL) + "\t" + value.strip()[at:]
    return title + text + draw(EOL)


@st.composite
def body_part(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["text", "long", "dots", "8bit", "base64", "qp"]))
    payload = draw(st.binary(max_size=300))
    eol = draw(EOL).encode()
    if kind == "text":
        return draw(TEXT).encode() + eol
    if kind == "long":
        return b"x" * draw(st.integers(990, 2_500)) + eol
    if kind == "dots":
        return b"".join(b"." * draw(st.integers(1, 3)) + draw(TEXT).encode() + eol for _ in "ab")
    if kind == "8bit":
        return payload.replace(b"\r", b"").replace(b"\n", b"") + eol
    if kind == "base64":
        return base64.encodebytes(payload).replace(b"\n", eol)
    return quopri.encodestring(payload).replace(b"\n", eol) + eol


@st.composite
def signable_message(draw: st.DrawFn) -> tuple[bytes, str]:
    """A message as an app submits it and the domain of its one From."""
    domain = draw(DOMAIN)
    mailbox = f"{draw(LOCAL)}@{domain}"
    author = draw(st.sampled_from([mailbox, f"<{mailbox}>", f"App <{mailbox}>"]))
    fields = [draw(header_field(st.sampled_from(["From", "from", "FROM"]), author))]
    fields += [
        draw(header_field("Subject", draw(TEXT).strip() or "hi")),
        draw(header_field("To", f"rcpt@{draw(DOMAIN)}")),
        draw(header_field("Date", "Tue, 01 Dec 2026 12:00:00 +0000")),
        draw(header_field("Message-ID", f"<{draw(LOCAL)}@{domain}>")),
    ]
    for _ in range(draw(st.integers(0, 4))):
        fields.append(draw(header_field(OTHER_NAME, draw(TEXT).strip() or "v")))
    mime = draw(st.booleans())
    if mime:
        fields += ["MIME-Version: 1.0\r\n", 'Content-Type: multipart/mixed; boundary="b0"\r\n']
    fields = draw(st.permutations(fields))
    eol = draw(EOL).encode()
    parts = draw(st.lists(body_part(), max_size=4))
    if mime:
        body = b"".join(b"--b0" + eol + eol + p for p in parts) + b"--b0--" + eol
    else:
        body = b"".join(parts)
    return "".join(fields).encode() + eol + body, domain.lower()


def _verified(message: bytes, domain: str, record: bytes) -> bool:
    """dkimpy's verdict, the key found at the selector's name under ``domain`` only."""
    name = f"{KEY.selector}._domainkey.{domain}.".encode()
    return bool(dkim.verify(message, dnsfunc=lambda n, timeout=5: record if n == name else None))


@given(signable_message())
@example((b"From : App <a@b.test>\r\nSubject :  x\r\n\r\n.\r\n", "b.test"))
@example((b"From:a@b.test\n\n" + b"y" * 2000 + b"\n\xff\xfe\n", "b.test"))
def test_signed_messages_verify_and_cover_from(case: tuple[bytes, str]) -> None:
    message, domain = case
    # As DkimSigner does: the domain and the already-signed check on the message as submitted,
    # then sign_message (canonical, one From for dkimpy, include_headers, signature).
    assert from_domain(message) == domain
    assert not signed_for(message, domain)
    done = sign_message(message, domain, [KEY])
    assert done is not None, "dkimpy would not see exactly one From"
    sent, [(_, field)] = done
    assert isinstance(field, bytes), field
    assert sent == canonical(message)
    tags = parse_tag_value(field.split(b":", 1)[1])
    assert tags[b"d"] == domain.encode()
    signed = [h.strip().lower() for h in tags[b"h"].split(b":")]
    assert signed.count(b"from") == 2  # the one From, oversigned
    record = public_record(domain, KEY.selector, RSA, SPKI).value.encode()
    assert _verified(field + sent, domain, record)


hostile_field = st.tuples(
    st.sampled_from(["To", "Subject", "X-A", "Sender", " From", "FROM ", "from", ">From", ""]),
    st.sampled_from([":", " :", "\t:", ""]),
    st.lists(
        st.sampled_from(["a@b.test", "c@d.test", "<", ">", ",", ";", '"', "(", ")", " "])
        | st.text(max_size=3),
        max_size=6,
    ).map("".join),
    st.sampled_from(["\r\n", "\n", "\r", "\r\n ", "\n\t", "\r\n\r\n"]),
).map("".join)
# Hostile fields around one plausible From, so that many examples are ones the relay signs.
hostile_headers = st.tuples(
    st.lists(hostile_field, max_size=3),
    st.sampled_from(["From", "from", "From ", "FROM\t"]),
    st.sampled_from([":", ": "]),
    st.sampled_from(["a@b.test", "<a@b.test>", "A <a@b.test>", '"a, b" <a@b.test>', "a@B.test"]),
    st.sampled_from(["\r\n", "\n", "\r", "\r\n "]),
    st.lists(hostile_field, max_size=3),
).map(
    lambda t: ("".join(t[0]) + "".join(t[1:5]) + "".join(t[5]) + "\r\nbody\r\n").encode(
        "utf-8", "surrogateescape"
    )
)


@given(st.one_of(hostile_headers, raw_messages))
@example(b"From: a@b.test\r\n From: c@d.test\r\n\r\n")
@example(b"From : a@b.test\nFrom\t: c@d.test\n\n")
def test_whatever_the_relay_signs_verifies(message: bytes) -> None:
    """On any bytes: when DkimSigner would sign (one From at one domain, not signed yet, one
    From for dkimpy), the signature verifies for that domain and covers the From."""
    domain = from_domain(message)
    if domain is None or signed_for(message, domain):
        return
    done = sign_message(message, domain, [KEY])
    if done is None:
        return
    sent, [(_, field)] = done
    if not isinstance(field, bytes):  # a domain dkimpy cannot sign for (IDNA): sent unsigned
        return
    record = public_record(domain, KEY.selector, RSA, SPKI).value.encode()
    assert _verified(field + sent, domain.encode("idna").decode(), record)


# -- DKIM and DMARC records as the operator reads them ------------------------------------------

records_text = st.one_of(
    st.text(max_size=300),
    st.lists(
        st.sampled_from(["v=DKIM1", "v=DMARC1", "p=", "k=rsa", ";", "=", " ", "\t", "V =dmarc1"])
        | st.text(max_size=6),
        max_size=20,
    ).map("".join),
)


@given(records_text)
@example("=;=;")
@example("v=DMARC1")
@example(";;v=DMARC1; p=reject")
def test_record_parsers_never_raise(value: str) -> None:
    tags = dkim_tags(value)
    assert all(name == name.strip().lower() for name in tags)
    dmarc = dmarc_tags(value)
    assert dmarc is None or all(name == name.strip().lower() for name in dmarc)


SPACE = st.text(st.sampled_from(" \t"), max_size=3)


@given(
    st.binary(min_size=16, max_size=600),
    st.lists(SPACE, min_size=6, max_size=6),
    st.sampled_from(["", ";", "; "]),
)
@example(SPKI, [""] * 6, "")
def test_dkim_tags_give_back_the_published_key(key: bytes, spaces: list[str], end: str) -> None:
    """Whatever key: its record, split into 255-byte strings as published and joined as a
    resolver does (dnspython's strings, concatenated), with white space around ``;`` and
    ``=`` as a DNS host may write it, reads back as the same p=."""
    record = public_record("example.com", "s1", RSA, key)
    p = record.value.partition("p=")[2]
    a, b, c, d, e, f = spaces
    written = f"{a}v{b}={c}DKIM1{d};{e}k={f}rsa{a};{b}p{c}={d}{p}{e}{end}{f}"
    strings = txt_strings(written)
    assert all(len(s.encode()) <= TXT_STRING_MAX for s in strings)
    joined = "".join(strings)
    assert dkim_tags(joined)["p"] == p == base64.b64encode(key).decode()
    assert dkim_tags(joined)["k"] == "rsa"
    assert dkim_tags(record.value) == {"v": "DKIM1", "k": "rsa", "p": p}


SPF_RESULTS = ["pass", "fail", "softfail", "neutral", "none", "permerror", "temperror"]
ADDRESS = st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)).map(str)


@given(
    st.sampled_from([RecordPurpose.SPF, RecordPurpose.RETURN_PATH_SPF]),
    DOMAIN,
    ADDRESS,
    st.lists(st.sampled_from(["v=spf1 -all", "v=spf1", "V=SPF1 a", "x"]) | st.text(max_size=20)),
    st.none() | st.text(max_size=20),
    st.sampled_from(SPF_RESULTS),
    st.text(max_size=40),
)
def test_spf_verdict_is_total(
    purpose: RecordPurpose,
    domain: str,
    address: str,
    values: list[str],
    failure: str | None,
    result: str,
    explanation: str,
) -> None:
    record = DnsRecord(domain, RecordType.TXT, f"v=spf1 ip4:{address} ~all", purpose, domain)
    check = spf_verdict(record, address, Answer(tuple(values), failure), result, explanation)
    assert isinstance(check, RecordCheck)
    assert (check.result is RecordResult.VERIFIED) == (result == "pass")


# -- the contract: shaping rates and warm-up ---------------------------------------------------


@given(st.from_regex(SHAPING_RATE, fullmatch=True))
@example("0.1/h")
@example("0." + "0" * 26 + "1/h")
def test_a_valid_rate_is_positive(text: str) -> None:
    """Any rate the CRD (pattern, 32 characters at most) and so the relay accept is a finite
    number of messages per second above zero."""
    try:
        SpecShapingLimits.model_validate({"rate": text})
    except ValidationError:
        assert len(text) > 32
        return
    rate = ShapingLimits.model_validate({"rate": text}).rate
    assert rate == text
    assert 0.0 < rate_per_second(text) < math.inf


@given(st.text(max_size=40))
def test_rate_text_parses_or_refuses(text: str) -> None:
    try:
        rate = rate_per_second(text)
    except ValueError:
        return
    assert 0.0 < rate < math.inf


START = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
)
SCHEDULE = st.lists(st.integers(1, 10_000_000), max_size=60)


@given(
    st.booleans(),
    SCHEDULE,
    START | st.none(),
    st.lists(st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=400)), max_size=8),
)
def test_warmup_budget_is_a_schedule_entry_and_days_go_forward(
    enabled: bool, volumes: list[int], start: datetime | None, steps: list[timedelta]
) -> None:
    config = WarmupConfig.model_validate(
        {"enabled": enabled, "dailyVolumes": volumes, "startedAt": start}
    )
    now = start or datetime(2026, 12, 1, tzinfo=UTC)
    previous = 0
    for step in [timedelta(0), *steps]:
        now += step
        day = config.day(now)
        assert day >= max(1, previous)
        previous = day
        budget = config.budget(day)
        assert budget is None or budget in volumes
        if not (enabled and volumes) or (start is not None and day > len(volumes)):
            assert budget is None
        else:
            assert budget == volumes[day - 1]
        if config.done(now):
            assert budget is None
        elif config.active and start is not None:
            assert budget is not None
        assert 0 <= config.percentage(now) <= 100
