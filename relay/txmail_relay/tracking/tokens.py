"""Open and click tracking: the token codec, trackable URLs, the pure side of ``/c`` and ``/o``.

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

Link rewriting is in :mod:`txmail_relay.tracking.links`.

GET ``/c`` and ``/o`` must only record an event (scanners prefetch links, T5), answer a
bad token with 400, redirect with :data:`CLICK_HEADERS` and serve :data:`TRANSPARENT_GIF`
with :data:`PIXEL_HEADERS`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final
from urllib.parse import quote, urlsplit

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

VERSION: Final = 3
KIND_CLICK: Final = ord("c")
KIND_OPEN: Final = ord("o")
EVENT_ID_BYTES: Final = 16
TAG_BYTES: Final = 16
NONCE_BYTES: Final = 12
MIN_KEY_BYTES: Final = 32
MAX_URL_BYTES: Final = 4096
MAX_VERIFIED: Final = 4096  # verified clicks remembered per key ring (~2 KB each at most)
MAX_CACHED_TOKEN: Final = 1024  # characters; longer tokens are verified every time

_HEADER = struct.Struct(">BBB16sH")
_MIN_TOKEN_BYTES = _HEADER.size + NONCE_BYTES + TAG_BYTES  # 49: an open token
_HKDF_INFO = b"txmail-tracking-v3 aead"
_B64URL = re.compile(r"[A-Za-z0-9_-]+")
URL_CONTROLS: Final = re.compile(r"[\x00-\x1f\x7f]")
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
    if URL_CONTROLS.search(url):
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
        # Clicks verified already, by token: a link clicked again (a person's second visit,
        # a scanner and then the person) is answered from memory. Valid ones only, so
        # invalid tokens cannot push them out; bounded in entries and token length. The
        # ring's keys are fixed for this object's life: a rotation makes a new ring, so a
        # retired key's clicks are forgotten with it.
        self._verified: dict[str, Click] = {}

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
        known = self._verified.get(token)
        if known is not None:
            return known
        found = self._click(token)
        if found is not None and len(token) <= MAX_CACHED_TOKEN:
            if len(self._verified) >= MAX_VERIFIED:
                del self._verified[next(iter(self._verified))]  # the oldest
            self._verified[token] = found
        return found

    def _click(self, token: str) -> Click | None:
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
