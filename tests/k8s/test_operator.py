"""The operator as a real process against a real API server and controller-manager."""

from __future__ import annotations

import copy
import datetime as dt
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import yaml
from kubernetes import client

from cluster.kubeapi import meta_of, name_of
from k8s.kit import GROUP, VERSION, Kit, read_or_none, refused_token_status
from k8s.operator_process import OperatorProcess, operator_service_account, wait_for
from txmail_relay import contract as c

pytestmark = pytest.mark.k8s
TOKENS, EMAILS, IPS = "smtptokens", "transactionalemails", "dedicatedips"


@pytest.fixture
def ip(kit: Kit) -> Iterator[str]:
    name = kit.dedicated_ip()
    yield name
    kit.objs.delete_cluster_custom_object(GROUP, VERSION, IPS, name)


def ready_secret(kit: Kit, namespace: str, token: str, timeout: float = 10) -> dict[str, str]:
    def probe() -> dict[str, str] | None:
        status = (kit.get(TOKENS, namespace, token) or {}).get("status") or {}
        data = kit.secret(namespace, status.get("secretName") or f"{token}-smtp")
        return data if data and kit.is_ready(TOKENS, namespace, token) else None

    return wait_for(probe, timeout, f"SmtpToken {namespace}/{token} Ready with its Secret")


def test_token_secret_has_everything_an_app_needs_within_2s(
    kit: Kit, ip: str, namespace: str
) -> None:
    start = time.monotonic()
    kit.token(namespace, ip, "shop")
    secret = wait_for(lambda: kit.secret(namespace, "shop-smtp"), 2.0, "the app Secret")
    elapsed = time.monotonic() - start
    assert set(secret) >= {"host", "port", "username", "password", "tls", "url", "ca.crt"}, elapsed
    assert secret["host"] == f"txmail-relay-{ip}.{kit.operator_namespace}.svc.cluster.local"
    assert secret["port"] == "587"
    assert secret["tls"] == "starttls"
    assert secret["url"] == f"smtp://{secret['username']}:{secret['password']}@{secret['host']}:587"
    assert len(secret["password"]) >= 43  # token_urlsafe(32)
    assert secret["ca.crt"].startswith("-----BEGIN CERTIFICATE-----")
    wait_for(
        lambda: kit.accepts(ip, secret["username"], secret["password"]),
        5,
        "the digest in the relay",
    )
    status = ready_secret(kit, namespace, "shop")
    token = kit.get(TOKENS, namespace, "shop")
    assert token is not None
    assert token["status"]["username"] == secret["username"]
    assert token["status"]["passwordGeneration"] == 1
    assert token["status"]["emailCampaignId"] >= 1
    assert status
    raw = kit.raw_secret(namespace, "shop-smtp")
    assert [o.kind for o in raw.metadata.owner_references] == ["SmtpToken"]
    entry = kit.entry(ip, secret["username"])
    assert entry is not None
    assert entry.namespace == namespace
    assert entry.allowed_from_domains == ["example.com", "example.org"]

    def tokens() -> object:
        return ((kit.get(IPS, None, ip) or {}).get("status") or {}).get("tokens")

    wait_for(lambda: tokens() == 1, 5, "the DedicatedIP to count its token")
    kit.objs.delete_namespaced_custom_object(GROUP, VERSION, namespace, TOKENS, "shop")
    wait_for(lambda: tokens() == 0, 10, "the DedicatedIP to stop counting it")


def test_restart_keeps_password_and_repairs_edits(
    kit: Kit, ip: str, namespace: str, operator: OperatorProcess
) -> None:
    kit.token(namespace, ip, "shop", secretTemplate={"labels": {"team": "checkout"}})
    first = ready_secret(kit, namespace, "shop")
    operator.restart()
    kit.core.patch_namespaced_secret(  # a person edits the Secret: drops a key and a label
        "shop-smtp",
        namespace,
        [
            {"op": "remove", "path": "/data/url"},
            {"op": "remove", "path": "/metadata/labels/team"},
        ],
    )

    def repaired() -> dict[str, str] | None:
        raw = kit.raw_secret(namespace, "shop-smtp")
        data = kit.secret(namespace, "shop-smtp")
        return (
            data
            if data and "url" in data and (raw.metadata.labels or {}).get("team") == "checkout"
            else None
        )

    again = wait_for(repaired, 10, "the edited Secret put back")
    assert again["password"] == first["password"]
    assert kit.accepts(ip, first["username"], first["password"])


def test_deleted_secret_is_reissued_with_a_new_password(kit: Kit, ip: str, namespace: str) -> None:
    kit.token(namespace, ip, "shop")
    first = ready_secret(kit, namespace, "shop")
    kit.core.delete_namespaced_secret("shop-smtp", namespace)
    second = kit.new_password(namespace, "shop-smtp", first["password"], 10)
    wait_for(lambda: kit.accepts(ip, second["username"], second["password"]), 5, "the new digest")
    assert not kit.accepts(ip, first["username"], first["password"])
    wait_for(
        lambda: any(e.reason == "SecretRecreated" for e in kit.events(namespace, "shop")),
        5,
        "an Event saying the password was re-issued",
    )


def test_raising_password_generation_resets_the_password(kit: Kit, ip: str, namespace: str) -> None:
    kit.token(namespace, ip, "shop")
    first = ready_secret(kit, namespace, "shop")
    kit.objs.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, TOKENS, "shop", {"spec": {"passwordGeneration": 2}}
    )
    second = kit.new_password(namespace, "shop-smtp", first["password"], 10)
    wait_for(lambda: kit.accepts(ip, second["username"], second["password"]), 5, "the new digest")
    assert not kit.accepts(ip, first["username"], first["password"])
    entry = kit.entry(ip, first["username"])
    assert entry is not None
    assert [d.generation for d in entry.digests] == [2]
    wait_for(
        lambda: (
            ((kit.get(TOKENS, namespace, "shop") or {}).get("status") or {}).get(
                "passwordGeneration"
            )
            == 2
        ),
        5,
        "status",
    )


def test_grace_period_keeps_both_passwords_until_it_ends(kit: Kit, ip: str, namespace: str) -> None:
    kit.token(namespace, ip, "shop", rotationGracePeriod="4s")
    first = ready_secret(kit, namespace, "shop")
    kit.objs.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, TOKENS, "shop", {"spec": {"passwordGeneration": 2}}
    )
    second = kit.new_password(namespace, "shop-smtp", first["password"], 10)
    wait_for(lambda: kit.accepts(ip, second["username"], second["password"]), 5, "the new digest")
    assert kit.accepts(ip, first["username"], first["password"]), (
        "old password must work during the grace period"
    )
    entry = kit.entry(ip, first["username"])
    assert entry is not None
    old = [d for d in entry.digests if d.generation == 1]
    assert old and old[0].not_after is not None
    wait_for(
        lambda: not kit.accepts(ip, first["username"], first["password"]),
        8,
        "the grace period to end",
    )
    wait_for(
        lambda: [d.generation for d in (kit.entry(ip, first["username"]) or entry).digests] == [2],
        5,
        "the old digest removed",
    )


def test_deleting_a_token_revokes_it(kit: Kit, ip: str, namespace: str) -> None:
    kit.token(namespace, ip, "shop")
    secret = ready_secret(kit, namespace, "shop")
    kit.objs.delete_namespaced_custom_object(GROUP, VERSION, namespace, TOKENS, "shop")
    wait_for(lambda: kit.get(TOKENS, namespace, "shop") is None, 10, "the finalizer released")
    assert kit.entry(ip, secret["username"]) is None
    # The garbage collector sees a new kind's owners only after its next discovery pass (every
    # 30 s), so right after the CRDs were installed this can take up to that long.
    wait_for(
        lambda: kit.secret(namespace, "shop-smtp") is None,
        45,
        "the garbage collector to delete the Secret",
    )


@contextmanager
def kopf_held_at_startup(kit: Kit, operator: OperatorProcess) -> Iterator[None]:
    """The operator restarted unable to list namespaces: kopf, which runs no handler before
    it has indexed every kind it indexes, handles nothing; on exit the ClusterRole is put
    back and the operator restarted."""
    (role,) = [
        o
        for o in operator_service_account()
        if o["kind"] == "ClusterRole" and any("namespaces" in r["resources"] for r in o["rules"])
    ]
    rbac = client.RbacAuthorizationV1Api(kit.api)
    name = role["metadata"]["name"]
    original = rbac.read_cluster_role(name)
    held = copy.deepcopy(original)
    for rule in held.rules or []:
        if rule.resources == ["namespaces"]:
            rule.verbs = ["get"]
    operator.stop()
    shared_log = operator.log  # kopf's expected 403s go to a log of their own
    operator.log = shared_log.with_name("operator-held.log")
    try:
        rbac.replace_cluster_role(name, held)
        wait_for(lambda: not may_list_namespaces(kit), 10, "the namespace list withheld")
        operator.start()
        yield
    finally:
        operator.stop()
        operator.log = shared_log
        restored = rbac.read_cluster_role(name)
        restored.rules = original.rules
        rbac.replace_cluster_role(name, restored)
        # the authorizer's cache follows RBAC a moment later: start once it may list again
        wait_for(lambda: may_list_namespaces(kit), 10, "the operator to list namespaces again")
        operator.start()


def may_list_namespaces(kit: Kit) -> bool:
    (account,) = [o for o in operator_service_account() if o["kind"] == "ServiceAccount"]
    meta = account["metadata"]
    review = client.V1SubjectAccessReview(
        spec=client.V1SubjectAccessReviewSpec(
            user=f"system:serviceaccount:{meta['namespace']}:{meta['name']}",
            resource_attributes=client.V1ResourceAttributes(verb="list", resource="namespaces"),
        )
    )
    answer = client.AuthorizationV1Api(kit.api).create_subject_access_review(review)
    return answer.status is not None and bool(answer.status.allowed)


def test_a_token_deleted_while_the_operator_is_starting_is_revoked(
    kit: Kit, ip: str, namespace: str, operator: OperatorProcess
) -> None:
    kit.token(namespace, ip, "shop")
    secret = ready_secret(kit, namespace, "shop")
    with kopf_held_at_startup(kit, operator):
        kit.objs.delete_namespaced_custom_object(GROUP, VERSION, namespace, TOKENS, "shop")
        wait_for(
            lambda: not kit.accepts(ip, secret["username"], secret["password"]),
            10,
            "the relay to refuse the deleted token's password",
        )
        assert kit.get(TOKENS, namespace, "shop") is not None, "kopf must not have handled it"
    wait_for(lambda: kit.get(TOKENS, namespace, "shop") is None, 30, "the finalizer released")


def test_token_waits_for_its_dedicated_ip(kit: Kit, namespace: str) -> None:
    name = f"late-{namespace}"
    kit.token(namespace, name, "shop")
    wait_for(
        lambda: kit.reason(TOKENS, namespace, "shop") == "DedicatedIPNotFound",
        5,
        "DedicatedIPNotFound",
    )
    assert kit.secret(namespace, "shop-smtp") is None
    kit.dedicated_ip(name)
    try:
        start = time.monotonic()
        ready_secret(kit, namespace, "shop", timeout=5)
        assert time.monotonic() - start < 5
    finally:
        kit.objs.delete_cluster_custom_object(GROUP, VERSION, IPS, name)


def test_namespace_must_be_allowed(kit: Kit, namespace: str) -> None:
    ip = kit.dedicated_ip(allowedNamespaces={"matchLabels": {"mail": namespace}})
    try:
        kit.token(namespace, ip, "shop")
        wait_for(
            lambda: kit.reason(TOKENS, namespace, "shop") == "NamespaceNotAllowed",
            5,
            "NamespaceNotAllowed",
        )
        cond = kit.condition(TOKENS, namespace, "shop")
        assert cond is not None
        assert "allowedNamespaces" in cond["message"]
        kit.core.patch_namespace(namespace, {"metadata": {"labels": {"mail": namespace}}})
        ready_secret(kit, namespace, "shop", timeout=5)
        kit.core.patch_namespace(namespace, {"metadata": {"labels": {"mail": None}}})
        secret = kit.secret(namespace, "shop-smtp")
        assert secret is not None
        wait_for(
            lambda: kit.reason(TOKENS, namespace, "shop") == "NamespaceNotAllowed",
            5,
            "revoked again",
        )
        assert kit.entry(ip, secret["username"]) is None
    finally:
        kit.objs.delete_cluster_custom_object(GROUP, VERSION, IPS, ip)


def test_expired_token_is_removed_from_the_relay(kit: Kit, ip: str, namespace: str) -> None:
    at = (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=3)).strftime("%Y-%m-%dT%H:%M:%SZ")
    kit.token(namespace, ip, "shop", expiresAt=at)
    secret = ready_secret(kit, namespace, "shop")
    wait_for(lambda: kit.reason(TOKENS, namespace, "shop") == "Expired", 10, "Expired")
    assert kit.entry(ip, secret["username"]) is None


def test_invalid_template_then_fixed(kit: Kit, ip: str, namespace: str) -> None:
    kit.email(namespace, ip, "welcome", html="<p>\n{% for x in custom.items %}\n{{ x }\n</p>")
    wait_for(
        lambda: kit.reason(EMAILS, namespace, "welcome", "TemplateValid") == "TemplateInvalid",
        5,
        "TemplateValid=False",
    )
    cond = kit.condition(EMAILS, namespace, "welcome", "TemplateValid")
    assert cond is not None
    assert cond["message"].startswith("html line 3"), cond["message"]
    assert not kit.is_ready(EMAILS, namespace, "welcome")
    kit.objs.patch_namespaced_custom_object(
        GROUP,
        VERSION,
        namespace,
        EMAILS,
        "welcome",
        {"spec": {"html": "<p>Hi {{ contact.firstname }}</p>"}},
    )
    wait_for(lambda: kit.is_ready(EMAILS, namespace, "welcome"), 5, "Ready")
    body = kit.get(EMAILS, namespace, "welcome")
    assert body is not None
    email_id = body["status"]["emailId"]
    assert 1 <= email_id < 2**53
    entry = wait_for(lambda: kit.template(ip, email_id), 5, "the template published to the relay")
    assert entry.html == "<p>Hi {{ contact.firstname }}</p>"
    assert entry.namespace == namespace


def test_from_domain_must_belong_to_the_ip(kit: Kit, ip: str, namespace: str) -> None:
    kit.email(namespace, ip, "welcome", **{"from": {"address": "news@elsewhere.net"}})
    wait_for(
        lambda: kit.reason(EMAILS, namespace, "welcome") == "FromDomainNotAllowed",
        5,
        "FromDomainNotAllowed",
    )
    cond = kit.condition(EMAILS, namespace, "welcome")
    assert cond is not None
    assert "elsewhere.net" in cond["message"]


def test_dedicated_ip_becomes_a_restricted_relay(kit: Kit, ip: str, api: client.ApiClient) -> None:
    ns = kit.operator_namespace
    name = c.relay_name(ip)
    apps = client.AppsV1Api(api)
    dep = wait_for(
        lambda: read_or_none(lambda: apps.read_namespaced_deployment(name, ns)),
        30,  # the tier's first DedicatedIP: the operator may still be listing at its start
        "the relay Deployment",
    )
    assert dep.spec.replicas == 1
    assert dep.spec.strategy is not None and dep.spec.strategy.type == "Recreate"
    labels = meta_of(dep).labels or {}
    assert labels[c.LABEL_NAME] == "txmail-relay"
    assert labels[c.LABEL_INSTANCE] == ip
    assert labels[c.LABEL_MANAGED_BY] == "txmail"
    pod = dep.spec.template.spec
    assert pod is not None
    assert not pod.host_network
    assert pod.security_context is not None and pod.security_context.run_as_non_root
    seccomp = pod.security_context.seccomp_profile
    assert seccomp is not None and seccomp.type == "RuntimeDefault"
    sc = pod.containers[0].security_context
    assert sc is not None
    assert sc.allow_privilege_escalation is False
    assert sc.capabilities is not None and sc.capabilities.drop == ["ALL"]
    assert sc.read_only_root_filesystem
    svc = client.CoreV1Api(api).read_namespaced_service(name, ns)
    assert svc.spec is not None and svc.spec.ports is not None
    assert {(p.port, p.target_port) for p in svc.spec.ports} == {
        (587, "submission"),
        (465, "submissions"),
        (80, "tracking"),
        (8081, "api"),
        (9090, "metrics"),
    }  # no 'smtp-in': without a return path or a complaints address no inbound listener runs
    client.CoreV1Api(api).read_namespaced_service_account(name, ns)
    role = client.RbacAuthorizationV1Api(api).read_namespaced_role(name, ns)
    assert role.rules, "the relay's Role grants what it reads"
    for rule in role.rules:
        assert rule.resource_names, "the relay may read only its own objects, by name"
        if not set(rule.verbs) <= {"get", "list", "watch"}:  # its one write: its stats report
            assert rule.resource_names == [c.stats_config_map_name(ip)]
            assert set(rule.verbs) == {"get", "patch"}
    # No kubelet runs here: the relay is not available until its Deployment says so.
    wait_for(
        lambda: kit.reason(IPS, None, ip, "RelayAvailable") not in (None, "RelayAvailable"),
        10,
        "RelayAvailable=False",
    )
    assert not kit.is_ready(IPS, None, ip)
    body = kit.get(IPS, None, ip)
    assert body is not None
    assert body["status"]["relay"]["podSecurity"] == "restricted"
    # Play the kubelet: mark the relay's pod Ready. The ReplicaSet and Deployment controllers
    # then report the Deployment Available, and the operator follows.
    core = client.CoreV1Api(api)
    selector = f"{c.LABEL_INSTANCE}={ip},{c.LABEL_NAME}=txmail-relay"
    relay_pod = wait_for(
        lambda: next(iter(core.list_namespaced_pod(ns, label_selector=selector).items), None),
        10,
        "the relay pod",
    )
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    core.patch_namespaced_pod_status(
        name_of(relay_pod),
        ns,
        {
            "status": {
                "phase": "Running",
                "conditions": [
                    {"type": "Ready", "status": "True", "lastTransitionTime": now},
                    {"type": "ContainersReady", "status": "True", "lastTransitionTime": now},
                ],
            }
        },
    )
    wait_for(lambda: kit.is_ready(IPS, None, ip), 5, "Ready once the Deployment is available")
    assert kit.reason(IPS, None, ip, "RelayAvailable") == "RelayAvailable"


def test_a_named_certificate_secret_is_used_once_it_exists(
    kit: Kit, namespace: str, api: client.ApiClient
) -> None:
    """cert-manager friendly: the relay serves the named Secret, apps trust its ca.crt."""
    ns, cert = kit.operator_namespace, f"cert-{namespace}"
    ip = kit.dedicated_ip(tls={"certificateSecretRef": {"name": cert}})
    try:
        wait_for(
            lambda: kit.reason(IPS, None, ip) == "ConfigurationInvalid", 10, "ConfigurationInvalid"
        )
        cond = kit.condition(IPS, None, ip)
        assert cond is not None
        assert f"certificate Secret {ns}/{cert} does not exist" in cond["message"]
        ca = "-----BEGIN CERTIFICATE-----\nissued-by-cert-manager\n-----END CERTIFICATE-----\n"
        issued = {  # what cert-manager writes
            "metadata": {"name": cert},
            "type": "kubernetes.io/tls",
            "stringData": {"tls.crt": "crt", "tls.key": "key", "ca.crt": ca},
        }
        kit.core.create_namespaced_secret(ns, client.V1Secret.model_validate(issued))
        wait_for(
            lambda: kit.reason(IPS, None, ip) != "ConfigurationInvalid", 10, "the problem to clear"
        )
        kit.token(namespace, ip, "shop")
        assert ready_secret(kit, namespace, "shop")["ca.crt"] == ca
        dep = client.AppsV1Api(api).read_namespaced_deployment(c.relay_name(ip), ns)
        pod = dep.spec.template.spec
        assert pod is not None and pod.volumes is not None
        tls = next(v for v in pod.volumes if v.name == "tls")
        assert tls.secret is not None and tls.secret.secret_name == cert
        assert kit.secret(ns, c.tls_secret_name(ip)) is None, "no CA is generated when one is named"
    finally:
        kit.objs.delete_cluster_custom_object(GROUP, VERSION, IPS, ip)
        kit.core.delete_namespaced_secret(cert, ns)


def test_host_network_egress_is_stated_plainly(kit: Kit) -> None:
    ip = kit.dedicated_ip(egress={"mode": "HostNetwork"})
    try:
        wait_for(
            lambda: ((kit.get(IPS, None, ip) or {}).get("status") or {}).get("relay"), 10, "status"
        )
        body = kit.get(IPS, None, ip)
        assert body is not None
        assert body["status"]["relay"]["podSecurity"].startswith(
            "privileged: egress mode HostNetwork"
        )
    finally:
        kit.objs.delete_cluster_custom_object(GROUP, VERSION, IPS, ip)


def test_changing_the_ip_updates_the_relay_config_in_place(kit: Kit, ip: str) -> None:
    kit.objs.patch_cluster_custom_object(
        GROUP, VERSION, IPS, ip, {"spec": {"hostname": "mta9.example.com"}}
    )

    def config() -> c.RelayConfig | None:
        cm = read_or_none(
            lambda: kit.core.read_namespaced_config_map(c.relay_name(ip), kit.operator_namespace)
        )
        if cm is None:
            return None
        assert cm.data is not None, "the relay ConfigMap without data"
        cfg = c.RelayConfig.model_validate_json(cm.data[c.RELAY_CONFIG_KEY])
        return cfg if cfg.hostname == "mta9.example.com" else None

    wait_for(config, 10, "the new hostname in the relay configuration")


def test_relay_limits_reach_the_relays_settings_and_roll_its_pod(kit: Kit, ip: str) -> None:
    """spec.relay.limits (e.g. a per-address cap raised behind an Ingress) is written into the
    settings file the relay pod mounts, and marks the pod template so the relay restarts."""
    kit.objs.patch_cluster_custom_object(
        GROUP, VERSION, IPS, ip, {"spec": {"relay": {"limits": {"maxConnectionsPerAddress": 500}}}}
    )
    ns, name = kit.operator_namespace, c.relay_name(ip)

    def settings() -> c.LimitSettings | None:
        cm = read_or_none(lambda: kit.core.read_namespaced_config_map(name, ns))
        if cm is None or cm.data is None:
            return None
        limits = c.RelaySettings.model_validate(yaml.safe_load(cm.data["settings.yaml"])).limits
        return limits if limits.max_connections_per_address == 500 else None

    assert wait_for(settings, 10, "the raised cap in the relay's settings").max_connections == (
        c.LimitSettings().max_connections
    )

    def annotated() -> str | None:
        dep = read_or_none(lambda: client.AppsV1Api(kit.api).read_namespaced_deployment(name, ns))
        template = dep.spec.template.metadata if dep is not None else None
        return ((template.annotations or {}) if template else {}).get("txmail.dev/relay-limits")

    wait_for(annotated, 10, "the relay pod template marked with the limits")


def test_deleting_the_ip_removes_the_relay_and_unreadies_dependents(
    kit: Kit, namespace: str, api: client.ApiClient
) -> None:
    ip = kit.dedicated_ip()
    kit.token(namespace, ip, "shop")
    kit.email(namespace, ip, "welcome")
    ready_secret(kit, namespace, "shop")
    wait_for(lambda: kit.is_ready(EMAILS, namespace, "welcome"), 5, "email Ready")
    kit.objs.delete_cluster_custom_object(GROUP, VERSION, IPS, ip)
    wait_for(
        lambda: kit.reason(TOKENS, namespace, "shop") == "DedicatedIPNotFound",
        10,
        "token not Ready",
    )
    wait_for(
        lambda: kit.reason(EMAILS, namespace, "welcome") == "DedicatedIPNotFound",
        10,
        "email not Ready",
    )
    apps = client.AppsV1Api(api)
    wait_for(
        lambda: (
            read_or_none(
                lambda: apps.read_namespaced_deployment(c.relay_name(ip), kit.operator_namespace)
            )
            is None
        ),
        30,
        "the garbage collector to remove the relay",
    )


def test_relay_stats_reach_the_token_status(kit: Kit, ip: str, namespace: str) -> None:
    kit.token(namespace, ip, "shop")
    secret = ready_secret(kit, namespace, "shop")
    report = c.RelayStats(
        tokens={
            secret["username"]: c.TokenStats(
                sent=10,
                delivered=8,
                bounced=2,
                opens=9,
                unique_opens=4,
                clicks=3,
                unique_clicks=2,
                open_rate=0.5,
                click_rate=0.25,
            )
        },
        updated_at=dt.datetime.now(dt.UTC),
    )
    kit.core.patch_namespaced_config_map(  # what the relay does, through its narrow Role
        c.stats_config_map_name(ip),
        kit.operator_namespace,
        {"data": {c.STATS_KEY: report.to_json()}},
    )

    def stats() -> dict[str, Any] | None:
        return ((kit.get(TOKENS, namespace, "shop") or {}).get("status") or {}).get("stats")

    got = wait_for(stats, 10, "stats in the token status")
    assert (got["sent"], got["delivered"], got["bounced"]) == (10, 8, 2)
    assert (got["uniqueOpens"], got["openRate"], got["clickRate"]) == (4, 0.5, 0.25)
    assert got["updatedAt"]


def test_sigkill_between_secret_and_status_converges(
    kit: Kit, ip: str, namespace: str, operator: OperatorProcess
) -> None:
    """An admission policy holds the operator right after it wrote the Secret; then SIGKILL."""
    try:
        with refused_token_status(kit, namespace, "status writes are held by the test"):
            kit.token(namespace, ip, "shop")
            secret = wait_for(lambda: kit.secret(namespace, "shop-smtp"), 10, "the Secret")
            wait_for(lambda: kit.entry(ip, secret["username"]), 5, "the digest")
            status = (kit.get(TOKENS, namespace, "shop") or {}).get("status") or {}
            assert "passwordGeneration" not in status, "the policy must hold the status write"
            operator.kill()
    finally:
        if operator.proc is None or operator.proc.poll() is not None:
            operator.start()
    after = ready_secret(kit, namespace, "shop")
    assert after["password"] == secret["password"]
    entry = kit.entry(ip, secret["username"])
    assert entry is not None
    assert len(entry.digests) == 1
    assert kit.accepts(ip, secret["username"], secret["password"])
    secrets = kit.core.list_namespaced_secret(
        namespace, label_selector="txmail.dev/smtptoken=shop"
    ).items
    assert len(secrets) == 1


def test_no_password_leaks(kit: Kit, ip: str, namespace: str, operator: OperatorProcess) -> None:
    """Passwords appear only in the app Secret: not in logs, Events, status or annotations."""
    kit.token(namespace, ip, "shop")
    first = ready_secret(kit, namespace, "shop")
    kit.core.delete_namespaced_secret("shop-smtp", namespace)  # forces a re-issue and an Event
    second = kit.new_password(namespace, "shop-smtp", first["password"], 10)
    wait_for(lambda: kit.events(namespace, "shop"), 5, "Events")
    passwords = [first["password"], second["password"]]
    token = kit.get(TOKENS, namespace, "shop")
    haystacks: dict[str, Any] = {
        "operator output": operator.output(),
        "token (status, annotations)": str(token),
        "events": str([e.to_dict() for e in kit.events(namespace, "shop")]),
        "relay documents": str(kit.entry(ip, first["username"])),
    }
    for where, text in haystacks.items():
        for password in passwords:
            assert password not in text, f"a password leaked into {where}"
