"""Drift of a relay's own objects is repaired, without the DedicatedIP changing.

The operator watches what it owns in its namespace (Deployments, Services, ConfigMaps,
ServiceAccounts, Roles, RoleBindings labelled as a relay's) and re-applies the DedicatedIP's
children when someone scales, deletes or edits one. Each test breaks one thing the way a
person with kubectl would, and polls until it is back.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from kubernetes import client

from cluster.kubeapi import uid_of
from k8s.kit import GROUP, VERSION, Kit, read_or_none
from k8s.operator_process import wait_for
from txmail_relay import contract as c

pytestmark = pytest.mark.k8s
DEADLINE = 10.0  # seconds: the watch reacts within about one (debounce and rate limit)


@pytest.fixture
def ip(kit: Kit, api: client.ApiClient) -> Iterator[str]:
    """A DedicatedIP whose relay objects all exist."""
    name = kit.dedicated_ip()
    apps = client.AppsV1Api(api)
    wait_for(
        lambda: read_or_none(
            lambda: apps.read_namespaced_deployment(c.relay_name(name), kit.operator_namespace)
        ),
        DEADLINE,
        "the relay Deployment",
    )
    yield name
    kit.objs.delete_cluster_custom_object(GROUP, VERSION, "dedicatedips", name)


def test_a_relay_scaled_to_0_comes_back_to_1(kit: Kit, ip: str, api: client.ApiClient) -> None:
    apps, ns, name = client.AppsV1Api(api), kit.operator_namespace, c.relay_name(ip)
    apps.patch_namespaced_deployment_scale(name, ns, {"spec": {"replicas": 0}})  # kubectl scale
    assert apps.read_namespaced_deployment(name, ns).spec.replicas == 0
    wait_for(
        lambda: apps.read_namespaced_deployment(name, ns).spec.replicas == 1,
        DEADLINE,
        "the relay scaled back to 1",
    )


def test_a_deleted_relay_deployment_is_recreated(kit: Kit, ip: str, api: client.ApiClient) -> None:
    apps, ns, name = client.AppsV1Api(api), kit.operator_namespace, c.relay_name(ip)
    before = uid_of(apps.read_namespaced_deployment(name, ns))

    def recreated() -> bool:
        dep = read_or_none(lambda: apps.read_namespaced_deployment(name, ns))
        return dep is not None and uid_of(dep) != before

    apps.delete_namespaced_deployment(name, ns)
    wait_for(recreated, DEADLINE, "a new relay Deployment")


def test_a_deleted_relay_role_comes_back(kit: Kit, ip: str, api: client.ApiClient) -> None:
    rbac, ns, name = client.RbacAuthorizationV1Api(api), kit.operator_namespace, c.relay_name(ip)
    rules = rbac.read_namespaced_role(name, ns).rules
    rbac.delete_namespaced_role(name, ns)
    again = wait_for(
        lambda: read_or_none(lambda: rbac.read_namespaced_role(name, ns)),
        DEADLINE,
        "the relay Role",
    )
    assert again.rules == rules


def test_a_deleted_role_binding_and_service_account_come_back(
    kit: Kit, ip: str, api: client.ApiClient
) -> None:
    rbac, ns, name = client.RbacAuthorizationV1Api(api), kit.operator_namespace, c.relay_name(ip)
    rbac.delete_namespaced_role_binding(name, ns)
    kit.core.delete_namespaced_service_account(name, ns)
    wait_for(
        lambda: read_or_none(lambda: rbac.read_namespaced_role_binding(name, ns)),
        DEADLINE,
        "the relay RoleBinding",
    )
    wait_for(
        lambda: read_or_none(lambda: kit.core.read_namespaced_service_account(name, ns)),
        DEADLINE,
        "the relay ServiceAccount",
    )


def test_an_edited_service_port_is_restored(kit: Kit, ip: str) -> None:
    ns, name = kit.operator_namespace, c.relay_name(ip)

    def service_ports() -> list[client.V1ServicePort]:
        svc = kit.core.read_namespaced_service(name, ns)
        assert svc.spec is not None and svc.spec.ports is not None, f"Service {ns}/{name}"
        return svc.spec.ports

    def ports() -> list[tuple[str, int, str]]:
        return sorted((str(p.name), p.port, str(p.target_port)) for p in service_ports())

    built = ports()
    live = [p.name for p in service_ports()]
    kit.core.patch_namespaced_service(  # kubectl edit: submission port 587 -> 2525
        name,
        ns,
        [{"op": "replace", "path": f"/spec/ports/{live.index('submission')}/port", "value": 2525}],
    )
    assert ports() != built
    wait_for(lambda: ports() == built, DEADLINE, f"the Service ports back to {built}")


def test_an_edited_relay_config_is_restored(kit: Kit, ip: str) -> None:
    ns, name = kit.operator_namespace, c.relay_name(ip)
    built: dict[str, str] = kit.core.read_namespaced_config_map(name, ns).data or {}
    edited = c.RelayConfig.model_validate_json(built[c.RELAY_CONFIG_KEY])
    assert edited.hostname == "mta1.example.com"
    kit.core.patch_namespaced_config_map(  # a person "fixes" the relay by hand
        name,
        ns,
        {"data": {c.RELAY_CONFIG_KEY: built[c.RELAY_CONFIG_KEY].replace("mta1.", "mta7.")}},
    )
    wait_for(
        lambda: kit.core.read_namespaced_config_map(name, ns).data == built,
        DEADLINE,
        "relay.json as the operator built it",
    )


def test_a_deleted_stats_config_map_is_recreated(kit: Kit, ip: str) -> None:
    ns, name = kit.operator_namespace, c.stats_config_map_name(ip)
    kit.core.delete_namespaced_config_map(name, ns)
    wait_for(
        lambda: read_or_none(lambda: kit.core.read_namespaced_config_map(name, ns)),
        DEADLINE,
        "the stats ConfigMap the relay reports into",
    )
