"""Fixtures of the node tier: a real node running the images this project builds.

Skipped, with the reason, only where this machine cannot create the namespaces a node needs.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster.controlplane import binaries
from cluster.node import can_run_node, node_cluster
from node.kit import ROOT, Cluster

IMAGE_BUILD = ROOT / "image" / "build.sh"


def _archive(*args: str) -> Path:
    out = subprocess.run(
        [str(IMAGE_BUILD), *args], check=True, capture_output=True, text=True, timeout=1800
    )
    return Path(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def node_images() -> list[Path]:
    """The pod sandbox image first (the runtime needs it before any pod), then txmail's."""
    return [_archive("pause"), _archive()]


@pytest.fixture(scope="session")
def cluster(node_images: list[Path]) -> Iterator[Cluster]:
    reason = can_run_node()
    if reason is not None:
        pytest.skip(f"no real node on this machine: {reason}")
    with node_cluster(node_images) as node:
        c = Cluster(node, binaries() / "helm")
        try:
            yield c
        finally:
            c.close()


@pytest.fixture(scope="session")
def installed(cluster: Cluster) -> Cluster:
    """``helm install`` of the chart, as the README says, into a Pod Security restricted
    namespace; the operator pod is Ready."""
    cluster.install_chart("-f", str(Path(__file__).parent / "values.yaml"))
    return cluster
