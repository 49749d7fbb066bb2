"""Per-destination shaping in a real API server: spec.shaping reaches the relay's RelayConfig,
the API server refuses a bad one, and the relay's paused destinations show in the status."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from k8s.kit import GROUP, VERSION, Kit
from k8s.operator_process import wait_for
from txmail_relay import contract as c

pytestmark = pytest.mark.k8s
IPS = "dedicatedips"
FOLLOW = 30.0


def relay_shaping(kit: Kit, ip: str) -> c.ShapingConfig | None:
    config = kit.relay_config(ip)
    return config.shaping if config else None


def delete(kit: Kit, ip: str) -> None:
    kit.objs.delete_cluster_custom_object(GROUP, VERSION, IPS, ip)


def test_spec_shaping_reaches_the_relay_config_and_follows_changes(kit: Kit) -> None:
    ip = kit.dedicated_ip(
        shaping={
            "sites": [
                {"name": "gmail", "connections": 2, "rate": "30/min"},
                {"name": "corp", "mx": ["*.mx.corp.example"], "messagesPerConnection": 10},
            ],
            "pause": {"initialSeconds": 30},
        }
    )
    try:
        shaping = wait_for(lambda: relay_shaping(kit, ip), FOLLOW, "the RelayConfig")
        gmail, corp = shaping.sites
        assert (gmail.name, gmail.connections, gmail.rate) == ("gmail", 2, "30/min")
        assert (corp.name, corp.mx, corp.messages_per_connection) == (
            "corp",
            ["*.mx.corp.example"],
            10,
        )
        assert shaping.pause.initial_seconds == 30
        assert shaping.enabled
        kit.objs.patch_cluster_custom_object(
            GROUP, VERSION, IPS, ip, {"spec": {"shaping": {"enabled": False}}}
        )
        wait_for(
            lambda: (s := relay_shaping(kit, ip)) is not None and not s.enabled,
            FOLLOW,
            "shaping off in the RelayConfig",
        )
    finally:
        delete(kit, ip)


@pytest.mark.parametrize(
    "shaping",
    [
        {"sites": [{"name": "gmail", "rate": "fast"}]},
        {"sites": [{"name": "gmail", "rate": "0/s"}]},  # zero would stop it for good
        {"default": {"rate": "0.0/h"}},
        {"sites": [{"name": "Not A Name"}]},
        {"sites": [{"name": "x", "connections": 0}]},
        {"sites": [{"name": "x"}, {"name": "x"}]},  # a list keyed by name
    ],
)
def test_the_api_server_refuses_a_bad_shaping(kit: Kit, shaping: dict[str, Any]) -> None:
    with pytest.raises(ApiException) as refused:
        kit.dedicated_ip(shaping=shaping)
    assert refused.value.status == 422


def test_paused_destinations_show_in_the_status(kit: Kit) -> None:
    ip = kit.dedicated_ip()
    try:
        wait_for(lambda: relay_shaping(kit, ip), FOLLOW, "the relay's objects")
        until = dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(minutes=5)
        paused = c.PausedDestination(name="gmail", until=until, reason="421 4.7.0 try later")

        def report(*destinations: c.PausedDestination) -> None:
            stats = c.RelayStats(updated_at=dt.datetime.now(dt.UTC), destinations=[*destinations])

            def patched() -> bool:
                try:
                    kit.core.patch_namespaced_config_map(  # what the relay does (its Role)
                        c.stats_config_map_name(ip),
                        kit.operator_namespace,
                        {"data": {c.STATS_KEY: stats.to_json()}},
                    )
                except ApiException as exc:
                    if exc.status == 404:  # the operator has not made it yet
                        return False
                    raise
                return True

            wait_for(patched, FOLLOW, "the stats ConfigMap")

        def shown() -> Any:
            return ((kit.get(IPS, None, ip) or {}).get("status") or {}).get("destinations")

        report(paused)
        got = wait_for(shown, FOLLOW, "status.destinations")
        assert got == [
            {
                "name": "gmail",
                "until": until.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "reason": "421 4.7.0 try later",
            }
        ]
        report()  # the pause is over
        wait_for(lambda: shown() is None, FOLLOW, "status.destinations gone")
    finally:
        delete(kit, ip)
