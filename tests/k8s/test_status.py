"""What a user gets wrong is said in the status, with what to do about it.

And what a user relies on at scale: a restart with nothing changed rewrites nothing.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from k8s.conftest import Endpoints
from k8s.kit import GROUP, VERSION, Kit, read_or_none
from k8s.operator_process import OperatorProcess, wait_for
from txmail_relay import contract as c

pytestmark = pytest.mark.k8s
IPS, TOKENS = "dedicatedips", "smtptokens"


@pytest.fixture
def ip(kit: Kit) -> Iterator[str]:
    name = kit.dedicated_ip()
    yield name
    kit.objs.delete_cluster_custom_object(GROUP, VERSION, IPS, name)


def test_a_token_that_may_send_from_no_domain_of_its_ip_is_not_ready(
    kit: Kit, ip: str, namespace: str
) -> None:
    kit.token(namespace, ip, "shop", allowedFromDomains=["shop.example.net"])
    wait_for(
        lambda: kit.reason(TOKENS, namespace, "shop") == "FromDomainNotAllowed",
        10,
        "the token not Ready for its domains",
    )
    ready = kit.condition(TOKENS, namespace, "shop")
    assert ready is not None
    assert ready["status"] == "False"
    assert "shop.example.net" in ready["message"]
    assert "example.com" in ready["message"]  # the IP's domains, to choose from
    assert kit.secret(namespace, "shop-smtp") is None  # nothing an app could use

    # Fixed: one of the IP's domains makes it Ready.
    kit.objs.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, TOKENS, "shop", {"spec": {"allowedFromDomains": ["example.org"]}}
    )
    wait_for(lambda: kit.is_ready(TOKENS, namespace, "shop"), 10, "the token Ready")
    username = (kit.get(TOKENS, namespace, "shop") or {})["status"]["username"]
    entry = kit.entry(ip, username)
    assert entry is not None
    assert entry.allowed_from_domains == ["example.org"]


@pytest.fixture
def admin_operator(
    api: client.ApiClient, operator: OperatorProcess, kubeconfig: Path, tmp_path: Path
) -> Iterator[OperatorProcess]:
    """An operator whose namespace does not exist, as a person runs it from a laptop (with
    their kubeconfig: the chart's ServiceAccount lives in the operator's namespace). The
    session's operator is paused meanwhile, so exactly one operator reconciles."""
    missing = f"t-missing-{uuid.uuid4().hex[:8]}"
    mine = OperatorProcess(kubeconfig, missing, tmp_path / "op.log", **operator.env)
    operator.stop()
    try:
        mine.start()
        try:
            yield mine
        finally:
            mine.stop()
            core = client.CoreV1Api(api)
            try:
                core.delete_namespace(missing)
            except ApiException as exc:
                if exc.status != 404:
                    raise
    finally:
        operator.start()
        operator.wait_ready(api)


def test_a_dedicated_ip_before_the_operator_namespace_exists_says_so(
    kit: Kit, admin_operator: OperatorProcess, api: client.ApiClient
) -> None:
    missing = admin_operator.namespace
    ip = kit.dedicated_ip()
    try:
        wait_for(
            lambda: kit.reason(IPS, None, ip) == "OperatorNamespaceMissing",
            20,
            "the DedicatedIP to say the operator's namespace is missing",
        )
        for type_ in ("Ready", "RelayAvailable"):
            cond = kit.condition(IPS, None, ip, type_)
            assert cond is not None
            assert cond["status"] == "False"
            assert cond["reason"] == "OperatorNamespaceMissing"
            assert f"kubectl create namespace {missing}" in cond["message"]
        assert "Traceback" not in admin_operator.output()

        # Once the namespace exists, the relay is made there without touching the IP.
        client.CoreV1Api(api).create_namespace(
            client.V1Namespace(metadata=client.V1ObjectMeta(name=missing))
        )
        apps = client.AppsV1Api(api)
        wait_for(
            lambda: read_or_none(
                lambda: apps.read_namespaced_deployment(c.relay_name(ip), missing)
            ),
            20,
            "the relay Deployment in the new namespace",
        )
        wait_for(
            lambda: kit.reason(IPS, None, ip) != "OperatorNamespaceMissing",
            10,
            "the condition to move on",
        )
        assert "Traceback" not in admin_operator.output()
    finally:
        kit.objs.delete_cluster_custom_object(GROUP, VERSION, IPS, ip)
        wait_for(
            lambda: (
                read_or_none(lambda: kit.objs.get_cluster_custom_object(GROUP, VERSION, IPS, ip))
                is None
            ),
            20,
            "the DedicatedIP's finalizer released",
        )


def _settled(body: dict[str, Any] | None) -> bool:
    """kopf has run every handler of the object: only its last-handled record is left."""
    annotations = ((body or {}).get("metadata") or {}).get("annotations") or {}
    ours = {k for k in annotations if k.startswith(f"{GROUP}/")}
    return ours <= {f"{GROUP}/last-handled-configuration", f"{GROUP}/kopf-managed"} and bool(ours)


def _versions(kit: Kit, ip: str, namespace: str) -> dict[str, Any]:
    """The resourceVersion of everything the operator writes for one IP and one token."""
    selector = f"{c.LABEL_INSTANCE}={ip}"
    ns = kit.operator_namespace
    core, apps = kit.core, client.AppsV1Api(kit.api)
    rbac = client.RbacAuthorizationV1Api(kit.api)
    found: dict[str, Any] = {}
    for kind, listing in (
        ("Secret", core.list_namespaced_secret),
        ("ConfigMap", core.list_namespaced_config_map),
        ("Service", core.list_namespaced_service),
        ("ServiceAccount", core.list_namespaced_service_account),
        ("Deployment", apps.list_namespaced_deployment),
        ("Role", rbac.list_namespaced_role),
        ("RoleBinding", rbac.list_namespaced_role_binding),
    ):
        for item in listing(ns, label_selector=selector).items:
            meta = item.metadata
            assert meta is not None
            if kind == "ConfigMap" and meta.name == c.stats_config_map_name(ip):
                continue  # the relay's to write
            found[f"{kind}/{meta.name}"] = meta.resource_version
    for key, plural, where in (("DedicatedIP", IPS, None), ("SmtpToken", TOKENS, namespace)):
        found[key] = (kit.get(plural, where, "shop" if where else ip) or {})["metadata"][
            "resourceVersion"
        ]
    secret = kit.raw_secret(namespace, "shop-smtp")
    assert secret is not None and secret.metadata is not None
    found["app Secret"] = secret.metadata.resource_version
    return found


def test_a_restart_with_nothing_changed_writes_nothing(
    kit: Kit, endpoints: Endpoints, namespace: str, api: client.ApiClient
) -> None:
    ip = kit.dedicated_ip()
    try:
        kit.token(namespace, ip, "shop")
        wait_for(lambda: kit.is_ready(TOKENS, namespace, "shop"), 10, "the token Ready")
        wait_for(lambda: kit.reason(IPS, None, ip) is not None, 10, "the IP's status")
        username = (kit.get(TOKENS, namespace, "shop") or {})["status"]["username"]
        report = c.RelayStats.model_validate(  # as the relay reports: nothing sent yet
            {
                "tokens": {username: {"sent": 0, "lastSentAt": None}},
                "updatedAt": dt.datetime.now(dt.UTC),
            }
        )
        kit.core.patch_namespaced_config_map(
            c.stats_config_map_name(ip),
            kit.operator_namespace,
            {"data": {c.STATS_KEY: report.to_json()}},
        )
        wait_for(
            lambda: ((kit.get(TOKENS, namespace, "shop") or {}).get("status") or {}).get("stats"),
            10,
            "the stats in the token's status",
        )
        wait_for(lambda: _settled(kit.get(TOKENS, namespace, "shop")), 20, "kopf done (token)")
        wait_for(lambda: _settled(kit.get(IPS, None, ip)), 20, "kopf done (IP)")
        before = _versions(kit, ip, namespace)
        endpoints.proc.stop()
        endpoints.proc.start()
        ok = "txmail_operator_reconciles_total"

        def reconciled(kind: str, times: int) -> bool:
            try:
                return endpoints.value(ok, kind=kind, result="ok") >= times
            except OSError:  # not listening yet
                return False

        # The resume and then at least two periodic checks (1 s apart in the tests) of each.
        wait_for(lambda: reconciled("SmtpToken", 3), 30, "the token resumed and checked")
        wait_for(lambda: reconciled("DedicatedIP", 2), 30, "the IP resumed and rechecked")
        assert _versions(kit, ip, namespace) == before
    finally:
        kit.objs.delete_cluster_custom_object(GROUP, VERSION, IPS, ip)
