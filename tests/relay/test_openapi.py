"""docs/openapi.yaml describes every route the relay serves, and the publishers' seams."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from relay.relaykit import RelayEnv
from txmail_relay.config.kube import KubernetesStatsPublisher
from txmail_relay.contract import RelayStats, TokenStats, stats_config_map_name
from txmail_relay.settings import KubernetesSettings

OPENAPI = Path(__file__).resolve().parents[2] / "docs" / "openapi.yaml"


def test_every_served_route_is_documented_on_its_listener(env: RelayEnv) -> None:
    doc = yaml.safe_load(OPENAPI.read_text())
    assert doc["openapi"].startswith("3.")
    relay = env.start()
    assert relay.relay is not None
    assert set(relay.relay.http) == {"tracking", "api", "metrics"}
    served = set()
    for listener, runner in relay.relay.http.items():
        for route in runner.app.router.routes():
            if route.method == "HEAD":
                continue
            info = route.resource.get_info() if route.resource is not None else {}
            path = info.get("path") or info.get("formatter")
            path = re.sub(r"\{(\w+)[^}]*\}", r"{\1}", str(path))
            served.add((listener, route.method.lower(), path))
    methods = {"get", "post", "put", "patch", "delete"}
    documented = {
        (item["x-txmail-listener"], m, p)
        for p, item in doc["paths"].items()
        for m in item
        if m in methods
    }
    assert served == documented, (served - documented, documented - served)
    assert ("api", "post", "/marketing/v3/transactional/single-email/send") in served


class _FakeCore:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, Any]] = []

    def patch_namespaced_config_map(self, name: str, namespace: str, body: Any) -> None:
        self.calls.append((name, namespace, body))


async def test_kubernetes_publisher_patches_only_the_stats_key() -> None:
    publisher = KubernetesStatsPublisher(
        KubernetesSettings(namespace="txmail-system", dedicatedIP="203.0.113.7")
    )
    fake = _FakeCore()
    publisher._core = fake  # type: ignore[assignment]
    stats = RelayStats(tokens={"u": TokenStats(sent=3)}, updatedAt="2026-01-01T00:00:00Z")
    await publisher.publish(stats)
    [(name, namespace, body)] = fake.calls
    assert name == stats_config_map_name("203.0.113.7") == "txmail-relay-203.0.113.7-stats"
    assert namespace == "txmail-system"
    parsed = RelayStats.model_validate_json(body["data"]["stats.json"])
    assert parsed.tokens["u"].sent == 3
    assert '"uniqueOpens"' in body["data"]["stats.json"]
