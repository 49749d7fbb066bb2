"""A delivery outcome survives a SIGKILL at either side of the spool's DONE record, counted
once (issue 13): the records (counter, event, send status) are written before the spool
crosses the recipient off, and keyed by attempt, so the redelivery a crash in between causes
is not counted again.

The relay is a real process killed at an exact point of its first delivery by the seam in
tests/relay/crashpoint.py (no sleep-and-hope); the restarted one runs in a thread. Upstream:
smtp-sink. The figures are read from the records database after the restarted relay has
finished the message.
"""

from __future__ import annotations

import contextlib
import http.client as http_client
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from relay import crashpoint
from relay.relaykit import (
    RelayEnv,
    bearer,
    free_port,
    http,
    send_request,
    start_relay_process,
    template_doc,
    wait_for,
)
from txmail_relay.contract import SendState
from txmail_relay.http.api import SEND_PATH
from txmail_relay.records.records import DB_NAME

ORDER = 313


def start_crashing_relay(
    point: str, settings: Path, port: int, log: Path
) -> subprocess.Popen[bytes]:
    """The relay, through the crash-point seam, once its API listens on ``port``."""
    command = [sys.executable, crashpoint.__file__, point]
    return start_relay_process(settings, port, log, command=command)


def records(directory: Path) -> tuple[int, int, list[tuple[str, str | None]]]:
    """DELIVERED counter, DELIVERED events, and (status, sendResult) of every send status."""
    with sqlite3.connect(directory / "spool" / DB_NAME) as db:
        counted = db.execute("SELECT coalesce(sum(n), 0) FROM counters WHERE kind = 'delivered'")
        events = db.execute("SELECT count(*) FROM events WHERE type = 'DELIVERED'")
        statuses = db.execute("SELECT status, send_result FROM statuses")
        return int(counted.fetchone()[0]), int(events.fetchone()[0]), list(statuses.fetchall())


def statuses(directory: Path) -> list[str]:
    with sqlite3.connect(directory / "spool" / DB_NAME) as db:
        return [row[0] for row in db.execute("SELECT status_id FROM statuses")]


@pytest.mark.parametrize("point", crashpoint.POINTS)
def test_an_outcome_is_counted_once_across_a_sigkill_around_the_spools_done(
    env: RelayEnv, point: str
) -> None:
    api = free_port()
    settings = env.settings(
        overrides={
            "listen": {"api": api, "submission": 0, "submissions": None, "tracking": None},
            "templates": [template_doc(ORDER)],
        }
    )
    process = start_crashing_relay(point, settings, api, env.directory / "relay.log")
    try:
        doc = {**send_request("user@dest.test"), "emailId": ORDER}
        # The crash point may come before the reply is written (delivery is that quick): the
        # send status is looked up in the records then.
        with contextlib.suppress(http_client.RemoteDisconnected, ConnectionError):
            reply = http(api, "POST", SEND_PATH, body=doc, headers=bearer(env.password))
            assert reply.status == 200, reply.body
        assert process.wait(30) == -9, "not killed at its crash point"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    env.sink.wait(1)  # delivered once before the kill
    if point == "after-done":
        # The spool has crossed it off: never delivered again, so only the records written
        # before DONE can count it (the other order lost it: 0, and PROCESSING for ever).
        assert records(env.directory) == (1, 1, [(SendState.COMPLETE.value, "SENT")])

    relay = env.start(settings)
    queue = relay.relay.queue if relay.relay is not None else None
    assert queue is not None
    if point == "before-done":
        env.sink.wait(2)  # not crossed off in the spool: delivered again (at least once)
    wait_for(lambda: queue.depth() == 0, 15, "the message finished")
    # The redelivery's write is its attempt's again: not counted a second time.
    assert records(env.directory) == (1, 1, [(SendState.COMPLETE.value, "SENT")])
    [status_id] = statuses(env.directory)
    shown = http(
        api, "GET", f"/marketing/v3/email/send-statuses/{status_id}", headers=bearer(env.password)
    )
    assert shown.status == 200, shown.body
    assert (shown.json()["status"], shown.json()["sendResult"]) == ("COMPLETE", "SENT")
