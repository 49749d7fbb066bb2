"""Shared fixtures. The `k8s` tier runs against a real control plane (see tests/cluster)."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from kubernetes import client, config

from cluster.controlplane import control_plane

ROOT = Path(__file__).resolve().parent.parent
CRDS = ROOT / "crds"


@pytest.fixture(scope="session")
def kubeconfig() -> Iterator[Path]:
    """An admin kubeconfig: TXMAIL_TEST_KUBECONFIG (kind, k3s...) or a control plane we start."""
    existing = os.environ.get("TXMAIL_TEST_KUBECONFIG")
    if existing:
        yield Path(existing)
        return
    with control_plane() as cp:
        yield cp.kubeconfig


@pytest.fixture(scope="session")
def api(kubeconfig: Path) -> Iterator[client.ApiClient]:
    api_client = config.new_client_from_config(config_file=str(kubeconfig))
    yield api_client
    api_client.close()


def install_crds(api_client: client.ApiClient, timeout: float = 30.0) -> list[str]:
    """Apply every CRD in crds/ (server-side) and wait until each is Established."""
    ext = client.ApiextensionsV1Api(api_client)
    names = []
    for path in sorted(CRDS.glob("*.yaml")):
        body = yaml.safe_load(path.read_text())
        name = body["metadata"]["name"]
        names.append(name)
        ext.patch_custom_resource_definition(
            name,
            body,
            field_manager="txmail-tests",
            force=True,
            _content_type="application/apply-patch+yaml",
        )
    deadline = time.monotonic() + timeout
    pending = set(names)
    while pending and time.monotonic() < deadline:
        for name in list(pending):
            conds = ext.read_custom_resource_definition(name).status.conditions or []
            if any(c.type == "Established" and c.status == "True" for c in conds):
                pending.discard(name)
        if pending:
            time.sleep(0.1)
    if pending:
        raise AssertionError(f"CRDs not Established within {timeout} s: {sorted(pending)}")
    return names


@pytest.fixture(scope="session")
def crds(api: client.ApiClient) -> list[str]:
    return install_crds(api)


@pytest.fixture
def namespace(api: client.ApiClient) -> Iterator[str]:
    """A fresh namespace per test, deleted afterwards."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    core = client.CoreV1Api(api)
    core.create_namespace({"metadata": {"name": name, "labels": {"txmail-test": "true"}}})
    yield name
    core.delete_namespace(name)
