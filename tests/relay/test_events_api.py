"""The events pull endpoint end to end: a relay in a thread, smtp-sink upstream, two
namespaces."""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import urlencode

import pytest

from relay.relaykit import (
    B_USER,
    ORDER,
    OTHER,
    HttpReply,
    RelayEnv,
    RelayThread,
    api_send,
    basic,
    bearer,
    http,
    start_two_namespaces,
    wait_for,
)
from txmail_relay.http.api import STATUS_PATH
from txmail_relay.http.feedback import EVENTS_PATH, SUPPRESSIONS_PATH


@pytest.fixture
def relay(env: RelayEnv, b_password: str) -> RelayThread:
    return start_two_namespaces(env, b_password)


def _events(relay: RelayThread, auth: dict[str, str], **query: Any) -> HttpReply:
    path = f"{EVENTS_PATH}?{urlencode(query, doseq=True)}" if query else EVENTS_PATH
    return http(relay.api_port, "GET", path, headers=auth)


def _types(body: dict[str, Any]) -> list[tuple[str, str]]:
    return [(e["type"], e["recipient"]) for e in body["events"]]


def test_a_token_pulls_its_namespaces_events_with_filters_and_paging(
    env: RelayEnv, relay: RelayThread, b_password: str
) -> None:
    a, b = bearer(env.password), basic(B_USER, b_password)
    before = int(time.time() * 1000)
    first = api_send(relay, a, ORDER, "ada@dest.test").json()
    second = api_send(relay, a, ORDER, "bob@dest.test").json()
    assert api_send(relay, b, OTHER, "cy@dest.test").status == 200
    env.sink.wait(3)
    everything = wait_for(
        lambda: (body := _events(relay, a).json())["events"][3:] and body,
        what="A's four events",
    )
    assert sorted(_types(everything)) == [
        ("DELIVERED", "ada@dest.test"),
        ("DELIVERED", "bob@dest.test"),
        ("SENT", "ada@dest.test"),
        ("SENT", "bob@dest.test"),
    ]
    assert everything["hasMore"] is False
    event = everything["events"][0]
    assert event["type"] == "SENT" and event["statusId"] == first["statusId"]
    assert (event["namespace"], event["token"], event["emailId"]) == ("apps", env.username, ORDER)
    assert event["id"].startswith("evt_") and event["messageId"]
    assert before <= event["created"] <= int(time.time() * 1000) + 1
    assert event["createdAt"].endswith("Z") and event["filteredEvent"] is False
    delivered = next(e for e in everything["events"] if e["type"] == "DELIVERED")
    assert delivered["response"]  # the upstream's reply

    # B sees only its own namespace's.
    theirs = wait_for(lambda: _events(relay, b).json()["events"][1:], what="B's two events")
    assert {e["recipient"] for e in theirs} == {"cy@dest.test"}

    # Filters: type (repeated or comma-separated), statusId, recipient, time.
    only = _events(relay, a, eventType="delivered").json()
    assert {e["type"] for e in only["events"]} == {"DELIVERED"} and len(only["events"]) == 2
    both = _events(relay, a, eventType=["SENT", "DELIVERED"]).json()
    assert len(both["events"]) == 4
    assert len(_events(relay, a, eventType="SENT,DELIVERED").json()["events"]) == 4
    by_status = _events(relay, a, statusId=second["statusId"]).json()
    assert _types(by_status) == [("SENT", "bob@dest.test"), ("DELIVERED", "bob@dest.test")]
    by_rcpt = _events(relay, a, recipient="BOB@dest.test").json()
    assert {r for _, r in _types(by_rcpt)} == {"bob@dest.test"} and len(by_rcpt["events"]) == 2
    created = [e["created"] for e in everything["events"]]
    late = _events(relay, a, startTimestamp=max(created)).json()
    assert [e["created"] for e in late["events"]] == [c for c in created if c >= max(created)]
    assert _events(relay, a, endTimestamp=before - 1).json()["events"] == []
    # Both bounds are inclusive (HubSpot's "at or after", "at or before").
    early = _events(relay, a, endTimestamp=min(created)).json()
    assert [e["created"] for e in early["events"]] == [c for c in created if c <= min(created)]
    assert early["events"]  # the event created at exactly endTimestamp is in
    # excludeFilteredEvents: the machine opens and clicks left out (there are none here).
    assert _events(relay, a, excludeFilteredEvents="true").json()["events"] == everything["events"]
    # A filter that matches nothing moves the offset past what it scanned.
    none = _events(relay, a, eventType="SPAMREPORT").json()
    assert none["events"] == [] and int(none["offset"]) >= everything["events"][-1]["seq"]

    # Paging: offset is the cursor; an empty page keeps it.
    seen: list[dict[str, Any]] = []
    offset = "0"
    while True:
        page = _events(relay, a, limit=3, offset=offset).json()
        seen.extend(page["events"])
        offset = page["offset"]
        if not page["hasMore"]:
            break
    assert seen == everything["events"]
    assert _events(relay, a, offset=offset).json() == {
        "hasMore": False,
        "offset": offset,
        "events": [],
    }


def test_a_refused_send_is_a_dropped_event(env: RelayEnv, relay: RelayThread) -> None:
    a = bearer(env.password)
    path = f"{SUPPRESSIONS_PATH}/gone@dest.test"
    assert http(relay.api_port, "PUT", path, headers=a).status == 201
    refused = api_send(relay, a, ORDER, "Gone@Dest.test")
    assert refused.json()["sendResult"] == "BLOCKED_ADDRESS"
    [dropped] = wait_for(
        lambda: _events(relay, a, eventType="DROPPED").json()["events"], what="the DROPPED"
    )
    assert dropped["recipient"] == "Gone@Dest.test"
    assert dropped["dropReason"] == "BLOCKED_ADDRESS" and dropped["statusId"] is None
    assert dropped["emailId"] == ORDER


def test_an_asynchronous_bounce_shows_in_the_send_status(env: RelayEnv, relay: RelayThread) -> None:
    a = bearer(env.password)
    sent = api_send(relay, a, ORDER, "ada@dest.test").json()
    status_path = STATUS_PATH.format(statusId=sent["statusId"])
    wait_for(
        lambda: (
            http(relay.api_port, "GET", status_path, headers=a).json().get("sendResult") == "SENT"
        ),
        what="delivered",
    )
    [event] = _events(relay, a, eventType="SENT").json()["events"]
    assert relay.relay is not None
    records = relay.relay.records
    # What the inbound listener records for a DSN that came back (ingress/inbound.py).
    relay.call(
        lambda: records.events.bounce(
            event["spoolId"],
            "ada@dest.test",
            hard=True,
            status="5.1.1",
            reply="550 5.1.1 <ada@dest.test>: user unknown",
            category=None,
            source="DSN",
            at=time.time(),
        )
    )
    view = wait_for(
        lambda: (
            (v := http(relay.api_port, "GET", status_path, headers=a).json()).get("bounce") and v
        ),
        what="the bounce in the status",
    )
    assert view["status"] == "COMPLETE" and view["sendResult"] == "UNDELIVERABLE"
    assert view["bounce"]["bounceType"] == "HARD" and view["bounce"]["status"] == "5.1.1"
    assert view["bounce"]["reply"].startswith("550 5.1.1") and view["bounce"]["at"].endswith("Z")
    [bounce] = _events(relay, a, eventType="BOUNCE").json()["events"]
    assert (bounce["bounceType"], bounce["source"], bounce["category"]) == (
        "HARD",
        "DSN",
        "UNKNOWN_USER",
    )
    entry = http(relay.api_port, "GET", f"{SUPPRESSIONS_PATH}/ada@dest.test", headers=a).json()
    assert [e["reason"] for e in entry["entries"]] == ["HARD_BOUNCE"]


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ({"eventType": "NOPE"}, "eventType"),
        ({"offset": "abc"}, "offset"),
        ({"offset": "-1"}, "offset"),
        ({"limit": "5000"}, "limit"),
        ({"startTimestamp": "yesterday"}, "startTimestamp"),
        ({"endTimestamp": "1.5"}, "endTimestamp"),
        ({"recipient": "not-an-address"}, "recipient"),
        ({"excludeFilteredEvents": "yes"}, "excludeFilteredEvents"),
    ],
)
def test_bad_queries_are_json_errors_naming_the_field(
    env: RelayEnv, relay: RelayThread, query: dict[str, str], field: str
) -> None:
    reply = _events(relay, bearer(env.password), **query)
    assert reply.status == 400
    assert reply.json()["errors"][0]["in"] == field


def test_the_events_need_the_tokens_credentials(relay: RelayThread) -> None:
    reply = _events(relay, bearer("wrong"))
    assert reply.status == 401 and reply.json()["category"] == "INVALID_AUTHENTICATION"
