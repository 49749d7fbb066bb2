"""Head-of-line blocking: a destination that hangs holds at most its share of the workers.

Direct delivery, routed per domain by a real local DNS server (tests/dns_server.py, Knot):
``good.test`` goes to smtp-sink on 127.0.0.1, ``bad.test`` to a peer that misbehaves on
127.0.0.5 (same port, ``delivery.mxPort``) or to a name whose lookup never gets an answer.
The bad domain's mail is submitted first; the healthy domain's must still arrive within a
deadline far below the bad peer's timeout (connect 30 s, command 300 s, DNS 10 s).
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from relay.relaykit import DnsServer, Recorder, RelayEnv, free_port, message, wait_for

BAD_HOST = "127.0.0.5"
BAD_MESSAGES = 16  # twice the test relay's 8 workers
GOOD_MESSAGES = 10
HANGUP_AFTER = 0.5  # seconds
DEADLINE = 8.0  # seconds; the old queue took 30 s (tarpit) to 300 s (silent after banner)


class MisbehavingPeer:
    """A TCP server that accepts and then, per ``mode``:

    * ``tarpit``: never sends a byte (the greeting never comes);
    * ``mute``: sends a 220 greeting, then never answers a command;
    * ``reset``: closes at once with a TCP reset;
    * ``hangup``: sends nothing and resets the connection after ``HANGUP_AFTER`` seconds.

    ``most_open`` is the most connections it held at once; ``most_open_later`` the same,
    counted from the first hangup on.
    """

    def __init__(self, host: str, port: int, mode: str) -> None:
        self.mode = mode
        self._server = socket.create_server((host, port))
        self._server.settimeout(0.05)
        self._held: list[tuple[float, socket.socket]] = []
        self.accepted = 0
        self.hung_up = 0
        self.most_open = 0
        self.most_open_later = 0
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stopped.is_set():
            if self.mode == "hangup":
                now = time.monotonic()
                for entry in [e for e in self._held if now - e[0] >= HANGUP_AFTER]:
                    self._held.remove(entry)
                    _reset(entry[1])
                    self.hung_up += 1
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            self.accepted += 1
            if self.mode == "reset":
                _reset(conn)
                continue
            if self.mode == "mute":
                conn.sendall(b"220 mute.test ESMTP\r\n")
            self._held.append((time.monotonic(), conn))
            self.most_open = max(self.most_open, len(self._held))
            if self.hung_up:
                self.most_open_later = max(self.most_open_later, len(self._held))

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(5)
        for _, conn in self._held:
            with contextlib.suppress(OSError):
                conn.close()
        self._server.close()


def _reset(conn: socket.socket) -> None:
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


@pytest.fixture
def peer_factory() -> Iterator[Callable[[str, int], MisbehavingPeer]]:
    peers: list[MisbehavingPeer] = []

    def make(mode: str, port: int) -> MisbehavingPeer:
        peer = MisbehavingPeer(BAD_HOST, port, mode)
        peers.append(peer)
        return peer

    yield make
    for peer in peers:
        peer.stop()


def _direct(env: RelayEnv, dns: DnsServer, port: int, **more: Any) -> Path:
    """Settings for Direct delivery through ``dns`` to ``port`` on whatever address the
    domain's A record names."""
    delivery = {"mode": "Direct", "resolver": [dns.address], "mxPort": port, "smarthost": None}
    # A short grace: at the end of a test, attempts to the bad destination are still hanging.
    overrides = {"relay": {"delivery": delivery}, "shutdownGrace": 1.0, **more}
    return env.settings(overrides=overrides)


def _submit(env: RelayEnv, domain: str, count: int, first: int = 0) -> None:
    with env.client(env.threads[-1]) as smtp:
        for seq in range(first, first + count):
            smtp.sendmail("app@example.com", [f"user{seq}@{domain}"], message(seq))


def _good_ones_arrive(env: RelayEnv) -> None:
    captured = env.sink.wait(GOOD_MESSAGES, timeout=DEADLINE)
    assert sorted(r for m in captured for r in m.rcpts) == sorted(
        f"<user{seq}@good.test>" for seq in range(BAD_MESSAGES, BAD_MESSAGES + GOOD_MESSAGES)
    )


def _only_bad_ones_left(env: RelayEnv) -> None:
    relay = env.threads[-1].relay
    assert relay is not None
    wait_for(
        lambda: env.threads[-1].call(relay.queue.depth) == BAD_MESSAGES,
        what="only the bad destination's mail left in the queue",
    )


@pytest.fixture
def dns() -> Iterator[DnsServer]:
    server = DnsServer({"good.test": {"A": ["127.0.0.1"]}, "bad.test": {"A": [BAD_HOST]}})
    yield server
    server.stop()


@pytest.mark.parametrize("bad", ["tarpit", "mute", "dns", "reset"])
def test_a_hanging_destination_does_not_hold_up_the_others(
    env: RelayEnv,
    dns: DnsServer,
    peer_factory: Callable[[str, int], MisbehavingPeer],
    bad: str,
) -> None:
    port = env.sink.port
    peer = None
    if bad == "dns":
        dns.drop("bad.test")
    else:
        peer = peer_factory(bad, port)
    recorder = Recorder()
    env.start(_direct(env, dns, port), listeners=[recorder])
    _submit(env, "bad.test", BAD_MESSAGES)
    _submit(env, "good.test", GOOD_MESSAGES, first=BAD_MESSAGES)
    _good_ones_arrive(env)
    # The bad destination's mail is kept for a retry, never delivered nor dropped...
    assert not any(
        "delivered" in recorder.outcomes(f"user{seq}@bad.test") for seq in range(BAD_MESSAGES)
    )
    _only_bad_ones_left(env)
    if peer is not None and bad != "reset":
        # ...and a server that hangs holds no more than its share: 8 workers / 4.
        wait_for(lambda: peer.accepted, what="a connection to the bad server")
        assert peer.accepted <= 2


def test_the_share_is_a_setting(
    env: RelayEnv, dns: DnsServer, peer_factory: Callable[[str, int], MisbehavingPeer]
) -> None:
    peer = peer_factory("tarpit", env.sink.port)
    env.start(_direct(env, dns, env.sink.port, outbound={"destinationConcurrency": 1}))
    _submit(env, "bad.test", BAD_MESSAGES)
    _submit(env, "good.test", GOOD_MESSAGES, first=BAD_MESSAGES)
    _good_ones_arrive(env)
    wait_for(lambda: peer.accepted, what="a connection to the tarpit")
    assert peer.accepted == 1


def test_the_recovered_backlog_is_scheduled_per_destination_too(
    env: RelayEnv, dns: DnsServer, peer_factory: Callable[[str, int], MisbehavingPeer]
) -> None:
    """Mail spooled before a restart is recovered before the first configuration is loaded;
    it is still split by destination once it is."""
    closed = free_port()  # first run: nothing listens there, every attempt is refused
    env.start(_direct(env, dns, closed))
    _submit(env, "bad.test", BAD_MESSAGES)
    _submit(env, "good.test", GOOD_MESSAGES, first=BAD_MESSAGES)
    env.threads[-1].stop()
    assert env.sink.messages() == []
    peer_factory("tarpit", env.sink.port)
    env.start(_direct(env, dns, env.sink.port))
    _good_ones_arrive(env)
    _only_bad_ones_left(env)


def test_a_failing_destination_is_probed_one_attempt_at_a_time(
    env: RelayEnv, dns: DnsServer, peer_factory: Callable[[str, int], MisbehavingPeer]
) -> None:
    """A destination whose attempts fail (here: no greeting, then a reset) keeps its backlog
    waiting and gets one attempt at a time until one succeeds, instead of its whole share."""
    peer = peer_factory("hangup", env.sink.port)
    env.start(_direct(env, dns, env.sink.port))
    _submit(env, "bad.test", BAD_MESSAGES)
    wait_for(lambda: peer.hung_up >= 5, what="five failed attempts")
    assert peer.most_open <= 2  # its share: 8 workers / 4
    assert peer.most_open_later == 1  # once failing, one at a time
    _submit(env, "good.test", GOOD_MESSAGES, first=BAD_MESSAGES)
    _good_ones_arrive(env)


def _send_to_both_domains(env: RelayEnv, dns: DnsServer) -> Recorder:
    """A relay with an outcome recorder; GOOD_MESSAGES messages, each to one recipient at the
    hanging domain and one at the healthy domain."""
    recorder = Recorder()
    env.start(_direct(env, dns, env.sink.port), listeners=[recorder])
    with env.client(env.threads[-1]) as smtp:
        for seq in range(GOOD_MESSAGES):
            smtp.sendmail(
                "app@example.com", [f"user{seq}@bad.test", f"user{seq}@good.test"], message(seq)
            )
    return recorder


def test_a_message_to_both_domains_reaches_the_healthy_one(
    env: RelayEnv, dns: DnsServer, peer_factory: Callable[[str, int], MisbehavingPeer]
) -> None:
    """The recipients of one message at a hanging and at a healthy domain are attempted
    apart: the healthy ones do not wait for the hanging attempt."""
    peer_factory("tarpit", env.sink.port)
    recorder = _send_to_both_domains(env, dns)
    captured = env.sink.wait(GOOD_MESSAGES, timeout=DEADLINE)
    assert sorted(r for m in captured for r in m.rcpts) == sorted(
        f"<user{seq}@good.test>" for seq in range(GOOD_MESSAGES)
    )
    wait_for(
        lambda: all(recorder.outcomes(f"user{s}@good.test") for s in range(GOOD_MESSAGES)),
        what="the healthy recipients' outcomes",
    )
    assert all(
        recorder.outcomes(f"user{s}@good.test") == ["delivered"] for s in range(GOOD_MESSAGES)
    )
    relay = env.threads[-1].relay
    assert relay is not None
    # Each message waits for its other recipient: none is finished, none is lost.
    assert env.threads[-1].call(relay.queue.depth) == GOOD_MESSAGES


def test_after_a_restart_only_the_undelivered_part_is_sent(
    env: RelayEnv, dns: DnsServer, peer_factory: Callable[[str, int], MisbehavingPeer]
) -> None:
    """Split attempts keep delivery's guarantee: the healthy part delivered before a restart
    is not sent again after it, and the hanging part is delivered once its server works."""
    peer_factory("tarpit", env.sink.port)
    recorder = _send_to_both_domains(env, dns)
    env.sink.wait(GOOD_MESSAGES, timeout=DEADLINE)
    wait_for(
        lambda: all(recorder.outcomes(f"user{s}@good.test") for s in range(GOOD_MESSAGES)),
        what="the healthy recipients' outcomes",
    )
    env.threads[-1].stop()  # the tarpit attempts are still hanging: cancelled
    dns.set("bad.test", "A", "127.0.0.1")  # bad.test now reaches smtp-sink too
    relay = env.start(_direct(env, dns, env.sink.port))
    assert relay.relay is not None
    queue = relay.relay.queue
    wait_for(lambda: relay.call(queue.depth) == 0, timeout=15, what="the queue to empty")
    rcpts = sorted(r for m in env.sink.messages() for r in m.rcpts)
    assert rcpts == sorted(
        f"<user{s}@{domain}.test>" for s in range(GOOD_MESSAGES) for domain in ("bad", "good")
    )
