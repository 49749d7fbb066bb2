"""IP warm-up in a real API server: status.warmup, the start, and the relay's figures.

The IP's status shows the warm-up once spec.warmup is set; the first time the IP is Ready the
operator records startedAt (never moved afterwards) and the RelayConfig carries the schedule
and that start; a live relay holds a burst over the budget and the operator copies what it
sent and holds into status.warmup.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from k8s.conftest import ADDRESS, Live
from k8s.kit import GROUP, VERSION, Kit
from k8s.operator_process import wait_for
from peers import Sink, auth_accepted, submit
from txmail_operator.api.warmup import STANDARD_SCHEDULE
from txmail_relay import contract as c

pytestmark = pytest.mark.k8s
IPS = "dedicatedips"
FOLLOW = 30.0


def mark_relay_ready(kit: Kit, ip: str) -> None:
    kit.mark_relay_ready(ip)
    wait_for(lambda: kit.is_ready(IPS, None, ip), FOLLOW, "the IP Ready", every=0.2)


def warmup(kit: Kit, ip: str) -> dict[str, Any]:
    status: dict[str, Any] = ((kit.get(IPS, None, ip) or {}).get("status") or {}).get(
        "warmup"
    ) or {}
    return status


def relay_warmup(kit: Kit, ip: str) -> c.WarmupConfig | None:
    config = kit.relay_config(ip)
    return config.warmup if config else None


def patch_spec(kit: Kit, ip: str, spec: dict[str, Any]) -> None:
    kit.objs.patch_cluster_custom_object(GROUP, VERSION, IPS, ip, {"spec": spec})


def delete(kit: Kit, ip: str) -> None:
    kit.objs.delete_cluster_custom_object(GROUP, VERSION, IPS, ip)


def test_warm_up_starts_when_the_ip_is_first_ready_and_the_relay_gets_the_schedule(
    kit: Kit,
) -> None:
    ip = kit.dedicated_ip(warmup={"schedule": "Custom", "dailyVolumes": [5, 10]})
    try:
        pending = wait_for(lambda: warmup(kit, ip) or None, FOLLOW, "status.warmup")
        assert pending["status"] == "InProgress"
        assert (pending["day"], pending["budget"], pending["percentage"]) == (1, 5, 0)
        assert "startedAt" not in pending  # not Ready yet: not started
        config = wait_for(lambda: relay_warmup(kit, ip), FOLLOW, "the RelayConfig")
        assert config.enabled and config.daily_volumes == [5, 10] and config.started_at is None

        mark_relay_ready(kit, ip)
        started = wait_for(
            lambda: warmup(kit, ip).get("startedAt"), FOLLOW, "status.warmup.startedAt"
        )
        at = dt.datetime.fromisoformat(started.replace("Z", "+00:00"))
        assert abs((dt.datetime.now(dt.UTC) - at).total_seconds()) < 120
        wait_for(
            lambda: (w := relay_warmup(kit, ip)) is not None and w.started_at == at,
            FOLLOW,
            "the RelayConfig with the start",
        )

        # A schedule change keeps the start: it is recorded once.
        patch_spec(kit, ip, {"warmup": {"dailyVolumes": [7, 10, 20]}})
        wait_for(
            lambda: (w := relay_warmup(kit, ip)) is not None and w.daily_volumes == [7, 10, 20],
            FOLLOW,
            "the new schedule in the RelayConfig",
        )
        wait_for(lambda: warmup(kit, ip).get("days") == 3, FOLLOW, "the new schedule shown")
        assert warmup(kit, ip)["startedAt"] == started
        assert warmup(kit, ip)["budget"] == 7
        assert relay_warmup(kit, ip).started_at == at  # type: ignore[union-attr]

        # Off: not applicable, and the start is forgotten (turning it on again starts over).
        patch_spec(kit, ip, {"warmup": None})
        wait_for(
            lambda: warmup(kit, ip) == {"status": "NotApplicable"},
            FOLLOW,
            "status.warmup NotApplicable",
        )
        wait_for(
            lambda: (w := relay_warmup(kit, ip)) is not None and not w.enabled,
            FOLLOW,
            "warm-up off in the RelayConfig",
        )
        patch_spec(kit, ip, {"warmup": {"schedule": "Standard"}})
        again = wait_for(
            lambda: warmup(kit, ip).get("startedAt"), FOLLOW, "a new start (the IP is Ready)"
        )
        assert again >= started
        shown = warmup(kit, ip)
        assert shown["days"] == len(STANDARD_SCHEDULE) and shown["budget"] == STANDARD_SCHEDULE[0]
        wait_for(
            lambda: (
                (w := relay_warmup(kit, ip)) is not None
                and w.daily_volumes == list(STANDARD_SCHEDULE)
                and w.started_at is not None
            ),
            FOLLOW,
            "the standard schedule and its start in the RelayConfig",
        )
    finally:
        delete(kit, ip)


def test_an_ip_without_warm_up_says_not_applicable(kit: Kit) -> None:
    ip = kit.dedicated_ip()
    try:
        wait_for(lambda: warmup(kit, ip) == {"status": "NotApplicable"}, FOLLOW, "NotApplicable")
        config = relay_warmup(kit, ip)
        assert config is not None and not config.enabled
    finally:
        delete(kit, ip)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"schedule": "Custom"}, "warmup.dailyVolumes is required when warmup.schedule is Custom"),
        (
            {"schedule": "Standard", "dailyVolumes": [1]},
            "warmup.dailyVolumes is only for warmup.schedule Custom",
        ),
    ],
)
def test_the_api_server_refuses_an_inconsistent_schedule(
    kit: Kit, spec: dict[str, Any], message: str
) -> None:
    with pytest.raises(ApiException) as refused:
        kit.dedicated_ip(warmup=spec)
    assert refused.value.status == 422
    assert message in str(refused.value.body)


def test_a_live_relay_holds_the_excess_and_the_status_shows_it(
    kit: Kit, namespace: str, sink: Sink, live: Live
) -> None:
    ip = live.ip
    patch_spec(kit, ip, {"warmup": {"schedule": "Custom", "dailyVolumes": [2, 100]}})
    mark_relay_ready(kit, ip)
    wait_for(lambda: warmup(kit, ip).get("startedAt"), FOLLOW, "the warm-up started")
    kit.token(namespace, ip, "shop")
    secret = wait_for(lambda: kit.secret(namespace, "shop-smtp"), 10, "the app Secret")

    def relay_enforces() -> bool:  # its stats report has warm-up figures: it has the schedule
        cm = kit.core.read_namespaced_config_map(
            c.stats_config_map_name(ip), kit.operator_namespace
        )
        raw = (cm.data or {}).get(c.STATS_KEY)
        report = c.RelayStats.model_validate_json(raw) if raw else None
        return bool(report and report.warmup and report.warmup.budget == 2)

    wait_for(relay_enforces, FOLLOW, "the relay's warm-up figures", every=0.2)
    address = (ADDRESS, live.port)
    wait_for(lambda: auth_accepted(address, secret), 10, "the token at the relay", every=0.2)
    for n in range(1, 4):
        body = (
            f"From: Shop <orders@example.com>\r\nTo: ann{n}@example.net\r\nSubject: order {n}\r\n"
            f"Message-ID: <warm-{n}@example.com>\r\n\r\nOrder {n}.\r\nEND-OF-MESSAGE {n}\r\n"
        ).encode()
        submit(address, secret, body, "orders@example.com", [f"ann{n}@example.net"])  # 250
    sink.wait(2)
    shown = wait_for(
        lambda: (w := warmup(kit, ip)).get("deferred") == 1 and w,
        FOLLOW,
        "status.warmup with the relay's figures",
    )
    assert (shown["status"], shown["day"], shown["budget"], shown["sent"]) == (
        "InProgress",
        1,
        2,
        2,
    )
    assert len(sink.messages()) == 2  # the third waits for day 2 in the relay's spool
