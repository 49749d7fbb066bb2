"""Shared fixtures. The `k8s` tier runs against a real control plane (see tests/cluster)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client

from cluster.controlplane import control_plane
from cluster.crds import install_crds
from cluster.kubeapi import close_api_client, name_of, new_api_client
from dns_server import DnsServer
from k8s.operator_process import OperatorProcess, install_operator_identity


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
    api_client = new_api_client(kubeconfig)
    yield api_client
    close_api_client(api_client)


@pytest.fixture(scope="session")
def crds(api: client.ApiClient) -> list[str]:
    return install_crds(api)


@pytest.fixture
def namespace(api: client.ApiClient) -> Iterator[str]:
    """A fresh namespace per test, deleted afterwards."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    core = client.CoreV1Api(api)
    meta = client.V1ObjectMeta(name=name, labels={"txmail-test": "true"})
    core.create_namespace(client.V1Namespace(metadata=meta))
    yield name
    core.delete_namespace(name)


@pytest.fixture(scope="session")
def operator_namespace(api: client.ApiClient) -> str:
    name = "txmail-system"
    core = client.CoreV1Api(api)
    if not [n for n in core.list_namespace().items if name_of(n) == name]:
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    return name


@pytest.fixture(scope="session")
def cluster_dns() -> Iterator[DnsServer]:
    """The session's real DNS server (Knot): the operator's DNS readiness check asks it."""
    with DnsServer() as server:
        yield server


@pytest.fixture(scope="session")
def operator(
    api: client.ApiClient,
    kubeconfig: Path,
    crds: list[str],
    operator_namespace: str,
    cluster_dns: DnsServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[OperatorProcess]:
    """`txmail-operator` as a real process for the whole session (tests may restart it).

    It runs with a token of the chart's own ServiceAccount and exactly the chart's RBAC
    (release txmail in txmail-system, default values: every namespace), never as admin. Its
    DNS readiness check resolves against ``cluster_dns`` only.
    """
    folder = tmp_path_factory.mktemp("op")
    identity = install_operator_identity(api, kubeconfig, folder / "operator.kubeconfig")
    proc = OperatorProcess(
        identity,
        operator_namespace,
        folder / "operator.log",
        TXMAIL_DNS_NAMESERVERS=cluster_dns.address,
    )
    proc.start()
    try:
        proc.wait_ready(api)
        yield proc
    finally:
        proc.stop()
