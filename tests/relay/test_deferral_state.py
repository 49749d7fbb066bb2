"""The retry schedule survives a restart (issue 12): attempts and the next attempt's time are
in the spool, so a relay killed with deferred mail and started again waits for that time
instead of retrying everything at once, and counts attempts on from where it was.

The first relay is a real process killed with SIGKILL (as in test_crash.py); the second runs
in a thread with an outcome recorder. Upstream: smtp-sink answering 4xx to every RCPT.
"""

from __future__ import annotations

import asyncio
import signal
import smtplib
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from peers import relay_command
from relay.relaykit import (
    Recorder,
    RelayEnv,
    Sink,
    credential,
    free_port,
    message,
    relay_settings,
    wait_for,
)
from txmail_relay.spool.segments import KIND_STATE, Spool, _parse

BACKOFF = 4.0  # seconds between attempts: long enough that a restart comes before the next


def states(spool: Path) -> list[dict[str, float]]:
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
    settings = relay_settings(
        env.directory,
        env.tls,
        failing.port,
        credentials=[credential(env.username, env.password)],
        overrides={
            "listen": {
                "submission": port,
                "submissions": None,
                "tracking": None,
                "api": None,
                "metrics": None,
            },
            "retry": {"minBackoff": BACKOFF, "maxBackoff": BACKOFF, "maxLifetime": 600.0},
            "logging": {"level": "INFO", "json": True},
        },
    )
    with (env.directory / "relay.log").open("ab") as out:
        process = subprocess.Popen(
            [*relay_command(), "--config", str(settings)], stdout=out, stderr=subprocess.STDOUT
        )
    try:

        def listening() -> bool:
            assert process.poll() is None, "the relay exited"
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0

        wait_for(listening, 20, "the relay to listen")
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
            smtp.starttls(context=env.tls.client_context())
            smtp.login(env.username, env.password)
            smtp.sendmail("app@example.com", ["user@dest.test"], message(1))
        spool = env.directory / "spool"
        [state] = wait_for(lambda: states(spool) or None, 20, "the deferral in the spool")
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(10)
    assert state["attempts"] == 1
    due = state["next"]
    # Started again before the next attempt is due: it waits for it, then counts attempt 2.
    recorder = Recorder()
    relay = env.start(settings, listeners=[recorder])
    assert relay.relay is not None
    if time.time() < due - 0.5:
        assert recorder.events == [], "retried before its time"
    event = wait_for(lambda: recorder.events[0] if recorder.events else None, 30, "the retry")
    assert event.at >= due
    assert event.attempts == 2
    assert event.outcome.value == "deferred"
    wait_for(lambda: len(states(spool)) >= 2, 10, "the second deferral in the spool")
    assert states(spool)[-1]["attempts"] == 2


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
    settings = relay_settings(
        env.directory,
        env.tls,
        failing.port,
        credentials=[credential(env.username, env.password)],
        overrides={"retry": {"minBackoff": 10.0, "maxBackoff": 60.0, "maxLifetime": 5 * 86400.0}},
    )
    started = time.time()
    relay = env.start(settings)
    queue = relay.relay.queue if relay.relay is not None else None
    assert queue is not None
    [(due, waiting_id, attempts)] = wait_for(queue.waiting, 10, "the recovered deferral")
    assert (waiting_id, attempts) == (msg_id, 3)
    assert started + 60.0 <= due <= time.time() + 60.0
