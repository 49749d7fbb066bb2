"""The records a DedicatedIP needs (builders/dns_records.py, pure; pinned by a golden file)
and the checker (reconcile/dns.py) against a real DNS server (Knot on loopback).

Regenerate the golden file after an intended change with ``TXMAIL_UPDATE_GOLDEN=1``.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from dns_server import DnsServer, ptr_name, txt
from txmail_operator.api import DedicatedIPSpec
from txmail_operator.api.dns import DnsRecordStatus, RecordPurpose, RecordResult, RecordType
from txmail_operator.builders.dkim import DkimPublicRecord, public_record
from txmail_operator.builders.dns_records import (
    DnsRecord,
    dns_endpoint,
    records_to_publish,
    reverse_name,
    spf_value,
    txt_strings,
)
from txmail_operator.builders.naming import RelayOwner
from txmail_operator.reconcile.dns import (
    RETRY_AFTER,
    Answer,
    DnsChecks,
    DnsReport,
    DnsSchedule,
    Resolver,
    carried,
    check_dns,
    check_records,
    dkim_tags,
    dns_status,
    dns_verified,
    return_path_verified,
    spf_verdict,
    unchecked,
)
from txmail_operator.settings import Settings, SettingsError, parse_nameservers

GOLDEN = Path(__file__).parent / "golden" / "dns-records.yaml"
ADDRESS, HOSTNAME = "203.0.113.5", "mail.example.com"


def spec(**overrides: Any) -> DedicatedIPSpec:
    base = {"address": ADDRESS, "hostname": HOSTNAME, "domains": ["example.com", "example.org"]}
    return DedicatedIPSpec.model_validate({**base, **overrides})


def rsa_record(domain: str, selector: str) -> DkimPublicRecord:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return public_record(domain, selector, "rsa", der)


def ed25519_record(domain: str, selector: str) -> DkimPublicRecord:
    raw = (
        ed25519.Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )
    return public_record(domain, selector, "ed25519", raw)


# Fixed DKIM records for the golden file (the value's key is only data here).
GOLDEN_DKIM = DkimPublicRecord(
    "example.com", "txmail-202612", "rsa", "v=DKIM1; k=rsa; p=" + "MIIBIjANBgkqhkiG9w0B" * 20
)
GOLDEN_NEXT = DkimPublicRecord(
    "example.com", "txmail-202701", "ed25519", "v=DKIM1; k=ed25519; p=" + "A" * 43 + "="
)


# --- the pure builder ----------------------------------------------------------------------------


def test_records_to_publish_match_the_golden_file() -> None:
    records = records_to_publish(
        spec(dns={"returnPathDomain": "bounces.example.net"}), [GOLDEN_DKIM], [GOLDEN_NEXT]
    )
    got = [r.wire() for r in records]
    if os.environ.get("TXMAIL_UPDATE_GOLDEN"):
        GOLDEN.write_text(yaml.safe_dump(got, sort_keys=False, width=100))
    assert got == yaml.safe_load(GOLDEN.read_text())


def test_every_purpose_is_listed_once_in_a_stable_order() -> None:
    records = records_to_publish(
        spec(dns={"returnPathDomain": "bounces.example.net"}), [GOLDEN_DKIM]
    )
    assert [(r.purpose, r.name) for r in records] == [
        (RecordPurpose.PTR, "5.113.0.203.in-addr.arpa"),
        (RecordPurpose.HOSTNAME, HOSTNAME),
        (RecordPurpose.SPF, "example.com"),
        (RecordPurpose.DMARC, "_dmarc.example.com"),
        (RecordPurpose.DKIM, "txmail-202612._domainkey.example.com"),
        (RecordPurpose.SPF, "example.org"),
        (RecordPurpose.DMARC, "_dmarc.example.org"),
        (RecordPurpose.RETURN_PATH_SPF, "bounces.example.net"),
        (RecordPurpose.RETURN_PATH_MX, "bounces.example.net"),
    ]
    assert records[0].value == HOSTNAME and records[1].type is RecordType.A
    assert (records[-1].type, records[-1].strings) == (RecordType.MX, [f"10 {HOSTNAME}"])
    assert all(r.required for r in records)


def test_a_return_path_that_is_a_sending_domain_is_refused_as_the_crd_refuses_it() -> None:
    """Its MX would take the sending domain's mail over to the relay (which takes only bounces
    and complaints): the model refuses it with the CEL rule's message (tests/k8s)."""
    with pytest.raises(ValueError, match=r"dns\.returnPathDomain must be a domain of its own"):
        spec(dns={"returnPathDomain": "example.org"})
    records = records_to_publish(spec(dns={"returnPathDomain": "bounces.example.org"}))
    assert [r.purpose for r in records].count(RecordPurpose.RETURN_PATH_MX) == 1


def test_without_a_return_path_domain_no_mx_is_listed() -> None:
    records = records_to_publish(spec())
    assert not [r for r in records if r.type is RecordType.MX]


def test_ipv6_gets_an_aaaa_record_an_ip6_arpa_ptr_and_an_ip6_spf() -> None:
    records = records_to_publish(spec(address="2001:DB8::0:5"))
    assert records[0].name == ptr_name("2001:db8::5") == reverse_name("2001:db8::5")
    assert records[0].name.endswith(".ip6.arpa")
    assert (records[1].type, records[1].value) == (RecordType.AAAA, "2001:db8::5")
    assert records[2].value == "v=spf1 ip6:2001:db8::5 ~all"
    assert spf_value(ADDRESS) == "v=spf1 ip4:203.0.113.5 ~all"


def test_dkim_keys_in_rotation_are_listed_but_not_required() -> None:
    records = records_to_publish(spec(), [GOLDEN_DKIM], [GOLDEN_NEXT])
    dkim = {r.name: r.required for r in records if r.purpose is RecordPurpose.DKIM}
    assert dkim == {GOLDEN_DKIM.name: True, GOLDEN_NEXT.name: False}


def test_txt_values_are_split_into_255_byte_strings_without_splitting_a_character() -> None:
    assert txt_strings("v=spf1 -all") == ["v=spf1 -all"]
    long = "p=" + "x" * 600
    parts = txt_strings(long)
    assert [len(p) for p in parts] == [255, 255, 92] and "".join(parts) == long
    wide = "é" * 200  # 2 bytes each in UTF-8
    parts = txt_strings(wide)
    assert all(len(p.encode()) <= 255 for p in parts) and "".join(parts) == wide
    record = records_to_publish(spec(), [GOLDEN_DKIM])[4]
    assert record.wire()["value"] == txt_strings(GOLDEN_DKIM.value)
    assert len(record.strings) == 2


def test_dkim_tags_tolerate_whitespace_and_splits() -> None:
    assert dkim_tags(" v = DKIM1 ;k=rsa;\n p = MIIB AAA\tBBB ; ") == {
        "v": "DKIM1",
        "k": "rsa",
        "p": "MIIBAAABBB",
    }


def test_nameserver_settings() -> None:
    assert parse_nameservers("127.0.0.1:5353, 10.0.0.10 [::1]:53 2001:db8::1") == (
        ("127.0.0.1", 5353),
        ("10.0.0.10", 53),
        ("::1", 53),
        ("2001:db8::1", 53),
    )
    settings = Settings.from_env({"TXMAIL_DNS_NAMESERVERS": "127.0.0.1:5353,[::1]:53"})
    assert settings.dns_nameservers == ("127.0.0.1:5353", "[::1]:53")
    assert Resolver.of(settings).nameservers == (("127.0.0.1", 5353), ("::1", 53))
    with pytest.raises(SettingsError, match="TXMAIL_DNS_NAMESERVERS"):
        Settings.from_env({"TXMAIL_DNS_NAMESERVERS": "dns.example.com"})
    with pytest.raises(SettingsError, match="TXMAIL_DNS_TIMEOUT"):
        Settings.from_env({"TXMAIL_DNS_TIMEOUT": "0"})


def test_spec_dns_defaults_and_bounds() -> None:
    dns = spec().dns
    assert (dns.require_verified, dns.check_interval_seconds, dns.return_path_domain) == (
        True,
        300,
        None,
    )
    with pytest.raises(ValueError, match=r"checkIntervalSeconds|check_interval_seconds"):
        spec(dns={"checkIntervalSeconds": 1})


# --- the checker, against Knot -------------------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[DnsServer]:
    with DnsServer() as s:
        yield s


def check(server: DnsServer, records: list[DnsRecord], domains: list[str]) -> DnsReport:
    resolver = Resolver(parse_nameservers(server.address), timeout=2.0)
    return asyncio.run(
        check_records(resolver, records, address=ADDRESS, hostname=HOSTNAME, domains=domains)
    )


def publish_all(server: DnsServer, domain: str, dkim: list[DkimPublicRecord]) -> None:
    server.update(
        {
            ptr_name(ADDRESS): {"PTR": [f"{HOSTNAME}."]},
            HOSTNAME: {"A": [ADDRESS]},
            domain: {"TXT": [txt(spf_value(ADDRESS))]},
            f"_dmarc.{domain}": {"TXT": [txt("v=DMARC1; p=reject; rua=mailto:d@example.com")]},
            **{r.name: {"TXT": [txt(r.value)]} for r in dkim},
        }
    )


def by_name(report: DnsReport) -> dict[str, tuple[RecordResult, str]]:
    return {c.record.name: (c.result, c.reason) for c in report.checks}


def test_correct_records_verify(server: DnsServer) -> None:
    domain = "ok.example.com"
    dkim = [rsa_record(domain, "txmail-a"), ed25519_record(domain, "txmail-b")]
    publish_all(server, domain, dkim)
    report = check(server, records_to_publish(spec(domains=[domain]), dkim), [domain])
    assert report.verified, report.condition()
    assert report.condition()[:2] == (True, "Verified")
    assert report.dkim_verified(domain, "txmail-a") and report.dkim_verified(domain, "txmail-b")
    (verdict,) = report.domain_verdicts()
    assert (verdict.verified, verdict.dmarc_policy) == (True, "reject")


def test_a_wrong_ptr_says_what_it_is_and_what_to_publish(server: DnsServer) -> None:
    domain = "ptr.example.com"
    publish_all(server, domain, [])
    server.set(ptr_name(ADDRESS), "PTR", "mail.other.example.")
    try:
        report = check(server, records_to_publish(spec(domains=[domain])), [domain])
        ok, reason, message = report.condition()
        assert (ok, reason) == (False, "PTRMismatch")
        assert f"the PTR of {ADDRESS} is mail.other.example" in message
        assert f"publish PTR 5.113.0.203.in-addr.arpa -> {HOSTNAME}" in message
        ptr = report.checks[0]
        assert (ptr.result, ptr.found) == (RecordResult.WRONG, ("mail.other.example",))
        assert ptr.wire()["found"] == ["mail.other.example"]
        # the domain's own records verify: its verdict is not the IP's PTR
        assert report.domain_verdicts()[0].verified
        server.delete(ptr_name(ADDRESS), "PTR")
        report = check(server, records_to_publish(spec(domains=[domain])), [domain])
        assert report.condition()[1] == "PTRMissing"
    finally:
        server.set(ptr_name(ADDRESS), "PTR", f"{HOSTNAME}.")


def test_the_hostname_must_resolve_back_to_the_address(server: DnsServer) -> None:
    domain = "fcrdns.example.com"
    publish_all(server, domain, [])
    server.set(HOSTNAME, "A", "203.0.113.99")
    try:
        report = check(server, records_to_publish(spec(domains=[domain])), [domain])
        ok, reason, message = report.condition()
        assert (ok, reason) == (False, "HostnameAddressMismatch")
        assert f"publish A {HOSTNAME} -> {ADDRESS}" in message
    finally:
        server.set(HOSTNAME, "A", ADDRESS)


def test_a_missing_or_other_dkim_record_is_named_exactly(server: DnsServer) -> None:
    domain = "dkim.example.com"
    active = rsa_record(domain, "txmail-202612")
    publish_all(server, domain, [])
    records = records_to_publish(spec(domains=[domain]), [active])
    report = check(server, records, [domain])
    ok, reason, message = report.condition()
    assert (ok, reason) == (False, "DKIMRecordMissing")
    quoted = " ".join(f'"{s}"' for s in txt_strings(active.value))
    assert f"publish {active.name} TXT {quoted}" in message
    assert not report.dkim_verified(domain, "txmail-202612")
    (verdict,) = report.domain_verdicts()
    assert (verdict.verified, verdict.reason) == (False, "DKIMRecordMissing")
    # another key at the name: Wrong, with what was found
    other = rsa_record(domain, "txmail-202612")
    server.set(active.name, "TXT", txt(other.value))
    report = check(server, records, [domain])
    assert report.condition()[1] == "DKIMKeyMismatch"
    assert report.check(active.name) is not None
    # the right key, split differently and with spaces: it verifies
    tags = dkim_tags(active.value)
    key = tags["p"]
    spaced = f"v=DKIM1;  k=rsa ;  p={key[:100]} {key[100:]}"
    server.set(
        active.name, "TXT", '"' + spaced[:60] + '" "' + spaced[60:250] + '" "' + spaced[250:] + '"'
    )
    report = check(server, records, [domain])
    assert report.verified, report.condition()
    assert report.dkim_verified(domain, "txmail-202612")


def test_spf_through_includes_verifies_and_past_ten_lookups_is_a_permerror(
    server: DnsServer,
) -> None:
    domain = "spf.example.com"
    publish_all(server, domain, [])
    server.set(domain, "TXT", txt("v=spf1 include:_a.spf.example.org -all"))
    server.set("_a.spf.example.org", "TXT", txt("v=spf1 include:_b.spf.example.org -all"))
    server.set("_b.spf.example.org", "TXT", txt("v=spf1 ip4:203.0.113.0/24 -all"))
    records = records_to_publish(spec(domains=[domain]))
    assert check(server, records, [domain]).verified
    # a chain of 11 includes: over RFC 7208's limit of 10 DNS lookups
    server.set(domain, "TXT", txt("v=spf1 include:_l1.spf.example.org -all"))
    for i in range(1, 12):
        server.set(
            f"_l{i}.spf.example.org", "TXT", txt(f"v=spf1 include:_l{i + 1}.spf.example.org -all")
        )
    server.set("_l12.spf.example.org", "TXT", txt(f"v=spf1 ip4:{ADDRESS} -all"))
    ok, reason, message = check(server, records, [domain]).condition()
    assert (ok, reason) == (False, "SPFPermError")
    assert "lookup" in message.lower() and domain in message
    # a policy that does not name the address
    server.set(domain, "TXT", txt("v=spf1 ip4:198.51.100.1 -all"))
    ok, reason, message = check(server, records, [domain]).condition()
    assert (ok, reason) == (False, "SPFNotAuthorized")
    assert f"add ip4:{ADDRESS}" in message
    server.delete(domain, "TXT")
    assert check(server, records, [domain]).condition()[1] == "SPFMissing"


def test_dmarc_must_exist_and_is_inherited_from_a_parent(server: DnsServer) -> None:
    domain = "news.dmarc.example.org"
    publish_all(server, domain, [])
    server.delete(f"_dmarc.{domain}", "TXT")
    records = records_to_publish(spec(domains=[domain]))
    report = check(server, records, [domain])
    assert report.condition()[1] == "DMARCMissing"
    assert f'publish _dmarc.{domain} TXT "v=DMARC1; p=none"' in report.condition()[2]
    server.set("_dmarc.dmarc.example.org", "TXT", txt("v=DMARC1; p=reject; sp=quarantine"))
    report = check(server, records, [domain])
    assert report.verified
    assert report.domain_verdicts()[0].dmarc_policy == "quarantine"
    server.set(f"_dmarc.{domain}", "TXT", txt("v=DMARC1; p=nonsense"))
    assert check(server, records, [domain]).condition()[1] == "DMARCInvalid"


def test_the_return_path_domain_needs_spf_too(server: DnsServer) -> None:
    domain = "rp.example.com"
    publish_all(server, domain, [])
    records = records_to_publish(
        spec(domains=[domain], dns={"returnPathDomain": "bounce.example.org"})
    )
    ok, reason, message = check(server, records, [domain]).condition()
    assert (ok, reason) == (False, "ReturnPathSPFMissing")
    assert "bounce.example.org" in message
    server.set("bounce.example.org", "TXT", txt(spf_value(ADDRESS)))
    assert check(server, records, [domain]).condition()[1] == "ReturnPathMXMissing"
    assert not return_path_verified(
        moved := spec(domains=[domain], dns={"returnPathDomain": "bounce.example.org"}),
        check(server, records, [domain]),
    )
    server.set("bounce.example.org", "MX", f"10 {HOSTNAME}.")
    report = check(server, records, [domain])
    assert report.verified
    # The relay's VERP return path goes live now (builders.relay_config), for this hostname.
    assert return_path_verified(moved, report)
    assert not return_path_verified(
        spec(
            hostname="mta2.example.com",
            domains=[domain],
            dns={"returnPathDomain": "bounce.example.org"},
        ),
        report,
    )
    assert not return_path_verified(spec(domains=[domain]), report)
    # A lookup that failed (or none yet) keeps the state as it was: the operator's own DNS
    # trouble does not switch the return path off.
    pending = unchecked(records, [domain])
    assert return_path_verified(moved, pending, unknown=True)
    assert not return_path_verified(moved, pending, unknown=False)


def test_the_return_path_domains_mx_must_name_the_hostname(server: DnsServer) -> None:
    """DSNs to bounces+<id>@<return-path domain> reach the relay only through that domain's MX:
    missing, naming another host, or a null MX is wrong; among several MX records the relay's
    hostname must be the most preferred one (far MTAs try the lowest preference first)."""
    domain, rp = "mx.example.com", "bounces.mx.example.org"
    publish_all(server, domain, [])
    server.set(rp, "TXT", txt(spf_value(ADDRESS)))
    records = records_to_publish(spec(domains=[domain], dns={"returnPathDomain": rp}))
    ok, reason, message = check(server, records, [domain]).condition()
    assert (ok, reason) == (False, "ReturnPathMXMissing")
    assert f"publish {rp}. MX 10 {HOSTNAME}." in message  # as a zone file reads
    server.set(rp, "MX", "10 mx.elsewhere.example.")
    report = check(server, records, [domain])
    ok, reason, message = report.condition()
    assert (ok, reason) == (False, "ReturnPathMXMismatch")
    assert "mx.elsewhere.example" in message and HOSTNAME in message
    mx = report.check(rp, RecordPurpose.RETURN_PATH_MX)
    assert mx is not None and mx.result is RecordResult.WRONG
    assert mx.wire()["found"] == ["10 mx.elsewhere.example"]

    # Several records: another host preferred to the relay is wrong, and so is a tie.
    server.set(rp, "MX", "5 mx.elsewhere.example.", f"20 {HOSTNAME}.")
    report = check(server, records, [domain])
    ok, reason, message = report.condition()
    assert (ok, reason) == (False, "ReturnPathMXNotPreferred")
    assert f"mx.elsewhere.example (5) at the same or a lower preference than {HOSTNAME} (20)" in (
        message
    )
    mx = report.check(rp, RecordPurpose.RETURN_PATH_MX)
    assert mx is not None and mx.wire()["found"] == ["5 mx.elsewhere.example", f"20 {HOSTNAME}"]
    server.set(rp, "MX", "10 mx.elsewhere.example.", f"10 {HOSTNAME}.")
    assert check(server, records, [domain]).condition()[1] == "ReturnPathMXNotPreferred"
    # The relay preferred, a backup beside it: verified (the backup's DSNs are its own matter).
    server.set(rp, "MX", "30 mx.elsewhere.example.", f"20 {HOSTNAME.upper()}.")
    assert check(server, records, [domain]).verified

    # A null MX (RFC 7505: the domain takes no mail) is named as such.
    server.set(rp, "MX", "0 .")
    ok, reason, message = check(server, records, [domain]).condition()
    assert (ok, reason) == (False, "ReturnPathMXMismatch")
    assert "null MX ('0 .'" in message and f"publish {rp}. MX 10 {HOSTNAME}." in message


def test_a_253_character_hostname_fits_every_listed_record_and_message() -> None:
    """The status write validates against the CRD's limits: an MX value '10 <253 characters>'
    and the messages naming it must fit."""
    long = ".".join(["a" * 61, "b" * 61, "c" * 61, "d" * 61, "example"])[:249] + ".com"
    assert len(long) == 253
    rp = "bounces." + "r" * 40 + ".example.net"
    ip = spec(hostname=long, dns={"returnPathDomain": rp})
    records = records_to_publish(ip)
    report = unchecked(records, ip.domains)
    wired = [DnsRecordStatus.model_validate(r) for r in report.records_status()]
    (mx,) = [r for r in wired if r.purpose is RecordPurpose.RETURN_PATH_MX]
    assert mx.value == [f"10 {long}"]


def test_a_lookup_that_hangs_is_a_failed_lookup_that_keeps_the_last_verdict() -> None:
    domain = "hang.example.com"
    with DnsServer() as server:
        publish_all(server, domain, [])
        records = records_to_publish(spec(domains=[domain]))
        first = check(server, records, [domain])
        assert first.verified
        server.drop(f"_dmarc.{domain}")
        resolver = Resolver(parse_nameservers(server.address), timeout=1.0)
        fresh = asyncio.run(
            check_records(resolver, records, address=ADDRESS, hostname=HOSTNAME, domains=[domain])
        )
        ok, reason, message = fresh.condition()
        assert (ok, reason) == (False, "LookupFailed")
        assert f"_dmarc.{domain}" in message
        kept = carried(first, fresh)
        assert kept.verified  # one failed lookup does not undo the last definite verdict
        for _ in range(3):
            kept = carried(kept, fresh)
        assert kept.condition()[1] == "LookupFailed"  # a few in a row do


def test_checks_are_kept_until_the_records_change_or_the_interval_passes(
    server: DnsServer,
) -> None:
    domain = "kept.example.com"
    publish_all(server, domain, [])
    now = [0.0]
    checks = DnsChecks(
        Resolver(parse_nameservers(server.address), timeout=2.0), clock=lambda: now[0]
    )
    records = records_to_publish(spec(domains=[domain]))

    async def report(recs: list[DnsRecord]) -> DnsReport:
        out, _ = await checks.report(
            "ip", recs, address=ADDRESS, hostname=HOSTNAME, domains=[domain], interval=60
        )
        return out

    first = asyncio.run(report(records))
    assert first.verified
    server.delete(f"_dmarc.{domain}", "TXT")
    now[0] = 30.0
    assert asyncio.run(report(records)) is first  # kept: no lookup
    assert not checks.stale("ip", 60) and checks.stale("ip", 30)
    now[0] = 61.0
    assert asyncio.run(report(records)).condition()[1] == "DMARCMissing"
    server.set(f"_dmarc.{domain}", "TXT", txt("v=DMARC1; p=none"))
    assert asyncio.run(report(records[:2])).verified  # other records: checked at once
    assert checks.kept("ip") is not None
    checks.forget("ip")
    assert checks.kept("ip") is None


def test_before_the_first_check_the_written_verdict_stays() -> None:
    """A status refresh right after a restart (nothing checked yet) keeps what was written."""
    records = records_to_publish(spec())
    fresh = unchecked(records, spec().domains)
    assert dns_verified(fresh) == (False, "NotCheckedYet", "the DNS records are checked shortly")
    written = {"type": "DNSVerified", "status": "True", "reason": "Verified", "message": "ok"}
    assert dns_verified(fresh, [written]) == (True, "Verified", "ok")
    before = {"dnsRecords": [{"name": "x"}], "domains": [{"name": "example.com"}]}
    out = dns_status(fresh, before)
    domains = out["domains"]
    assert out == before and isinstance(domains, list) and domains[0] is not before["domains"][0]
    assert dns_status(fresh, {})["dnsRecords"] == [
        r.wire() | {"result": "Unknown", "message": "not checked yet"} for r in records
    ]


def test_the_external_dns_endpoint_carries_the_hostname_and_every_dkim_key_only() -> None:
    owner = RelayOwner("mta1", "00000000-0000-4000-8000-000000000001", "txmail-system")
    records = records_to_publish(spec(), [GOLDEN_DKIM], [GOLDEN_NEXT])
    endpoint = dns_endpoint(owner, records)
    assert (endpoint["apiVersion"], endpoint["kind"]) == (
        "externaldns.k8s.io/v1alpha1",
        "DNSEndpoint",
    )
    assert endpoint["metadata"]["name"] == "txmail-relay-mta1-dns"
    assert endpoint["metadata"]["namespace"] == "txmail-system"
    assert endpoint["metadata"]["ownerReferences"][0]["uid"] == owner.uid
    assert endpoint["spec"]["endpoints"] == [
        {"dnsName": HOSTNAME, "recordType": "A", "targets": [ADDRESS], "recordTTL": 300},
        *(
            {"dnsName": r.name, "recordType": "TXT", "targets": [r.value], "recordTTL": 300}
            for r in (GOLDEN_DKIM, GOLDEN_NEXT)
        ),
    ]


# --- errors, restarts and the schedule ---------------------------------------------------------


def test_a_dns_error_inside_spf_is_that_records_failed_lookup(server: DnsServer) -> None:
    """A third party's include naming what is no DNS name (past 255 bytes: dnspython's
    NameTooLong, neither a timeout nor SERVFAIL) fails that record's lookup; the check
    finishes, the other records are checked, and the message names the error's class."""
    domain = "badinclude.example.com"
    publish_all(server, domain, [])
    far = ".".join(["c" * 60] * 5) + ".example.org"
    server.set(domain, "TXT", txt(f"v=spf1 include:{far} -all"))
    report = check(server, records_to_publish(spec(domains=[domain])), [domain])
    spf_check = report.check(domain, RecordPurpose.SPF)
    assert spf_check is not None
    assert (spf_check.result, spf_check.reason) == (RecordResult.UNKNOWN, "LookupFailed")
    assert "NameTooLong" in spf_check.message
    assert all(c.verified for c in report.checks if c is not spf_check)


def test_spf_is_not_missing_when_the_txt_lookup_failed() -> None:
    """pyspf saw a record that does not pass, but the domain's own TXT lookup failed: what is
    published is not known, so the result is a failed lookup, not a definite SPFMissing.
    (Against Knot the two lookups ask the same name of the same server, so one cannot be
    made to fail alone: the verdict is the pure part.)"""
    (record,) = [
        r for r in records_to_publish(spec(domains=["x.example.com"])) if r.name == "x.example.com"
    ]
    failed = Answer(failure="no answer for TXT x.example.com within 1 s")
    out = spf_verdict(record, ADDRESS, failed, "fail", "SPF fail")
    assert (out.result, out.reason) == (RecordResult.UNKNOWN, "LookupFailed")
    assert "x.example.com within 1 s" in out.message
    missing = spf_verdict(record, ADDRESS, Answer(), "none", "")
    assert missing.reason == "SPFMissing"


def test_after_a_restart_the_written_verdict_survives_one_failed_lookup() -> None:
    """Nothing in memory after a restart: status.dnsRecords' Verified results are carried
    over a failed lookup like an earlier check's, so Ready does not flap."""
    domain = "restart.example.com"
    with DnsServer() as server:
        publish_all(server, domain, [])
        the_spec = spec(domains=[domain])
        resolver = Resolver(parse_nameservers(server.address), timeout=1.0)
        before = asyncio.run(check_dns(DnsChecks(resolver), "ip", the_spec))
        assert before.verified
        written = before.records_status()  # what status.dnsRecords holds
        server.drop(f"_dmarc.{domain}")
        fresh = DnsChecks(Resolver(parse_nameservers(server.address), timeout=1.0))
        after = asyncio.run(check_dns(fresh, "ip", the_spec, written=written))
        assert after.verified, after.condition()
        dmarc = after.check(f"_dmarc.{domain}")
        assert dmarc is not None and dmarc.failures == 1
        nothing_written = DnsChecks(Resolver(parse_nameservers(server.address), timeout=1.0))
        unseeded = asyncio.run(check_dns(nothing_written, "ip", the_spec))
        assert unseeded.condition()[1] == "LookupFailed"


def test_a_spec_change_that_leaves_the_records_alone_is_not_checked_again(
    server: DnsServer,
) -> None:
    domain = "samekey.example.com"
    publish_all(server, domain, [])
    checks = DnsChecks(Resolver(parse_nameservers(server.address), timeout=2.0))
    first = asyncio.run(check_dns(checks, "ip", spec(domains=[domain])))
    other = spec(domains=[domain], dns={"requireVerified": False, "checkIntervalSeconds": 600})
    assert asyncio.run(check_dns(checks, "ip", other)) is first  # kept: no lookup
    moved = spec(domains=[domain], dns={"returnPathDomain": "bounce.example.org"})
    assert asyncio.run(check_dns(checks, "ip", moved)) is not first  # its records changed


def test_the_schedule_does_not_queue_an_ip_whose_check_never_finishes_every_tick() -> None:
    """An IP whose reconcile returns early (its namespace is missing) or fails makes no
    report: it is queued again RETRY_AFTER after the attempt, not at every tick."""
    now = [0.0]
    checks = DnsChecks(Resolver([("127.0.0.1", 9)], timeout=1.0), clock=lambda: now[0])
    queued: list[str] = []
    schedule = DnsSchedule(checks, lambda: [("ip", 300.0)], queued.append)
    for _ in range(50):  # 100 s of ticks
        now[0] += 2.0
        schedule.due()
    # first seen at 2 s (its create or resume handler checks it), queued at 32, 62 and 92 s
    assert len(queued) == int((100 - 2) // RETRY_AFTER) == 3


def test_the_schedule_checks_a_reported_ip_once_per_interval(server: DnsServer) -> None:
    domain = "sched.example.com"
    publish_all(server, domain, [])
    now = [0.0]
    checks = DnsChecks(
        Resolver(parse_nameservers(server.address), timeout=2.0), clock=lambda: now[0]
    )
    queued: list[str] = []
    schedule = DnsSchedule(checks, lambda: [("ip", 60.0)], queued.append)
    asyncio.run(check_dns(checks, "ip", spec(domains=[domain], dns={"checkIntervalSeconds": 60})))
    for _ in range(40):  # 80 s
        now[0] += 2.0
        schedule.due()
    assert queued == ["ip"]  # at 60 s, and its check still under way at 80 s
