"""Fixtures of the k8s tier: the operator's view (kit) and a live relay on the same API."""

from __future__ import annotations

import secrets
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from kubernetes import client
from prometheus_client.parser import text_string_to_metric_families

from cluster.kubeapi import name_of
from k8s.kit import GROUP, VERSION, Kit
from k8s.operator_process import OperatorProcess, service_account_token, token_kubeconfig
from peers import RelayProcess, Sink, free_port, wait_for
from txmail_relay import contract as c

ADDRESS = "127.0.0.2"


@dataclass(frozen=True)
class Live:
    """A DedicatedIP relaying to smtp-sink and its relay process (SMTP, tracking, API ports)."""

    ip: str
    port: int
    tracking_port: int
    api_port: int
    relay: RelayProcess
    kubeconfig: Path  # the relay's own identity: its ServiceAccount's token, nothing more


def relay_kubeconfig(kit: Kit, admin: Path, ip: str, path: Path) -> Path:
    """A kubeconfig with only a token of the relay's ServiceAccount (TokenRequest API).

    The relay then runs with exactly the Role the operator wrote for it, as in its pod.
    """
    ns, name = kit.operator_namespace, c.relay_name(ip)
    wait_for(
        lambda: name in {name_of(sa) for sa in kit.core.list_namespaced_service_account(ns).items},
        10,
        "the relay's ServiceAccount",
    )
    token = service_account_token(kit.api, name, ns)
    return token_kubeconfig(admin, token, name, ns, path)


@pytest.fixture
def kit(api: client.ApiClient, operator: OperatorProcess, operator_namespace: str) -> Kit:
    return Kit(api, operator_namespace)


@pytest.fixture
def sink() -> Iterator[Sink]:
    s = Sink()
    yield s
    s.stop()


@pytest.fixture
def live(kit: Kit, sink: Sink, kubeconfig: Path, tmp_path: Path) -> Iterator[Live]:
    """A DedicatedIP relaying to smtp-sink, and its relay process."""
    tracking_port, api_port = free_port(ADDRESS), free_port(ADDRESS)
    ip = kit.dedicated_ip(
        address=ADDRESS,
        relay={"apiURL": f"http://{ADDRESS}:{api_port}"},
        tracking={"baseURL": f"http://{ADDRESS}:{tracking_port}"},
        delivery={
            "mode": "Smarthost",
            "smarthost": {"host": "127.0.0.1", "port": sink.port, "tls": "None"},
        },
    )
    tls = wait_for(
        lambda: kit.secret(kit.operator_namespace, c.tls_secret_name(ip)),
        10,
        "the relay's TLS Secret",
    )
    (tmp_path / "tls.crt").write_text(tls["tls.crt"])
    (tmp_path / "tls.key").write_text(tls["tls.key"])
    keys = tmp_path / "tracking-keys"
    keys.write_text(f"1:{secrets.token_hex(32)}\n")
    identity = relay_kubeconfig(kit, kubeconfig, ip, tmp_path / "relay.kubeconfig")
    port = free_port(ADDRESS)
    relay = RelayProcess(
        {
            "kubernetes": {
                "namespace": kit.operator_namespace,
                "dedicatedIP": ip,
                "kubeconfig": str(identity),
            },
            "listen": {
                "host": ADDRESS,
                "submission": port,
                "submissions": None,
                "tracking": tracking_port,
                "api": api_port,
                "metrics": None,
            },
            "tls": {"certFile": str(tmp_path / "tls.crt"), "keyFile": str(tmp_path / "tls.key")},
            "spool": {"directory": str(tmp_path / "spool")},
            "retry": {"minBackoff": 1, "maxBackoff": 2, "maxLifetime": 60},
            "statsInterval": 1,
            "tracking": {"machineClickWindow": 0},  # the tests click at once, as scanners do
            "trackingKeysFile": str(keys),
            "logging": {"level": "DEBUG"},
        },
        tmp_path,
    )
    relay.start(wait_port=(ADDRESS, port))
    try:
        yield Live(ip, port, tracking_port, api_port, relay, identity)
    finally:
        relay.stop()
        kit.objs.delete_cluster_custom_object(GROUP, VERSION, "dedicatedips", ip)


@dataclass
class Endpoints:
    """A second operator with its health and metrics ports on, while the session's one is paused."""

    proc: OperatorProcess
    health: int
    metrics: int

    def get(self, port: int, path: str) -> tuple[int, str]:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
            return resp.status, resp.read().decode()

    def samples(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        _, text = self.get(self.metrics, "/metrics")
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def value(self, name: str, **labels: str) -> float:
        return self.samples().get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def endpoints(
    api: client.ApiClient, operator: OperatorProcess, tmp_path: Path
) -> Iterator[Endpoints]:
    """Exactly one operator reconciles, with free ports, as a Deployment would run it with
    TXMAIL_HEALTH_PORT and TXMAIL_METRICS_PORT; restartable through ``.proc``."""
    health, metrics = free_port(), free_port()
    env = {**operator.env, "TXMAIL_HEALTH_PORT": str(health), "TXMAIL_METRICS_PORT": str(metrics)}
    mine = OperatorProcess(operator.kubeconfig, operator.namespace, tmp_path / "op.log", **env)
    operator.stop()
    try:
        mine.start()
        try:
            mine.wait_ready(api)  # one DedicatedIP reconciled
            yield Endpoints(mine, health, metrics)
        finally:
            mine.stop()
    finally:
        operator.start()
        operator.wait_ready(api)
