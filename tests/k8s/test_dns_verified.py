"""DNSVerified against a real DNS server: the operator resolves against the tier's Knot server
(``cluster_dns``), a test publishes, breaks and fixes records while the operator runs, and the
condition and Ready follow.

Every test uses its own address, hostname and domains, so the records of one never answer for
another in the shared server.
"""

from __future__ import annotations

import contextlib
import itertools
import random
import uuid
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from cluster.kubeapi import custom_object
from dns_server import DnsServer, ptr_name, txt
from k8s.kit import GROUP, VERSION, Kit
from k8s.operator_process import wait_for
from txmail_relay import contract as c

pytestmark = pytest.mark.k8s
IPS = "dedicatedips"
INTERVAL = 5  # spec.dns.checkIntervalSeconds of these tests (the smallest allowed)
FOLLOW = 40.0  # a re-check within one interval and the operator's tick, on a loaded machine


class Names:
    """An address, hostname and sending domain of this test only."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:8]
        self.address = f"198.51.{random.randint(0, 255)}.{random.randint(1, 254)}"
        self.hostname = f"mta-{tag}.example.com"
        self.domain = f"d{tag}.example.org"

    @property
    def ptr(self) -> str:
        return ptr_name(self.address)


@pytest.fixture
def names() -> Names:
    return Names()


def dedicated_ip(kit: Kit, names: Names, **dns: Any) -> str:
    return kit.dedicated_ip(
        address=names.address,
        hostname=names.hostname,
        domains=[names.domain],
        dns={"checkIntervalSeconds": INTERVAL, **dns},
    )


def dns_condition(kit: Kit, ip: str) -> dict[str, Any] | None:
    return kit.condition(IPS, None, ip, "DNSVerified")


def wait_dns(kit: Kit, ip: str, status: str, reason: str | None = None) -> dict[str, Any]:
    seen: list[dict[str, Any] | None] = [None]

    def probe() -> dict[str, Any] | None:
        cond = seen[0] = dns_condition(kit, ip)
        if cond and cond["status"] == status and reason in (None, cond["reason"]):
            return cond
        return None

    try:
        return wait_for(probe, FOLLOW, f"DNSVerified={status} {reason or ''} on {ip}", every=0.2)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; DNSVerified was {seen[0]}") from None


def status(kit: Kit, ip: str) -> dict[str, Any]:
    return (kit.get(IPS, None, ip) or {}).get("status") or {}


def delete(kit: Kit, ip: str) -> None:
    kit.objs.delete_cluster_custom_object(GROUP, VERSION, IPS, ip)


def to_publish(kit: Kit, ip: str) -> list[dict[str, Any]]:
    """status.dnsRecords once the operator listed the DKIM keys it made too."""

    def listed() -> list[dict[str, Any]] | None:
        records: list[dict[str, Any]] = status(kit, ip).get("dnsRecords") or []
        return records if any(r["purpose"] == "DKIM" for r in records) else None

    return wait_for(listed, FOLLOW, f"the records of {ip}, DKIM included", every=0.2)


def publish(server: DnsServer, records: list[dict[str, Any]], *skip: str) -> None:
    """Publish what the status lists, as a person would (but the purposes in ``skip``)."""
    for record in records:
        if record["purpose"] in skip:
            continue
        if record["type"] == "TXT":
            data = txt("".join(record["value"]))
        elif record["type"] in ("PTR", "MX"):  # a host name (MX: after the preference)
            data = record["value"][0] + "."
        else:
            data = record["value"][0]
        server.set(record["name"], record["type"], data)


def unpublish(server: DnsServer, records: list[dict[str, Any]]) -> None:
    for record in records:
        server.delete(record["name"])


def test_correct_records_verify_and_the_ip_is_ready(
    kit: Kit, cluster_dns: DnsServer, names: Names
) -> None:
    ip = dedicated_ip(kit, names, requireVerified=True)
    records = to_publish(kit, ip)
    try:
        assert {r["purpose"] for r in records} == {"PTR", "Hostname", "SPF", "DMARC", "DKIM"}
        kit.mark_relay_ready(ip)
        cond = wait_dns(kit, ip, "False")
        assert not kit.is_ready(IPS, None, ip)
        publish(cluster_dns, records)
        cond = wait_dns(kit, ip, "True", "Verified")
        assert names.domain in cond["message"]
        wait_for(lambda: kit.is_ready(IPS, None, ip), FOLLOW, "Ready", every=0.2)
        st = status(kit, ip)
        checked = {(r["purpose"], r["name"]): r for r in st["dnsRecords"]}
        assert set(checked) >= {
            ("PTR", names.ptr),
            ("Hostname", names.hostname),
            ("SPF", names.domain),
            ("DMARC", f"_dmarc.{names.domain}"),
        }
        assert all(r["result"] == "Verified" for r in checked.values() if r["required"])
        assert checked[("PTR", names.ptr)]["value"] == [names.hostname]
        assert checked[("Hostname", names.hostname)]["type"] == "A"
        (domain,) = st["domains"]
        assert domain == {
            "name": names.domain,
            "verified": True,
            "reason": "Verified",
            "message": domain["message"],
            "dmarcPolicy": "none",
            **({"dkim": domain["dkim"]} if "dkim" in domain else {}),
        }
    finally:
        delete(kit, ip)
        unpublish(cluster_dns, records)


def test_the_return_paths_mx_must_name_the_hostname_and_a_fix_is_followed(
    kit: Kit, cluster_dns: DnsServer, names: Names
) -> None:
    """With spec.dns.returnPathDomain the DSNs come back through that domain's MX: it is
    listed (-> spec.hostname), checked, and gates DNSVerified like the other records."""
    return_path = f"bounces.{names.domain}"
    ip = dedicated_ip(kit, names, requireVerified=True, returnPathDomain=return_path)
    records = to_publish(kit, ip)
    try:
        (mx,) = [r for r in records if r["purpose"] == "ReturnPathMX"]
        assert (mx["name"], mx["type"], mx["value"]) == (
            return_path,
            "MX",
            [f"10 {names.hostname}"],
        )
        publish(cluster_dns, records, "ReturnPathMX")
        cond = wait_dns(kit, ip, "False", "ReturnPathMXMissing")
        assert f"publish {return_path}. MX 10 {names.hostname}." in cond["message"]
        cluster_dns.set(return_path, "MX", "10 mx.elsewhere.example.")
        cond = wait_dns(kit, ip, "False", "ReturnPathMXMismatch")
        assert "mx.elsewhere.example" in cond["message"]
        # VERP waits for the MX: DSNs to bounces+<id>@ would go elsewhere until then.
        config = kit.relay_config(ip)
        assert config is not None and config.return_path.domain is None
        publish(cluster_dns, [mx])
        wait_dns(kit, ip, "True", "Verified")
        checked = next(r for r in status(kit, ip)["dnsRecords"] if r["purpose"] == "ReturnPathMX")
        assert checked["result"] == "Verified"
        wait_for(
            lambda: (kit.relay_config(ip) or config).return_path.domain == return_path,
            FOLLOW,
            "the VERP return path once its MX verified",
        )
    finally:
        delete(kit, ip)
        unpublish(cluster_dns, records)


def test_a_wrong_ptr_names_the_record_then_a_fix_is_followed(
    kit: Kit, cluster_dns: DnsServer, names: Names
) -> None:
    ip = dedicated_ip(kit, names, requireVerified=True)
    records = to_publish(kit, ip)
    publish(cluster_dns, records)
    cluster_dns.set(names.ptr, "PTR", "mail.other.example.")
    try:
        kit.mark_relay_ready(ip)
        cond = wait_dns(kit, ip, "False", "PTRMismatch")
        assert f"the PTR of {names.address} is mail.other.example" in cond["message"]
        assert f"publish PTR {names.ptr} -> {names.hostname}" in cond["message"]
        ready = kit.condition(IPS, None, ip)
        assert ready is not None and ready["status"] == "False"
        assert ready["reason"] == "DNSNotVerified" and "PTRMismatch" in ready["message"]
        ptr = next(r for r in status(kit, ip)["dnsRecords"] if r["purpose"] == "PTR")
        assert (ptr["result"], ptr["found"]) == ("Wrong", ["mail.other.example"])
        wait_for(
            lambda: any(e.reason == "PTRMismatch" for e in kit.events("default", ip)),
            FOLLOW,
            "a PTRMismatch Event",
        )
        # fixed while the operator runs: the next check sees it
        cluster_dns.set(names.ptr, "PTR", f"{names.hostname}.")
        wait_dns(kit, ip, "True", "Verified")
        wait_for(lambda: kit.is_ready(IPS, None, ip), FOLLOW, "Ready after the fix", every=0.2)
        wait_for(
            lambda: any(e.reason == "DNSVerified" for e in kit.events("default", ip)),
            FOLLOW,
            "a DNSVerified Event",
        )
        # and broken again (the DMARC record removed): it follows back
        cluster_dns.delete(f"_dmarc.{names.domain}", "TXT")
        cond = wait_dns(kit, ip, "False", "DMARCMissing")
        assert f'publish _dmarc.{names.domain} TXT "v=DMARC1; p=none"' in cond["message"]
        (domain,) = status(kit, ip)["domains"]
        assert (domain["verified"], domain["reason"]) == (False, "DMARCMissing")
        wait_for(lambda: not kit.is_ready(IPS, None, ip), FOLLOW, "not Ready", every=0.2)
    finally:
        delete(kit, ip)
        unpublish(cluster_dns, records)


def test_a_missing_dkim_record_is_named_exactly_then_published(
    kit: Kit, cluster_dns: DnsServer, names: Names
) -> None:
    ip = dedicated_ip(kit, names)
    records = to_publish(kit, ip)
    publish(cluster_dns, records, "DKIM")
    try:
        cond = wait_dns(kit, ip, "False", "DKIMRecordMissing")
        (dkim,) = [r for r in records if r["purpose"] == "DKIM"]
        quoted = " ".join(f'"{part}"' for part in dkim["value"])
        assert f"publish {dkim['name']} TXT {quoted}" in cond["message"]
        assert dkim["name"].endswith(f"._domainkey.{names.domain}")
        assert all(len(part.encode()) <= 255 for part in dkim["value"])
        listed = next(r for r in status(kit, ip)["dnsRecords"] if r["purpose"] == "DKIM")
        assert listed["result"] == "Missing" and listed["required"] is True
        (domain,) = status(kit, ip)["domains"]
        assert (domain["verified"], domain["reason"]) == (False, "DKIMRecordMissing")
        publish(cluster_dns, [dkim])
        wait_dns(kit, ip, "True", "Verified")
    finally:
        delete(kit, ip)
        unpublish(cluster_dns, records)


def test_spf_past_the_ten_lookup_limit_is_a_permerror(
    kit: Kit, cluster_dns: DnsServer, names: Names
) -> None:
    ip = dedicated_ip(kit, names)
    records = to_publish(kit, ip)
    publish(cluster_dns, records)
    chain = [f"_l{i}.{names.domain}" for i in range(12)]
    cluster_dns.set(names.domain, "TXT", txt(f"v=spf1 include:{chain[0]} ~all"))
    for here, there in itertools.pairwise(chain):
        cluster_dns.set(here, "TXT", txt(f"v=spf1 include:{there} -all"))
    cluster_dns.set(chain[-1], "TXT", txt(f"v=spf1 ip4:{names.address} -all"))
    try:
        cond = wait_dns(kit, ip, "False", "SPFPermError")
        assert names.domain in cond["message"] and "lookup" in cond["message"].lower()
        # a shorter chain (two includes) authorizes the address
        cluster_dns.set(names.domain, "TXT", txt(f"v=spf1 include:{chain[-3]} ~all"))
        wait_dns(kit, ip, "True", "Verified")
    finally:
        delete(kit, ip)
        unpublish(cluster_dns, records)
        for name in chain:
            cluster_dns.delete(name)


def test_a_dns_error_that_is_no_timeout_still_gets_the_relay(
    kit: Kit, cluster_dns: DnsServer, names: Names
) -> None:
    """The domain's SPF includes a name past DNS's 255 bytes (dnspython raises NameTooLong
    inside pyspf, neither a timeout nor SERVFAIL): the relay's objects are applied all the
    same and the record is a failed lookup naming the error's class."""
    far = ".".join(["c" * 60] * 5) + ".example.org"
    cluster_dns.set(names.domain, "TXT", txt(f"v=spf1 include:{far} -all"))
    apps = client.AppsV1Api(kit.api)

    def deployment() -> Any:
        try:
            return apps.read_namespaced_deployment(c.relay_name(ip), kit.operator_namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def spf_result() -> dict[str, Any] | None:
        records = status(kit, ip).get("dnsRecords") or []
        spf = next((r for r in records if r["purpose"] == "SPF"), None)
        return spf if spf is not None and spf["result"] == "Unknown" else None

    ip = dedicated_ip(kit, names)
    try:
        wait_for(deployment, FOLLOW, f"the relay Deployment of {ip}", every=0.2)
        spf = wait_for(spf_result, FOLLOW, "the SPF record's failed lookup", every=0.2)
        assert "NameTooLong" in spf["message"]
        assert dns_condition(kit, ip) is not None
    finally:
        delete(kit, ip)
        cluster_dns.delete(names.domain)


def test_without_require_verified_the_ip_is_ready_without_dns(kit: Kit, names: Names) -> None:
    ip = dedicated_ip(kit, names, requireVerified=False)  # nothing published
    try:
        kit.mark_relay_ready(ip)
        wait_for(lambda: kit.is_ready(IPS, None, ip), FOLLOW, "Ready without DNS", every=0.2)
        cond = wait_dns(kit, ip, "False")
        assert cond["reason"] in ("PTRMissing", "HostnameAddressMissing", "SPFMissing")
        results = {r["purpose"]: r["result"] for r in status(kit, ip)["dnsRecords"]}
        assert results == {
            "PTR": "Missing",
            "Hostname": "Missing",
            "SPF": "Missing",
            "DMARC": "Missing",
            "DKIM": "Missing",
        }
    finally:
        delete(kit, ip)


def test_a_change_of_the_records_is_checked_at_once(
    kit: Kit, cluster_dns: DnsServer, names: Names
) -> None:
    ip = kit.dedicated_ip(
        address=names.address,
        hostname=names.hostname,
        domains=[names.domain],
        dns={"checkIntervalSeconds": 86400},  # the schedule would not re-check within the test
    )
    records = to_publish(kit, ip)  # checked before anything was published
    publish(cluster_dns, records)
    try:
        # another sending domain: other records, checked at once (the first domain's now
        # verify, the new one has no SPF)
        other = f"o{uuid.uuid4().hex[:8]}.example.org"
        kit.objs.patch_cluster_custom_object(
            GROUP, VERSION, IPS, ip, {"spec": {"domains": [names.domain, other]}}
        )
        cond = wait_dns(kit, ip, "False", "SPFMissing")
        assert other in cond["message"]
        assert other in {d["name"] for d in status(kit, ip)["domains"]}
    finally:
        delete(kit, ip)
        unpublish(cluster_dns, records)


# external-dns's CRD as external-dns ships it (the fields the operator writes).
DNSENDPOINT_CRD: dict[str, Any] = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {
        "name": "dnsendpoints.externaldns.k8s.io",
        # *.k8s.io groups need it; external-dns's own CRD carries this one
        "annotations": {
            "api-approved.kubernetes.io": "https://github.com/kubernetes-sigs/external-dns/pull/2007"
        },
    },
    "spec": {
        "group": "externaldns.k8s.io",
        "scope": "Namespaced",
        "names": {
            "kind": "DNSEndpoint",
            "listKind": "DNSEndpointList",
            "plural": "dnsendpoints",
            "singular": "dnsendpoint",
        },
        "versions": [
            {
                "name": "v1alpha1",
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {
                                "type": "object",
                                "properties": {
                                    "endpoints": {
                                        "type": "array",
                                        "items": {
                                            "type": "object",
                                            "properties": {
                                                "dnsName": {"type": "string"},
                                                "recordType": {"type": "string"},
                                                "recordTTL": {"type": "integer"},
                                                "targets": {
                                                    "type": "array",
                                                    "items": {"type": "string"},
                                                },
                                            },
                                        },
                                    }
                                },
                            },
                            "status": {
                                "type": "object",
                                "x-kubernetes-preserve-unknown-fields": True,
                            },
                        },
                    }
                },
            }
        ],
    },
}


def dns_endpoint(kit: Kit, ip: str) -> dict[str, Any] | None:
    try:
        out = kit.objs.get_namespaced_custom_object(
            "externaldns.k8s.io",
            "v1alpha1",
            kit.operator_namespace,
            "dnsendpoints",
            f"{c.relay_name(ip)}-dns",
        )
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise
    return custom_object(out)


def test_external_dns_gets_the_hostname_and_dkim_records_when_its_crd_is_installed(
    kit: Kit, names: Names
) -> None:
    ext = client.ApiextensionsV1Api(kit.api)
    ip = dedicated_ip(kit, names, externalDNS=True)
    try:
        cond = wait_dns(kit, ip, "False")
        wait_for(
            lambda: "DNSEndpoint kind" in (dns_condition(kit, ip) or {}).get("message", ""),
            FOLLOW,
            "the missing DNSEndpoint kind noted",
            every=0.2,
        )
        cond = dns_condition(kit, ip) or {}
        assert "is not installed" in cond["message"] and "externalDNS" in cond["message"]
        ext.create_custom_resource_definition(
            client.V1CustomResourceDefinition.model_validate(DNSENDPOINT_CRD)
        )
        endpoint = wait_for(lambda: dns_endpoint(kit, ip), FOLLOW, "the DNSEndpoint", every=0.2)
        records = to_publish(kit, ip)
        dkim = next(r for r in records if r["purpose"] == "DKIM")
        by_name = {e["dnsName"]: e for e in endpoint["spec"]["endpoints"]}
        assert set(by_name) == {names.hostname, dkim["name"]}  # SPF and DMARC stay yours
        assert (by_name[names.hostname]["recordType"], by_name[names.hostname]["targets"]) == (
            "A",
            [names.address],
        )
        assert by_name[dkim["name"]]["targets"] == ["".join(dkim["value"])]
        (owner,) = endpoint["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["name"]) == ("DedicatedIP", ip)
        wait_for(
            lambda: "DNSEndpoint" not in (dns_condition(kit, ip) or {}).get("message", "x"),
            FOLLOW,
            "the note gone",
            every=0.2,
        )
        kit.objs.patch_cluster_custom_object(
            GROUP, VERSION, IPS, ip, {"spec": {"dns": {"externalDNS": False}}}
        )
        wait_for(lambda: dns_endpoint(kit, ip) is None, FOLLOW, "the DNSEndpoint deleted")
    finally:
        delete(kit, ip)
        with contextlib.suppress(ApiException):
            ext.delete_custom_resource_definition(DNSENDPOINT_CRD["metadata"]["name"])
