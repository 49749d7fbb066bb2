"""D1: a relay process killed with SIGKILL at random moments loses no message it said 250 to.

Two clients submit sequence-numbered messages while the relay delivers them to smtp-sink;
the relay is killed mid-DATA, right after a 250 or mid-delivery (whatever the moment hits),
restarted, and killed again. In the end every acknowledged sequence number must have
reached smtp-sink; duplicates are counted and bounded. Finally SIGTERM stops it cleanly.
"""

from __future__ import annotations

import random
import re
import signal
import smtplib
import threading
import time
from collections import Counter

import pytest

from relay.relaykit import (
    RelayEnv,
    free_port,
    kill_relay_process,
    message,
    start_relay_process,
    submission_only,
    wait_for,
)

ROUNDS = 6
CLIENTS = 2


class Submitter:
    """Clients sending numbered messages until told to stop; records what got a 250."""

    def __init__(self, env: RelayEnv, port: int) -> None:
        self._env = env
        self._port = port
        self._lock = threading.Lock()
        self._next = 0
        self.acked: set[int] = set()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def _seq(self) -> int:
        with self._lock:
            self._next += 1
            return self._next

    def _client(self) -> None:
        while not self._stop.is_set():
            try:
                with smtplib.SMTP("127.0.0.1", self._port, timeout=5) as smtp:
                    smtp.starttls(context=self._env.tls.client_context())
                    smtp.login(self._env.username, self._env.password)
                    while not self._stop.is_set():
                        seq = self._seq()
                        smtp.sendmail("app@example.com", ["user@dest.test"], message(seq))
                        with self._lock:
                            self.acked.add(seq)
            except (OSError, smtplib.SMTPException):
                self._stop.wait(0.01)  # relay down: try again

    def start(self) -> None:
        self._stop.clear()
        self._threads = [threading.Thread(target=self._client) for _ in range(CLIENTS)]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)


@pytest.mark.slow
def test_sigkill_loses_no_acknowledged_message(env: RelayEnv) -> None:
    port = free_port()
    settings = env.settings(
        overrides={
            "logging": {"level": "INFO", "json": True},
            "listen": submission_only(port),
        },
    )
    log = env.directory / "relay.log"
    submitter = Submitter(env, port)
    rng = random.Random()
    for _ in range(ROUNDS):
        process = start_relay_process(settings, port, log)
        submitter.start()
        time.sleep(rng.uniform(0.1, 0.6))  # the kill moment is random on purpose
        kill_relay_process(process)
        submitter.stop()
    assert len(submitter.acked) > ROUNDS, "the clients should have got some 250s"

    process = start_relay_process(settings, port, log)
    seqs = re.compile(r"Subject: seq (\d+)")

    def delivered() -> Counter[int]:
        return Counter(
            int(m.group(1))
            for captured in env.sink.messages()
            if (m := seqs.search(captured.content))
        )

    counts = wait_for(
        lambda: c if submitter.acked <= set(c := delivered()) else None,
        timeout=30,
        what="every acknowledged message at smtp-sink",
    )
    duplicates = sum(counts.values()) - len(counts)
    # A duplicate needs a kill between the upstream's 250 and our fdatasync of the outcome,
    # or a kill after our fsync but before the client read the 250 (then it is not acked).
    assert duplicates <= ROUNDS * 8 * 2, f"{duplicates} duplicates"

    process.send_signal(signal.SIGTERM)
    assert process.wait(10) == 0
    print(f"acked={len(submitter.acked)} delivered={len(counts)} duplicates={duplicates}")
