"""DNS readiness of a DedicatedIP: spec.dns, status.dnsRecords, status.domains.

The operator lists every record the IP's sending needs (SPF, DKIM, DMARC of each domain, the
address's PTR and the hostname's A/AAAA, the return-path domain's SPF and MX), checks each against
real DNS, and sums it up in the DNSVerified condition (docs/deliverability.md).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

from pydantic import Field

from .common import DOMAIN, Model
from .dkim import DomainDkimStatus

DnsDomain = Annotated[str, Field(min_length=3, max_length=253, pattern=DOMAIN)]
# Condition type on the DedicatedIP.
DNS_VERIFIED = "DNSVerified"


class DnsSpec(Model):
    require_verified: bool = Field(
        default=True,
        description="Ready needs DNSVerified=True: the IP's DNS (SPF, DKIM, DMARC, PTR and the "
        "hostname's address) checks out. Set false when that DNS is not yours to publish, for "
        "example a smarthost that signs and sends under its own names, or a local test: the "
        "records are still checked and listed, they only stop gating Ready.",
    )
    check_interval_seconds: int = Field(
        default=300,
        ge=5,
        le=86400,
        description="Seconds between checks of the records against DNS (5 to 86400). A spec "
        "change is checked at once.",
    )
    return_path_domain: DnsDomain | None = Field(
        default=None,
        description="The return-path (envelope sender) domain of this IP's mail, a domain of "
        "its own (for example bounces.example.com, not a sending domain): when set, and once "
        "its MX below verifies (at once with requireVerified false), every delivery goes out "
        "with MAIL FROM bounces+<id>@<this domain> (the header From stays the app's), and "
        "the DSNs receivers send back reach the relay's inbound listener (Service port 25, "
        "'smtp-in'), which ties each to its message. Its SPF must authorize the address and "
        "its MX must name spec.hostname as its most preferred exchange (both listed in "
        "status.dnsRecords). Off (the app's sender as the return path) when omitted.",
    )
    external_dns: bool = Field(
        default=False,
        alias="externalDNS",
        description="Write the hostname's A/AAAA and every DKIM key's TXT record as an "
        "external-dns DNSEndpoint (txmail-relay-<name>-dns in the operator's namespace), for "
        "an external-dns with the CRD source. SPF, DMARC and the PTR stay yours to publish. "
        "Without the DNSEndpoint CRD, DNSVerified's message says so.",
    )


class RecordType(StrEnum):
    TXT = "TXT"
    PTR = "PTR"
    A = "A"
    AAAA = "AAAA"
    MX = "MX"


class RecordPurpose(StrEnum):
    SPF = "SPF"
    DKIM = "DKIM"
    DMARC = "DMARC"
    PTR = "PTR"
    HOSTNAME = "Hostname"
    RETURN_PATH_SPF = "ReturnPathSPF"
    RETURN_PATH_MX = "ReturnPathMX"


class RecordResult(StrEnum):
    VERIFIED = "Verified"
    MISSING = "Missing"
    WRONG = "Wrong"
    UNKNOWN = "Unknown"


class DnsRecordStatus(Model):
    name: str = Field(
        max_length=253, description="The record's owner name, fully qualified (no final dot)."
    )
    type: RecordType = Field(description="TXT, PTR, A, AAAA or MX.")
    # 255: a TXT character-string; an MX's "<preference> <host>" may be 6 + 253 characters.
    value: list[Annotated[str, Field(max_length=259)]] = Field(
        max_length=64,
        description="The data to publish. For TXT the character-strings of at most 255 bytes "
        "each, in order, as one record (in a zone file: each quoted, separated by spaces); "
        "otherwise one item (the PTR target, the address, or an MX's 'preference host').",
    )
    purpose: RecordPurpose = Field(
        description="What the record is for: SPF, DKIM, DMARC (of domain), PTR (the "
        "address's reverse name -> hostname), Hostname (the hostname's A/AAAA -> address), "
        "ReturnPathSPF (SPF of spec.dns.returnPathDomain), ReturnPathMX (its MX -> hostname: "
        "where DSNs come back)."
    )
    domain: str | None = Field(
        default=None,
        max_length=253,
        description="The sending (or return-path) domain the record belongs to; omitted for "
        "the IP's own PTR and hostname records.",
    )
    required: bool = Field(
        default=True,
        description="Whether DNSVerified needs this record. False for a DKIM key that is "
        "being introduced (publish it: signing switches once it verifies) or retired.",
    )
    result: RecordResult = Field(
        default=RecordResult.UNKNOWN,
        description="Verified, Missing, Wrong (found but not what it should be), or Unknown "
        "(not checked yet, or the lookup failed: see message).",
    )
    found: list[Annotated[str, Field(max_length=4096)]] | None = Field(
        default=None,
        max_length=16,
        description="What DNS answered when the result is Wrong.",
    )
    message: str | None = Field(
        default=None,
        max_length=2048,
        description="What is wrong and what to do, when the result is not Verified.",
    )


class DomainStatus(Model):
    """One sending domain's DNS verdict (more per-domain details may be added beside)."""

    name: str = Field(max_length=253, description="The sending domain.")
    verified: bool = Field(
        default=False,
        description="Its required SPF, DKIM and DMARC records all verify.",
    )
    reason: str = Field(
        default="Unknown",
        max_length=64,
        description="A CamelCase word: Verified, or the first problem (SPFNotAuthorized, "
        "DKIMRecordMissing, DMARCMissing, ...).",
    )
    message: str = Field(
        default="", max_length=4096, description="The first problem in a sentence."
    )
    dmarc_policy: str | None = Field(
        default=None,
        max_length=32,
        description="The DMARC policy that applies to the domain (p=, or sp= when inherited "
        "from a parent domain): none, quarantine or reject.",
    )
    dkim: DomainDkimStatus | None = Field(
        default=None, description="The domain's DKIM selectors: signing, next, retiring."
    )
