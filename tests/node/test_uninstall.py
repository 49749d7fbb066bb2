"""``helm uninstall``: everything the chart installed goes, the CRDs stay (``crds.keep``).

Runs after test_install.py (pytest orders modules by name), on the same node.
"""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from kubernetes.dynamic import DynamicClient
from kubernetes.dynamic.exceptions import NotFoundError

from node.kit import NAMESPACE, RELEASE, Cluster
from peers import wait_for

pytestmark = pytest.mark.node

CRDS = {f"{p}.txmail.dev" for p in ("dedicatedips", "smtptokens", "transactionalemails")}


def _exists(cluster: Cluster, obj: dict[str, Any]) -> bool:
    """Whether the object a chart manifest names is on the API server."""
    resource = DynamicClient(cluster.api).resources.get(  # type: ignore[no-untyped-call]
        api_version=obj["apiVersion"], kind=obj["kind"]
    )
    meta = obj["metadata"]
    namespace = (meta.get("namespace") or NAMESPACE) if resource.namespaced else None
    try:
        resource.get(name=meta["name"], namespace=namespace)
    except NotFoundError:
        return False
    return True


def test_uninstall_removes_everything_but_the_crds(installed: Cluster) -> None:
    manifest = [
        o
        for o in yaml.safe_load_all(installed.helm("get", "manifest", RELEASE, "-n", NAMESPACE))
        if o
    ]
    kinds = {o["kind"] for o in manifest}
    assert {"Deployment", "ServiceAccount", "CustomResourceDefinition"} <= kinds
    assert all(_exists(installed, o) for o in manifest)
    installed.helm("uninstall", RELEASE, "-n", NAMESPACE, "--wait", "--timeout", "2m")
    rest = [o for o in manifest if o["kind"] != "CustomResourceDefinition"]
    wait_for(
        lambda: not any(_exists(installed, o) for o in rest),
        60,
        "the chart's objects to be gone",
        every=0.5,
    )
    crds = [o for o in manifest if o["kind"] == "CustomResourceDefinition"]
    assert {o["metadata"]["name"] for o in crds} == CRDS
    assert all(_exists(installed, o) for o in crds), "crds.keep keeps the CRDs"
