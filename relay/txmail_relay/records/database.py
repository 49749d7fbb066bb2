"""One SQLite connection for the records, and the order in which work runs on it.

aiosqlite runs the connection on its own thread. Units of work (a transaction, or a few
reads that belong together) take one lock in turn, so statements of two units never
interleave; each unit is a task made when it is asked for, and asyncio runs tasks and grants
the lock first come, first served, so units run in the order they were asked for, whether
the caller awaits them or not (a read sees every write asked for before it).

The connection's thread is not a daemon: a connection left open would keep the process
from exiting (a relay that failed to start, say). So it also closes when the event loop
ends (``asyncio.run`` cancels the tasks left), not only on :meth:`Database.close`.

A write, once asked for, runs to the end even if its caller is cancelled: what it records
(a spooled message, a released reservation) must not depend on a client staying connected.
Writes are ``BEGIN IMMEDIATE ... COMMIT`` with ``synchronous=FULL`` in WAL mode: one fsync of
the WAL per transaction, so a transaction is what is durable together.

The database shares its volume with the spool. :meth:`Database.headroom` is what it may still
add there without asking, which the spool's free-space check counts as used: the WAL grows up
to its checkpoint size (``wal_autocheckpoint`` pages), and a checkpoint may grow the database
file by as much again. A write that finds the disk full raises :class:`RecordsFullError`.

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
import logging
import os
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from txmail_relay.records.schema import migrate

log = logging.getLogger(__name__)
T = TypeVar("T")

Work = Callable[[aiosqlite.Connection], Awaitable[T]]
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

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()
        self._pending: set[asyncio.Future[Any]] = set()
        self._closer: asyncio.Task[None] | None = None
        self._wal = path.with_name(path.name + "-wal")
        self._wal_bytes = 0  # the WAL's checkpoint size, known once open
        self._room = path.with_name(path.name + "-room")
        self._room_tried = 0.0  # time.monotonic() of the last attempt to take it
        self._room_held = False  # only this class makes and removes the room file

    def headroom(self) -> int:
        """Bytes the database may still add on its volume: the WAL up to its checkpoint
        size, and as much again for the database file the checkpoint copies it into; and
        the room kept for opening, while it is not taken (it is tried again now and then)."""
        try:
            wal = self._wal.stat().st_size
        except FileNotFoundError:
            wal = 0
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
        self._closer = asyncio.create_task(self._close_with_the_loop(), name="records-close")

    async def _close_with_the_loop(self) -> None:
        try:
            await asyncio.get_running_loop().create_future()  # until cancelled
        finally:
            if self._db is not None:
                db, self._db = self._db, None
                await db.close()  # after the statements already queued

    async def close(self) -> None:
        await self._drain()
        if self._closer is not None:
            closer, self._closer = self._closer, None
            closer.cancel()
            await asyncio.wait({closer})
            if not closer.cancelled():
                closer.result()  # db.close() failed: say so

    async def _drain(self) -> None:
        """Wait for the work asked for so far (its failures are reported where they belong)."""
        if self._pending:
            await asyncio.wait(set(self._pending))

    def _connection(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RuntimeError("records are not open")
        return self._db

    def _task(self, unit: Awaitable[T]) -> asyncio.Task[T]:
        task = asyncio.ensure_future(unit)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        return task

    def read(self, work: Work[T]) -> asyncio.Task[T]:
        """Run ``work`` (reads only) in its turn; cancelling the caller cancels it."""
        db = self._connection()
        return self._task(self._read(db, work))

    async def _read(self, db: aiosqlite.Connection, work: Work[T]) -> T:
        async with self._lock:
            return await work(db)

    def write(self, work: Work[T]) -> Awaitable[T]:
        """Run ``work`` in one transaction in its turn; it finishes even if the caller is
        cancelled. Await the result, or hand it to :func:`background`."""
        db = self._connection()
        task = self._task(self._transaction(db, work))
        outer = asyncio.shield(task)

        def unseen_failure(done: asyncio.Task[T]) -> None:
            # shield() drops the error of a write whose caller was cancelled: report it.
            if outer.cancelled() and not done.cancelled() and done.exception() is not None:
                _report(done)

        task.add_done_callback(unseen_failure)
        return outer

    async def _transaction(self, db: aiosqlite.Connection, work: Work[T]) -> T:
        async with self._lock:
            try:
                await db.execute("BEGIN IMMEDIATE")
                try:
                    result = await work(db)
                    await db.execute("COMMIT")
                except BaseException:
                    # A failed COMMIT may have ended the transaction already.
                    with contextlib.suppress(sqlite3.OperationalError):
                        await db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as e:
                if is_full(e):
                    raise RecordsFullError(str(e)) from e
                raise
            return result


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
