"""Open and click tracking: sealed links, HTML rewriting, and the pure side of ``/c`` and ``/o``.

Token format 3 (stateless; checklist T1, T2, T4). A token is unpadded base64url of::

    header = version (1 byte, = 3) | kind (1 byte, 'c' click / 'o' open) | key id (1 byte)
             | event id (16 random bytes) | link index (2 bytes, big-endian; 0 for opens)
    | nonce (12 random bytes)
    | AES-256-GCM(key, nonce, target URL (clicks) or nothing (opens), associated data = header)
      (the ciphertext, then its 16-byte tag)

Tokens are opaque: the target URL is encrypted (a template's link may carry personal data
in its path or query), and the header, key id included, is authenticated as associated
data, so no field can be changed or moved to another key. The AEAD key is derived from the
ring key with HKDF-SHA256. Nonces are random: keep a key for fewer than 2**32 tokens (the
NIST bound for random 96-bit GCM nonces), far beyond any rotation period. Click links are
``<base>/c/<token>`` and the pixel is ``<base>/o/<token>.gif``. The event id is random per
message and recipient: the relay maps it to its own record of the send, so a token holds no
address or other personal data. Verification takes a key ring (key id -> key) so mail
signed with a retired key keeps working while the key stays in the ring; a bad, tampered,
unknown-key or wrong-kind token yields ``None``, never a redirect target. Even a valid
token only ever yields an absolute http(s) URL. Length: 49 bytes plus the URL (an open
token is 66 characters; format 2 took 53 bytes plus the URL, 71 characters).

Format 2 (AES-256-CTR then HMAC-SHA256, see :class:`_LegacyCtrHmac`) is still verified,
never written, so mail sent before the upgrade keeps working until its key is retired.

Rewriting (T3, T7, T8): only absolute http(s) ``href``\\ s of ``<a>``/``<area>`` are
rewritten; ``mailto:``, ``tel:``, relative, ``#anchor``, ``javascript:`` and unsubscribe
links, and links marked ``data-txmail-track="false"``, are left alone. The rest of the
document is kept byte for byte: ``html.parser`` finds the tags (so links in comments,
``<script>`` and ``<style>`` are skipped) and only the ``href`` value is replaced.
:func:`rewrite_message` rewrites decoded ``text/html`` parts and re-encodes them with lines
of at most 998 octets; on any error it returns the original message and the error, so
tracking never fails a delivery.

GET ``/c`` and ``/o`` must only record an event (scanners prefetch links, T5), answer a
bad token with 400, redirect with :data:`CLICK_HEADERS` and serve :data:`TRANSPARENT_GIF`
with :data:`PIXEL_HEADERS`.
"""

from __future__ import annotations

import base64
import binascii
import copy
import hashlib
import hmac
import html as htmllib
import re
import secrets
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from email.message import EmailMessage, Message
from html.parser import HTMLParser
from types import MappingProxyType
from typing import Final, TypeGuard
from urllib.parse import quote, urlsplit

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from txmail_relay.mail.compose import POLICY, to_bytes

VERSION: Final = 3
KIND_CLICK: Final = ord("c")
KIND_OPEN: Final = ord("o")
EVENT_ID_BYTES: Final = 16
TAG_BYTES: Final = 16
NONCE_BYTES: Final = 12
MIN_KEY_BYTES: Final = 32
MAX_URL_BYTES: Final = 4096
OPT_OUT_ATTRIBUTE: Final = "data-txmail-track"  # ="false" leaves the link alone

_HEADER = struct.Struct(">BBB16sH")
_MIN_TOKEN_BYTES = _HEADER.size + NONCE_BYTES + TAG_BYTES  # 49: an open token
_HKDF_INFO = b"txmail-tracking-v3 aead"
_B64URL = re.compile(r"[A-Za-z0-9_-]+")
_URL_CONTROLS = re.compile(r"[\x00-\x1f\x7f]")
_NEEDS_QUOTING = re.compile(r"[^\x21-\x7e]+")
_SKIP_WORDS = ("unsubscribe",)

#: 1x1 transparent GIF (43 bytes).
TRANSPARENT_GIF: Final = (
    b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00\x00\x00\x00"
    b",\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
)
#: Headers of the redirect answering a valid ``/c/<token>`` (the relay adds ``Location``).
CLICK_HEADERS: Final[Mapping[str, str]] = MappingProxyType(
    {"Referrer-Policy": "no-referrer", "Cache-Control": "no-store"}
)
#: Headers of the pixel answering ``/o/<token>.gif`` (valid or not, so probing learns nothing).
PIXEL_HEADERS: Final[Mapping[str, str]] = MappingProxyType(
    {
        "Content-Type": "image/gif",
        "Content-Length": str(len(TRANSPARENT_GIF)),
        "Cache-Control": "no-store",
        "Referrer-Policy": "no-referrer",
    }
)


def _hkdf(key: bytes, info: bytes) -> bytes:
    """A 256-bit key for one purpose from a ring key (HKDF-SHA256)."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(key)


class _LegacyCtrHmac:
    """LEGACY, verify only: token format 2, written by txmail before format 3 (AES-GCM).

    Format 2 is ``header (version 2) | iv (16) | AES-256-CTR(enc key, iv, URL) |
    HMAC-SHA256(mac key, b"txmail-tracking\\x00" + everything before the tag)[:16]``, with
    the enc and mac keys derived by HKDF (info ``b"txmail-tracking-v2 enc"`` / ``mac``).

    Remove this class (and its use in :meth:`TrackingKeys._open_token`) once every key id
    that was in a ring before the upgrade to format 3 has been retired from the tracking
    keys files: no format-2 token can verify after that, as ring keys never sign format 2
    again. With the rotation of docs/relay.md#tracking-keys that is when the first key
    added after the upgrade has been the signing key for as long as mail may be clicked.
    """

    VERSION: Final = 2
    IV_BYTES: Final = 16
    _CONTEXT: Final = b"txmail-tracking\x00"
    _INFO: Final = b"txmail-tracking-v2 "
    MIN_BYTES: Final = _HEADER.size + IV_BYTES + TAG_BYTES

    def __init__(self, key: bytes) -> None:
        self._enc = _hkdf(key, self._INFO + b"enc")
        self._mac = _hkdf(key, self._INFO + b"mac")

    def open(self, raw: bytes) -> bytes | None:
        """The plaintext URL (empty for opens) of an authentic format-2 token, else None."""
        if len(raw) < self.MIN_BYTES:
            return None
        body, tag = raw[:-TAG_BYTES], raw[-TAG_BYTES:]
        mac = hmac.new(self._mac, self._CONTEXT + body, hashlib.sha256).digest()[:TAG_BYTES]
        if not hmac.compare_digest(mac, tag):
            return None
        iv = body[_HEADER.size : _HEADER.size + self.IV_BYTES]
        sealed = body[_HEADER.size + self.IV_BYTES :]
        if not sealed:
            return b""
        ctr = Cipher(algorithms.AES(self._enc), modes.CTR(iv)).decryptor()
        return ctr.update(sealed) + ctr.finalize()


# The longest token either format can carry, checked before decoding anything.
_MAX_TOKEN_CHARS = (_LegacyCtrHmac.MIN_BYTES + MAX_URL_BYTES) * 4 // 3 + 4


def new_event_id() -> bytes:
    """A random id for one message and recipient: the relay maps it to the send."""
    return secrets.token_bytes(EVENT_ID_BYTES)


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def trackable_url(href: str) -> str | None:
    """``href`` normalised for tracking (trimmed; spaces and non-ASCII percent-encoded), or
    ``None`` if it must be left alone: not absolute http(s), a control character inside, a
    non-ASCII host, an unsubscribe link, or longer than :data:`MAX_URL_BYTES`."""
    url = href.strip(
        "\x00\x01\x02\x03\x04\x05\x06\x07\x08\t\n\x0b\x0c\r\x0e\x0f\x10\x11"
        "\x12\x13\x14\x15\x16\x17\x18\x19\x1a\x1b\x1c\x1d\x1e\x1f "
    )
    if _URL_CONTROLS.search(url):
        return None
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    if parts.scheme.lower() not in {"http", "https"} or not parts.hostname:
        return None
    if not parts.netloc.isascii() or not url[: len(parts.scheme) + 3].lower().endswith("://"):
        return None
    if any(word in url.lower() for word in _SKIP_WORDS):
        return None
    url = _NEEDS_QUOTING.sub(lambda m: quote(m.group(), safe=""), url)
    if len(url) > MAX_URL_BYTES:
        return None
    return url


@dataclass(frozen=True)
class Click:
    event_id: bytes
    link_index: int
    url: str
    key_id: int


@dataclass(frozen=True)
class _RingKey:
    aead: AESGCM
    legacy: _LegacyCtrHmac  # LEGACY: format 2, see _LegacyCtrHmac for when it can go


class TrackingKeys:
    """Key ring: signs with ``current``, verifies with any key in ``keys`` (id 0-255)."""

    def __init__(self, keys: Mapping[int, bytes], current: int) -> None:
        for kid, key in keys.items():
            if not 0 <= kid <= 255:
                raise ValueError(f"key id {kid} is not in 0..255")
            if len(key) < MIN_KEY_BYTES:
                raise ValueError(f"key {kid} is shorter than {MIN_KEY_BYTES} bytes")
        if current not in keys:
            raise ValueError(f"current key {current} is not in the ring")
        # derived once from the ring key
        self._keys: Mapping[int, _RingKey] = MappingProxyType(
            {
                kid: _RingKey(AESGCM(_hkdf(key, _HKDF_INFO)), _LegacyCtrHmac(key))
                for kid, key in keys.items()
            }
        )
        self.current = current

    def _sign(self, kind: int, event_id: bytes, index: int, payload: bytes) -> str:
        if len(event_id) != EVENT_ID_BYTES:
            raise ValueError(f"event id must be {EVENT_ID_BYTES} bytes")
        header = _HEADER.pack(VERSION, kind, self.current, event_id, index)
        nonce = secrets.token_bytes(NONCE_BYTES)
        sealed = self._keys[self.current].aead.encrypt(nonce, payload, header)
        return _b64(header + nonce + sealed)

    def sign_click(self, event_id: bytes, link_index: int, url: str) -> str:
        target = trackable_url(url)
        if target is None or target != url:
            raise ValueError("only normalised absolute http(s) URLs can be signed")
        return self._sign(KIND_CLICK, event_id, link_index, url.encode("ascii"))

    def sign_open(self, event_id: bytes) -> str:
        return self._sign(KIND_OPEN, event_id, 0, b"")

    def _open_token(self, token: str, kind: int) -> tuple[int, bytes, int, bytes] | None:
        if not isinstance(token, str) or len(token) > _MAX_TOKEN_CHARS:
            return None
        if not _B64URL.fullmatch(token):
            return None
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (binascii.Error, ValueError):
            return None
        if _b64(raw) != token or len(raw) < _MIN_TOKEN_BYTES:
            return None  # non-canonical encodings are refused too
        version, got_kind, kid, event_id, index = _HEADER.unpack_from(raw)
        ring_key = self._keys.get(kid)
        if got_kind != kind or ring_key is None:
            return None
        if version == VERSION:
            header = raw[: _HEADER.size]
            nonce = raw[_HEADER.size : _HEADER.size + NONCE_BYTES]
            try:
                payload = ring_key.aead.decrypt(nonce, raw[_HEADER.size + NONCE_BYTES :], header)
            except InvalidTag:
                return None
        elif version == _LegacyCtrHmac.VERSION:  # LEGACY: see _LegacyCtrHmac
            legacy = ring_key.legacy.open(raw)
            if legacy is None:
                return None
            payload = legacy
        else:
            return None
        return kid, event_id, index, payload

    def click(self, token: str) -> Click | None:
        """The verified click behind ``token``, or ``None``."""
        opened = self._open_token(token, KIND_CLICK)
        if opened is None:
            return None
        kid, event_id, index, payload = opened
        try:
            url = payload.decode("ascii")
        except UnicodeDecodeError:
            return None
        if trackable_url(url) != url:
            return None
        return Click(event_id, index, url, kid)

    def verify_click(self, token: str) -> str | None:
        """The redirect target of a valid click token, else ``None``."""
        found = self.click(token)
        return None if found is None else found.url

    def verify_open(self, token: str) -> bytes | None:
        """The event id of a valid open token (``.gif`` suffix allowed), else ``None``."""
        opened = self._open_token(token.removesuffix(".gif"), KIND_OPEN)
        if opened is None or opened[3]:
            return None
        return opened[1]


# --- HTML -------------------------------------------------------------------------------------

_TAG_NAME = re.compile(r"([a-zA-Z][^\t\n\r\f />\x00]*)(?:\s|/(?!>))*")
_ATTR = re.compile(
    r"((?<=['\"\s/])[^\s/>][^\s/=>]*)(\s*=+\s*('[^']*'|\"[^\"]*\"|(?!['\"])[^>\s]*))?(?:\s|/(?!>))*"
)


@dataclass(frozen=True)
class TrackedLink:
    index: int
    url: str


class _Scanner(HTMLParser):
    """Collects ``<a>``/``<area>`` start tags and the last ``</body>`` with their offsets."""

    def __init__(self, source: str) -> None:
        super().__init__(convert_charrefs=True)
        self._line_starts = [0] + [m.end() for m in re.finditer("\n", source)]
        self.links: list[tuple[int, str, list[tuple[str, str | None]]]] = []
        self.body_end: int | None = None

    def _offset(self) -> int:
        line, column = self.getpos()
        return self._line_starts[line - 1] + column

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        raw = self.get_starttag_text()
        if tag in {"a", "area"} and raw is not None:
            self.links.append((self._offset(), raw, attrs))

    def handle_endtag(self, tag: str) -> None:
        if tag == "body":
            self.body_end = self._offset()


def _href_span(raw: str, attrs: list[tuple[str, str | None]]) -> tuple[int, int] | None:
    """Span of the first ``href`` value in the raw tag text, if our reading matches the
    parser's (otherwise the tag is left alone)."""
    m = _TAG_NAME.match(raw, 1)
    if m is None:
        return None
    found: list[tuple[str, str | None, tuple[int, int] | None]] = []
    k = m.end()
    while k < len(raw):
        a = _ATTR.match(raw, k)
        if a is None or a.end() == k:
            break
        value = a.group(3)
        if value is not None and value[:1] in {"'", '"'}:
            value = value[1:-1]
        if value:
            value = htmllib.unescape(value)
        found.append((a.group(1).lower(), value if a.group(2) else None, a.span(3)))
        k = a.end()
    if [(n, v) for n, v, _ in found] != attrs:
        return None
    for name, value, span in found:
        if name == "href":
            return span if value is not None else None
    return None


def _base(base_url: str) -> str:
    parts = urlsplit(base_url)
    if parts.scheme not in {"http", "https"} or not parts.netloc or parts.query or parts.fragment:
        raise ValueError(f"invalid tracking base URL {base_url!r}")
    if _URL_CONTROLS.search(base_url) or not base_url.isascii():
        raise ValueError(f"invalid tracking base URL {base_url!r}")
    return base_url.rstrip("/")


def open_pixel(base_url: str, keys: TrackingKeys, event_id: bytes) -> str:
    src = f"{_base(base_url)}/o/{keys.sign_open(event_id)}.gif"
    return f'<img src="{htmllib.escape(src)}" width="1" height="1" alt="" style="display:none">'


def rewrite_html(
    html: str,
    base_url: str,
    keys: TrackingKeys,
    event_id: bytes,
    *,
    clicks: bool = True,
    opens: bool = True,
    first_index: int = 0,
) -> tuple[str, list[TrackedLink]]:
    """Rewrite trackable links to ``<base>/c/<token>`` and add the open pixel; returns the
    new HTML and the tracked links. Raises ``ValueError`` for a bad base URL or HTML that
    ``html.parser`` refuses (:func:`rewrite_message` turns that into an untracked send)."""
    base = _base(base_url)
    scanner = _Scanner(html)
    try:
        scanner.feed(html)
        scanner.close()
    except AssertionError as e:  # html.parser's way of refusing some markup (``<![x``)
        raise ValueError(f"cannot parse the HTML: {e}") from e
    edits: list[tuple[int, int, str]] = []
    links: list[TrackedLink] = []
    for offset, raw, attrs in scanner.links if clicks else []:
        if html[offset : offset + len(raw)] != raw:
            continue
        values = dict(reversed(attrs))  # the first occurrence of a name wins, as in browsers
        if (values.get(OPT_OUT_ATTRIBUTE) or "").strip().lower() == "false":
            continue
        span = _href_span(raw, attrs)
        url = trackable_url(values.get("href") or "")
        if span is None or url is None:
            continue
        index = first_index + len(links)
        token = keys.sign_click(event_id, index, url)
        new_value = '"' + htmllib.escape(f"{base}/c/{token}", quote=True) + '"'
        edits.append((offset + span[0], offset + span[1], new_value))
        links.append(TrackedLink(index, url))
    if opens:
        at = scanner.body_end if scanner.body_end is not None else len(html)
        edits.append((at, at, open_pixel(base, keys, event_id)))
    out: list[str] = []
    pos = 0
    for start, end, text in sorted(edits):
        out.append(html[pos:start])
        out.append(text)
        pos = end
    out.append(html[pos:])
    return "".join(out), links


# --- messages ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class RewriteResult:
    message: EmailMessage
    links: tuple[TrackedLink, ...]
    error: str | None = None  # set when tracking failed: ``message`` is then the original

    @property
    def failed(self) -> bool:
        return self.error is not None


def _set_html(part: EmailMessage, html: str) -> None:
    fresh = EmailMessage(policy=POLICY)
    fresh.set_content(html, subtype="html", charset="utf-8")
    cte = fresh["Content-Transfer-Encoding"]
    if "Content-Transfer-Encoding" in part:
        part.replace_header("Content-Transfer-Encoding", cte)
    else:
        part["Content-Transfer-Encoding"] = cte
    part.set_param("charset", "utf-8")
    part.set_payload(fresh.get_payload())


def _is_html_body(part: Message) -> TypeGuard[EmailMessage]:
    if not isinstance(part, EmailMessage):
        raise TypeError("parse messages with an email.policy.EmailPolicy, not compat32")
    return part.get_content_type() == "text/html" and not part.is_attachment()


def rewrite_message(
    msg: EmailMessage,
    base_url: str,
    keys: TrackingKeys,
    event_id: bytes,
    *,
    clicks: bool = True,
    opens: bool = True,
) -> RewriteResult:
    """Track the ``text/html`` parts of a copy of ``msg``; never raises (T8)."""
    if not (clicks or opens):
        return RewriteResult(msg, ())
    try:
        tracked = copy.deepcopy(msg)
        links: list[TrackedLink] = []
        pixel = opens
        for part in tracked.walk():
            if not _is_html_body(part):
                continue
            html, found = rewrite_html(
                part.get_content(),
                base_url,
                keys,
                event_id,
                clicks=clicks,
                opens=pixel,
                first_index=len(links),
            )
            _set_html(part, html)
            links.extend(found)
            pixel = False  # one pixel per message
        to_bytes(tracked)  # lines <= 998 and headers still safe, or fall back
    except Exception as e:  # any failure: deliver untracked
        return RewriteResult(msg, (), f"{type(e).__name__}: {e}")
    return RewriteResult(tracked, tuple(links))
