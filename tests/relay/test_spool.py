"""The spool: durability before 250, group commit, recovery, quarantine, injected failures."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import shutil
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from txmail_relay.mail.dsn import DsnEnvelope, RecipientParams
from txmail_relay.metrics import RelayMetrics
from txmail_relay.outcomes import Outcome
from txmail_relay.spool.segments import (
    HEADER,
    KIND_DONE,
    KIND_MESSAGE,
    META_LEN,
    OsSpoolIO,
    Spool,
    SpooledMessage,
    SpoolError,
    SpoolFullError,
    _done_record,
    _message_record,
    _parse,
    _record,
)


class FaultyIO(OsSpoolIO):
    """Counts syncs; fails pwrite or sync with a chosen errno while ``fail`` is set."""

    def __init__(self) -> None:
        self.syncs = 0
        self.fail_write: int | None = None
        self.fail_sync: int | None = None
        self.free = 1 << 40

    def pwrite(self, fd: int, data: bytes, offset: int) -> None:
        if self.fail_write is not None:
            super().pwrite(fd, data[: len(data) // 2], offset)  # a torn write, then the error
            raise OSError(self.fail_write, "injected write failure")
        super().pwrite(fd, data, offset)

    def sync(self, fd: int) -> None:
        self.syncs += 1
        if self.fail_sync is not None:
            raise OSError(self.fail_sync, "injected fsync failure")
        super().sync(fd)

    def disk_free(self, path: Path) -> int:
        return self.free


@pytest.fixture
def io() -> FaultyIO:
    return FaultyIO()


SpoolFactory = Callable[..., Spool]


@pytest.fixture
async def open_spool(tmp_path: Path, io: FaultyIO) -> AsyncIterator[SpoolFactory]:
    opened: list[Spool] = []

    def make(**kwargs: object) -> Spool:
        registry = CollectorRegistry()
        spool = Spool(tmp_path / "spool", io=io, metrics=RelayMetrics(registry), **kwargs)  # type: ignore[arg-type]
        spool.registry = registry  # type: ignore[attr-defined]
        opened.append(spool)
        return spool

    yield make
    for spool in opened:
        if spool._task is not None and not spool._task.done():
            await spool.close()


async def started(spool: Spool) -> list[SpooledMessage]:
    recovered = spool.recover()
    spool.start()
    return recovered


async def test_stored_message_survives_a_restart(open_spool: SpoolFactory) -> None:
    first = open_spool()
    await started(first)
    stored = await first.append("a@example.com", ["x@d.test", "y@d.test"], "app1", b"body\r\n")
    assert await first.read_body(stored) == b"body\r\n"
    # No close(): as after a crash.
    second = open_spool()
    [recovered] = await started(second)
    assert (recovered.id, recovered.mail_from, recovered.recipients) == (
        stored.id,
        "a@example.com",
        ("x@d.test", "y@d.test"),
    )
    assert await second.read_body(recovered) == b"body\r\n"


async def test_only_undelivered_recipients_are_recovered(open_spool: SpoolFactory) -> None:
    first = open_spool()
    await started(first)
    msg = await first.append("a@example.com", ["x@d.test", "y@d.test", "z@d.test"], "app1", b"b")
    await first.record(msg, {0: Outcome.DELIVERED, 2: Outcome.BOUNCED})
    second = open_spool()
    [recovered] = await started(second)
    assert recovered.pending() == [1]


async def test_finished_segments_are_deleted(open_spool: SpoolFactory, tmp_path: Path) -> None:
    spool = open_spool(segment_bytes=1)  # every commit starts a new segment
    await started(spool)
    messages = [await spool.append("a@example.com", ["x@d.test"], "app1", b"b") for _ in range(3)]
    for msg in messages:
        await spool.record(msg, {0: Outcome.DELIVERED})
    await spool.append("a@example.com", ["x@d.test"], "app1", b"last")  # forces a commit
    await spool.close()
    segments = list((tmp_path / "spool").glob("seg-*.log"))
    assert len(segments) == 1
    again = open_spool()
    [left] = await started(again)
    assert await again.read_body(left) == b"last"


async def test_torn_tail_is_quarantined_not_delivered(
    open_spool: SpoolFactory, tmp_path: Path
) -> None:
    first = open_spool()
    await started(first)
    kept = await first.append("a@example.com", ["x@d.test"], "app1", b"complete")
    [segment] = (tmp_path / "spool").glob("seg-*.log")
    whole = segment.read_bytes()
    with segment.open("ab") as f:  # a second record cut short by a crash
        f.write(whole[: len(whole) - 3])
    second = open_spool()
    recovered = await started(second)
    assert [m.id for m in recovered] == [kept.id]
    [quarantined] = (tmp_path / "spool" / "quarantine").iterdir()
    assert quarantined.stat().st_size == len(whole) - 3
    assert second.registry.get_sample_value("txmail_relay_spool_quarantined_total") == 1  # type: ignore[attr-defined]
    assert segment.stat().st_size == len(whole)  # truncated back to the valid records


async def test_corrupt_record_is_quarantined_and_scanning_resumes(
    open_spool: SpoolFactory, tmp_path: Path
) -> None:
    first = open_spool()
    await started(first)
    bad = await first.append("a@example.com", ["x@d.test"], "app1", b"A" * 100)
    good = await first.append("a@example.com", ["x@d.test"], "app1", b"B" * 100)
    [segment] = (tmp_path / "spool").glob("seg-*.log")
    data = bytearray(segment.read_bytes())
    data[bad.body_offset + 10] ^= 0xFF  # a flipped bit in the first body
    segment.write_bytes(bytes(data))
    second = open_spool()
    recovered = await started(second)
    assert [m.id for m in recovered] == [good.id]
    assert await second.read_body(recovered[0]) == b"B" * 100
    assert len(list((tmp_path / "spool" / "quarantine").iterdir())) == 1


@pytest.mark.parametrize(
    ("where", "code", "error"),
    [
        ("sync", errno.EIO, SpoolError),
        ("write", errno.EIO, SpoolError),
        ("write", errno.ENOSPC, SpoolFullError),
        ("sync", errno.ENOSPC, SpoolFullError),
    ],
)
async def test_injected_failures_never_acknowledge(
    open_spool: SpoolFactory, io: FaultyIO, where: str, code: int, error: type[Exception]
) -> None:
    spool = open_spool()
    await started(spool)
    delivered: list[SpooledMessage] = []
    spool.subscribe(delivered.append)
    setattr(io, f"fail_{where}", code)
    with pytest.raises(error):
        await spool.append("a@example.com", ["x@d.test"], "app1", b"lost")
    assert not delivered
    assert not spool.healthy
    setattr(io, f"fail_{where}", None)
    ok = await spool.append("a@example.com", ["x@d.test"], "app1", b"kept")
    assert spool.healthy
    assert [m.id for m in delivered] == [ok.id]
    again = open_spool()
    assert [m.id for m in await started(again)] == [ok.id]


async def test_free_space_reserve(open_spool: SpoolFactory, io: FaultyIO) -> None:
    spool = open_spool(min_free_bytes=1000)
    await started(spool)
    io.free = 500
    assert not spool.has_room()
    with pytest.raises(SpoolFullError):
        await spool.append("a@example.com", ["x@d.test"], "app1", b"b")


async def test_concurrent_stores_share_syncs(open_spool: SpoolFactory, io: FaultyIO) -> None:
    spool = open_spool()
    await started(spool)
    io.syncs = 0
    stored = await asyncio.gather(
        *(spool.append("a@example.com", ["x@d.test"], "app1", b"%d" % i) for i in range(200))
    )
    assert len({m.id for m in stored}) == 200
    assert io.syncs < 50, f"{io.syncs} syncs for 200 messages"
    bodies = await asyncio.gather(*(spool.read_body(m) for m in stored))
    assert bodies == [b"%d" % i for i in range(200)]


def test_header_size_is_stable() -> None:
    assert HEADER.size == 13  # the on-disk format documented in docs/relay.md


async def _until(condition: Callable[[], bool], what: str) -> None:
    """Poll ``condition`` for up to 5 s."""
    try:
        async with asyncio.timeout(5.0):
            while not condition():  # noqa: ASYNC110 - a plain state, no event to wait on
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


async def test_outcomes_that_failed_are_written_again(
    open_spool: SpoolFactory, io: FaultyIO
) -> None:
    spool = open_spool(retry_interval=0.05)
    await started(spool)
    msg = await spool.append("a@example.com", ["x@d.test", "y@d.test"], "app1", b"b")
    io.fail_write = errno.ENOSPC
    assert not await spool.record(msg, {0: Outcome.DELIVERED})
    assert spool.unrecorded() == 1
    assert msg.pending() == [1]  # crossed off in memory meanwhile: not sent again
    io.fail_write = None
    await _until(lambda: spool.unrecorded() == 0, "the DONE record written again")
    again = open_spool()
    [recovered] = await started(again)
    assert recovered.pending() == [1]


async def test_a_finished_segment_goes_even_if_its_done_records_cannot_be_written(
    open_spool: SpoolFactory, io: FaultyIO, tmp_path: Path
) -> None:
    spool = open_spool(segment_bytes=100)  # past the size a finished one is kept at
    await started(spool)
    first, second = await asyncio.gather(
        spool.append("a@example.com", ["x@d.test"], "app1", b"first"),
        spool.append("a@example.com", ["x@d.test"], "app1", b"second"),
    )
    io.fail_write = errno.ENOSPC  # the disk is full: no DONE record can be written
    assert not await spool.record(first, {0: Outcome.DELIVERED})
    assert list((tmp_path / "spool").glob("seg-*.log"))
    # The last one: deleting the segment records both, no write needed.
    assert await spool.record(second, {0: Outcome.DELIVERED})
    await _until(lambda: not list((tmp_path / "spool").glob("seg-*.log")), "no segment left")
    assert spool.unrecorded() == 0
    io.fail_write = None
    again = open_spool()
    assert await started(again) == []


async def test_the_current_segment_goes_once_delivered(
    open_spool: SpoolFactory, tmp_path: Path
) -> None:
    spool = open_spool(segment_bytes=100)  # past the size a finished one is kept at
    await started(spool)
    msg = await spool.append("a@example.com", ["x@d.test"], "app1", b"b")
    assert await spool.record(msg, {0: Outcome.DELIVERED})
    await _until(lambda: not list((tmp_path / "spool").glob("seg-*.log")), "no segment left")
    later = await spool.append("a@example.com", ["x@d.test"], "app1", b"later")  # a new one
    again = open_spool()
    assert [m.id for m in await started(again)] == [later.id]


async def test_a_small_finished_current_segment_goes_when_room_is_short(
    open_spool: SpoolFactory, io: FaultyIO, tmp_path: Path
) -> None:
    spool = open_spool(min_free_bytes=1000)
    await started(spool)
    msg = await spool.append("a@example.com", ["x@d.test"], "app1", b"b")
    assert await spool.record(msg, {0: Outcome.DELIVERED})
    assert list((tmp_path / "spool").glob("seg-*.log"))  # small, kept for the next ones
    io.free = 500
    assert not spool.has_room()
    await _until(lambda: not list((tmp_path / "spool").glob("seg-*.log")), "no segment left")


async def test_the_reserve_counts_queued_records_and_other_writers(
    open_spool: SpoolFactory, io: FaultyIO
) -> None:
    others = 400
    spool = open_spool(min_free_bytes=1000, reserved=lambda: others)
    await started(spool)
    io.free = 1000 + 400 + 100
    assert spool.has_room(100)
    assert not spool.has_room(101)
    others = 0
    # A burst: each append sees the ones queued before it.
    results = await asyncio.gather(
        *(spool.append("a@example.com", ["x@d.test"], "app1", b"x" * 100) for _ in range(10)),
        return_exceptions=True,
    )
    accepted = [r for r in results if isinstance(r, SpooledMessage)]
    assert 0 < len(accepted) < 10
    assert all(isinstance(r, SpoolFullError) for r in results if r not in accepted)


async def test_a_failing_subscriber_does_not_stop_the_writer(open_spool: SpoolFactory) -> None:
    """A subscriber that raises (a bug in whatever it feeds) is logged; the write it came
    with is still acknowledged, later ones too, and the other subscribers hear of each."""
    spool = open_spool()
    await started(spool)
    heard: list[str] = []

    def broken(msg: SpooledMessage) -> None:
        raise RuntimeError("subscriber bug")

    spool.subscribe(broken)
    spool.subscribe(lambda msg: heard.append(msg.id))
    async with asyncio.timeout(10):
        first = await spool.append("a@example.com", ["x@d.test"], "app1", b"one")
        second = await spool.append("a@example.com", ["x@d.test"], "app1", b"two")
    assert heard == [first.id, second.id]
    assert spool.healthy


# -- deferral state, DSN parameters and reclaim (issue 12) -------------------------------------


def _records(path: Path) -> list[tuple[int, dict[str, object]]]:
    """(kind, metadata) of every valid record of one segment file."""
    data, pos, found = path.read_bytes(), 0, []
    while (parsed := _parse(data, pos)) is not None:
        kind, meta, _, pos = parsed
        found.append((kind, meta))
    return found


async def test_deferral_state_survives_a_restart_and_the_latest_wins(
    open_spool: SpoolFactory,
) -> None:
    first = open_spool()
    await started(first)
    msg = await first.append("a@example.com", ["x@d.test"], "app1", b"b")
    other = await first.append("a@example.com", ["y@d.test"], "app1", b"c")
    msg.attempts = 1
    assert await first.defer(msg, 1000.0)
    msg.attempts = 2
    assert await first.defer(msg, 2000.0)
    # No close(): as after a crash.
    second = open_spool()
    recovered = {m.id: m for m in await started(second)}
    assert (recovered[msg.id].attempts, recovered[msg.id].next_attempt) == (2, 2000.0)
    assert (recovered[other.id].attempts, recovered[other.id].next_attempt) == (0, 0.0)


async def test_dsn_parameters_are_spooled_and_old_records_read_as_before(
    open_spool: SpoolFactory, tmp_path: Path
) -> None:
    dsn = DsnEnvelope(
        "HDRS", "env 1", (RecipientParams(frozenset({"FAILURE"}), "rfc822;X@d.test"),)
    )
    first = open_spool()
    await started(first)
    msg = await first.append("a@example.com", ["x@d.test"], "app1", b"b", dsn=dsn)
    await first.close()
    # A segment as a relay before issue 12 wrote it: no dsn, attempts or next keys.
    meta = json.dumps(
        {
            "id": "0123456789abcdef",
            "from": "a@example.com",
            "rcpt": ["z@d.test"],
            "user": "app1",
            "at": 1.0,
            "final": {},
        }
    ).encode()
    old = _record(KIND_MESSAGE, META_LEN.pack(len(meta)) + meta + b"old body")
    (tmp_path / "spool" / "seg-000000000099.log").write_bytes(old)
    second = open_spool()
    recovered = {m.id: m for m in await started(second)}
    assert recovered[msg.id].dsn == dsn
    legacy = recovered["0123456789abcdef"]
    assert (legacy.dsn, legacy.attempts, legacy.next_attempt) == (None, 0, 0.0)
    assert await second.read_body(legacy) == b"old body"


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


async def test_a_segment_held_by_long_deferred_mail_is_reclaimed(
    open_spool: SpoolFactory, tmp_path: Path
) -> None:
    clock = Clock()
    spool = open_spool(segment_bytes=1, clock=clock)  # every commit starts a new segment
    await started(spool)
    dsn = DsnEnvelope(None, "e", (RecipientParams(), RecipientParams(frozenset({"NEVER"}))))
    held = await _mostly_delivered_segment(spool, ["x@d.test", "y@d.test"], dsn=dsn)
    await spool.record(held, {0: Outcome.DELIVERED})
    held.attempts = 7
    await spool.defer(held, clock.now + 3000)
    old = tmp_path / "spool" / f"seg-{held.segment:012d}.log"
    clock.now += 60
    fresh = await spool.append("a@example.com", ["z@d.test"], "app1", b"fresh")
    assert await spool.reclaim(older_than=600) == 0  # not deferred long enough yet
    clock.now += 600
    assert await spool.reclaim(older_than=600) == 1
    await _until(lambda: not old.exists(), "the old segment deleted")
    assert held.segment > fresh.segment  # in the current segment now
    assert await spool.read_body(held) == b"held"
    await spool.record(held, {1: Outcome.BOUNCED})  # crossed off in its new segment
    again = open_spool()
    [left] = await started(again)
    assert left.id == fresh.id  # the moved message is finished, the new one is not


async def test_recovery_after_a_crash_between_the_copy_and_the_delete(
    open_spool: SpoolFactory, tmp_path: Path
) -> None:
    """The message is then in both segments: recovery keeps one (the newest copy, with its
    attempts), counts the DONE records of both, and drops the old segment."""
    clock = Clock()
    spool = open_spool(segment_bytes=1, clock=clock)
    await started(spool)
    held = await _mostly_delivered_segment(spool, ["x@d.test", "y@d.test", "z@d.test"])
    await spool.record(held, {0: Outcome.DELIVERED})  # in the old segment only
    old = tmp_path / "spool" / f"seg-{held.segment:012d}.log"
    kept = tmp_path / "old-segment"
    os.link(old, kept)  # the old segment as the crash leaves it (same inode: every append)
    clock.now += 60
    await spool.append("a@example.com", ["w@d.test"], "app1", b"new")
    held.attempts = 3
    clock.now += 600
    assert await spool.reclaim(older_than=600) == 1
    await spool.record(held, {1: Outcome.DELIVERED})  # in the new segment only
    await _until(lambda: not old.exists(), "the old segment deleted")
    await spool.close()
    crashed = tmp_path / "crashed"
    shutil.copytree(tmp_path / "spool", crashed / "spool", ignore=shutil.ignore_patterns("lock"))
    shutil.copyfile(kept, crashed / "spool" / old.name)
    kinds = [k for k, _ in _records(crashed / "spool" / old.name)]
    assert kinds == [KIND_MESSAGE, KIND_MESSAGE, KIND_DONE, KIND_DONE]  # held, the big one
    image = Spool(crashed / "spool")
    recovered = image.recover()
    try:
        mine = [m for m in recovered if m.id == held.id]
        assert len(mine) == 1
        assert mine[0].pending() == [2]
        assert mine[0].attempts == 3
        assert not (crashed / "spool" / old.name).exists()  # nothing of it is needed
    finally:
        image.start()
        await image.close()


# -- reclaim and crashes (fix round) ----------------------------------------------------------


async def _settle() -> None:
    for _ in range(20):  # every callback the last commit scheduled runs first
        await asyncio.sleep(0)


class CrashIO(FaultyIO):
    """Pictures the spool folder before every write and every directory sync: what a crash
    at that point leaves on the disk. Each picture is marked with ``acknowledged``, set by
    the test once the outcome it checks was reported durable (the loop is let run first, so
    a picture taken after that report is marked). ``hold``: the next pwrite waits for ``go``."""

    def __init__(self, directory: Path, pictures: Path) -> None:
        super().__init__()
        self.directory = directory
        self.root = pictures
        self.loop = asyncio.get_running_loop()
        self.loop_thread = threading.get_ident()
        self.acknowledged = False
        self.pictures: list[tuple[bool, Path]] = []
        self.hold = False
        self.held = threading.Event()
        self.go = threading.Event()

    def picture(self) -> None:
        if threading.get_ident() != self.loop_thread:
            asyncio.run_coroutine_threadsafe(_settle(), self.loop).result(10)
        target = self.root / f"crash-{len(self.pictures):03d}"
        shutil.copytree(self.directory, target / "spool", ignore=shutil.ignore_patterns("lock"))
        self.pictures.append((self.acknowledged, target))

    def pwrite(self, fd: int, data: bytes, offset: int) -> None:
        if self.hold:
            self.hold = False
            self.held.set()
            self.go.wait(10)
        self.picture()
        super().pwrite(fd, data, offset)

    def sync_dir(self, fd: int) -> None:
        self.picture()
        super().sync_dir(fd)


async def _recover_twice(directory: Path) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """Pending recipients by message after a crash, and after a second crash that follows
    the first recovery (nothing delivered in between)."""
    seen = []
    for _ in range(2):
        image = Spool(directory)
        seen.append({m.id: m.pending() for m in image.recover()})
        await image.close()
    return seen[0], seen[1]


async def _mostly_delivered_segment(
    spool: Spool, rcpts: list[str], dsn: DsnEnvelope | None = None
) -> SpooledMessage:
    """A message that shares its segment with a large delivered one (a segment worth
    reclaiming: most of it is dead)."""
    held, big = await asyncio.gather(
        spool.append("a@example.com", rcpts, "app1", b"held", dsn=dsn),
        spool.append("a@example.com", ["b@d.test"], "app1", b"B" * 8192),
    )
    assert held.segment == big.segment
    assert await spool.record(big, {0: Outcome.DELIVERED})
    return held


async def test_a_recipient_finished_during_a_reclaim_is_never_sent_again(
    tmp_path: Path,
) -> None:
    """The last pending recipient of a message finishes while its copy is being written:
    whenever the relay crashes after that outcome is acknowledged, and however often it
    crashes again after recovering, the recipient is not pending."""
    clock = Clock()
    directory = tmp_path / "spool"
    io = CrashIO(directory, tmp_path)
    # The large delivered message fills the first segment; the copy goes where new mail goes.
    spool = Spool(directory, io=io, segment_bytes=8192, clock=clock)
    spool.recover()
    spool.start()
    try:
        held = await _mostly_delivered_segment(spool, ["x@d.test", "y@d.test"])
        assert await spool.record(held, {0: Outcome.DELIVERED})
        old = directory / f"seg-{held.segment:012d}.log"
        clock.now += 60
        await spool.append("a@example.com", ["w@d.test"], "app1", b"new")
        clock.now += 600
        io.hold = True  # the copy's commit waits
        reclaim = asyncio.create_task(spool.reclaim(older_than=600))
        await asyncio.to_thread(io.held.wait, 10)
        finish = asyncio.create_task(spool.record(held, {1: Outcome.DELIVERED}))
        await _settle()
        io.go.set()
        assert await finish
        io.acknowledged = True
        await reclaim
        await _until(lambda: not old.exists(), "the old segment deleted")
        io.picture()
    finally:
        io.go.set()
        await spool.close()
    checked = 0
    for acknowledged, picture in io.pictures:
        first, second = await _recover_twice(picture / "spool")
        assert second == first, picture.name
        if acknowledged:
            checked += 1
            assert held.id not in first, picture.name
    assert checked >= 2


def _image_segment(path: Path, *records: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(records))


async def test_a_second_crash_after_recovering_a_copied_message_loses_nothing(
    tmp_path: Path,
) -> None:
    """A crash left a message in an old segment, with a DONE record written there after the
    copy was made, and in the current one: recovery counts that DONE record, and still does
    after the old segment is gone (a second crash right after the first recovery)."""
    directory = tmp_path / "spool"
    msg = SpooledMessage(
        "00000000000000aa", "a@example.com", ("x@d.test", "y@d.test"), "app1", 1.0, 4
    )
    other = SpooledMessage("00000000000000bb", "a@example.com", ("z@d.test",), "app1", 2.0, 5)
    original, _ = _message_record(msg, b"body")
    _image_segment(
        directory / "seg-000000000001.log", original, _done_record(msg, {0: Outcome.DELIVERED})
    )
    msg.attempts, msg.next_attempt = 4, 5000.0
    copy, _ = _message_record(msg, b"body")  # made before the DONE record above
    _image_segment(directory / "seg-000000000002.log", copy, _message_record(other, b"other")[0])
    first, second = await _recover_twice(directory)
    assert first == {msg.id: [1], other.id: [0]}
    assert not (directory / "seg-000000000001.log").exists()
    assert second == first
    image = Spool(directory)
    again = {m.id: m for m in image.recover()}
    await image.close()
    assert (again[msg.id].attempts, again[msg.id].next_attempt) == (4, 5000.0)


async def test_an_old_copy_is_kept_when_its_outcomes_cannot_be_carried_over(
    tmp_path: Path,
) -> None:
    """On a full disk at start the merged DONE record cannot be written into the surviving
    copy's segment: the old segment then stays (its DONE record still counts)."""
    directory = tmp_path / "spool"
    msg = SpooledMessage(
        "00000000000000aa", "a@example.com", ("x@d.test", "y@d.test"), "app1", 1.0, 4
    )
    original, _ = _message_record(msg, b"body")
    copy, _ = _message_record(msg, b"body")
    _image_segment(
        directory / "seg-000000000001.log", original, _done_record(msg, {0: Outcome.DELIVERED})
    )
    _image_segment(directory / "seg-000000000002.log", copy)
    io = FaultyIO()
    io.fail_write = errno.ENOSPC
    image = Spool(directory, io=io)
    assert {m.id: m.pending() for m in image.recover()} == {msg.id: [1]}
    await image.close()
    assert (directory / "seg-000000000001.log").exists()
    first, second = await _recover_twice(directory)
    assert first == second == {msg.id: [1]}
    assert not (directory / "seg-000000000001.log").exists()


async def test_reclaim_copies_only_what_frees_space(open_spool: SpoolFactory) -> None:
    """A segment that is mostly pending mail is not copied (nothing to gain), and a copy is
    not copied again at every later reclaim: each run frees more than it writes."""
    clock = Clock()
    spool = open_spool(segment_bytes=1, clock=clock)  # every commit starts a new segment
    await started(spool)
    alone = await spool.append("a@example.com", ["x@d.test"], "app1", b"A" * 4096)
    held = await _mostly_delivered_segment(spool, ["y@d.test"])
    clock.now += 700
    await spool.append("a@example.com", ["z@d.test"], "app1", b"new")
    assert await spool.reclaim(older_than=600) == 1  # held: its segment is mostly dead
    assert held.segment > alone.segment + 1
    for _ in range(3):
        await spool.append("a@example.com", ["z@d.test"], "app1", b"new")  # a new current one
        clock.now += 700
        assert await spool.reclaim(older_than=600) == 0
    assert await spool.read_body(alone) == b"A" * 4096


async def test_a_cancelled_reclaim_still_lets_the_old_segment_go(tmp_path: Path) -> None:
    """The reclaim is cancelled (the relay stopping it) while its copy is being written: the
    copy still lands, the old segment is deleted without waiting for a restart, and the
    message is there once after one."""
    clock = Clock()
    directory = tmp_path / "spool"
    io = CrashIO(directory, tmp_path)
    spool = Spool(directory, io=io, segment_bytes=8192, clock=clock)
    spool.recover()
    spool.start()
    try:
        held = await _mostly_delivered_segment(spool, ["x@d.test"])
        old = directory / f"seg-{held.segment:012d}.log"
        clock.now += 60
        await spool.append("a@example.com", ["w@d.test"], "app1", b"new")
        clock.now += 600
        io.hold = True
        reclaim = asyncio.create_task(spool.reclaim(older_than=600))
        await asyncio.to_thread(io.held.wait, 10)
        reclaim.cancel()
        io.go.set()
        with pytest.raises(asyncio.CancelledError):
            await reclaim
        await _until(lambda: not old.exists(), "the old segment deleted")
        assert await spool.read_body(held) == b"held"
    finally:
        io.go.set()
        await spool.close()
    again = Spool(directory)
    assert [m.id for m in again.recover() if m.id == held.id] == [held.id]
    await again.close()


async def test_a_deferral_recorded_during_a_reclaim_follows_the_copy(tmp_path: Path) -> None:
    """An attempt deferred while its message is copied writes its STATE record to the old
    segment: after the move and a restart the message still has that attempt count and
    next attempt."""
    clock = Clock()
    directory = tmp_path / "spool"
    io = CrashIO(directory, tmp_path)
    spool = Spool(directory, io=io, segment_bytes=8192, clock=clock)
    spool.recover()
    spool.start()
    try:
        held = await _mostly_delivered_segment(spool, ["x@d.test"])
        held.attempts = 2
        assert await spool.defer(held, clock.now + 100)
        old = directory / f"seg-{held.segment:012d}.log"
        clock.now += 60
        await spool.append("a@example.com", ["w@d.test"], "app1", b"new")
        clock.now += 600
        io.hold = True
        reclaim = asyncio.create_task(spool.reclaim(older_than=600))
        await asyncio.to_thread(io.held.wait, 10)
        held.attempts = 3
        deferral = asyncio.create_task(spool.defer(held, clock.now + 5000))
        await _settle()
        io.go.set()
        assert await deferral
        assert await reclaim == 1
        await _until(lambda: not old.exists(), "the old segment deleted")
    finally:
        io.go.set()
        await spool.close()
    again = Spool(directory)
    [recovered] = [m for m in again.recover() if m.id == held.id]
    await again.close()
    assert (recovered.attempts, recovered.next_attempt) == (3, clock.now + 5000)


class CountingIO(FaultyIO):
    """Keeps the size of every pwrite; ``fail_after``: that many more succeed, then one fails."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[int] = []
        self.fail_after: int | None = None

    def pwrite(self, fd: int, data: bytes, offset: int) -> None:
        self.writes.append(len(data))
        if self.fail_after is not None:
            self.fail_after -= 1
            if self.fail_after < 0:
                self.fail_after = None
                raise OSError(errno.EIO, "injected write failure")
        super().pwrite(fd, data, offset)


async def _four_old_messages(spool: Spool, clock: Clock) -> list[SpooledMessage]:
    """Four pending messages of 3000 bytes in a segment that is mostly delivered mail."""
    *held, big = await asyncio.gather(
        *(spool.append("a@example.com", ["x@d.test"], "app1", b"%d" % i * 3000) for i in range(4)),
        spool.append("a@example.com", ["b@d.test"], "app1", b"B" * 32768),
    )
    assert len({m.segment for m in [*held, big]}) == 1
    assert await spool.record(big, {0: Outcome.DELIVERED})
    clock.now += 700
    await spool.append("a@example.com", ["w@d.test"], "app1", b"new")
    return held


async def test_reclaim_copies_a_chunk_at_a_time(tmp_path: Path) -> None:
    """A reclaim never has a whole segment's bodies in memory: it copies them a few at a
    time (here one, the chunk being smaller than two)."""
    clock = Clock()
    io = CountingIO()
    spool = Spool(tmp_path / "spool", io=io, segment_bytes=1, clock=clock, reclaim_chunk_bytes=4096)
    spool.recover()
    spool.start()
    try:
        held = await _four_old_messages(spool, clock)
        io.writes.clear()
        assert await spool.reclaim(older_than=600) == 4
        assert io.writes and max(io.writes) < 2 * 3000
    finally:
        await spool.close()
    again = Spool(tmp_path / "spool")
    recovered = {m.id: m for m in again.recover()}
    try:
        assert all(m.id in recovered for m in held)
        again.start()
        for i, msg in enumerate(held):
            assert await again.read_body(recovered[msg.id]) == b"%d" % i * 3000
    finally:
        await again.close()


async def test_a_partly_failed_reclaim_lets_the_old_segment_go_once_the_rest_finishes(
    tmp_path: Path,
) -> None:
    """The first chunk is copied, the second fails: the message moved no longer holds the old
    segment, so it goes as soon as the messages left there finish (no restart needed); the
    moved message's outcomes are recorded in the old segment too, so a crash meanwhile does
    not send it again from its first copy."""
    clock = Clock()
    io = CountingIO()
    directory = tmp_path / "spool"
    spool = Spool(directory, io=io, segment_bytes=1, clock=clock, reclaim_chunk_bytes=4096)
    spool.recover()
    spool.start()
    try:
        held = await _four_old_messages(spool, clock)
        old = directory / f"seg-{held[0].segment:012d}.log"
        io.fail_after = 1
        assert await spool.reclaim(older_than=600) == 1
        assert held[0].segment != held[1].segment  # moved; the others stayed
        copy = directory / f"seg-{held[0].segment:012d}.log"
        assert await spool.record(held[0], {0: Outcome.DELIVERED})
        await _until(lambda: not copy.exists(), "the copy's segment deleted (it is finished)")
        # A crash now: the old segment still has the moved message's first copy.
        shutil.copytree(
            directory, tmp_path / "crash" / "spool", ignore=shutil.ignore_patterns("lock")
        )
        first, second = await _recover_twice(tmp_path / "crash" / "spool")
        assert held[0].id not in first
        assert all(first[m.id] == [0] for m in held[1:])
        assert second == first
        for msg in held[1:]:
            assert await spool.record(msg, {0: Outcome.DELIVERED})
        await _until(lambda: not old.exists(), "the old segment deleted")
    finally:
        await spool.close()


async def test_a_message_finished_in_its_copy_stays_finished_in_an_old_segment_that_stays(
    tmp_path: Path,
) -> None:
    """A crash left a message's first copy in an old segment another message still holds, and
    its copy, finished since, in a newer one: recovery writes the outcome into the old
    segment before the newer one goes, so a second crash does not find it pending there."""
    directory = tmp_path / "spool"
    msg = SpooledMessage("00000000000000aa", "a@example.com", ("x@d.test",), "app1", 1.0, 4)
    other = SpooledMessage("00000000000000bb", "a@example.com", ("z@d.test",), "app1", 2.0, 5)
    original, _ = _message_record(msg, b"body")
    _image_segment(directory / "seg-000000000001.log", original, _message_record(other, b"o")[0])
    _image_segment(
        directory / "seg-000000000002.log",
        _message_record(msg, b"body")[0],
        _done_record(msg, {0: Outcome.DELIVERED}),
    )
    first, second = await _recover_twice(directory)
    assert first == second == {other.id: [0]}
