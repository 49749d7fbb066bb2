"""DKIM keys of a DedicatedIP, against the real control plane and the tier's real DNS server.

A DedicatedIP gets one key Secret with a key per sending domain, lists each public record in
its status and names the active keys in the relay's RelayConfig; a keyGeneration bump lists a
next record, and signing switches to it only once that record is published in the DNS server
the operator resolves against (``cluster_dns``, Knot). Bring-your-own keys come from a Secret
the user names. No private key material ever shows in status, annotations, Events or logs.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from dns_server import DnsServer, txt
from k8s.kit import GROUP, VERSION, Kit
from k8s.operator_process import OperatorProcess, wait_for
from txmail_operator.builders import dkim as b
from txmail_relay import contract as c

pytestmark = pytest.mark.k8s
IPS = "dedicatedips"
INTERVAL = 5  # spec.dns.checkIntervalSeconds (the smallest allowed)
FOLLOW = 40.0  # a DNS re-check within one interval and the operator's tick, on a loaded machine
SETTLE = 2 * INTERVAL + 2  # two DNS checks


def domains_of_test() -> list[str]:
    tag = uuid.uuid4().hex[:8]
    return [f"a{tag}.example.org", f"b{tag}.example.com"]


@pytest.fixture
def domains(cluster_dns: DnsServer) -> Iterator[list[str]]:
    names = domains_of_test()
    yield names
    for name in names:
        cluster_dns.delete(name)


def status(kit: Kit, ip: str) -> dict[str, Any]:
    return (kit.get(IPS, None, ip) or {}).get("status") or {}


def dkim_of(kit: Kit, ip: str, domain: str) -> dict[str, Any]:
    found: dict[str, Any] = next(
        (d for d in status(kit, ip).get("domains") or [] if d["name"] == domain), {}
    )
    dkim: dict[str, Any] = found.get("dkim") or {}
    return dkim


def key_secret(kit: Kit, ip: str) -> Any:
    return kit.raw_secret(kit.operator_namespace, c.dkim_secret_name(ip))


def key_files(kit: Kit, ip: str) -> dict[str, bytes]:
    raw = key_secret(kit, ip)
    return {k: base64.b64decode(v) for k, v in ((raw.data if raw else None) or {}).items()}


def sha(data: bytes) -> str:
    """What a failing assertion may print of a key: never the key."""
    return hashlib.sha256(data).hexdigest()


def digests(files: dict[str, bytes]) -> dict[str, str]:
    return {name: sha(data) for name, data in files.items()}


def relay_config(kit: Kit, ip: str) -> c.RelayConfig:
    config = kit.relay_config(ip)
    assert config is not None, f"no RelayConfig for {ip} yet"
    return config


def replaced(kit: Kit, ip: str, domain: str, old: str, what: str) -> list[str]:
    """The active selectors of ``domain`` once they are no longer just ``old``."""

    def changed() -> list[str] | None:
        active: list[str] = dkim_of(kit, ip, domain).get("active") or [old]
        return active if active != [old] else None

    return wait_for(changed, FOLLOW, what)


def signing(kit: Kit, ip: str, domain: str) -> list[str]:
    return [k.selector for k in relay_config(kit, ip).dkim.keys_for(domain)]


def dkim_records(kit: Kit, ip: str) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in status(kit, ip).get("dnsRecords") or [] if r["purpose"] == "DKIM"}


def reasons(kit: Kit, ip: str) -> list[str]:
    return [e.reason for e in kit.events("default", ip)]


def patch_dkim(kit: Kit, ip: str, dkim: dict[str, Any]) -> None:
    kit.objs.patch_cluster_custom_object(GROUP, VERSION, IPS, ip, {"spec": {"dkim": dkim}})


def delete(kit: Kit, ip: str) -> None:
    kit.objs.delete_cluster_custom_object(GROUP, VERSION, IPS, ip)


def key_material(pem: bytes) -> list[str]:
    """Pieces of a PEM key's body that must never show anywhere but the key Secret."""
    body = "".join(line for line in pem.decode().splitlines() if "-----" not in line)
    return [body[i : i + 24] for i in range(0, len(body) - 24, 24)]


def assert_no_key_material(kit: Kit, ip: str, pems: list[bytes], operator: OperatorProcess) -> None:
    raw = key_secret(kit, ip)
    visible = json.dumps(
        {
            "status": status(kit, ip),
            "annotations": raw.metadata.annotations if raw else None,
            "ipAnnotations": ((kit.get(IPS, None, ip) or {}).get("metadata") or {}).get(
                "annotations"
            ),
            "events": [e.message for e in kit.events("default", ip)],
        }
    )
    log = operator.output()
    for pem in pems:
        for piece in key_material(pem):
            assert piece not in visible
            assert piece not in log
    assert "PRIVATE KEY" not in visible


published: list[str] = []  # DKIM records this module put in the shared DNS server


def publish(cluster_dns: DnsServer, record: dict[str, Any]) -> None:
    cluster_dns.set(record["name"], "TXT", txt("".join(record["value"])))
    published.append(record["name"])


def test_each_domain_gets_a_key_its_record_and_the_relay_signs_with_it(
    kit: Kit, operator: OperatorProcess, domains: list[str]
) -> None:
    ip = kit.dedicated_ip(domains=domains, dkim={"algorithm": "RSAAndEd25519"})
    try:
        active = {d: wait_active(kit, ip, d) for d in domains}
        raw = key_secret(kit, ip)
        assert raw.metadata.owner_references[0].kind == "DedicatedIP"
        assert raw.metadata.owner_references[0].name == ip
        files = key_files(kit, ip)
        records = dkim_records(kit, ip)
        for domain in domains:
            rsa_sel, ed_sel = active[domain]
            assert rsa_sel == f"txmail-{ip}-{rsa_sel.split('-')[-2]}-1"
            assert ed_sel == f"{rsa_sel}-ed"
            assert dkim_of(kit, ip, domain)["source"] == "Generated"
            # The relay signs with these keys, read from files of the mounted Secret.
            keys = relay_config(kit, ip).dkim.keys_for(domain)
            assert [(k.selector, k.algorithm) for k in keys] == [
                (rsa_sel, c.DkimAlgorithm.RSA_SHA256),
                (ed_sel, c.DkimAlgorithm.ED25519_SHA256),
            ]
            for key, algorithm in zip(keys, (b.RSA, b.ED25519), strict=True):
                pem = files[key.key_file]
                # Status lists the record that publishes exactly this key, split for TXT.
                record = records[f"{key.selector}._domainkey.{domain}"]
                expected = b.record_for_private_key(domain, key.selector, algorithm, pem)
                assert "".join(record["value"]) == expected.value
                assert all(len(s.encode()) <= 255 for s in record["value"])
                assert record["required"] is True and record["type"] == "TXT"
        rsa_record = records[f"{active[domains[0]][0]}._domainkey.{domains[0]}"]
        assert len(rsa_record["value"]) == 2  # a 2048-bit key needs two strings
        deployment = kit_deployment(kit, ip)
        volume = next(v for v in deployment.spec.template.spec.volumes if v.name == "dkim")
        assert volume.secret.secret_name == c.dkim_secret_name(ip) and not volume.secret.items
        wait_for(lambda: reasons(kit, ip).count("DKIMKeyCreated") == 2, 20, "two Events")
        assert_no_key_material(kit, ip, list(files.values()), operator)

        # Created once: a restarted operator keeps the keys and their selectors. A spec
        # change after the restart, seen in observedGeneration, proves it reconciled since.
        operator.restart()
        operator.wait_ready(kit.api)
        kit.objs.patch_cluster_custom_object(
            GROUP,
            VERSION,
            IPS,
            ip,
            {"spec": {"dns": {"requireVerified": False, "checkIntervalSeconds": 301}}},
        )
        generation = (kit.get(IPS, None, ip) or {})["metadata"]["generation"]
        wait_for(
            lambda: status(kit, ip).get("observedGeneration") == generation,
            30,
            "a reconcile after the restart",
        )
        assert digests(key_files(kit, ip)) == digests(files)
        assert {d: dkim_of(kit, ip, d)["active"] for d in domains} == active
    finally:
        delete(kit, ip)


def wait_active(kit: Kit, ip: str, domain: str) -> list[str]:
    def probe() -> list[str] | None:
        found: list[str] | None = dkim_of(kit, ip, domain).get("active")
        return found

    return wait_for(probe, 30, f"the active keys of {domain}")


def kit_deployment(kit: Kit, ip: str) -> Any:
    apps = client.AppsV1Api(kit.api)
    return wait_for(
        lambda: apps.read_namespaced_deployment(c.relay_name(ip), kit.operator_namespace),
        20,
        "the relay Deployment",
    )


def test_a_rotation_switches_signing_only_once_the_next_record_is_published(
    kit: Kit, cluster_dns: DnsServer, operator: OperatorProcess, domains: list[str]
) -> None:
    domain = domains[0]
    ip = kit.dedicated_ip(
        domains=[domain], dns={"requireVerified": False, "checkIntervalSeconds": INTERVAL}
    )
    try:
        (first,) = wait_for(lambda: dkim_of(kit, ip, domain).get("active"), 30, "the first key")
        publish(cluster_dns, dkim_records(kit, ip)[f"{first}._domainkey.{domain}"])
        wait_for(
            lambda: dkim_records(kit, ip)[f"{first}._domainkey.{domain}"]["result"] == "Verified",
            FOLLOW,
            "the first record verifies",
        )

        patch_dkim(kit, ip, {"keyGeneration": 1})
        (second,) = wait_for(lambda: dkim_of(kit, ip, domain).get("next"), 30, "the next key")
        assert second != first and second.endswith("-2")
        listed = dkim_records(kit, ip)
        assert listed[f"{second}._domainkey.{domain}"]["required"] is False
        assert listed[f"{first}._domainkey.{domain}"]["required"] is True
        wait_for(lambda: "DKIMKeyCreated" in reasons(kit, ip), 20, "DKIMKeyCreated")

        # Not published: two DNS checks later the first key still signs.
        wait_for(
            lambda: dkim_records(kit, ip)[f"{second}._domainkey.{domain}"]["result"] == "Missing",
            FOLLOW,
            "the next record checked",
        )
        assert signing(kit, ip, domain) == [first]
        assert dkim_of(kit, ip, domain)["next"] == [second]

        # Published: signing switches, the old record stays listed, its key kept.
        publish(cluster_dns, dkim_records(kit, ip)[f"{second}._domainkey.{domain}"])
        wait_for(lambda: signing(kit, ip, domain) == [second], FOLLOW, "signing switches")
        dkim = wait_for(
            lambda: dkim_of(kit, ip, domain) if dkim_of(kit, ip, domain).get("retiring") else None,
            FOLLOW,
            "the retiring key in status",
        )
        assert dkim["active"] == [second] and "next" not in dkim
        assert [r["selector"] for r in dkim["retiring"]] == [first]
        assert dkim_records(kit, ip)[f"{first}._domainkey.{domain}"]["required"] is False
        assert b.key_file(domain, first) in key_files(kit, ip)
        wait_for(lambda: "DKIMRotated" in reasons(kit, ip), 20, "DKIMRotated")

        # retireAfterDays 0: the old key still stays a few minutes (b.MIN_RETIRE), for the
        # relay pod to get the new key file first (its deletion: the unit tests, with a clock).
        switched = dt.datetime.strptime(dkim["retiring"][0]["retireAt"], "%Y-%m-%dT%H:%M:%SZ")
        patch_dkim(kit, ip, {"keyGeneration": 1, "retireAfterDays": 0})
        soon = (switched - dt.timedelta(days=7) + b.MIN_RETIRE).strftime("%Y-%m-%dT%H:%M:%SZ")
        wait_for(
            lambda: (
                dkim_of(kit, ip, domain).get("retiring") == [{"selector": first, "retireAt": soon}]
            ),
            30,
            "the old key retires in minutes",
        )
        assert b.key_file(domain, first) in key_files(kit, ip)
        assert f"{first}._domainkey.{domain}" in dkim_records(kit, ip)
        assert signing(kit, ip, domain) == [second]
        assert_no_key_material(kit, ip, list(key_files(kit, ip).values()), operator)
    finally:
        delete(kit, ip)
        for name in published:
            cluster_dns.delete(name)


def pkcs8(key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def user_secret(kit: Kit, name: str, pem: bytes) -> None:
    kit.core.create_namespaced_secret(
        kit.operator_namespace,
        client.V1Secret(
            metadata=client.V1ObjectMeta(name=name),
            data={"dkim.key": base64.b64encode(pem).decode()},
        ),
    )


def test_a_brought_key_signs_its_domain(
    kit: Kit, operator: OperatorProcess, domains: list[str]
) -> None:
    own, generated = domains
    secret = f"brand-{uuid.uuid4().hex[:6]}"
    ip = kit.dedicated_ip(
        domains=domains,
        dkim={"keys": [{"domain": own, "selector": "brand2026", "secretRef": {"name": secret}}]},
    )
    try:
        # The Secret does not exist yet: the IP says which one it waits for.
        ready = wait_for(
            lambda: (
                (kit.condition(IPS, None, ip) or {}).get("reason") == "ConfigurationInvalid"
                and kit.condition(IPS, None, ip)
            ),
            30,
            "ConfigurationInvalid",
        )
        assert f"{kit.operator_namespace}/{secret}" in ready["message"]
        assert "does not exist" in ready["message"]
        assert "brand2026" not in signing(kit, ip, own)
        wait_for(lambda: dkim_of(kit, ip, generated).get("active"), 30, "the generated domain")

        pem = pkcs8(rsa.generate_private_key(public_exponent=65537, key_size=2048))
        user_secret(kit, secret, pem)
        wait_for(lambda: signing(kit, ip, own) == ["brand2026"], 30, "the brought key signs")
        wait_for(
            lambda: dkim_of(kit, ip, own) == {"active": ["brand2026"], "source": "Secret"},
            30,
            "the brought key in status",
        )
        (key,) = relay_config(kit, ip).dkim.keys_for(own)
        copied = key_files(kit, ip)[key.key_file]
        assert sha(copied) == sha(pem)  # copied into the relay's key Secret
        record = wait_for(
            lambda: dkim_records(kit, ip).get(f"brand2026._domainkey.{own}"), 30, "its record"
        )
        expected = b.record_for_private_key(own, "brand2026", b.RSA, pem)
        assert "".join(record["value"]) == expected.value
        wait_for(
            lambda: (kit.condition(IPS, None, ip) or {}).get("reason") != "ConfigurationInvalid",
            30,
            "the problem cleared",
        )
        assert_no_key_material(kit, ip, [pem], operator)

        # Another key under the same selector would sign before the DNS has its record:
        # refused, the first key keeps signing (a rotation takes a new selector).
        other = pkcs8(rsa.generate_private_key(public_exponent=65537, key_size=2048))
        kit.core.patch_namespaced_secret(
            secret, kit.operator_namespace, {"data": {"dkim.key": base64.b64encode(other).decode()}}
        )
        ready = wait_for(
            lambda: (
                (kit.condition(IPS, None, ip) or {}).get("reason") == "ConfigurationInvalid"
                and kit.condition(IPS, None, ip)
            ),
            FOLLOW,
            "the changed key refused",
        )
        assert (
            f"the key in Secret {kit.operator_namespace}/{secret} changed under selector "
            "brand2026" in ready["message"]
        )
        assert "use a new selector to rotate" in ready["message"]
        assert signing(kit, ip, own) == ["brand2026"]
        assert sha(key_files(kit, ip)[key.key_file]) == sha(pem)  # the old key, kept
        assert "".join(dkim_records(kit, ip)[f"brand2026._domainkey.{own}"]["value"]) == (
            expected.value
        )
        assert_no_key_material(kit, ip, [pem, other], operator)
    finally:
        delete(kit, ip)
        kit.core.delete_namespaced_secret(secret, kit.operator_namespace)


def test_a_brought_key_must_be_for_a_sending_domain(kit: Kit, domains: list[str]) -> None:
    with pytest.raises(ApiException) as refused:
        kit.dedicated_ip(
            domains=domains[:1],
            dkim={
                "keys": [{"domain": domains[1], "selector": "s1", "secretRef": {"name": "mine"}}]
            },
        )
    assert refused.value.status == 422
    assert "every dkim.keys[].domain must be one of spec.domains" in str(refused.value.body)


def test_a_lost_key_is_replaced_under_a_selector_never_used_before(
    kit: Kit, domains: list[str]
) -> None:
    domain = domains[0]
    ip = kit.dedicated_ip(
        domains=[domain], dns={"requireVerified": False, "checkIntervalSeconds": INTERVAL}
    )
    try:
        (first,) = wait_active(kit, ip, domain)
        assert first.endswith("-1")
        # A key file edited by hand no longer holds a key: it cannot sign, a new key does.
        name = c.dkim_secret_name(ip)
        broken = base64.b64encode(b"not a key\n").decode()
        kit.core.patch_namespaced_secret(
            name, kit.operator_namespace, {"data": {b.key_file(domain, first): broken}}
        )
        (second,) = replaced(kit, ip, domain, first, "a new key for the broken one")
        assert second.endswith("-2") and signing(kit, ip, domain) == [second]
        assert sorted(key_files(kit, ip)) == [b.key_file(domain, second)]
        # The whole Secret deleted (and the state in it): the status still knows the
        # selectors used, so the new key takes the next one.
        kit.core.delete_namespaced_secret(name, kit.operator_namespace)
        (third,) = replaced(kit, ip, domain, second, "a new key for the deleted Secret")
        assert third.endswith("-3") and signing(kit, ip, domain) == [third]
        assert list(key_files(kit, ip)) == [b.key_file(domain, third)]
    finally:
        delete(kit, ip)


def test_an_unreadable_state_keeps_signing_and_no_selector_is_used_twice(
    kit: Kit, domains: list[str]
) -> None:
    domain = domains[0]
    ip = kit.dedicated_ip(
        domains=[domain], dns={"requireVerified": False, "checkIntervalSeconds": INTERVAL}
    )
    try:
        (first,) = wait_active(kit, ip, domain)
        name = c.dkim_secret_name(ip)
        kit.core.patch_namespaced_secret(
            name, kit.operator_namespace, {"metadata": {"annotations": {b.STATE_ANNOTATION: "{"}}}
        )
        ready = wait_for(
            lambda: (
                (kit.condition(IPS, None, ip) or {}).get("reason") == "ConfigurationInvalid"
                and kit.condition(IPS, None, ip)
            ),
            FOLLOW,
            "the unreadable state reported",
        )
        assert "cannot read" in ready["message"]
        # The relay signs as it did, the status keeps the selectors.
        assert signing(kit, ip, domain) == [first]
        assert dkim_of(kit, ip, domain).get("active") == [first]
        # The user deletes the Secret as the message advises: the new key never takes a
        # selector used before (this month's -1).
        kit.core.delete_namespaced_secret(name, kit.operator_namespace)
        (second,) = wait_for(
            lambda: (
                (dkim_of(kit, ip, domain).get("active") or [first]) != [first]
                and dkim_of(kit, ip, domain)["active"]
            ),
            FOLLOW,
            "a new key for the deleted Secret",
        )
        assert second.endswith("-2") and signing(kit, ip, domain) == [second]
    finally:
        delete(kit, ip)
