"""DKIM public records: the TXT data a sending domain publishes for each of its selectors.

Pure: keys are arguments (the reconciler generates or reads them), nothing here draws
randomness or reads the clock. The record format is RFC 6376 section 3.6.1 (``k=rsa``, ``p=`` the
base64 DER SubjectPublicKeyInfo) and RFC 8463 (``k=ed25519``, ``p=`` the base64 raw 32-byte
public key, not wrapped in a SubjectPublicKeyInfo).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Final

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

# The algorithm names used everywhere in the operator (state, status, the relay contract).
RSA: Final = "rsa"
ED25519: Final = "ed25519"
ALGORITHMS: Final = (RSA, ED25519)

ED25519_KEY_LENGTH: Final = 32


@dataclass(frozen=True)
class DkimPublicRecord:
    """One DKIM key's DNS record: ``<selector>._domainkey.<domain>`` TXT ``value``.

    ``algorithm`` is ``"rsa"`` or ``"ed25519"``; ``value`` is the full TXT data
    (``"v=DKIM1; k=rsa; p=MIIB..."``), not yet split into 255-byte strings.
    """

    domain: str
    selector: str
    algorithm: str
    value: str

    @property
    def name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"


def rsa_record_value(spki_der: bytes) -> str:
    """The TXT data for an RSA key given its DER SubjectPublicKeyInfo."""
    return f"v=DKIM1; k=rsa; p={base64.b64encode(spki_der).decode('ascii')}"


def ed25519_record_value(raw_public_key: bytes) -> str:
    """The TXT data for an Ed25519 key given its raw 32-byte public key (RFC 8463 3.2)."""
    if len(raw_public_key) != ED25519_KEY_LENGTH:
        raise ValueError(f"an Ed25519 public key has {ED25519_KEY_LENGTH} bytes")
    return f"v=DKIM1; k=ed25519; p={base64.b64encode(raw_public_key).decode('ascii')}"


def public_record(
    domain: str, selector: str, algorithm: str, public_key: bytes
) -> DkimPublicRecord:
    """The record for ``public_key``: DER SubjectPublicKeyInfo (rsa) or raw 32 bytes (ed25519)."""
    if algorithm == RSA:
        value = rsa_record_value(public_key)
    elif algorithm == ED25519:
        value = ed25519_record_value(public_key)
    else:
        raise ValueError(f"unknown DKIM algorithm {algorithm!r} (expected one of {ALGORITHMS})")
    return DkimPublicRecord(
        domain=domain.lower(), selector=selector, algorithm=algorithm, value=value
    )


def public_key_bytes(algorithm: str, private_pem: bytes) -> bytes:
    """The public half of a PEM private key, in the form its record carries.

    Raises ValueError (naming no key material) when the PEM is not a key of ``algorithm``.
    """
    try:
        key = serialization.load_pem_private_key(private_pem, password=None)
    except (ValueError, TypeError):
        raise ValueError(f"not an unencrypted PEM private key ({algorithm})") from None
    if algorithm == RSA and isinstance(key, rsa.RSAPrivateKey):
        return key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    if algorithm == ED25519 and isinstance(key, ed25519.Ed25519PrivateKey):
        return key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
    raise ValueError(f"the PEM private key is not an {algorithm} key")


def record_for_private_key(
    domain: str, selector: str, algorithm: str, private_pem: bytes
) -> DkimPublicRecord:
    """The record publishing the public half of ``private_pem``."""
    return public_record(domain, selector, algorithm, public_key_bytes(algorithm, private_pem))
