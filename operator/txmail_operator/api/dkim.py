"""DKIM keys of a DedicatedIP: spec.dkim, and the selectors in each domain's status.

The operator keeps one key (two with dual signing) per sending domain of the IP, in one Secret
of its namespace (``txmail-relay-<ip>-dkim``), and rotates them without a gap: a new key is
published under a new selector, signing switches once that record verifies in DNS, and the old
record stays listed for ``retireAfterDays`` (docs/deliverability.md "DKIM keys and rotation").
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated

from pydantic import ConfigDict, Field

from .common import DNS_LABEL, DOMAIN, Cel, LocalObjectReference, Model, cel

# The key of a bring-your-own Secret that holds the private key (PEM).
BYOK_SECRET_KEY = "dkim.key"  # noqa: S105 - a key name, not a secret
SELECTOR_MAX = 63

Selector = Annotated[str, Field(min_length=1, max_length=SELECTOR_MAX, pattern=DNS_LABEL)]


class DkimAlgorithm(StrEnum):
    RSA = "RSA"
    RSA_AND_ED25519 = "RSAAndEd25519"


class DkimKeyRef(Model):
    domain: Annotated[str, Field(min_length=3, max_length=253, pattern=DOMAIN)] = Field(
        description="The sending domain this key signs for: one of spec.domains."
    )
    secret_ref: LocalObjectReference = Field(
        alias="secretRef",
        description=f"A Secret in the operator's namespace whose key '{BYOK_SECRET_KEY}' holds "
        "the unencrypted private key in PEM (PKCS#8 'BEGIN PRIVATE KEY' or PKCS#1 'BEGIN RSA "
        "PRIVATE KEY'): RSA of at least 1024 bits (2048 recommended) or Ed25519. The operator "
        "copies it into the relay's key Secret and re-reads it on every reconcile (another "
        "key under the same selector is refused: see selector).",
    )
    selector: Selector = Field(
        description="The DKIM selector its public record is published under "
        "(<selector>._domainkey.<domain>): one DNS label, at most 63 characters. Changing it "
        "is a rotation: the new key signs once its record verifies. Another key under a "
        "selector in use (new Secret content or secretRef) is refused (Ready False, "
        "ConfigurationInvalid) and the key it had keeps signing: rotate with a new selector."
    )


# On DedicatedIPSpec: rules that need spec.domains beside spec.dkim.
DKIM_SPEC_RULES: list[Cel] = [
    cel(
        "!has(self.dkim) || !has(self.dkim.keys) || "
        "self.dkim.keys.all(k, k.domain in self.domains)",
        "every dkim.keys[].domain must be one of spec.domains",
        field=".dkim.keys",
    ),
]


class DkimSpec(Model):
    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "!has(oldSelf.keyGeneration) || !has(self.keyGeneration) || "
                    "self.keyGeneration >= oldSelf.keyGeneration",
                    "dkim.keyGeneration can only be raised: raising it rotates the generated keys",
                )
            ]
        }
    )

    enabled: bool = Field(
        default=True,
        description="Sign the mail of every sending domain. The operator generates a key per "
        "domain (unless keys names one) into the Secret txmail-relay-<name>-dkim of its "
        "namespace; status.dnsRecords lists each public record to publish. False: nothing is "
        "signed (the keys are kept, so turning it back on needs no new records).",
    )
    algorithm: DkimAlgorithm = Field(
        default=DkimAlgorithm.RSA,
        description="RSA: one RSA 2048-bit key per domain. RSAAndEd25519: an RSA and an "
        "Ed25519 key per domain, two signatures on every message (RFC 8463; receivers that "
        "do not know Ed25519 verify the RSA one). A change is a rotation of the generated keys.",
    )
    key_generation: int = Field(
        default=0,
        ge=0,
        le=2147483647,
        alias="keyGeneration",
        description="Raise it to rotate the generated keys (like an SmtpToken's "
        "passwordGeneration): new keys are made under new selectors and listed in "
        "status.dnsRecords; signing switches to them once their records verify in DNS; the "
        "old records stay listed for retireAfterDays. Can only be raised.",
    )
    rotate_after_days: int | None = Field(
        default=None,
        ge=1,
        le=3650,
        alias="rotateAfterDays",
        description="Rotate the generated keys on a schedule: a new key is made this many "
        "days after the active one started signing (then as with keyGeneration). No "
        "scheduled rotation when omitted.",
    )
    retire_after_days: int = Field(
        default=7,
        ge=0,
        le=365,
        alias="retireAfterDays",
        description="Days an old key's record stays listed (and the key kept) after signing "
        "switched away from it, so mail signed with it still verifies where it is read later; "
        "then the key is deleted and the record can be removed from DNS.",
    )
    keys: list[DkimKeyRef] | None = Field(
        default=None,
        max_length=200,
        description="Bring your own keys: a domain listed here signs with these keys (one "
        "entry per key, at most one RSA and one Ed25519 per domain) instead of generated ones. "
        "Selectors are unique per domain.",
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["domain", "selector"],
        },
    )


class RetiringSelector(Model):
    selector: str = Field(max_length=SELECTOR_MAX, description="The retiring key's selector.")
    retire_at: datetime = Field(
        alias="retireAt",
        description="When the key is deleted and its record no longer listed.",
    )


class DomainDkimStatus(Model):
    """Where one domain's DKIM keys stand in their rotation (no key material)."""

    active: list[Annotated[str, Field(max_length=SELECTOR_MAX)]] | None = Field(
        default=None,
        max_length=2,
        description="Selectors signing now (two with dual signing).",
    )
    next: list[Annotated[str, Field(max_length=SELECTOR_MAX)]] | None = Field(
        default=None,
        max_length=2,
        description="Selectors of the keys waiting for their record to verify in DNS; signing "
        "switches to them once all do.",
    )
    retiring: list[RetiringSelector] | None = Field(
        default=None,
        max_length=16,
        description="Selectors no longer signing whose records stay listed until retireAt.",
    )
    source: str | None = Field(
        default=None,
        max_length=16,
        description="Generated (by the operator) or Secret (spec.dkim.keys).",
    )
