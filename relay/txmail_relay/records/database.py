"""One SQLite connection for the records, and the order in which work runs on it.

aiosqlite runs the connection on its own thread. Units of work (a write, or a few reads that
belong together) go into one queue, first come, first served, and one task (the writer) runs
them in that order, so statements of two units never interleave and units run in the order
they were asked for, whether the caller awaits them or not (a read sees every write asked for
before it).

Writes are group-committed: the writes asked for while a transaction runs wait in the queue
and the writer runs them together (up to ``max_batch`` units, reads in between included) in
the next single ``BEGIN IMMEDIATE ... COMMIT``, each write inside its own ``SAVEPOINT``, so a
write that raises is rolled back alone and its caller gets its exception while the others
commit. With ``synchronous=FULL`` in WAL mode a COMMIT is one fsync of the WAL: one per batch,
not one per write. A write's awaitable resolves only after the COMMIT of its batch (a write
awaited is durable), a read's too when it ran inside a batch (it saw the writes before it);
when a batch's COMMIT fails, its writes all fail with that error and its reads run again
after the rollback. Units given as plain functions (:meth:`Database.write_sync` and
:meth:`Database.read_sync`, the hot ones: a message spooled, a delivery outcome, the
suppression lookup of a message) run on the connection's thread back to back, ``BEGIN`` and
``COMMIT`` included: a batch of them costs one thread hop, not one per statement.

The queue is bounded by ``max_queue`` units waiting for a batch. Past it, :meth:`has_room`
is False and :meth:`room` waits until there is room again: producers that do not wait for
their writes (the outcomes, records/stats.py ``OutcomeRecorder``) check it and hold what they
would write in their own bounded list. A write asked for is never refused or dropped: a
caller that awaits it waits for its COMMIT, and so is held back by the queue ahead of it
(that is the backpressure on the SMTP and API paths: a 250 or a 200 waits for its records);
:func:`background` writes (dropped sends, warm-up counts, tracking hits) queue like any other
and are not dropped when the queue is full either: each is a figure or an event someone
reads, and their producers are bounded by the requests and deliveries in flight.

The connection's thread is not a daemon: a connection left open would keep the process
from exiting (a relay that failed to start, say). So it also closes when the event loop
ends (``asyncio.run`` cancels the tasks left, the writer included), not only on
:meth:`Database.close`.

A write, once asked for, runs to the end even if its caller is cancelled: what it records
(a spooled message, a released reservation) must not depend on a client staying connected.
A transaction (a batch) is what is durable together.

The database shares its volume with the spool. :meth:`Database.headroom` is what it may still
add there without asking, which the spool's free-space check counts as used: the WAL grows up
to its checkpoint size (``wal_autocheckpoint`` pages), and a checkpoint may grow the database
file by as much again. A write that finds the disk full raises :class:`RecordsFullError` (if
SQLite rolled the whole transaction back, the batch-mates before it fail with it too: all of
them may be tried again).

A clean stop deletes the WAL and its shared-memory file, and SQLite cannot create them again
on a full volume: the relay would not start, so the spooled mail whose delivery gives space
back would never go. So the database keeps ``ROOM_BYTES`` allocated beside it (``<db>-room``)
while there is space, and gives them up when it cannot open (or clean up on open) otherwise;
the room is taken again once the volume has twice that free, and counted in
:meth:`Database.headroom` while it is missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import sqlite3
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

import aiosqlite

from txmail_relay.records.schema import migrate

log = logging.getLogger(__name__)
T = TypeVar("T")

Work = Callable[[aiosqlite.Connection], Awaitable[T]]
#: A unit run on the connection's own thread, on its sqlite3 connection (no await inside).
SyncWork = Callable[[sqlite3.Connection], T]
MAX_BATCH = 500  # units in one transaction
MAX_QUEUE = 5000  # units waiting for a batch before has_room() says no
ROOM_BYTES = 1024 * 1024  # what opening needs on a full volume (WAL, shared memory, a write)
ROOM_RETRY = 10.0  # seconds between attempts to take the room again


class RecordsFullError(sqlite3.OperationalError):
    """SQLite reports ``database or disk is full`` (SQLITE_FULL): the relay's volume is full;
    the transaction was rolled back, so trying again later is safe."""


def is_full(error: BaseException) -> bool:
    code = getattr(error, "sqlite_errorcode", None) if isinstance(error, sqlite3.Error) else None
    return isinstance(code, int) and code & 0xFF == sqlite3.SQLITE_FULL  # primary code


class Database:
    """``open()`` before use, ``close()`` at the end (it waits for the writes asked for)."""

    def __init__(
        self, path: Path, *, max_batch: int = MAX_BATCH, max_queue: int = MAX_QUEUE
    ) -> None:
        self.path = path
        self.max_batch = max_batch
        self.max_queue = max_queue
        self._db: aiosqlite.Connection | None = None
        self._queue: deque[_Unit] = deque()
        self._wake = asyncio.Event()  # something was queued
        self._roomy = asyncio.Event()  # the queue is below max_queue
        self._roomy.set()
        self._pending: set[asyncio.Future[Any]] = set()
        self._writer: asyncio.Task[None] | None = None
        #: Called with the number of writes of each batch after its COMMIT (metrics).
        self.on_commit: Callable[[int], None] | None = None
        self.commits = 0  # transactions committed (each one fsync of the WAL)
        self._batches = 0  # batches started (the WAL's size is read again after each)
        self._wal_seen = -1
        self._wal_size = 0
        self.written = 0  # writes committed
        self._wal = path.with_name(path.name + "-wal")
        self._wal_bytes = 0  # the WAL's checkpoint size, known once open
        self._room = path.with_name(path.name + "-room")
        self._room_tried = 0.0  # time.monotonic() of the last attempt to take it
        self._room_held = False  # only this class makes and removes the room file

    def headroom(self) -> int:
        """Bytes the database may still add on its volume: the WAL up to its checkpoint
        size, and as much again for the database file the checkpoint copies it into; and
        the room kept for opening, while it is not taken (it is tried again now and then)."""
        if self._wal_seen != self._batches:  # the WAL grows only while a batch runs
            try:
                self._wal_size = self._wal.stat().st_size
            except FileNotFoundError:
                self._wal_size = 0
            self._wal_seen = self._batches
        wal = self._wal_size
        if not self._room_held and time.monotonic() - self._room_tried >= ROOM_RETRY:
            self._room_tried = time.monotonic()
            self._take_room()
        missing = 0 if self._room_held else ROOM_BYTES
        return max(0, self._wal_bytes - wal) + self._wal_bytes + missing

    def _take_room(self) -> None:
        """Allocate the room if the volume has twice its size free (else try later)."""
        try:
            if self._room.stat().st_size >= ROOM_BYTES:  # kept from an earlier run
                self._room_held = True
                return
        except OSError:
            pass
        try:
            st = os.statvfs(self.path.parent)
            if st.f_bavail * st.f_frsize < 2 * ROOM_BYTES:
                return
            fd = os.open(self._room, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        except OSError:
            return
        try:
            os.posix_fallocate(fd, 0, ROOM_BYTES)  # real blocks, not a sparse file
            self._room_held = True
        except OSError:
            self._room.unlink(missing_ok=True)
        finally:
            os.close(fd)

    def release_room(self) -> bool:
        """Give the room up for the records to use (the volume is full); True if there was
        one."""
        self._room_held = False
        try:
            self._room.unlink()
        except FileNotFoundError:
            return False
        log.warning("records: the volume is full, using the room kept for them")
        self._room_tried = time.monotonic()
        return True

    async def open(self) -> None:
        await asyncio.to_thread(self.path.parent.mkdir, parents=True, exist_ok=True)
        try:
            await self._open()
        except sqlite3.Error:
            if not await asyncio.to_thread(self.release_room):
                raise
            await self._open()
        await asyncio.to_thread(self._take_room)

    async def _open(self) -> None:
        db = await aiosqlite.connect(self.path, isolation_level=None)  # BEGIN/COMMIT as written
        try:
            db.row_factory = sqlite3.Row
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute("PRAGMA synchronous=FULL")
            pages = await _pragma(db, "wal_autocheckpoint")
            self._wal_bytes = pages * await _pragma(db, "page_size")
            await migrate(db, self.path)
        except BaseException:
            await db.close()
            raise
        self._db = db
        self._writer = asyncio.create_task(self._write_all(db), name="records-writer")

    async def close(self) -> None:
        await self._drain()
        if self._writer is not None:
            writer, self._writer = self._writer, None
            writer.cancel()
            await asyncio.wait({writer})
            if not writer.cancelled():
                writer.result()  # db.close() failed: say so

    async def _drain(self) -> None:
        """Wait for the work asked for so far (its failures are reported where they belong)."""
        while self._pending:
            await asyncio.wait(set(self._pending))

    def _connection(self) -> aiosqlite.Connection:
        if self._db is None or self._writer is None or self._writer.done():
            raise RuntimeError("records are not open")
        return self._db

    def has_room(self) -> bool:
        """Whether the queue is below ``max_queue`` (what producers that do not wait for
        their writes check)."""
        return len(self._queue) < self.max_queue

    async def room(self) -> None:
        """Wait until the queue is below ``max_queue``."""
        while not self.has_room():
            self._roomy.clear()
            await self._roomy.wait()

    def queued(self) -> int:
        """Units waiting for a batch."""
        return len(self._queue)

    def _queue_unit(self, unit: _Unit) -> asyncio.Future[Any]:
        self._connection()
        self._queue.append(unit)
        self._pending.add(unit.future)
        unit.future.add_done_callback(self._pending.discard)
        self._wake.set()
        return unit.future

    def read(self, work: Work[T]) -> asyncio.Future[T]:
        """Run ``work`` (reads only) in its turn; cancelling the caller cancels it (if it has
        not started)."""
        return self._queue_unit(_Unit(_READ, work))

    def read_sync(self, work: SyncWork[T]) -> asyncio.Future[T]:
        """:meth:`read` for a plain function of the sqlite3 connection (run on its thread in
        one hop with the plain-function units next to it)."""
        return self._queue_unit(_Unit(_SYNC_READ, work))

    def write(self, work: Work[T]) -> Awaitable[T]:
        """Run ``work`` in the next transaction, in its turn (its own savepoint); it finishes
        even if the caller is cancelled, and the result is there once its batch committed.
        Await the result, or hand it to :func:`background`."""
        return self._shielded(self._queue_unit(_Unit(_WRITE, work)))

    def write_sync(self, work: SyncWork[T]) -> Awaitable[T]:
        """:meth:`write` for a plain function of the sqlite3 connection, run on the
        connection's thread with its batch-mates in one hop (no await: statements only)."""
        return self._shielded(self._queue_unit(_Unit(_SYNC, work)))

    @staticmethod
    def _shielded(future: asyncio.Future[T]) -> Awaitable[T]:
        outer = asyncio.shield(future)

        def unseen_failure(done: asyncio.Future[T]) -> None:
            # shield() drops the error of a write whose caller was cancelled: report it.
            if outer.cancelled() and not done.cancelled() and done.exception() is not None:
                _report(done)

        future.add_done_callback(unseen_failure)
        return outer

    async def _write_all(self, db: aiosqlite.Connection) -> None:
        """The writer: takes the queue batch by batch until cancelled, then closes the
        connection (after the statements already queued on its thread)."""
        batch: list[_Unit] = []
        try:
            while True:
                while not self._queue:
                    self._wake.clear()
                    await self._wake.wait()
                batch = []
                while self._queue and len(batch) < self.max_batch:
                    unit = self._queue.popleft()
                    if not unit.future.done():  # a read whose caller was cancelled: skip
                        batch.append(unit)
                if self.has_room():
                    self._roomy.set()
                if not batch:
                    continue
                self._batches += 1
                try:
                    await _Batch(db, batch, self).run()
                except Exception:  # a bug here must not stop the records: fail the batch
                    log.exception("records batch failed")
                    for unit in batch:
                        if not unit.future.done():
                            unit.future.set_exception(RuntimeError("records batch failed"))
                self._batches += 1
        finally:
            for unit in (*batch, *self._queue):
                unit.future.cancel()  # the loop is ending: nothing will run them now
            self._queue.clear()
            self._roomy.set()
            if self._db is not None:
                self._db = None
                await db.close()

    def _committed(self, writes: int) -> None:
        self.commits += 1
        self.written += writes
        if self.on_commit is not None:
            self.on_commit(writes)


_READ, _WRITE, _SYNC, _SYNC_READ = "read", "write", "sync", "sync-read"
_READS = (_READ, _SYNC_READ)
_PLAIN = (_SYNC, _SYNC_READ)  # run on the connection's thread, back to back


class _Unit:
    """One unit of work in the queue; its outcome is kept until its transaction ends."""

    __slots__ = ("error", "future", "kind", "result", "work")

    def __init__(self, kind: str, work: Any) -> None:
        self.kind = kind
        self.work = work
        self.future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.result: Any = None
        self.error: BaseException | None = None

    def settle(self) -> None:
        if self.future.done():
            return
        if self.error is not None:
            self.future.set_exception(self.error)
        else:
            self.future.set_result(self.result)
        self.error = None  # no reference cycle through the traceback


def _records_error(error: Exception) -> Exception:
    if (
        isinstance(error, sqlite3.Error)
        and is_full(error)
        and not isinstance(error, RecordsFullError)
    ):
        full = RecordsFullError(str(error))
        full.__cause__ = error
        return full
    return error


class _Batch:
    """Runs a batch's units in order: writes inside one transaction, each in its savepoint;
    reads between them; consecutive plain-function writes in one hop to the thread.

    Written by hand: aiosqlite runs one statement per hop and knows nothing of savepoints or
    of grouping its callers' transactions (no library here does group commit for SQLite)."""

    def __init__(self, db: aiosqlite.Connection, units: list[_Unit], owner: Database) -> None:
        self._db = db
        self._units = units
        self._owner = owner
        self._open: list[_Unit] = []  # the units of the transaction running

    async def run(self) -> None:
        try:
            i = 0
            while i < len(self._units):
                i = await self._step(i)
            if self._open:
                await self._commit()  # (or settle what read outside a transaction)
        except BaseException:
            # Cancelled (the loop ends): nothing of the transaction running is durable.
            with contextlib.suppress(Exception):
                if self._db.in_transaction:
                    await self._db.execute("ROLLBACK")
            raise

    async def _step(self, i: int) -> int:
        """Run the unit at ``i`` (or the plain-function writes from there on, in one hop);
        where the next step starts."""
        unit = self._units[i]
        if unit.kind not in _PLAIN:
            try:
                await self._async_unit(unit)
            except Exception as e:  # BEGIN, SAVEPOINT, RELEASE failed: the transaction too
                error = _records_error(e)
                if unit not in self._open:
                    unit.error = error
                    self._open.append(unit)
                await self._lost(error)
            return i + 1
        j = i
        while j < len(self._units) and self._units[j].kind in _PLAIN:
            j += 1
        last = j == len(self._units)
        step = self._units[i:j]
        try:
            done, lost = await _on_thread(self._db, functools.partial(self._sync, step, last))
        except Exception as e:  # not SQLite's (the connection is gone, say): all of them
            for unit in step:
                unit.error = _records_error(e)
            self._open.extend(step)
            await self._lost(_records_error(e))
            return j
        self._open.extend(step[:done])
        if lost is not None:
            await self._lost(lost)
        elif last or not self._db.in_transaction:  # committed, or reads only so far
            self._settle_committed()
        return i + done

    # The thread side: plain functions, BEGIN and COMMIT in the same hop.
    def _sync(
        self, units: Sequence[_Unit], end: bool, conn: sqlite3.Connection
    ) -> tuple[int, Exception | None]:
        """Run ``units`` (and COMMIT after them if ``end``); how many ran, and the error that
        ended the transaction if one did (the unit it ended at is counted)."""
        for n, unit in enumerate(units, 1):
            if unit.kind == _SYNC_READ:
                try:
                    unit.result = unit.work(conn)
                except Exception as e:
                    unit.error = _records_error(e)
                continue
            try:
                if not conn.in_transaction:
                    conn.execute("BEGIN IMMEDIATE")
                conn.execute("SAVEPOINT unit")
            except sqlite3.Error as e:
                unit.error = _records_error(e)
                return n, unit.error
            try:
                unit.result = unit.work(conn)
            except Exception as e:  # the unit's own failure: rolled back alone
                unit.error = _records_error(e)
                if not conn.in_transaction:  # SQLite rolled the whole transaction back
                    return n, unit.error
                try:
                    conn.execute("ROLLBACK TO unit")
                    conn.execute("RELEASE unit")
                except sqlite3.Error as gone:
                    return n, _records_error(gone)
                continue
            try:
                conn.execute("RELEASE unit")
            except sqlite3.Error as e:
                return n, _records_error(e)
        if end and conn.in_transaction:
            try:
                conn.execute("COMMIT")
            except sqlite3.Error as e:
                return len(units), _records_error(e)
        return len(units), None

    async def _async_unit(self, unit: _Unit) -> None:
        db = self._db
        if unit.kind == _READ:
            try:
                unit.result = await unit.work(db)
            except Exception as e:
                unit.error = _records_error(e)
            if self._open or db.in_transaction:
                self._open.append(unit)  # it saw writes not yet committed
            else:
                unit.settle()
            return
        if not db.in_transaction:
            await db.execute("BEGIN IMMEDIATE")
        await db.execute("SAVEPOINT unit")
        self._open.append(unit)
        try:
            unit.result = await unit.work(db)
        except Exception as e:
            unit.error = _records_error(e)
            if not db.in_transaction:
                await self._lost(unit.error)
                return
            await db.execute("ROLLBACK TO unit")
        await db.execute("RELEASE unit")

    async def _commit(self) -> None:
        if not self._db.in_transaction:
            self._settle_committed()
            return
        try:
            await self._db.execute("COMMIT")
        except sqlite3.Error as e:
            await self._lost(_records_error(e))
            return
        self._settle_committed()

    def _settle_committed(self) -> None:
        writes = sum(1 for u in self._open if u.kind not in _READS and u.error is None)
        if any(u.kind not in _READS for u in self._open):
            self._owner._committed(writes)
        for unit in self._open:
            unit.settle()
        self._open = []

    async def _lost(self, error: Exception) -> None:
        """The transaction ended without its COMMIT: its writes fail with ``error`` (those
        that had not failed on their own), its reads run again on what is left."""
        with contextlib.suppress(sqlite3.Error):
            if self._db.in_transaction:
                await self._db.execute("ROLLBACK")
        reads = [u for u in self._open if u.kind in _READS]
        for unit in self._open:
            if unit.kind not in _READS:
                if unit.error is None:
                    unit.error = error
                unit.settle()
        self._open = []
        for unit in reads:
            unit.error = None
            try:
                if unit.kind == _SYNC_READ:
                    unit.result = await _on_thread(self._db, unit.work)
                else:
                    unit.result = await unit.work(self._db)
            except Exception as e:
                unit.error = _records_error(e)
            unit.settle()


def _on_thread(db: aiosqlite.Connection, fn: SyncWork[T]) -> Awaitable[T]:
    """Run ``fn`` on the connection's own thread, with its sqlite3 connection, in one hop.

    aiosqlite has no public way to do this: ``Connection._execute`` is how its own
    ``execute`` queues a callable on that thread (aiosqlite 0.22, pinned in
    requirements.lock); ``_conn`` is read there, where it is used."""
    queue: Any = db  # untyped there
    return cast("Awaitable[T]", queue._execute(lambda: fn(db._conn)))


async def run_sync(db: aiosqlite.Connection, fn: SyncWork[T]) -> T:
    """Inside an async unit: run the plain function ``fn`` on the connection in one hop."""
    return await _on_thread(db, fn)


async def _pragma(db: aiosqlite.Connection, name: str) -> int:
    async with db.execute(f"PRAGMA {name}") as cursor:
        row = await cursor.fetchone()
    return int(row[0]) if row is not None else 0


def _report(future: asyncio.Future[Any]) -> None:
    error = future.exception()
    if error is not None:
        log.error("records write failed: %s", type(error).__name__, exc_info=error)


def background(write: Awaitable[Any]) -> None:
    """Let a write run without waiting for it (outcome listeners, tracking hits); a failure
    is logged."""
    future = asyncio.ensure_future(write)
    future.add_done_callback(lambda f: None if f.cancelled() else _report(f))
