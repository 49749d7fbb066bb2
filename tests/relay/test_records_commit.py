"""The records' group commit: writes asked for together share one transaction (one fsync),
each rolled back alone when it fails, in the order they were asked for, durable once awaited,
never lost to a cancelled caller, drained on close; and a bounded queue (backpressure).

COMMITs are counted with SQLite's own statement trace on the connection (not the database's
counter alone), so the tests see what SQLite was asked to do.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import aiosqlite
import pytest

from txmail_relay.outcomes import Outcome, OutcomeEvent
from txmail_relay.records.database import Database, SyncWork, Work
from txmail_relay.records.model import Kind, SentCopy
from txmail_relay.records.records import Records
from txmail_relay.records.stats import OutcomeRecorder


@contextlib.asynccontextmanager
async def database(
    path: Path, *, max_batch: int = 500, max_queue: int = 5000
) -> AsyncIterator[tuple[Database, list[str]]]:
    """An open Database and the statements SQLite ran on it (from its trace callback)."""
    db = Database(path / "t.db", max_batch=max_batch, max_queue=max_queue)
    await db.open()
    statements: list[str] = []
    await db._connection().set_trace_callback(statements.append)
    await db.write(_create)
    statements.clear()
    try:
        yield db, statements
    finally:
        await db.close()


async def _create(db: aiosqlite.Connection) -> None:
    await db.execute("CREATE TABLE IF NOT EXISTS t (n INTEGER PRIMARY KEY)")


def _commits(statements: list[str]) -> int:
    return sum(1 for s in statements if s.strip().upper() == "COMMIT")


def insert(n: int) -> Work[int]:
    async def work(db: aiosqlite.Connection) -> int:
        await db.execute("INSERT INTO t VALUES (?)", (n,))
        return n

    return work


def insert_sync(n: int) -> SyncWork[int]:
    def work(conn: sqlite3.Connection) -> int:
        conn.execute("INSERT INTO t VALUES (?)", (n,))
        return n

    return work


async def count(db: aiosqlite.Connection) -> int:
    rows = list(await db.execute_fetchall("SELECT count(*) FROM t"))
    return int(rows[0][0])


def count_sync(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT count(*) FROM t").fetchone()[0])


def rows_on_disk(path: Path) -> list[int]:
    """What another connection reads: only what was committed."""
    with contextlib.closing(sqlite3.connect(path / "t.db")) as conn:
        return [r[0] for r in conn.execute("SELECT n FROM t ORDER BY n")]


async def test_writes_asked_for_together_share_one_commit(tmp_path: Path) -> None:
    async with database(tmp_path) as (db, statements):
        commits, written = db.commits, db.written
        writes = [db.write(insert(n)) for n in range(50)]
        writes += [db.write_sync(insert_sync(n)) for n in range(50, 100)]
        assert await asyncio.gather(*writes) == list(range(100))
        assert _commits(statements) == 1
        assert (db.commits - commits, db.written - written) == (1, 100)  # what metrics see
        assert rows_on_disk(tmp_path) == list(range(100))  # durable once awaited


async def test_a_batch_is_bounded(tmp_path: Path) -> None:
    async with database(tmp_path, max_batch=10) as (db, statements):
        await asyncio.gather(*(db.write_sync(insert_sync(n)) for n in range(35)))
        assert _commits(statements) == 4


async def test_writes_asked_for_while_a_transaction_runs_go_in_the_next_one(
    tmp_path: Path,
) -> None:
    async with database(tmp_path) as (db, statements):
        first = db.write(insert(0))
        await asyncio.sleep(0)  # the writer took it: its transaction is running
        rest = [db.write_sync(insert_sync(n)) for n in range(1, 40)]
        await asyncio.gather(first, *rest)
        assert _commits(statements) <= 2
        assert rows_on_disk(tmp_path) == list(range(40))


@pytest.mark.parametrize("plain", [False, True], ids=["async", "sync"])
async def test_a_failing_write_is_rolled_back_alone(tmp_path: Path, plain: bool) -> None:
    def failing_sync(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO t VALUES (1000)")
        raise ValueError("refused")

    async def failing(db: aiosqlite.Connection) -> None:
        await db.execute("INSERT INTO t VALUES (1000)")
        raise ValueError("refused")

    async with database(tmp_path) as (db, statements):
        before = [db.write_sync(insert_sync(n)) for n in range(5)]
        bad = db.write_sync(failing_sync) if plain else db.write(failing)
        duplicate = db.write_sync(insert_sync(3))
        after = [db.write(insert(n)) for n in range(5, 10)]
        results = await asyncio.gather(*before, bad, duplicate, *after, return_exceptions=True)
        assert results[:5] == list(range(5))
        assert isinstance(results[5], ValueError)
        assert isinstance(results[6], sqlite3.IntegrityError)  # n = 3 is there already
        assert results[7:] == list(range(5, 10))
        assert _commits(statements) == 1
        assert rows_on_disk(tmp_path) == list(range(10))  # not 1000: rolled back


async def test_a_read_sees_every_write_asked_for_before_it(tmp_path: Path) -> None:
    async with database(tmp_path) as (db, statements):
        reads = []
        for n in range(30):
            if n % 2:
                db.write_sync(insert_sync(n))
            else:
                db.write(insert(n))
            reads.append(db.read(count) if n % 3 else db.read_sync(count_sync))
        assert await asyncio.gather(*reads) == list(range(1, 31))
        assert _commits(statements) == 1


async def test_reads_alone_commit_nothing(tmp_path: Path) -> None:
    async with database(tmp_path) as (db, statements):
        await db.write_sync(insert_sync(1))
        statements.clear()
        commits = db.commits
        reads = [db.read_sync(count_sync) if n % 2 else db.read(count) for n in range(10)]
        assert await asyncio.gather(*reads) == [1] * 10
        assert _commits(statements) == 0 and db.commits == commits


async def test_a_write_whose_caller_is_cancelled_still_commits(tmp_path: Path) -> None:
    async with database(tmp_path) as (db, _):
        started = asyncio.Event()

        async def caller(n: int) -> None:
            write = db.write_sync(insert_sync(n))
            started.set()
            await write

        callers = [asyncio.create_task(caller(n)) for n in range(20)]
        await started.wait()
        for task in callers:
            task.cancel()
        await asyncio.gather(*callers, return_exceptions=True)
        assert await db.read(count) == 20  # runs after them


async def test_close_drains_the_writes_asked_for(tmp_path: Path) -> None:
    db = Database(tmp_path / "t.db")
    await db.open()
    await db.write(_create)
    for n in range(2000):
        db.write_sync(insert_sync(n))  # nobody awaits them
    await db.close()
    assert rows_on_disk(tmp_path) == list(range(2000))
    assert db.commits >= 4  # 2,000 writes, at most 500 a transaction


async def test_a_full_queue_holds_back_until_it_has_room(tmp_path: Path) -> None:
    async with database(tmp_path, max_batch=5, max_queue=10) as (db, _):
        release = asyncio.Event()

        async def blocking(conn: aiosqlite.Connection) -> None:
            await release.wait()  # holds the writer (and its transaction)

        blocker = db.write(blocking)
        await asyncio.sleep(0)
        writes = [db.write_sync(insert_sync(n)) for n in range(12)]
        assert not db.has_room() and db.queued() == 12
        room = asyncio.ensure_future(db.room())
        await asyncio.sleep(0.05)
        assert not room.done()  # backpressure: nothing drains while the writer is held
        release.set()
        await asyncio.wait_for(room, 10)
        await asyncio.gather(blocker, *writes)
        assert db.has_room() and rows_on_disk(tmp_path) == list(range(12))


async def test_the_hot_writes_share_a_transaction(tmp_path: Path) -> None:
    """Spooled messages and their delivery outcomes (plain functions on the connection's
    thread): a few transactions for many of them, and every figure right."""
    records = Records(tmp_path)
    await records.open()
    try:
        db = records._db
        statements: list[str] = []
        await db._connection().set_trace_callback(statements.append)
        recorded = [
            records.sends.record("u", 7, [SentCopy(f"m{n}", "a@x.test")], namespace="ns", token="t")
            for n in range(100)
        ]
        await asyncio.gather(*recorded)
        outcomes = [
            records.events.outcome(f"m{n}", "u", "a@x.test", Outcome.DELIVERED, 1.0)
            for n in range(100)
        ]
        await asyncio.gather(*outcomes)
        assert _commits(statements) <= 2
        totals = await records.counters.totals()
        assert totals.counts["u"][Kind.SENT] == 100
        assert totals.counts["u"][Kind.DELIVERED] == 100
        events = await records.events.after(0, namespace="ns", limit=1000)
        assert len(events) == 200
    finally:
        await records.close()


async def test_outcomes_wait_while_the_queue_is_full_and_are_written_in_order(
    tmp_path: Path,
) -> None:
    records = Records(tmp_path)
    await records.open()
    try:
        db = records._db
        db.max_queue = 3
        release = asyncio.Event()

        async def blocking(conn: aiosqlite.Connection) -> None:
            await release.wait()

        blocker = db.write(blocking)
        await asyncio.sleep(0)
        for _ in range(3):
            db.write_sync(lambda conn: None)
        assert not records.has_room()
        recorder = OutcomeRecorder(records, retry_interval=0.01)
        for n in range(50):
            recorder.on_outcome(
                OutcomeEvent(
                    message_id=f"m{n}",
                    username="u",
                    recipient="a@x.test",
                    outcome=Outcome.DELIVERED,
                    reply="250 ok",
                    attempts=1,
                    received_at=0.0,
                    at=float(n),
                )
            )
        assert recorder.kept() == 50  # held in the recorder's bounded list, not the queue
        release.set()
        await blocker
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while recorder.kept() and loop.time() < deadline:  # noqa: ASYNC110 - polls a count
            await asyncio.sleep(0.01)
        assert recorder.kept() == 0
        await db.room()
        totals = await records.counters.totals()
        assert totals.counts["u"][Kind.DELIVERED] == 50
    finally:
        await records.close()
