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
from k8s.operator_process import OperatorProcess
from project import CRDS


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


@pytest.fixture(scope="session")
def operator_namespace(api: client.ApiClient) -> str:
    name = "txmail-system"
    core = client.CoreV1Api(api)
    if not [n for n in core.list_namespace().items if n.metadata.name == name]:
        core.create_namespace({"metadata": {"name": name}})
    return name


@pytest.fixture(scope="session")
def operator(
    kubeconfig: Path,
    crds: list[str],
    operator_namespace: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[OperatorProcess]:
    """`txmail-operator` as a real process for the whole session (tests may restart it)."""
    proc = OperatorProcess(
        kubeconfig, operator_namespace, tmp_path_factory.mktemp("op") / "operator.log"
    )
    proc.start()
    _await_operator(api_client_for(kubeconfig), proc)
    yield proc
    proc.stop()


def api_client_for(kubeconfig: Path) -> client.ApiClient:
    return config.new_client_from_config(config_file=str(kubeconfig))


def _await_operator(api_client: client.ApiClient, proc: OperatorProcess) -> None:
    """The operator is up once it has reconciled a throwaway DedicatedIP."""
    objs = client.CustomObjectsApi(api_client)
    name = f"ready-{uuid.uuid4().hex[:6]}"
    body = {
        "apiVersion": "txmail.dev/v1alpha1",
        "kind": "DedicatedIP",
        "metadata": {"name": name},
        "spec": {
            "address": "127.0.0.9",
            "hostname": "probe.example.com",
            "domains": ["example.com"],
        },
    }
    objs.create_cluster_custom_object("txmail.dev", "v1alpha1", "dedicatedips", body)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        got = objs.get_cluster_custom_object("txmail.dev", "v1alpha1", "dedicatedips", name)
        if (got.get("status") or {}).get("conditions"):
            objs.delete_cluster_custom_object("txmail.dev", "v1alpha1", "dedicatedips", name)
            return
        if proc.proc is not None and proc.proc.poll() is not None:
            break
        time.sleep(0.1)
    raise AssertionError(f"the operator did not start:\n{proc.output()[-5000:]}")
