"""DKIM signing of an outgoing message (RFC 6376, RFC 8463), with dkimpy (pure).

:func:`signature` makes one DKIM-Signature field per key (two for dual RSA + Ed25519
signing) for the message's header From domain (:func:`from_domain`), relaxed/relaxed, over
:data:`SIGNED_HEADERS` where present, From signed one time more than it occurs (oversigned:
a From added later breaks the signature instead of being shown as the author). Each covers
the message as it is before any of them (``h=`` never lists DKIM-Signature), so they are
all made over the same bytes and put in front in any order.

Line endings are made CRLF first, exactly as aiosmtplib does on the way out (bare CR and
bare LF become CRLF), and field names written in RFC 5322's obsolete form with white space
before the colon (``From :``) are written ``From:`` (:func:`canonical`): dkimpy's parser drops
a ``From :`` line as an mbox ``From`` line (its signature would cover no From) and refuses a
``Subject :`` line. What is signed is byte for byte what the upstream receives.

:func:`load_private_key` reads a key file in the formats the contract documents
(:class:`txmail_relay.contract.DkimKey`) with ``cryptography`` and hands dkimpy the form it
takes. Errors name the problem, never the key's bytes.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from dkim.util import InvalidTagValueList, parse_tag_value

from txmail_relay.contract import DkimAlgorithm
from txmail_relay.mail.addresses import AddressError, mailboxes
from txmail_relay.mail.headers import header_fields

#: The fields signed when present (RFC 6376 5.4.1's list, narrowed to what the relay's mail
#: carries); From is always signed, once more than it occurs.
SIGNED_HEADERS = (
    "From",
    "To",
    "Cc",
    "Subject",
    "Date",
    "Message-ID",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
    "Reply-To",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
)
MIN_RSA_BITS = 1024  # RFC 8301 3.2: verifiers must refuse smaller keys
# aiosmtplib's LINE_ENDINGS_REGEX (aiosmtplib.protocol, not public API: tests check they agree)
_LINE_ENDINGS = re.compile(rb"\r\n|\n|\r(?!\n)")
# A field line (not a continuation) with white space between its name and the colon.
_OBS_FIELD_NAME = re.compile(rb"^([!-9;-~]+)[ \t]+:", re.MULTILINE)
_CANONICALIZE = (b"relaxed", b"relaxed")


class DkimKeyError(ValueError):
    """A key file that cannot sign; the message never holds key material."""


@dataclass(frozen=True)
class SigningKey:
    """One loaded key: ``private`` is what dkimpy's ``privkey`` takes (never in a repr)."""

    selector: str
    algorithm: DkimAlgorithm
    private: bytes = field(repr=False)


def load_private_key(data: bytes, algorithm: DkimAlgorithm) -> bytes:
    """The key in ``data`` as dkimpy signs with it: PKCS#1 PEM for RSA, the base64 seed for
    Ed25519. Raises :class:`DkimKeyError` for anything else."""
    text = data.strip()
    if algorithm is DkimAlgorithm.ED25519_SHA256 and not text.startswith(b"-----BEGIN"):
        # dkimpy's own format (dknewkey.py): the 32-byte seed, base64.
        try:
            seed = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise DkimKeyError("not PEM and not a base64 Ed25519 seed") from None
        if len(seed) != 32:
            raise DkimKeyError(f"an Ed25519 seed has 32 bytes, this one {len(seed)}")
        return base64.b64encode(seed)
    try:
        key = serialization.load_pem_private_key(text, password=None)
    except (ValueError, TypeError) as e:
        # cryptography's messages describe the format problem, not the key; keep ours short.
        reason = "encrypted" if isinstance(e, TypeError) else "not an unencrypted PEM private key"
        raise DkimKeyError(reason) from None
    except Exception:  # e.g. UnsupportedAlgorithm: never let its text out
        raise DkimKeyError("unsupported private key") from None
    if algorithm is DkimAlgorithm.RSA_SHA256:
        if not isinstance(key, rsa.RSAPrivateKey):
            raise DkimKeyError("rsa-sha256 needs an RSA key")
        if key.key_size < MIN_RSA_BITS:
            raise DkimKeyError(f"an RSA key of {key.key_size} bits (at least {MIN_RSA_BITS})")
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise DkimKeyError("ed25519-sha256 needs an Ed25519 key")
    return base64.b64encode(key.private_bytes_raw())


def from_domain(message: bytes) -> str | None:
    """The domain of the message's header From (lowercase), when there is exactly one From
    field and all its mailboxes are at one domain; otherwise None (not signed)."""
    values = header_fields(message).get_all("From")
    if len(values) != 1:
        return None
    try:
        domains = {m.domain for m in mailboxes(values[0])}
    except AddressError:
        return None
    return domains.pop() if len(domains) == 1 else None


def signed_for(message: bytes, domain: str) -> bool:
    """Whether the message already has a DKIM-Signature with ``d=`` ``domain``."""
    wanted = domain.rstrip(".").lower()
    for value in header_fields(message).get_all("DKIM-Signature"):
        try:
            tags = parse_tag_value(value.encode("utf-8", "replace"))
        except InvalidTagValueList:
            continue
        found = tags.get(b"d", b"").decode("utf-8", "replace").strip().rstrip(".").lower()
        if found == wanted:
            return True
    return False


def include_headers(message: bytes) -> list[bytes]:
    """The ``h=`` list for ``message``: each field of :data:`SIGNED_HEADERS` as many times as
    it occurs (dkimpy signs instances bottom to top), From once more (oversigned)."""
    fields = header_fields(message)
    names: list[bytes] = []
    for name in SIGNED_HEADERS:
        count = len(fields.get_all(name)) + (1 if name == "From" else 0)
        names += [name.lower().encode("ascii")] * count
    return names


def crlf(message: bytes) -> bytes:
    """Line endings as aiosmtplib sends them."""
    return _LINE_ENDINGS.sub(b"\r\n", message)


def canonical(message: bytes) -> bytes:
    """``message`` as it is signed and sent: CRLF line endings (:func:`crlf`), and field names
    without white space before the colon (RFC 5322 4.5's obsolete ``From :`` means the same
    field as ``From:``; dkimpy reads only the latter). The body is not touched."""
    message = crlf(message)
    end = message.find(b"\r\n\r\n")
    head, body = (message, b"") if end < 0 else (message[: end + 2], message[end + 2 :])
    return _OBS_FIELD_NAME.sub(rb"\1:", head) + body


def dkimpy_from_fields(message: bytes) -> int | None:
    """How many From fields dkimpy sees in ``message`` (:func:`canonical` form), or None if
    it cannot parse the header section: the signature's ``h=from`` covers exactly these."""
    end = message.find(b"\r\n\r\n")
    head = message if end < 0 else message[: end + 4]
    try:
        fields, _ = dkim.rfc822_parse(head)
    except (dkim.MessageFormatError, IndexError):  # IndexError: a continuation line first
        return None
    return sum(1 for name, _ in fields if name.lower() == b"from")


def signature(message: bytes, domain: str, key: SigningKey, headers: Sequence[bytes]) -> bytes:
    """The DKIM-Signature field (CRLF-terminated) of ``key`` over ``message``, which has CRLF
    line endings already (:func:`crlf`), signing ``headers`` (:func:`include_headers`).

    Raises dkimpy's ``DKIMException`` if the key cannot sign (e.g. NaClNotFoundError for
    Ed25519 without PyNaCl).
    """
    header: bytes = dkim.sign(
        message,
        key.selector.encode("ascii"),
        domain.encode("idna"),  # the A-label form DNS holds (ASCII stays as it is)
        key.private,
        canonicalize=_CANONICALIZE,
        signature_algorithm=key.algorithm.value.encode("ascii"),
        include_headers=list(headers),
        linesep=b"\r\n",
    )
    return header
