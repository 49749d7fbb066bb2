"""TransactionalEmail spec.send: the operator sends through a live relay, once per recipient."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from kubernetes import client

from k8s.conftest import Live
from k8s.kit import GROUP, VERSION, Kit
from k8s.operator_process import OperatorProcess
from peers import Sink, wait_for

pytestmark = pytest.mark.k8s
EMAILS = "transactionalemails"
TEXT = "Hello {{ contact.firstname }}, {{ custom.greeting }}\nEND-OF-MESSAGE\n"


def send_status(kit: Kit, namespace: str, name: str) -> dict[str, Any]:
    body = kit.get(EMAILS, namespace, name) or {}
    status: dict[str, Any] = (body.get("status") or {}).get("send") or {}
    return status


def phase_is(kit: Kit, namespace: str, name: str, *phases: str) -> dict[str, Any] | None:
    status = send_status(kit, namespace, name)
    return status if status.get("phase") in phases else None


def recipients(sink: Sink) -> list[str]:
    return sorted(r for m in sink.messages() for r in m.rcpts)


def test_scheduled_send_goes_out_once_and_again_only_for_a_new_generation(
    kit: Kit, namespace: str, sink: Sink, live: Live, operator: OperatorProcess
) -> None:
    at = (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=4)).strftime("%Y-%m-%dT%H:%M:%SZ")
    send = {
        "at": at,
        "customProperties": {"greeting": "welcome aboard"},
        "recipients": [
            {"address": "ann@example.net", "contactProperties": {"firstname": "Ann"}},
            {"address": "bob@example.net", "contactProperties": {"firstname": "Bob"}},
        ],
    }
    kit.email(namespace, live.ip, "news", html=None, text=TEXT, send=send)
    scheduled = wait_for(lambda: phase_is(kit, namespace, "news", "Scheduled"), 10, "Scheduled")
    assert scheduled["message"] == f"sends at {at}"
    assert sink.messages() == []
    done = wait_for(lambda: phase_is(kit, namespace, "news", "Complete"), 30, "Complete")
    assert (done["total"], done["accepted"], done["failed"]) == (2, 2, 0)
    assert done["startedAt"] >= at and done["completedAt"] >= done["startedAt"]
    got = sink.wait(2)
    assert recipients(sink) == ["<ann@example.net>", "<bob@example.net>"]
    assert any("Hello Ann, welcome aboard" in m.content for m in got)

    # A restart, or edits after completion, send nothing more: only a new generation does.
    operator.restart()
    kit.objs.patch_namespaced_custom_object(
        GROUP,
        VERSION,
        namespace,
        EMAILS,
        "news",
        {"spec": {"send": {"customProperties": {"greeting": "again"}}}},
    )
    kit.objs.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, EMAILS, "news", {"spec": {"send": {"sendGeneration": 2}}}
    )
    wait_for(
        lambda: (s := phase_is(kit, namespace, "news", "Complete")) and s["generation"] == 2,
        30,
        "generation 2",
    )
    sink.wait(4)
    assert recipients(sink) == ["<ann@example.net>"] * 2 + ["<bob@example.net>"] * 2


def test_operator_killed_mid_send_sends_each_recipient_once(
    kit: Kit, namespace: str, sink: Sink, live: Live, operator: OperatorProcess
) -> None:
    people = [f"p{i:03d}@example.net" for i in range(80)]
    csv = "email,firstname\n" + "".join(f"{p},P{i}\n" for i, p in enumerate(people))
    recipients_list = {"metadata": {"name": "list"}, "data": {"people.csv": csv}}
    kit.core.create_namespaced_config_map(
        namespace, client.V1ConfigMap.model_validate(recipients_list)
    )
    kit.email(
        namespace,
        live.ip,
        "bulk",
        html=None,
        text=TEXT,
        send={
            "recipientsFrom": {"name": "list", "key": "people.csv"},
            "customProperties": {"greeting": "hi"},
        },
    )
    wait_for(sink.messages, 30, "the first mails")
    operator.kill()
    at_kill = send_status(kit, namespace, "bulk")
    assert at_kill["phase"] == "Sending", f"the kill must land mid-send: {at_kill}"
    operator.start()
    done = wait_for(
        lambda: phase_is(kit, namespace, "bulk", "Complete"), 60, "Complete after the restart"
    )
    assert (done["total"], done["accepted"], done["failed"]) == (80, 80, 0)
    sink.wait(80, timeout=60)
    assert recipients(sink) == sorted(f"<{p}>" for p in people), "exactly one mail per recipient"


def test_suspended_send_is_canceled_and_sends_nothing(
    kit: Kit, namespace: str, sink: Sink, live: Live
) -> None:
    at = (dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5)).strftime("%Y-%m-%dT%H:%M:%SZ")
    send = {
        "at": at,
        "recipients": [{"address": "ann@example.net", "contactProperties": {"firstname": "Ann"}}],
    }
    kit.email(namespace, live.ip, "later", html=None, text=TEXT, send=send)
    wait_for(lambda: phase_is(kit, namespace, "later", "Scheduled"), 10, "Scheduled")
    kit.objs.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, EMAILS, "later", {"spec": {"send": {"suspend": True}}}
    )
    canceled = wait_for(lambda: phase_is(kit, namespace, "later", "Canceled"), 10, "Canceled")
    assert canceled.get("accepted", 0) == 0
    assert sink.messages() == []


def test_a_refused_recipient_is_counted_and_explained(
    kit: Kit, namespace: str, sink: Sink, live: Live
) -> None:
    send = {
        "customProperties": {"greeting": "hi"},
        "recipients": [
            {"address": "ann@example.net", "contactProperties": {"firstname": "Ann"}},
            {"address": "cat@example.net"},  # no firstname: MISSING_TEMPLATE_PROPERTIES
        ],
    }
    kit.email(namespace, live.ip, "partial", html=None, text=TEXT, send=send)
    done = wait_for(lambda: phase_is(kit, namespace, "partial", "Complete"), 30, "Complete")
    assert (done["accepted"], done["failed"]) == (1, 1)
    assert "cat@example.net" in done["message"] and "MISSING_TEMPLATE_PROPERTIES" in done["message"]
