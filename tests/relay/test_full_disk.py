"""A full disk, for real: the relay's spool on a small tmpfs in a private mount namespace.

The tmpfs is mounted by a holder process (``unshare --mount``) and exists only in its mount
namespace: the relay runs inside it (``nsenter``), the test reaches the files through
``/proc/<holder>/root`` and fills the volume with a file of its own. When the holder ends, the
mount and everything on it go with it; nothing is mounted on the host. The upstream is
Postfix's smtp-sink, the clients are smtplib and an HTTP client.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from relay.relaykit import (
    RelayEnv,
    Sink,
    bearer,
    credential,
    free_port,
    http,
    relay_settings,
    template_doc,
    wait_for,
)
from relay.test_crash import Submitter
from txmail_relay.http.api import SEND_PATH
from txmail_relay.http.feedback import SUPPRESSIONS_PATH

MIB = 1024 * 1024
KIB = 1024
PAGE = 4096
EMAIL_ID = 101
SEQ = re.compile(r"Subject: full-disk (\d+)")


class Volume:
    """A tmpfs of ``size`` bytes at ``path``, seen only inside a private mount namespace."""

    def __init__(self, path: Path, size: int) -> None:
        path.mkdir(parents=True, exist_ok=True)
        if shutil.which("unshare") is None or shutil.which("nsenter") is None:
            pytest.skip("needs unshare and nsenter (util-linux)")
        self._holder = subprocess.Popen(
            [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "--",
                "sh",
                "-c",
                # The sleep bounds the holder's life even if the test process is killed.
                'mount -t tmpfs -o size="$1" txmail-full-disk "$0" && echo mounted'
                " && exec sleep 900",
                str(path),
                str(size),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert self._holder.stdout is not None
        if self._holder.stdout.readline() != b"mounted\n":
            error = self._holder.communicate(timeout=10)[1].decode(errors="replace").strip()
            self.close()
            pytest.skip(f"cannot mount a tmpfs in a private mount namespace: {error}")
        self.path = path  # inside the namespace
        self.view = Path(f"/proc/{self._holder.pid}/root") / path.relative_to("/")  # from here
        self._filler = self.view / "filler"

    def popen(self, argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """A process in the volume's mount namespace."""
        return subprocess.Popen(
            ["nsenter", f"--target={self._holder.pid}", "--mount", "--", *argv], **kwargs
        )

    def free(self) -> int:
        st = os.statvfs(self.view)
        return st.f_bavail * st.f_frsize

    def fill(self, leave: int) -> None:
        """Grow or shrink the test's own file so that ``leave`` bytes stay free (in pages)."""
        fd = os.open(self._filler, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            size = os.fstat(fd).st_size
            excess = self.free() - leave
            if excess < 0:
                os.ftruncate(fd, max(0, size + excess) // PAGE * PAGE)
                return
            step = excess // PAGE * PAGE
            while step >= PAGE and self.free() - leave >= PAGE:
                step = min(step, (self.free() - leave) // PAGE * PAGE)
                try:
                    os.posix_fallocate(fd, size, step)
                    size += step
                except OSError as e:  # tmpfs keeps a little for itself: smaller steps
                    if e.errno != errno.ENOSPC:
                        raise
                    step //= 2
        finally:
            os.close(fd)

    def segments(self) -> list[str]:
        return sorted(p.name for p in (self.view / "spool").glob("seg-*.log"))

    def close(self) -> None:
        self._holder.kill()
        self._holder.communicate(timeout=10)  # reaps it and closes its pipes


class Relay:
    """``python -m txmail_relay`` inside the volume's namespace, spool on the volume."""

    def __init__(self, env: RelayEnv, volume: Volume, upstream: int, **limits: Any) -> None:
        self.env = env
        self.volume = volume
        self.port = free_port()
        self.api_port = free_port()
        self.metrics_port = free_port()
        self.log = env.directory / "relay.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._limits = limits
        self._mark = 0
        self.configure(upstream)

    def configure(self, upstream: int) -> None:
        """(Re)write the settings; a running relay picks up the new upstream live."""
        relay_settings(
            self.env.directory,
            self.env.tls,
            upstream,
            credentials=[credential(self.env.username, self.env.password)],
            overrides={
                "templates": [template_doc(EMAIL_ID)],
                "logging": {"level": "INFO", "json": True},
                "listen": {
                    "submission": self.port,
                    "submissions": None,
                    "tracking": None,
                    "api": self.api_port,
                    "metrics": self.metrics_port,
                },
                "statsInterval": 0.2,
                "spool": {
                    "directory": str(self.volume.path / "spool"),
                    **self._limits.get("spool", {}),
                },
                "limits": {"spoolMinFreeBytes": self._limits.get("reserve", 0)},
                # Few attempts while the upstream is down: the machine is shared.
                "retry": {"minBackoff": 2.0, "maxBackoff": 2.0, "maxLifetime": 600.0},
            },
        )

    def start(self) -> None:
        self._mark = len(self.output())
        with self.log.open("ab") as stderr:
            self.process = self.volume.popen(
                [
                    sys.executable,
                    "-m",
                    "txmail_relay",
                    "--config",
                    str(self.env.directory / "relay.yaml"),
                ],
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )

        def listening() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"relay exited early:\n{self.output()[-3000:]}")
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0

        wait_for(listening, 20, "the relay to listen")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def logged(self, message: str) -> list[dict[str, Any]]:
        """JSON log lines of the latest start that contain ``message``."""
        found = []
        for line in self.output()[self._mark :].splitlines():
            if line.startswith("{") and message in line:
                found.append(json.loads(line))
        return found

    def delivered(self) -> float:
        """The token's delivered count, as the relay's records have it (via /metrics)."""
        text = http(self.metrics_port, "GET", "/metrics").body.decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "txmail_relay_token_events_total" and sample.labels == {
                    "token": self.env.username,
                    "event": "delivered",
                }:
                    return sample.value
        return 0.0

    def client(self) -> smtplib.SMTP:
        smtp = smtplib.SMTP("127.0.0.1", self.port, timeout=15)
        smtp.starttls(context=self.env.tls.client_context())
        smtp.login(self.env.username, self.env.password)
        return smtp


def mail(seq: int, size: int) -> bytes:
    head = f"From: app@example.com\r\nTo: user@dest.test\r\nSubject: full-disk {seq}\r\n\r\n"
    line = b"x" * 998 + b"\r\n"
    return head.encode() + line * max(1, size // len(line)) + f"END-OF-MESSAGE {seq}\r\n".encode()


def send(smtp: smtplib.SMTP, seq: int, size: int, recipients: int = 1) -> int:
    """The reply code to one message (250, or the 4xx that refused it)."""
    to = [f"user{i}@dest.test" for i in range(recipients)]
    try:
        smtp.sendmail("app@example.com", to, mail(seq, size))
    except smtplib.SMTPResponseException as e:  # smtplib has sent RSET
        return e.smtp_code
    except smtplib.SMTPRecipientsRefused as e:
        return next(iter(e.recipients.values()))[0]
    return 250


def delivered(sink: Sink) -> Counter[int]:
    return Counter(int(m.group(1)) for c in sink.messages() if (m := SEQ.search(c.content)))


@pytest.fixture
def volume(tmp_path: Path) -> Iterator[Volume]:
    # 64 MiB: 12 MiB of deferred mail, the records' room (8 MiB WAL and checkpoint, 1 MiB),
    # and their events log: a SENT row per recipient and a DEFERRED one per recipient and
    # attempt, about 1.5 MiB for each 2 s round of retrying 2,400 recipients, so its size
    # follows how long the uploads take (a loaded machine: 20 s and more). Every test fills
    # the volume to what it needs, so its size only bounds that growth.
    vol = Volume(tmp_path / "volume", 64 * MIB)
    try:
        yield vol
    finally:
        vol.close()


@pytest.fixture
def relays() -> Iterator[list[Relay]]:
    started: list[Relay] = []
    yield started
    for relay in started:
        relay.kill()


def test_outcomes_that_cannot_be_written_do_not_keep_the_disk_full(
    env: RelayEnv, volume: Volume, relays: list[Relay]
) -> None:
    """Item 1: mail delivered while the disk is full gives its space back without a restart,
    and a restart (even by SIGKILL) sends none of it again."""
    relay = Relay(env, volume, upstream=free_port(), spool={"segmentBytes": 4 * MIB})
    relays.append(relay)
    relay.start()  # the upstream is down: everything is deferred and stays spooled
    # 12 MiB over 3 segments; 16 messages of 50 recipients each: their DONE records need
    # more than the last page of the segment has left.
    total = 48
    with relay.client() as smtp:
        codes = [send(smtp, seq, 256 * KIB, recipients=50) for seq in range(total)]
    assert codes == [250] * total
    assert len(volume.segments()) >= 3
    volume.fill(leave=0)  # something else fills the disk: DONE records cannot all be written
    relay.configure(env.sink.port)  # the upstream comes back
    wait_for(lambda: len(delivered(env.sink)) == total, 60, f"{total} deliveries")
    assert relay.logged("outcomes not recorded") or relay.logged("could not record outcomes")
    # The finished segments go, so the space comes back and new mail is accepted again.
    wait_for(lambda: volume.free() >= 10 * MIB, 15, "the spool's space to come back")

    def accepted() -> bool:
        with relay.client() as smtp:
            return send(smtp, total, 16 * KIB) == 250

    wait_for(accepted, 15, "a new message to be accepted", every=0.5)
    wait_for(lambda: delivered(env.sink)[total], 15, "the new message delivered")
    # The outcomes the full disk refused to the records are written once there is space.
    wait_for(lambda: relay.delivered() == total * 50 + 1, 15, "every delivery counted")
    relay.kill()
    relay.start()
    [recovered] = wait_for(lambda: relay.logged("spool recovered"), 10, "the recovery")
    assert recovered["messages"] == 0, "delivered mail would be sent again"
    counts = delivered(env.sink)
    assert sorted(counts) == list(range(total + 1))
    assert max(counts.values()) == 1, f"duplicates: {counts}"


def test_a_delivered_current_segment_is_deleted(
    env: RelayEnv, volume: Volume, relays: list[Relay]
) -> None:
    """Item 2: the relay's own mail, all delivered, does not hold the volume under its reserve
    (the segment it was writing to is deleted like the others)."""
    relay = Relay(env, volume, upstream=free_port(), reserve=MIB)  # the upstream is down
    relays.append(relay)
    relay.start()
    volume.fill(leave=MIB + 8 * MIB + 4 * MIB)  # the reserve, the records' room, 4 MiB for mail
    sent = 0
    with relay.client() as smtp:
        while (code := send(smtp, sent, 256 * KIB)) == 250:
            sent += 1
            assert sent < 100, "the reserve was never reached"
    assert code == 452
    assert sent > 0
    assert len(volume.segments()) == 1  # all in the segment being written
    relay.configure(env.sink.port)  # the upstream comes back
    wait_for(lambda: len(delivered(env.sink)) == sent, 30, f"{sent} deliveries")
    wait_for(lambda: not volume.segments(), 15, "the delivered segment to be deleted")
    with relay.client() as smtp:
        assert send(smtp, sent, 16 * KIB) == 250


def test_the_reserve_counts_everything_the_relay_writes(
    env: RelayEnv, volume: Volume, relays: list[Relay]
) -> None:
    """Item 3: accepting mail never takes the volume below its reserve: not in a burst that
    a cached measurement would miss, not with the records' write-ahead log."""
    reserve = MIB
    relay = Relay(env, volume, upstream=env.sink.port, reserve=reserve)
    relays.append(relay)
    relay.start()
    volume.fill(leave=reserve + 12 * MIB)
    with relay.client() as smtp:
        assert send(smtp, 0, 256 * KIB) == 250
        # The volume fills up from elsewhere right after that check: the next one must see it.
        volume.fill(leave=reserve + 100 * KIB)
        assert send(smtp, 1, 256 * KIB) == 452
        assert volume.free() >= reserve
        # Small mail: a few spool bytes each, but pages of the records' write-ahead log.
        volume.fill(leave=reserve + 200 * KIB)
        small = 0
        while small < 40 and send(smtp, 2 + small, KIB) == 250:
            small += 1
    wait_for(lambda: len(delivered(env.sink)) == 1 + small, 15, "the deliveries")
    assert volume.free() >= reserve, f"{volume.free()} bytes free, {small} small ones accepted"


def test_the_api_answers_503_when_the_records_are_full(
    env: RelayEnv, volume: Volume, relays: list[Relay]
) -> None:
    """Item 4: SQLite's "database or disk is full" is the relay's fault: 503 and Retry-After,
    like a full spool, never a 500."""
    relay = Relay(env, volume, upstream=env.sink.port)
    relays.append(relay)
    relay.start()
    request = {
        "emailId": EMAIL_ID,
        "message": {"to": "buyer@dest.test"},
        "contactProperties": {"firstname": "Ada"},
        "customProperties": {"order_id": "42"},
    }
    ok = http(relay.api_port, "POST", SEND_PATH, body=request, headers=bearer(env.password))
    assert ok.status == 200, ok.body
    volume.fill(leave=0)
    for send_id in ("first", "second"):
        reply = http(
            relay.api_port,
            "POST",
            SEND_PATH,
            body={**request, "message": {"to": "buyer@dest.test", "sendId": send_id}},
            headers=bearer(env.password),
        )
        assert reply.status == 503, reply.body
        assert int(reply.headers["retry-after"]) > 0
        assert reply.json()["sendResult"] == "THROTTLED"
    volume.fill(leave=16 * MIB)
    again = http(
        relay.api_port,
        "POST",
        SEND_PATH,
        body={**request, "message": {"to": "buyer@dest.test", "sendId": "first"}},
        headers=bearer(env.password),
    )
    assert again.status == 200, again.body
    assert "sendResult" not in again.json() or again.json()["sendResult"] != "IDEMPOTENT_IGNORE"


def test_the_suppression_api_answers_503_when_the_records_are_full(
    env: RelayEnv, volume: Volume, relays: list[Relay]
) -> None:
    """PUT and DELETE of a suppression entry on a full volume: 503, Retry-After and the JSON
    error body, never a bare 500; once there is room again they work."""
    relay = Relay(env, volume, upstream=env.sink.port)
    relays.append(relay)
    relay.start()
    auth = bearer(env.password)
    kept = f"{SUPPRESSIONS_PATH}/kept@dest.test"
    assert http(relay.api_port, "PUT", kept, headers=auth).status == 201
    volume.fill(leave=0)
    for method, path in (
        ("PUT", f"{SUPPRESSIONS_PATH}/new1@dest.test"),
        ("PUT", f"{SUPPRESSIONS_PATH}/new2@dest.test"),
        ("DELETE", kept),
    ):
        reply = http(relay.api_port, method, path, headers=auth)
        assert reply.status == 503, (method, reply.status, reply.body)
        assert int(reply.headers["retry-after"]) > 0
        assert reply.json()["category"] == "RATE_LIMITS"
    volume.fill(leave=16 * MIB)
    assert (
        http(relay.api_port, "PUT", f"{SUPPRESSIONS_PATH}/new1@dest.test", headers=auth).status
        == 201
    )
    assert http(relay.api_port, "DELETE", kept, headers=auth).status == 204


def test_a_relay_restarted_on_a_full_disk_delivers_what_it_holds(
    env: RelayEnv, volume: Volume, relays: list[Relay]
) -> None:
    """Sibling of item 1: a restart on a full disk (after a kill left a torn record) starts and
    delivers the spooled mail, which gives the space back, instead of failing to start because
    the torn bytes cannot be copied to quarantine."""
    relay = Relay(env, volume, upstream=free_port())  # the upstream is down
    relays.append(relay)
    relay.start()
    with relay.client() as smtp:
        assert [send(smtp, seq, 64 * KIB) for seq in range(5)] == [250] * 5
    relay.kill()
    [segment] = volume.segments()
    path = volume.view / "spool" / segment
    whole = path.read_bytes()
    with path.open("ab") as f:  # a record cut short, as a kill in mid-write leaves one
        f.write(whole[: len(whole) // 2])
    volume.fill(leave=0)
    relay.configure(env.sink.port)
    relay.start()
    counts = wait_for(lambda: c if len(c := delivered(env.sink)) == 5 else None, 20, "deliveries")
    assert max(counts.values()) == 1
    assert relay.logged("no space to quarantine it")
    wait_for(lambda: not volume.segments(), 15, "the delivered segment to be deleted")


def test_a_relay_stopped_cleanly_starts_again_on_a_full_disk(
    env: RelayEnv, volume: Volume, relays: list[Relay]
) -> None:
    """Sibling of item 1: after a clean stop SQLite has removed its write-ahead log, and on a
    full volume it cannot create it again; the relay still starts (it gives up the room it
    keeps for this) and delivers the spooled mail, which gives the space back."""
    relay = Relay(env, volume, upstream=free_port())  # the upstream is down
    relays.append(relay)
    relay.start()
    with relay.client() as smtp:
        assert [send(smtp, seq, 64 * KIB) for seq in range(5)] == [250] * 5
    relay.stop()
    assert relay.process is not None and relay.process.returncode == 0
    volume.fill(leave=0)
    relay.configure(env.sink.port)
    relay.start()
    counts = wait_for(lambda: c if len(c := delivered(env.sink)) == 5 else None, 20, "deliveries")
    assert max(counts.values()) == 1
    wait_for(lambda: not volume.segments(), 15, "the delivered segment to be deleted")
    volume.fill(leave=8 * MIB + 4 * MIB)  # room again: new mail is accepted
    with relay.client() as smtp:
        assert send(smtp, 5, 16 * KIB) == 250
    wait_for(lambda: delivered(env.sink)[5], 15, "the new message delivered")


@pytest.mark.slow
def test_sigkill_on_a_full_disk_loses_no_acknowledged_message(
    env: RelayEnv, volume: Volume, relays: list[Relay]
) -> None:
    """The spool's promise on a full disk: clients keep sending while the volume fills up to
    the last byte and frees again, the relay is killed (SIGKILL) at random moments and
    restarted; every message that got a 250 reaches the upstream, and the duplicates stay
    within the kill windows."""
    relay = Relay(env, volume, upstream=env.sink.port)
    relays.append(relay)
    submitter = Submitter(env, relay.port)
    rng = random.Random()
    rounds = 6
    for _ in range(rounds):
        relay.start()
        submitter.start()
        time.sleep(rng.uniform(0.1, 0.4))  # the moments are random on purpose
        volume.fill(leave=0)  # commits and DONE records fail with ENOSPC from here
        time.sleep(rng.uniform(0.1, 0.4))
        if rng.random() < 0.5:
            volume.fill(leave=16 * MIB)  # space comes back before the kill, or only after
            time.sleep(rng.uniform(0.0, 0.3))
        relay.kill()
        submitter.stop()
        volume.fill(leave=16 * MIB)
    assert len(submitter.acked) > rounds, "the clients should have got some 250s"
    relay.start()
    seqs = re.compile(r"Subject: seq (\d+)")

    def counts() -> Counter[int]:
        return Counter(
            int(m.group(1)) for c in env.sink.messages() if (m := seqs.search(c.content))
        )

    found = wait_for(
        lambda: c if submitter.acked <= set(c := counts()) else None,
        30,
        "every acknowledged message at smtp-sink",
    )
    duplicates = sum(found.values()) - len(found)
    assert duplicates <= rounds * 8 * 2, f"{duplicates} duplicates"
    relay.stop()
    assert relay.process is not None and relay.process.returncode == 0
    print(f"acked={len(submitter.acked)} delivered={len(found)} duplicates={duplicates}")
