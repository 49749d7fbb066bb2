"""The retry schedule survives a restart (issue 12): attempts and the next attempt's time are
in the spool, so a relay killed with deferred mail and started again waits for that time
instead of retrying everything at once, and counts attempts on from where it was.

The first relay is a real process killed with SIGKILL (as in test_crash.py); the second runs
in a thread with an outcome recorder. Upstream: smtp-sink answering 4xx to every RCPT. The
backoff is long, so no second attempt comes while a test runs: what the restarted relay plans
is read from its queue, not raced against the clock.
"""

from __future__ import annotations

import asyncio
import smtplib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from relay.relaykit import (
    Recorder,
    RelayEnv,
    Sink,
    free_port,
    kill_relay_process,
    message,
    start_relay_process,
    submission_only,
    wait_for,
)
from txmail_relay.spool.segments import KIND_STATE, Spool, _parse

BACKOFF = 600.0  # seconds between attempts: no second attempt while a test runs


def states(spool: Path) -> list[dict[str, Any]]:
    """The STATE records of every segment, in order."""
    found = []
    for path in sorted(spool.glob("seg-*.log")):
        data, pos = path.read_bytes(), 0
        while (parsed := _parse(data, pos)) is not None:
            kind, meta, _, pos = parsed
            if kind == KIND_STATE:
                found.append(meta)
    return found


def test_a_restarted_relay_keeps_the_retry_schedule(
    env: RelayEnv, sink_factory: Callable[..., Sink]
) -> None:
    failing = sink_factory("-r", "RCPT")  # 4xx to every RCPT: deferred, again and again
    port = free_port()
    settings = env.settings(
        upstream_port=failing.port,
        overrides={
            "listen": submission_only(port),
            "retry": {"minBackoff": BACKOFF, "maxBackoff": BACKOFF, "maxLifetime": 3600.0},
            "logging": {"level": "INFO", "json": True},
        },
    )
    process = start_relay_process(settings, port, env.directory / "relay.log")
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
            smtp.starttls(context=env.tls.client_context())
            smtp.login(env.username, env.password)
            smtp.sendmail("app@example.com", ["user@dest.test"], message(1))
        spool = env.directory / "spool"
        [state] = wait_for(lambda: states(spool) or None, 20, "the deferral in the spool")
    finally:
        kill_relay_process(process)
    assert state["attempts"] == 1
    # Started again long before the next attempt is due: it waits for that very time, and
    # its attempts count on from the one already made.
    recorder = Recorder()
    relay = env.start(settings, listeners=[recorder])
    queue = relay.relay.queue if relay.relay is not None else None
    assert queue is not None
    [(due, msg_id, attempts)] = wait_for(queue.waiting, 10, "the recovered deferral")
    assert (msg_id, due, attempts) == (state["id"], state["next"], 1)
    assert recorder.events == [], "retried before its time"


def test_a_next_attempt_past_the_longest_backoff_is_brought_forward(
    env: RelayEnv, sink_factory: Callable[..., Sink]
) -> None:
    """A next attempt persisted three days ahead (the clock was stepped back since, by days)
    waits at most retry.maxBackoff after a restart, not until then."""
    failing = sink_factory("-r", "RCPT")
    spool_dir = env.directory / "spool"

    async def deferred_far_ahead() -> str:
        spool = Spool(spool_dir)
        spool.recover()
        spool.start()
        try:
            msg = await spool.append("app@example.com", ["user@dest.test"], env.username, b"x")
            msg.attempts = 3
            assert await spool.defer(msg, time.time() + 3 * 86400)
            return msg.id
        finally:
            await spool.close()

    msg_id = asyncio.run(deferred_far_ahead())
    settings = env.settings(
        upstream_port=failing.port,
        overrides={"retry": {"minBackoff": 10.0, "maxBackoff": 60.0, "maxLifetime": 5 * 86400.0}},
    )
    started = time.time()
    relay = env.start(settings)
    queue = relay.relay.queue if relay.relay is not None else None
    assert queue is not None
    [(due, waiting_id, attempts)] = wait_for(queue.waiting, 10, "the recovered deferral")
    assert (waiting_id, attempts) == (msg_id, 3)
    assert started + 60.0 <= due <= time.time() + 60.0
