"""The DNS records a DedicatedIP's mail needs, from its spec and its DKIM keys (pure).

What a receiver checks of mail from the IP, and so what must be published:

* PTR: the address's reverse name points at ``spec.hostname`` (the EHLO name), and
* Hostname: ``spec.hostname`` has an A (IPv4) or AAAA (IPv6) record with the address back:
  together forward-confirmed reverse DNS (FCrDNS), which Gmail and Yahoo require;
* SPF of each sending domain authorizes the address;
* DMARC: ``_dmarc.<domain>`` exists (its policy is reported);
* DKIM: ``<selector>._domainkey.<domain>`` carries each signing key's public half;
* ReturnPathSPF: the return-path domain's SPF, when spec.dns.returnPathDomain names one;
* ReturnPathMX: that domain's MX names ``spec.hostname``, so that DSNs sent to the VERP return
  path (``bounces+<id>@<domain>``) reach the relay's inbound listener.

The suggested SPF and DMARC values are what to publish where the domain has none yet; the
checker (reconcile/dns.py) accepts any record that gives the same verdict (an SPF record that
reaches the address through an include, a stricter DMARC policy).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from txmail_relay import contract as c

from ..api import DedicatedIPSpec
from ..api.dns import RecordPurpose, RecordType
from .dkim import DkimPublicRecord
from .naming import Obj, RelayOwner, owned_meta

# RFC 1035 3.3: a TXT record is a sequence of character-strings of at most 255 bytes each.
TXT_STRING_MAX = 255

# Where the domain has no SPF record yet. "~all" (softfail) rather than "-all": mail that is
# forwarded fails SPF however it is written, and a receiver that rejects on a hard SPF fail at
# SMTP time never looks at the DKIM signature that would have carried it through; DMARC's
# policy is where a domain says what to do with mail that fails both (M3AAWG's advice).
SPF_ALL = "~all"
# DMARC where the domain has none: monitor first (p=none), then tighten to quarantine or
# reject once the reports show only this IP and your other senders (docs/deliverability.md).
DMARC_SUGGESTED = "v=DMARC1; p=none"

# The preference of the return-path domain's MX: the relay is its only mail exchanger.
MX_PREFERENCE = 10

# external-dns's CRD source (spec.dns.externalDNS): one DNSEndpoint per DedicatedIP.
EXTERNAL_DNS_API_VERSION = "externaldns.k8s.io/v1alpha1"
EXTERNAL_DNS_KIND = "DNSEndpoint"
EXTERNAL_DNS_TTL = 300
# What the DNSEndpoint carries: the names that are the IP's alone. external-dns owns a whole
# record set (every TXT of a name), so a domain's SPF at its apex and its _dmarc record, which
# hold the user's other senders and policy, stay the user's to edit; a PTR belongs to whoever
# holds the address.
EXTERNAL_DNS_PURPOSES = (RecordPurpose.HOSTNAME, RecordPurpose.DKIM)


@dataclass(frozen=True)
class DnsRecord:
    """One record to publish: ``name`` ``type`` ``value`` (TXT ``value`` not yet split)."""

    name: str
    type: RecordType
    value: str
    purpose: RecordPurpose
    domain: str | None = None
    required: bool = True  # False: listed but not needed by DNSVerified (a DKIM key in rotation)

    @property
    def strings(self) -> list[str]:
        """The data as it is published: TXT split into 255-byte strings, else one item."""
        return txt_strings(self.value) if self.type is RecordType.TXT else [self.value]

    def wire(self) -> dict[str, object]:
        """The record in status.dnsRecords (camelCase), without a check result."""
        out: dict[str, object] = {
            "name": self.name,
            "type": self.type.value,
            "value": self.strings,
            "purpose": self.purpose.value,
        }
        if self.domain is not None:
            out["domain"] = self.domain
        out["required"] = self.required
        return out


def txt_strings(value: str) -> list[str]:
    """``value`` as TXT character-strings of at most 255 bytes (UTF-8), never splitting a
    character (RFC 7208 3.3 and RFC 6376 3.6.2.2: receivers join them without spaces)."""
    out: list[str] = []
    current, size = "", 0
    for char in value:
        width = len(char.encode())
        if size + width > TXT_STRING_MAX:
            out.append(current)
            current, size = "", 0
        current += char
        size += width
    out.append(current)
    return out


def normalized_address(address: str) -> str:
    """The address in its canonical text form (IPv6 compressed, lower case)."""
    return str(ipaddress.ip_address(address.strip()))


def reverse_name(address: str) -> str:
    """The PTR owner name of ``address``: ``5.113.0.203.in-addr.arpa`` or its ip6.arpa form."""
    return ipaddress.ip_address(address.strip()).reverse_pointer


def address_type(address: str) -> RecordType:
    return RecordType.A if ipaddress.ip_address(address.strip()).version == 4 else RecordType.AAAA


def spf_value(address: str) -> str:
    """A complete SPF record authorizing ``address`` alone (``v=spf1 ip4:<addr> ~all``)."""
    ip = ipaddress.ip_address(address.strip())
    mechanism = "ip4" if ip.version == 4 else "ip6"
    return f"v=spf1 {mechanism}:{ip} {SPF_ALL}"


def dmarc_name(domain: str) -> str:
    return f"_dmarc.{domain}"


def records_to_publish(
    spec: DedicatedIPSpec,
    dkim: Iterable[DkimPublicRecord] = (),
    dkim_optional: Iterable[DkimPublicRecord] = (),
) -> list[DnsRecord]:
    """Every record the IP's mail needs, in a stable order: the IP's PTR and hostname, then
    per sending domain (spec order) SPF, DMARC and DKIM (by selector), then the return path.

    ``dkim`` are the keys that sign now (DNSVerified needs them); ``dkim_optional`` the ones
    listed but not needed: a next key waiting for its record, a retired one kept listed.
    """
    address = normalized_address(spec.address)
    hostname = spec.hostname.lower()
    out = [
        DnsRecord(reverse_name(address), RecordType.PTR, hostname, RecordPurpose.PTR),
        DnsRecord(hostname, address_type(address), address, RecordPurpose.HOSTNAME),
    ]
    keys: dict[str, list[tuple[DkimPublicRecord, bool]]] = {}
    for record in dkim:
        keys.setdefault(record.domain.lower(), []).append((record, True))
    for record in dkim_optional:
        keys.setdefault(record.domain.lower(), []).append((record, False))
    domains = [d.lower() for d in spec.domains]
    domains += sorted(d for d in keys if d not in domains)
    spf = spf_value(address)
    for domain in domains:
        if domain in spec.domains:
            out.append(DnsRecord(domain, RecordType.TXT, spf, RecordPurpose.SPF, domain))
            out.append(
                DnsRecord(
                    dmarc_name(domain), RecordType.TXT, DMARC_SUGGESTED, RecordPurpose.DMARC, domain
                )
            )
        seen: set[str] = set()
        for record, required in sorted(keys.get(domain, []), key=lambda k: k[0].selector):
            if record.name in seen:
                continue
            seen.add(record.name)
            out.append(
                DnsRecord(
                    record.name.lower(),
                    RecordType.TXT,
                    record.value,
                    RecordPurpose.DKIM,
                    domain,
                    required=required,
                )
            )
    return_path = spec.dns.return_path_domain
    if return_path is not None:
        rp = return_path.lower()
        if rp not in domains:
            out.append(DnsRecord(rp, RecordType.TXT, spf, RecordPurpose.RETURN_PATH_SPF, rp))
        out.append(
            DnsRecord(rp, RecordType.MX, mx_value(hostname), RecordPurpose.RETURN_PATH_MX, rp)
        )
    return out


def mx_value(host: str) -> str:
    """An MX record's data as status.dnsRecords lists it: ``<preference> <host>``."""
    return f"{MX_PREFERENCE} {host.lower().rstrip('.')}"


def mx_host(value: str) -> str:
    """The exchange of MX data ``<preference> <host>`` (lower case, no final dot)."""
    parts = value.split()
    return parts[-1].lower().rstrip(".") if parts else ""


def dns_endpoint_name(ip: str) -> str:
    return f"{c.relay_name(ip)}-dns"


def dns_endpoint(owner: RelayOwner, records: Iterable[DnsRecord]) -> Obj:
    """external-dns's DNSEndpoint with the IP's hostname and every DKIM key's record (a next
    key's too, so a rotation publishes itself), in the operator's namespace, owned by the
    DedicatedIP. A TXT target is the whole value, unsplit: external-dns hands a target to its
    provider as it is, and how (whether) a value past 255 bytes is split is the provider's;
    some refuse it (Route53), which docs/deliverability.md says."""
    endpoints = [
        {
            "dnsName": r.name,
            "recordType": r.type.value,
            "targets": [r.value],
            "recordTTL": EXTERNAL_DNS_TTL,
        }
        for r in records
        if r.purpose in EXTERNAL_DNS_PURPOSES
    ]
    return {
        "apiVersion": EXTERNAL_DNS_API_VERSION,
        "kind": EXTERNAL_DNS_KIND,
        "metadata": owned_meta(owner, dns_endpoint_name(owner.name), "dns"),
        "spec": {"endpoints": endpoints},
    }
