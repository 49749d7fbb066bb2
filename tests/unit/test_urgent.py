"""What the urgent SmtpToken watch acts on, and that its work and kopf's are done once."""

from __future__ import annotations

from typing import Any

import pytest

from txmail_operator.builders import username_for
from txmail_operator.reconcile.context import Handled
from txmail_operator.reconcile.tokens import TokenIndex
from txmail_operator.reconcile.urgent import Urgent, decide
from txmail_operator.reconcile.work import ROUTINE, URGENT, Work


def token(generation: int, observed: int | None, deleting: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "uid": "u1",
        "name": "shop",
        "namespace": "app",
        "generation": generation,
    }
    if deleting:
        meta["deletionTimestamp"] = "2026-12-01T12:00:00Z"
    status = {} if observed is None else {"observedGeneration": observed}
    return {"metadata": meta, "spec": {"dedicatedIPRef": {"name": "ip1"}}, "status": status}


@pytest.mark.parametrize("event", ["LISTED", "ADDED", "MODIFIED"])
def test_a_token_being_deleted_is_revoked_at_once(event: str) -> None:
    assert decide(event, token(1, 1, deleting=True), 1) is Urgent.REVOKE
    assert decide("DELETED", token(1, 1), 1) is Urgent.GONE


def test_a_spec_change_of_a_reconciled_token_is_reconciled_at_once() -> None:
    assert decide("LISTED", token(3, 2), None) is Urgent.RECONCILE  # changed while away
    assert decide("MODIFIED", token(3, 2), 2) is Urgent.RECONCILE
    assert decide("MODIFIED", token(3, 2), 3) is None  # kopf's own patch of the same change
    assert decide("MODIFIED", token(3, 3), 3) is None  # our status write coming back


def test_creations_are_left_to_kopf() -> None:
    assert decide("ADDED", token(1, None), None) is None
    assert decide("MODIFIED", token(2, None), 1) is None


def test_a_revocation_or_reconcile_done_is_known_by_uid() -> None:
    handled = Handled()
    assert handled.generation("u1") is None
    handled.reconciled("u1", 3)
    handled.reconciled("u1", 2)  # an older view never moves it back
    assert handled.generation("u1") == 3
    assert not handled.revoked("u1")
    handled.revoke("u1")
    assert handled.revoked("u1")
    handled.forget("u1")
    assert not handled.revoked("u1") and handled.generation("u1") is None


async def test_urgent_work_replaces_the_same_job_waiting_as_routine() -> None:
    work = Work(workers=0)
    ran: list[str] = []

    async def note(what: str) -> None:
        ran.append(what)

    assert work.submit(("t", "a"), note, "routine")
    assert work.submit(("t", "a"), note, "urgent", priority=URGENT)
    assert not work.submit(("t", "a"), note, "again", priority=URGENT)
    assert not work.submit(("t", "a"), note, "routine-again", priority=ROUTINE)
    job, _ = work.take()
    assert job is not None and job.priority == URGENT
    await job.fn()
    work.finish(job)
    assert ran == ["urgent"]
    assert work.take() == (None, None)  # the routine one was dropped: it never runs


def test_the_token_index_counts_tokens_not_being_deleted_by_ip_namespace_and_user() -> None:
    index = TokenIndex()
    index.put(token(1, 1))
    other = token(1, 1)
    other["metadata"] |= {"uid": "u2", "name": "billing"}
    index.put(other)
    assert index.on_ip("ip1") == [("app", "billing"), ("app", "shop")]
    assert index.user(username_for("u2")) == ("app", "billing")
    moved = token(2, 1)
    moved["spec"] = {"dedicatedIPRef": {"name": "ip2"}}
    index.put(moved)  # the same token, now on another IP
    assert index.on_ip("ip1") == [("app", "billing")] and index.on_ip("ip2") == [("app", "shop")]
    index.put(token(2, 1, deleting=True))  # on its way out: no longer counted
    assert index.on_ip("ip2") == [] and index.body("app", "shop") is None
    assert index.in_namespace("app") == [("app", "billing")] and len(index) == 1
