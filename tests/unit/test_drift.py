"""Which changes to a relay's objects the drift watch acts on (the loop guard is here)."""

from __future__ import annotations

import pytest

from txmail_operator.kube import Change
from txmail_operator.reconcile.context import Written
from txmail_operator.reconcile.drift import Action, classify
from txmail_operator.reconcile.sweep import due, offset, window
from txmail_operator.reconcile.work import ROUTINE, URGENT, Work, _Job
from txmail_relay import contract as c


def change(
    type_: str, kind: str, component: str = "relay", rv: str = "7", gen: int | None = None
) -> Change:
    labels = {c.LABEL_INSTANCE: "ip1", c.LABEL_COMPONENT: component}
    return Change(type_, kind, "txmail-relay-ip1", labels, rv, gen)


def written(kind: str, rv: str = "5", gen: int | None = None) -> Written:
    w = Written()
    w.record(kind, "txmail-relay-ip1", rv, gen)
    return w


def test_our_own_write_coming_back_is_skipped() -> None:
    assert classify(change("MODIFIED", "Role", rv="5"), written("Role", "5")) is None
    assert (
        classify(change("MODIFIED", "Deployment", rv="5", gen=2), written("Deployment", "5", 2))
        is None
    )


@pytest.mark.parametrize("kind", ["Role", "RoleBinding", "ServiceAccount", "Service", "Deployment"])
def test_someone_elses_edit_or_a_delete_is_repaired(kind: str) -> None:
    assert classify(change("MODIFIED", kind, gen=3), written(kind, gen=2)) == ("ip1", Action.REPAIR)
    assert classify(change("DELETED", kind), written(kind)) == ("ip1", Action.REPAIR)


def test_deployment_status_only_refreshes_the_dedicated_ip_status() -> None:
    got = classify(change("MODIFIED", "Deployment", rv="9", gen=2), written("Deployment", "5", 2))
    assert got == ("ip1", Action.STATUS)


def test_the_relay_config_map_is_whole_but_shards_and_stats_are_written_by_entry() -> None:
    cm = "ConfigMap"
    assert classify(change("MODIFIED", cm, "config"), written(cm)) == ("ip1", Action.REPAIR)
    assert classify(change("MODIFIED", cm, "stats"), written(cm)) is None
    assert classify(change("MODIFIED", cm, "templates"), written(cm)) is None
    assert classify(change("DELETED", cm, "stats"), written(cm)) == ("ip1", Action.REPAIR)


def test_objects_of_no_dedicated_ip_are_ignored() -> None:
    orphan = Change("DELETED", "Role", "x", {}, "1", None)
    assert classify(orphan, Written()) is None


# --- the periodic token check, spread over its interval ----------------------------------


def test_each_token_is_due_once_per_interval_even_across_the_wrap() -> None:
    refs = [((f"ns{i}", "t"), offset(f"uid-{i}", 10.0)) for i in range(500)]
    assert all(0 <= at < 10.0 for _, at in refs)
    windows = [(9.5, 2.0), (2.0, 6.0), (6.0, 9.5)]  # one interval, wrapping at 10
    seen = [ref for start, end in windows for ref in due(refs, start, end)]
    assert sorted(seen) == sorted(ref for ref, _ in refs)  # each exactly once
    # spread: no tenth of the interval holds more than a fair share and a half
    assert max(len(due(refs, k, k + 1.0)) for k in range(10)) < 500 / 10 * 1.5


def test_the_sorted_window_finds_what_the_full_scan_finds() -> None:
    uids = [f"uid-{i}" for i in range(500)]
    offsets = sorted((offset(uid, 10.0), uid) for uid in uids)
    scan = [((uid, ""), at) for at, uid in offsets]
    for start, end in [(9.5, 2.0), (2.0, 6.0), (6.0, 9.5), (0.0, 10.0), (3.3, 3.3)]:
        assert sorted(window(offsets, start, end)) == sorted(r[0] for r in due(scan, start, end))


async def test_urgent_work_goes_first_and_routine_work_is_queued_once() -> None:
    work = Work(workers=0, routine_workers=1)  # no workers: the queue is read by hand
    ran: list[str] = []

    async def note(what: str) -> None:
        ran.append(what)

    assert work.submit(("SmtpToken", "a", "resume"), note, "routine-1")
    assert not work.submit(("SmtpToken", "a", "resume"), note, "routine-dup")
    assert work.submit(("SmtpToken", "b", "resume"), note, "routine-2")
    work._push(_Job(URGENT, next(work._seq), lambda: note("delete")), 0.0)
    order = []
    while work.pending():
        job, _ = work.take()
        assert job is not None
        order.append(job.priority)
        await job.fn()
        work.finish(job)
    assert ran == ["delete", "routine-1", "routine-2"]
    assert order == [URGENT, ROUTINE, ROUTINE]
    # once taken, the same key may be queued again (a later change needs a later run)
    assert work.submit(("SmtpToken", "a", "resume"), note, "again")
