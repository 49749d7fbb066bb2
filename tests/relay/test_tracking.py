"""Click/open tracking: sealed tokens, HTML and MIME rewriting, and the HTTP constants."""

from __future__ import annotations

import base64
import email
import email.policy
import re
from email.message import EmailMessage

import pytest

from txmail_relay.mail.compose import MAX_LINE_OCTETS, build_message, to_bytes
from txmail_relay.templates.policy import Rendered
from txmail_relay.tracking.links import TrackedLink, rewrite_html, rewrite_message
from txmail_relay.tracking.tokens import (
    CLICK_HEADERS,
    MAX_URL_BYTES,
    PIXEL_HEADERS,
    TRANSPARENT_GIF,
    Click,
    TrackingKeys,
    new_event_id,
    trackable_url,
)

BASE = "https://t.example.com"
KEY1 = b"1" * 32
KEY2 = b"2" * 32
EVENT = bytes(range(16))
CLICK_RE = re.compile(r"https://t\.example\.com/c/([A-Za-z0-9_-]+)")
OPEN_RE = re.compile(r'<img src="https://t\.example\.com/o/([A-Za-z0-9_-]+)\.gif"')


@pytest.fixture
def keys() -> TrackingKeys:
    return TrackingKeys({1: KEY1}, current=1)


def raw(token: str) -> bytes:
    return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def tokens(html: str) -> list[str]:
    return CLICK_RE.findall(html)


# --- tokens --------------------------------------------------------------------------------


def test_click_token_round_trip(keys: TrackingKeys) -> None:
    token = keys.sign_click(EVENT, 7, "https://shop.example/a?b=1&c=2#d")
    assert keys.verify_click(token) == "https://shop.example/a?b=1&c=2#d"
    assert keys.click(token) == Click(EVENT, 7, "https://shop.example/a?b=1&c=2#d", 1)
    assert re.fullmatch(r"[A-Za-z0-9_-]+", token)


def test_open_token_round_trip(keys: TrackingKeys) -> None:
    token = keys.sign_open(EVENT)
    assert keys.verify_open(token) == EVENT
    assert keys.verify_open(token + ".gif") == EVENT


def test_click_tokens_are_opaque(keys: TrackingKeys) -> None:
    """The target URL is encrypted: personal data in a link never shows in the token."""
    url = "https://shop.example/orders/42?email=alice%40example.org"
    token = keys.sign_click(EVENT, 0, url)
    data = raw(token)
    for part in (b"shop.example", b"orders/42", b"alice", b"example.org"):
        assert part not in data
    assert keys.sign_click(EVENT, 0, url) != token  # a fresh IV every time
    assert keys.verify_click(token) == url


def test_tokens_do_not_cross_kinds(keys: TrackingKeys) -> None:
    assert keys.verify_open(keys.sign_click(EVENT, 0, "https://a.example/")) is None
    assert keys.verify_click(keys.sign_open(EVENT)) is None


def test_every_flipped_bit_is_rejected(keys: TrackingKeys) -> None:
    token = keys.sign_click(EVENT, 3, "https://a.example/x")
    data = raw(token)
    for i in range(len(data)):
        for bit in (0x01, 0x80):
            tampered = bytearray(data)
            tampered[i] ^= bit
            assert keys.verify_click(b64(bytes(tampered))) is None, (i, bit)


@pytest.mark.parametrize(
    "mangle",
    [
        lambda t: t[:-1],
        lambda t: t[1:],
        lambda t: t + "A",
        lambda t: t + "=",
        lambda t: t + "==",
        lambda t: t[:10] + "." + t[10:],
        lambda t: t[:10] + "+" + t[11:],
        lambda t: t.swapcase(),
        lambda t: "",
        lambda t: "A" * 20,
        lambda t: "A" * 100_000,
    ],
)
def test_malformed_tokens_are_rejected(keys: TrackingKeys, mangle: object) -> None:
    token = keys.sign_click(EVENT, 0, "https://a.example/")
    assert callable(mangle)
    assert keys.verify_click(mangle(token)) is None
    assert keys.verify_open(mangle(keys.sign_open(EVENT))) is None


def test_non_canonical_base64_is_rejected(keys: TrackingKeys) -> None:
    token = keys.sign_open(EVENT)  # 49 bytes: the last character carries 4 unused bits
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(token[-1])
    twin = token[:-1] + alphabet[last | 1 if last % 2 == 0 else last - 1]
    assert raw(twin) == raw(token)
    assert keys.verify_open(twin) is None


def test_a_token_for_one_url_cannot_redirect_elsewhere(keys: TrackingKeys) -> None:
    good = raw(keys.sign_click(EVENT, 0, "https://shop.example/"))
    evil = raw(keys.sign_click(EVENT, 0, "https://evil.example/"))
    header, tag = good[:21], good[-16:]
    candidates = [
        header + b"https://evil.example/" + tag,  # URL swapped, tag kept
        evil[:-16] + tag,  # tag moved onto another body
        header + b"https://shop.example/@evil.example" + tag,  # URL extended
        header + b"https://shop.example" + tag,  # URL truncated
        good[:19] + b"\x00\x01" + good[21:],  # another link index
    ]
    for forged in candidates:
        assert keys.verify_click(b64(forged)) is None


def test_key_rotation(keys: TrackingKeys) -> None:
    old_token = keys.sign_click(EVENT, 0, "https://a.example/")
    rotated = TrackingKeys({1: KEY1, 2: KEY2}, current=2)
    new_token = rotated.sign_click(EVENT, 0, "https://a.example/")
    assert raw(new_token)[2] == 2  # signed with the new key id
    assert rotated.verify_click(old_token) == "https://a.example/"  # delivered mail still works
    assert rotated.verify_click(new_token) == "https://a.example/"
    retired = TrackingKeys({2: KEY2}, current=2)
    assert retired.verify_click(old_token) is None  # key id 1 is unknown now
    assert keys.verify_click(new_token) is None  # key id 2 unknown to the old ring
    wrong_key = TrackingKeys({1: KEY2}, current=1)
    assert wrong_key.verify_click(old_token) is None


def test_tokens_stay_short_enough_for_links(keys: TrackingKeys) -> None:
    """49 bytes plus the URL (format 2 took 53): an open token is 66 characters."""
    url = "https://shop.example.com/o/42"
    assert len(keys.sign_open(EVENT)) == 66
    assert len(keys.sign_click(EVENT, 3, url)) == 104  # ceil((49 + 29) * 4 / 3)
    assert len(raw(keys.sign_click(EVENT, 3, url))) == 49 + len(url)


# Made by the format-2 code (AES-256-CTR + HMAC-SHA256) before format 3, with KEY1 as kid 1:
# a click on https://shop.example.com/o/42 (link 3) and an open, both for EVENT.
LEGACY_CLICK = (
    "AmMBAAECAwQFBgcICQoLDA0ODwADrREGeDWlyneI45SM5as-z5q0HMrf_1W3DrfZxG-f7qNOK8pqWCxgopAsnUJewXz"
    "aNkW38m8Gm8rq85bQqQ"
)
LEGACY_OPEN = "Am8BAAECAwQFBgcICQoLDA0ODwAAPGpOK7HWez9dMl4us2wzFJGZ7-r7figlEqnnaQ8nZXo"


def test_format_2_tokens_verify_until_their_key_is_retired(keys: TrackingKeys) -> None:
    """Mail delivered before the AEAD format keeps its links working while kid 1 stays."""
    url = "https://shop.example.com/o/42"
    assert keys.click(LEGACY_CLICK) == Click(EVENT, 3, url, 1)
    assert keys.verify_open(LEGACY_OPEN + ".gif") == EVENT
    rotated = TrackingKeys({1: KEY1, 2: KEY2}, current=2)
    assert rotated.verify_click(LEGACY_CLICK) == url
    assert rotated.verify_open(LEGACY_OPEN) == EVENT
    assert raw(rotated.sign_open(EVENT))[0] == 3  # never written again
    retired = TrackingKeys({2: KEY2}, current=2)
    assert retired.verify_click(LEGACY_CLICK) is None
    assert retired.verify_open(LEGACY_OPEN) is None
    assert TrackingKeys({1: KEY2}, current=1).verify_click(LEGACY_CLICK) is None
    assert keys.verify_open(LEGACY_CLICK) is None  # kinds do not cross
    assert keys.verify_click(LEGACY_OPEN) is None


def test_tampered_format_2_tokens_are_rejected(keys: TrackingKeys) -> None:
    data = raw(LEGACY_CLICK)
    for i in range(len(data)):
        tampered = bytearray(data)
        tampered[i] ^= 0x01
        assert keys.verify_click(b64(bytes(tampered))) is None, i
    as_format_3 = bytes([3]) + data[1:]  # the same bytes read as an AEAD token
    assert keys.verify_click(b64(as_format_3)) is None


@pytest.mark.parametrize(
    ("ring", "current"),
    [({1: b"short"}, 1), ({256: KEY1}, 256), ({-1: KEY1}, -1), ({1: KEY1}, 2)],
)
def test_key_ring_is_validated(ring: dict[int, bytes], current: int) -> None:
    with pytest.raises(ValueError):
        TrackingKeys(ring, current)


@pytest.mark.parametrize(
    "url",
    ["javascript:alert(1)", "/relative", "mailto:a@b.example", "//evil.example/", "data:x"],
)
def test_only_absolute_http_urls_can_be_signed(keys: TrackingKeys, url: str) -> None:
    with pytest.raises(ValueError):
        keys.sign_click(EVENT, 0, url)


def test_wrong_event_id_length_is_refused(keys: TrackingKeys) -> None:
    with pytest.raises(ValueError):
        keys.sign_open(b"short")


def test_tokens_carry_no_recipient_data(keys: TrackingKeys) -> None:
    out = build_message(
        Rendered("s", '<a href="https://shop.example/">x</a>', None),
        from_address="shop@example.com",
        to=["alice.secret@example.org"],
    )
    event = new_event_id()
    result = rewrite_message(out.message, BASE, keys, event)
    html = result.message.get_body(("html",))
    assert html is not None
    found = tokens(html.get_content()) + OPEN_RE.findall(html.get_content())
    assert len(found) == 2
    for token in found:
        data = raw(token)
        assert b"alice" not in data and b"example.org" not in data
        assert event in data  # only the random event id identifies the send
    assert new_event_id() != new_event_id()
    assert len(new_event_id()) == 16


# --- URLs ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("href", "expected"),
    [
        ("https://a.example/x", "https://a.example/x"),
        ("HTTP://A.example/x", "HTTP://A.example/x"),
        ("  https://a.example/x \n", "https://a.example/x"),
        ("https://a.example/caf\u00e9 x", "https://a.example/caf%C3%A9%20x"),
        ("https://a.example/unsubscribe?u=1", None),
        ("https://a.example/x\ny", None),
        ("https://\u00e9.example/", None),
        ("https:///path", None),
        ("ftp://a.example/", None),
        ("javascript:alert(1)", None),
        ("#top", None),
        ("", None),
        ("https://a.example/" + "x" * MAX_URL_BYTES, None),
    ],
)
def test_trackable_url(href: str, expected: str | None) -> None:
    assert trackable_url(href) == expected


# --- HTML ------------------------------------------------------------------------------------


def rewrite(keys: TrackingKeys, html: str, **kw: bool) -> tuple[str, list[TrackedLink]]:
    return rewrite_html(html, BASE + "/", keys, EVENT, **kw)


def test_rewrites_links_and_keeps_everything_else(keys: TrackingKeys) -> None:
    html = (
        "<!DOCTYPE html>\n<html><head><style>a { color: red }</style></head>\n"
        '<body class="x">\n'
        "<A HREF='https://a.example/1?x=1&amp;y=2' Class=Big>one</A>\n"
        '<a class=x href=https://a.example/2 title="t">two</a>\n'
        '<a\n  href = "https://a.example/1?x=1&amp;y=2"\n>again</a>\n'
        '<map><area shape="rect" href="https://a.example/area"></map>\n'
        "</body>\n</html>\n"
    )
    out, links = rewrite(keys, html)
    assert links == [
        TrackedLink(0, "https://a.example/1?x=1&y=2"),
        TrackedLink(1, "https://a.example/2"),
        TrackedLink(2, "https://a.example/1?x=1&y=2"),
        TrackedLink(3, "https://a.example/area"),
    ]
    found = tokens(out)
    assert [keys.verify_click(t) for t in found] == [link.url for link in links]
    assert [keys.click(t).link_index for t in found] == [0, 1, 2, 3]  # type: ignore[union-attr]
    # Undo the href edits and the pixel: the rest of the document is byte for byte the same.
    restored = re.sub(
        r'<img src="[^"]+" width="1" height="1" alt="" style="display:none">', "", out
    )
    originals = iter(
        [
            "'https://a.example/1?x=1&amp;y=2'",
            "https://a.example/2",
            '"https://a.example/1?x=1&amp;y=2"',
            '"https://a.example/area"',
        ]
    )
    restored = re.sub(
        r'"https://t\.example\.com/c/[A-Za-z0-9_-]+"', lambda m: next(originals), restored
    )
    assert restored == html


@pytest.mark.parametrize(
    "link",
    [
        '<a href="mailto:a@b.example">m</a>',
        '<a href="tel:+15551234">t</a>',
        '<a href="/relative">r</a>',
        '<a href="relative/page">r</a>',
        '<a href="#top">t</a>',
        '<a href="javascript:alert(1)">j</a>',
        '<a href="//a.example/proto-relative">p</a>',
        '<a href="https://a.example/unsubscribe">u</a>',
        '<a href="https://a.example/x" data-txmail-track="false">o</a>',
        '<a data-txmail-track="FALSE" href="https://a.example/x">o</a>',
        "<a href>empty</a>",
        '<a name="anchor">n</a>',
        '<link href="https://a.example/style.css">',
        '<img src="https://a.example/i.png">',
        '<!-- <a href="https://a.example/comment">c</a> -->',
        "<script>var s = '<a href=\"https://a.example/script\">';</script>",
        '<style>/* <a href="https://a.example/style"> */</style>',
        '<a href="https://a.example/' + "x" * MAX_URL_BYTES + '">long</a>',
    ],
)
def test_links_left_alone(keys: TrackingKeys, link: str) -> None:
    html = f"<html><body>{link}</body></html>"
    out, links = rewrite(keys, html, opens=False)
    assert (out, links) == (html, [])


def test_very_long_urls_are_tracked_up_to_the_limit(keys: TrackingKeys) -> None:
    url = "https://a.example/" + "x" * 3000
    out, links = rewrite(keys, f'<a href="{url}">x</a>', opens=False)
    assert links == [TrackedLink(0, url)]
    assert keys.verify_click(tokens(out)[0]) == url


def test_first_href_wins_like_in_browsers(keys: TrackingKeys) -> None:
    out, links = rewrite(
        keys, '<a href="https://a.example/first" href="https://a.example/second">x</a>'
    )
    assert links == [TrackedLink(0, "https://a.example/first")]
    assert 'href="https://a.example/second"' in out


def test_entities_in_urls_are_decoded(keys: TrackingKeys) -> None:
    out, links = rewrite(keys, '<a href="https://a.example/?a=1&amp;b=&quot;2&quot;&#x20;">x</a>')
    assert links[0].url == 'https://a.example/?a=1&b="2"'  # trailing space trimmed
    assert keys.verify_click(tokens(out)[0]) == links[0].url


def test_pixel_goes_before_the_closing_body_tag(keys: TrackingKeys) -> None:
    html = "<html><BODY><p>x</p><!-- </body> --></BODY></html>"
    out, _ = rewrite(keys, html)
    match = OPEN_RE.search(out)
    assert match is not None
    assert out.endswith('style="display:none"></BODY></html>')
    assert out.startswith("<html><BODY><p>x</p><!-- </body> --><img ")
    assert keys.verify_open(match.group(1)) == EVENT
    assert '<img src="https://t.example.com/o/' in out
    assert 'width="1" height="1" alt="" style="display:none">' in out


def test_pixel_is_appended_without_a_body(keys: TrackingKeys) -> None:
    out, _ = rewrite(keys, "<p>fragment</p>")
    assert out.startswith("<p>fragment</p><img ")


def test_clicks_and_opens_can_be_turned_off(keys: TrackingKeys) -> None:
    html = '<body><a href="https://a.example/">x</a></body>'
    only_opens, links = rewrite(keys, html, clicks=False)
    assert links == [] and 'href="https://a.example/"' in only_opens
    assert OPEN_RE.search(only_opens)
    only_clicks, links = rewrite(keys, html, opens=False)
    assert len(links) == 1 and not OPEN_RE.search(only_clicks)


@pytest.mark.parametrize("base", ["ftp://t.example", "https://t.example/?q=1", "/relative", ""])
def test_bad_base_url_is_refused(keys: TrackingKeys, base: str) -> None:
    with pytest.raises(ValueError):
        rewrite_html("<p>x</p>", base, keys, EVENT)


# --- messages --------------------------------------------------------------------------------


def message(html: str, text: str | None = "plain https://a.example/") -> EmailMessage:
    return build_message(
        Rendered("s", html, text), from_address="shop@example.com", to=["a@example.org"]
    ).message


def reparse(msg: EmailMessage) -> EmailMessage:
    data = to_bytes(msg)
    assert max(len(line) for line in data.split(b"\r\n")) <= MAX_LINE_OCTETS
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    return parsed


def html_of(msg: EmailMessage) -> str:
    part = msg.get_body(("html",))
    assert part is not None
    content: str = part.get_content()
    return content


@pytest.mark.parametrize("cte", ["quoted-printable", "base64", "8bit", "7bit"])
def test_rewrites_html_parts_in_any_transfer_encoding(keys: TrackingKeys, cte: str) -> None:
    html = '<html><body><p>Grüße</p><a href="https://a.example/é">x</a></body></html>'
    msg = EmailMessage(policy=email.policy.SMTP)
    msg["From"] = "shop@example.com"
    msg.set_content("text part https://a.example/")
    msg.add_alternative(html, subtype="html", cte=cte if cte != "7bit" else "8bit")
    original = msg.as_bytes()
    result = rewrite_message(msg, BASE, keys, EVENT)
    assert not result.failed
    assert result.links == (TrackedLink(0, "https://a.example/%C3%A9"),)
    assert msg.as_bytes() == original  # the input is not modified
    parsed = reparse(result.message)
    new_html = html_of(parsed)
    assert "<p>Grüße</p>" in new_html
    assert keys.verify_click(tokens(new_html)[0]) == "https://a.example/%C3%A9"
    assert len(OPEN_RE.findall(new_html)) == 1
    text = parsed.get_body(("plain",))
    assert text is not None and text.get_content().strip() == "text part https://a.example/"


def test_long_single_line_html_stays_within_998_octets(keys: TrackingKeys) -> None:
    links = "".join(f'<a href="https://a.example/{i}">{"é" * 50}</a>' for i in range(100))
    result = rewrite_message(message("<body>" + links + "</body>"), BASE, keys, EVENT)
    assert not result.failed
    assert len(result.links) == 100
    parsed = reparse(result.message)
    assert len(tokens(html_of(parsed))) == 100


def test_one_pixel_and_continuous_link_indexes_across_html_parts(keys: TrackingKeys) -> None:
    msg = EmailMessage(policy=email.policy.SMTP)
    msg.set_content('<a href="https://a.example/1">1</a>', subtype="html")
    msg.add_related('<a href="https://a.example/2">2</a>', subtype="html")
    msg.add_attachment(
        '<a href="https://a.example/att">a</a>', subtype="html", filename="page.html"
    )
    result = rewrite_message(msg, BASE, keys, EVENT)
    assert not result.failed
    assert [link.url for link in result.links] == ["https://a.example/1", "https://a.example/2"]
    data = to_bytes(result.message).decode()
    assert data.count("/o/") == 1
    attachment = next(p for p in result.message.walk() if p.get_filename() == "page.html")
    assert "https://a.example/att" in attachment.get_content()


def test_failures_return_the_original_message(keys: TrackingKeys) -> None:
    msg = message('<a href="https://a.example/">x</a>')
    result = rewrite_message(msg, "not a url", keys, EVENT)
    assert result.failed and result.message is msg and result.links == ()
    assert result.error is not None and "base URL" in result.error

    legacy = email.message_from_bytes(to_bytes(msg))  # compat32 Message, not EmailMessage
    result = rewrite_message(legacy, BASE, keys, EVENT)  # type: ignore[arg-type]
    assert result.failed and result.message is legacy


def test_html_the_parser_refuses_is_left_untracked(keys: TrackingKeys) -> None:
    html = '<![bogus[ <a href="https://a.example/">x</a>'
    with pytest.raises(ValueError, match="parse"):
        rewrite_html(html, BASE, keys, EVENT)
    msg = message(html)
    result = rewrite_message(msg, BASE, keys, EVENT)
    assert result.failed and result.message is msg


def test_nothing_to_do_returns_the_message(keys: TrackingKeys) -> None:
    msg = message("<p>x</p>")
    result = rewrite_message(msg, BASE, keys, EVENT, clicks=False, opens=False)
    assert result.message is msg and not result.failed


# --- HTTP side -------------------------------------------------------------------------------


def test_transparent_gif() -> None:
    assert len(TRANSPARENT_GIF) == 43
    assert TRANSPARENT_GIF.startswith(b"GIF89a\x01\x00\x01\x00")
    assert TRANSPARENT_GIF.endswith(b";")
    assert PIXEL_HEADERS["Content-Type"] == "image/gif"
    assert PIXEL_HEADERS["Content-Length"] == "43"


def test_response_headers() -> None:
    assert CLICK_HEADERS["Referrer-Policy"] == "no-referrer"
    assert PIXEL_HEADERS["Cache-Control"] == "no-store"
    assert PIXEL_HEADERS["Referrer-Policy"] == "no-referrer"
    with pytest.raises(TypeError):
        CLICK_HEADERS["Location"] = "https://evil.example/"  # type: ignore[index]
