"""The durable spool: an append-only log of segment files with group commit.

Every record is ``MAGIC | kind | length | crc32 | payload``. A MESSAGE record holds the
envelope (JSON) and the body; a DONE record holds final outcomes of some recipients of a
message and is appended to the segment holding that message. A single writer task takes
every record queued since its last commit, writes them (``pwrite``) and calls
``fdatasync`` once per touched file, so concurrent sessions share one sync. Only then do
the waiters learn that their records are durable, and only then does SMTP say 250.

A segment is deleted when none of its messages has an undelivered recipient, the current one
included (a new message then starts a new segment); the deletion is made durable (directory
``fsync``) and, once it is, stands for every DONE record that segment would still have needed.
So a full disk does not keep delivered mail: a DONE record that cannot be written is kept in
memory and written again (every ``retry_interval``, and as soon as a commit or a deletion
succeeds), and a segment whose messages are all finished is deleted whether or not their DONE
records made it. The free-space check counts everything the relay writes on the volume: it
measures the volume at every check, less what is queued and not yet written, less what the
records' database may still add (``reserved``). On start,
segments are scanned: a record whose header, length or checksum is wrong is copied to
``quarantine/`` and reported (metric + log), never delivered; scanning resumes at the next
valid record. Messages with undelivered recipients are handed back for delivery, with the
recipients already crossed off by DONE records left out.

A STATE record holds a message's delivery attempts so far and the time of its next attempt;
the queue appends one to the message's segment whenever it defers the message, and on start
the latest one of each message wins (so a restart continues the retry schedule instead of
retrying everything at once). A MESSAGE record may also carry the message's DSN parameters
(RFC 3461, :class:`~txmail_relay.mail.dsn.DsnEnvelope`); segments written before either
existed read as before.

:meth:`Spool.reclaim` rewrites the messages of an old segment, held only by mail deferred for
long, into the current segment (same id, outcomes and attempts carried over), then deletes the
old segment: otherwise one message that keeps failing for days pins a whole segment of
delivered mail on the disk. The old segment is held until the outcomes recorded there during
the move are durable next to the copy too; while an old segment stays (a move that failed part
way), the outcomes of the messages moved out of it are recorded there as well. A crash between
the copy and the deletion leaves the message twice; recovery keeps the newest copy, counts the
DONE records of both and writes them (and the latest STATE) into every copy's segment that
stays before another may go, so a second crash forgets nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import logging
import os
import secrets
import struct
import time
import zlib
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from txmail_relay.mail.dsn import DsnEnvelope
from txmail_relay.metrics import RelayMetrics
from txmail_relay.outcomes import Outcome

log = logging.getLogger(__name__)

MAGIC = b"TXR1"
HEADER = struct.Struct(">4sBII")  # magic, kind, payload length, crc32(kind byte + payload)
META_LEN = struct.Struct(">I")
KIND_MESSAGE = 1
KIND_DONE = 2
KIND_STATE = 3  # attempts and the next attempt's time of a deferred message (issue 12)
_KINDS = (KIND_MESSAGE, KIND_DONE, KIND_STATE)
_SEGMENT_GLOB = "seg-*.log"
# A finished current segment smaller than this is kept for the next messages while there is
# room (a new segment costs a create and directory syncs); past it, or short of room, it goes.
IDLE_SEGMENT_BYTES = 1024 * 1024
# Bodies up to this size are read on the event loop (read_body), larger ones in a thread.
LOOP_READ_BYTES = 256 * 1024
# A reclaim copies a segment's pending messages only when more than this share of the segment
# is dead (finished messages, DONE and STATE records): each copy then frees more than it
# writes, so copying again and again (a copy outliving the segment it went to) stays bounded.
RECLAIM_DEAD_FRACTION = 0.5
RECLAIM_CHUNK_BYTES = 4 * 1024 * 1024  # copied at a time: bodies read into memory at once


class SpoolError(Exception):
    """The spool could not make a record durable (reply 451)."""


class SpoolFullError(SpoolError):
    """No space left for the spool (reply 452)."""


class SpoolIO(Protocol):
    """The system calls behind a commit: the seam where tests inject failures."""

    def pwrite(self, fd: int, data: bytes, offset: int) -> None: ...

    def sync(self, fd: int) -> None: ...

    def sync_dir(self, fd: int) -> None: ...

    def disk_free(self, path: Path) -> int: ...


class OsSpoolIO:
    def pwrite(self, fd: int, data: bytes, offset: int) -> None:
        view = memoryview(data)
        while view:
            written = os.pwrite(fd, view, offset)
            view = view[written:]
            offset += written

    def sync(self, fd: int) -> None:
        os.fdatasync(fd)

    def sync_dir(self, fd: int) -> None:
        os.fsync(fd)

    def disk_free(self, path: Path) -> int:
        st = os.statvfs(path)
        return st.f_bavail * st.f_frsize


@dataclass(eq=False)
class SpooledMessage:
    id: str
    mail_from: str
    recipients: tuple[str, ...]
    username: str
    received_at: float
    body_length: int
    segment: int = 0
    body_offset: int = 0
    final: dict[int, Outcome] = field(default_factory=dict)
    attempts: int = 0
    # Not before this time (epoch seconds) is the message tried again: a recovered deferral.
    next_attempt: float = 0.0
    # The DSN parameters of an SMTP submission; None: never a DSN (API and template sends,
    # DSNs themselves, mail spooled before the relay knew DSNs).
    dsn: DsnEnvelope | None = None
    record_length: int = 0  # bytes of its MESSAGE record (what a copy of it writes again)
    # Segments that may still hold an earlier copy of it (a reclaim moved it, and a failed
    # or unfinished move kept the old segment): its outcomes are recorded there too, so a
    # crash never finds that copy more pending than the message is.
    older: set[int] = field(default_factory=set)

    def pending(self) -> list[int]:
        return [i for i in range(len(self.recipients)) if i not in self.final]


@dataclass(eq=False)
class _Segment:
    id: int
    path: Path
    fd: int | None = None
    size: int = 0
    live: int = 0
    # Its messages with recipients still to deliver, by id (what a reclaim copies).
    messages: dict[str, SpooledMessage] = field(default_factory=dict)

    def open_fd(self) -> int:
        if self.fd is None:
            raise OSError(errno.EBADF, f"segment {self.id} is not open")
        return self.fd


@dataclass(eq=False)
class _Write:
    record: bytes
    future: asyncio.Future[None] | None  # None: a DONE record written again, nobody waits
    segment: int | None = None  # None: the current segment (new messages)
    message: SpooledMessage | None = None  # set for MESSAGE records
    body_start: int = 0  # offset of the body inside the record
    done: SpooledMessage | None = None  # set for DONE records: whose outcomes
    outcomes: dict[int, Outcome] = field(default_factory=dict)  # the outcomes it records
    copy: bool = False  # a MESSAGE record that moves a message (reclaim): nobody is told


@dataclass
class _Plan:
    create: _Segment | None
    appends: dict[int, list[bytes]]
    offsets: list[tuple[int, int]]  # per write: (segment, offset); offset -1: not written
    sizes_before: dict[int, int]
    retire: list[_Segment]
    deleted: bool = False  # the retired segments are gone, durably


def _record(kind: int, payload: bytes) -> bytes:
    crc = zlib.crc32(payload, zlib.crc32(bytes([kind])))
    return HEADER.pack(MAGIC, kind, len(payload), crc) + payload


def _message_record(msg: SpooledMessage, body: bytes) -> tuple[bytes, int]:
    doc: dict[str, Any] = {
        "id": msg.id,
        "from": msg.mail_from,
        "rcpt": msg.recipients,
        "user": msg.username,
        "at": msg.received_at,
        "final": {str(i): o.value for i, o in msg.final.items()},
    }
    # Optional keys: a record without them reads as before (and as older relays wrote it).
    if msg.dsn is not None:
        doc["dsn"] = msg.dsn.to_json()
    if msg.attempts:
        doc["attempts"] = msg.attempts
    if msg.next_attempt:
        doc["next"] = msg.next_attempt
    meta = json.dumps(doc, separators=(",", ":")).encode()
    payload = META_LEN.pack(len(meta)) + meta + body
    return _record(KIND_MESSAGE, payload), HEADER.size + META_LEN.size + len(meta)


def _done_record(msg: SpooledMessage, outcomes: Mapping[int, Outcome]) -> bytes:
    doc = {"id": msg.id, "final": {str(i): o.value for i, o in outcomes.items()}}
    return _record(KIND_DONE, json.dumps(doc, separators=(",", ":")).encode())


def _state_record(msg: SpooledMessage, attempts: int, next_attempt: float) -> bytes:
    doc = {"id": msg.id, "attempts": attempts, "next": next_attempt}
    return _record(KIND_STATE, json.dumps(doc, separators=(",", ":")).encode())


def _parse(data: bytes, pos: int) -> tuple[int, dict[str, Any], int, int] | None:
    """(kind, metadata, body offset, end) of a valid record at ``pos``, else None."""
    if len(data) - pos < HEADER.size:
        return None
    magic, kind, length, crc = HEADER.unpack_from(data, pos)
    end = pos + HEADER.size + length
    if magic != MAGIC or kind not in _KINDS or end > len(data):
        return None
    payload = memoryview(data)[pos + HEADER.size : end]
    if zlib.crc32(payload, zlib.crc32(bytes([kind]))) != crc:
        return None
    try:
        if kind != KIND_MESSAGE:  # DONE and STATE: JSON only
            return kind, json.loads(bytes(payload)), end, end
        (meta_len,) = META_LEN.unpack_from(payload)
        meta = json.loads(bytes(payload[META_LEN.size : META_LEN.size + meta_len]))
    except (ValueError, struct.error):
        return None
    return kind, meta, pos + HEADER.size + META_LEN.size + meta_len, end


def _resync(data: bytes, start: int) -> int:
    """Offset of the next valid record at or after ``start`` (or the end of data)."""
    pos = data.find(MAGIC, start)
    while pos != -1:
        if _parse(data, pos) is not None:
            return pos
        pos = data.find(MAGIC, pos + 1)
    return len(data)


def _outcomes(doc: Mapping[str, str]) -> dict[int, Outcome]:
    return {int(i): Outcome(o) for i, o in doc.items()}


class SpoolLock:
    """One relay per spool folder: an exclusive ``flock`` on ``<spool>/lock``, held while the
    relay runs.

    Two relays on one spool would recover and deliver the same messages and interleave their
    writes. That happens on Kubernetes: a relay pod deleted by hand is replaced while it still
    shuts down, and a ReadWriteOnce claim mounts on both pods of one node. The second relay waits
    (not Ready) until the first has stopped. The kernel drops the lock when its holder dies, even
    by SIGKILL, so a crash never leaves the spool locked.
    """

    def __init__(self, directory: Path) -> None:
        self._path = directory / "lock"
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    async def acquire(self, poll: float = 0.5) -> None:
        """Take the lock, waiting (and saying so once) while another relay holds it."""
        if self.try_acquire():
            return
        log.warning(
            "spool is in use by another relay; waiting for it to stop",
            extra={"spool": str(self._path.parent)},
        )
        # Another process holds it and flock has no asynchronous wake-up: poll.
        while not self.try_acquire():  # noqa: ASYNC110
            await asyncio.sleep(poll)
        log.info("spool lock acquired", extra={"spool": str(self._path.parent)})

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


class Spool:
    """Group-committed spool in ``directory``; call :meth:`recover`, then :meth:`start`."""

    def __init__(
        self,
        directory: Path,
        *,
        io: SpoolIO | None = None,
        segment_bytes: int = 64 * 1024 * 1024,
        min_free_bytes: int = 0,
        reserved: Callable[[], int] = lambda: 0,
        retry_interval: float = 1.0,
        metrics: RelayMetrics | None = None,
        clock: Callable[[], float] = time.time,
        reclaim_chunk_bytes: int = RECLAIM_CHUNK_BYTES,
    ) -> None:
        """``reserved``: bytes other writers of the relay (the records' database) may still add
        on this volume; the free-space check counts them as used. ``retry_interval``: how
        often a DONE record that could not be written is tried again. ``reclaim_chunk_bytes``:
        how much of a segment a reclaim reads and copies at a time."""
        self._dir = directory
        self._io: SpoolIO = io or OsSpoolIO()
        self._segment_bytes = segment_bytes
        self._min_free_bytes = min_free_bytes
        self._reserved = reserved
        self._retry_interval = retry_interval
        self._metrics = metrics
        self._clock = clock
        self._reclaim_chunk_bytes = reclaim_chunk_bytes
        self._segments: dict[int, _Segment] = {}
        self._current = 0
        self._rotate = True
        self._retire: list[_Segment] = []
        self._queue: list[_Write] = []
        self._wakeup = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._dir_fd: int | None = None
        self._subscribers: list[Callable[[SpooledMessage], None]] = []
        self._unwritten = 0  # bytes of the records queued or being written
        # DONE records whose commit failed, by message id: written again until they land
        # or their segment is deleted.
        self._unrecorded: dict[str, tuple[SpooledMessage, dict[int, Outcome]]] = {}
        self._retry_at = 0.0  # time.monotonic() of the next attempt
        self._flushed = False  # the last attempt on close() was made
        self._failing = False  # in a run of failed commits (logged once)
        self._reclaiming = False
        self._reclaim_task: asyncio.Task[int] | None = None
        self._reclaim_stop = False  # closing: no further segment is moved
        self.healthy = True

    # -- lifecycle -------------------------------------------------------------------------

    def subscribe(self, callback: Callable[[SpooledMessage], None]) -> None:
        """Call ``callback`` with every message once it is durable."""
        self._subscribers.append(callback)

    def recover(self) -> list[SpooledMessage]:
        """Scan the segments left by a previous run; return messages still to deliver."""
        self._dir.mkdir(parents=True, exist_ok=True)
        self._dir_fd = os.open(self._dir, os.O_RDONLY | os.O_DIRECTORY)
        messages: dict[str, SpooledMessage] = {}
        done: dict[str, dict[int, Outcome]] = defaultdict(dict)
        states: dict[str, tuple[int, float]] = {}
        # Segments holding an older copy of a message (a reclaim interrupted by a crash).
        older: dict[str, set[int]] = defaultdict(set)
        bad: list[tuple[_Segment, list[tuple[int, bytes]]]] = []
        for path in sorted(self._dir.glob(_SEGMENT_GLOB)):
            sid = int(path.name[4:-4])
            good_end, spans = self._scan(sid, path, messages, done, states, older)
            seg = _Segment(sid, path, os.open(path, os.O_RDWR), good_end)
            self._segments[sid] = seg
            self._current = max(self._current, sid)
            if spans:
                bad.append((seg, spans))
        live = []
        for msg in messages.values():
            msg.final.update(done.get(msg.id, {}))
            msg.attempts, msg.next_attempt = states.get(msg.id, (0, 0.0))
            if msg.pending():
                live.append(msg)
                self._segments[msg.segment].live += 1
                self._segments[msg.segment].messages[msg.id] = msg
        keep = self._carry_over(messages, older)
        for seg in list(self._segments.values()):
            if seg.live == 0 and seg.id not in keep:
                self._close_segment(seg)
        for msg_id, sids in older.items():
            messages[msg_id].older = {sid for sid in sids if sid in self._segments}
        # Only now, with the finished segments gone: on a full disk their space is what the
        # copies need.
        for seg, spans in bad:
            self._set_aside(seg, seg.size, spans)
        self._rotate = True  # new messages never go after a possibly torn tail
        live.sort(key=lambda m: m.received_at)
        log.info(
            "spool recovered",
            extra={"messages": len(live), "segments": len(self._segments)},
        )
        return live

    def _carry_over(
        self, messages: Mapping[str, SpooledMessage], older: Mapping[str, set[int]]
    ) -> set[int]:
        """Write what all copies of each message said (its merged outcomes and state) into
        every segment holding a copy that stays, durably, before a segment holding another
        copy may go: otherwise a second crash would forget the DONE and STATE records that
        were only in the deleted segment and send those recipients again. The segments that
        must stay because that failed (a full disk): they go at a later start."""
        writes: dict[int, list[tuple[str, bytes]]] = defaultdict(list)
        for msg_id, sids in older.items():
            msg = messages[msg_id]
            for sid in {msg.segment, *sids}:
                if self._segments[sid].live == 0:  # it goes: nothing to carry there
                    continue
                if msg.final:
                    writes[sid].append((msg_id, _done_record(msg, msg.final)))
                if msg.attempts:
                    state = _state_record(msg, msg.attempts, msg.next_attempt)
                    writes[sid].append((msg_id, state))
        keep: set[int] = set()
        for sid, records in writes.items():
            seg = self._segments[sid]
            data = b"".join(record for _, record in records)
            try:
                self._io.pwrite(seg.open_fd(), data, seg.size)
                self._io.sync(seg.open_fd())
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(seg.open_fd(), seg.size)
                log.exception(
                    "could not carry the outcomes of other copies over; they stay",
                    extra={"segment": sid},
                )
                for msg_id, _ in records:
                    keep |= {messages[msg_id].segment, *older[msg_id]}
                continue
            seg.size += len(data)
        return keep

    def _scan(
        self,
        sid: int,
        path: Path,
        messages: dict[str, SpooledMessage],
        done: dict[str, dict[int, Outcome]],
        states: dict[str, tuple[int, float]],
        older: dict[str, set[int]],
    ) -> tuple[int, list[tuple[int, bytes]]]:
        """(end of the last valid record, the invalid spans by offset) of one segment.

        ``states``: attempts and next attempt of each message, from the record with the most
        attempts (they only grow; at a tie the later one): a STATE record written to a
        reclaimed segment after its copy still counts."""

        def state(doc: Mapping[str, Any]) -> None:
            attempts = int(doc.get("attempts", 0))
            if attempts and attempts >= states.get(doc["id"], (0, 0.0))[0]:
                states[doc["id"]] = (attempts, float(doc.get("next", 0.0)))

        data = path.read_bytes()
        pos = good_end = 0
        spans: list[tuple[int, bytes]] = []
        while pos < len(data):
            parsed = _parse(data, pos)
            if parsed is None:
                nxt = _resync(data, pos + 1)
                spans.append((pos, data[pos:nxt]))
                pos = nxt
                continue
            kind, meta, body_offset, end = parsed
            if kind == KIND_DONE:
                done[meta["id"]].update(_outcomes(meta["final"]))
            elif kind == KIND_STATE:
                state(meta)
            else:
                msg = SpooledMessage(
                    id=meta["id"],
                    mail_from=meta["from"],
                    recipients=tuple(meta["rcpt"]),
                    username=meta["user"],
                    received_at=meta["at"],
                    body_length=end - body_offset,
                    segment=sid,
                    body_offset=body_offset,
                    final=_outcomes(meta["final"]),
                    dsn=DsnEnvelope.from_json(meta["dsn"]) if "dsn" in meta else None,
                    record_length=end - pos,
                )
                state(meta)
                previous = messages.get(msg.id)
                if previous is not None:  # a copy: crossed-off recipients accumulate
                    msg.final.update(previous.final)
                    older[msg.id].add(previous.segment)
                messages[msg.id] = msg
            pos = good_end = end
        return good_end, spans

    def _set_aside(self, seg: _Segment, good_end: int, spans: list[tuple[int, bytes]]) -> None:
        """Quarantine a segment's invalid spans, then cut its torn tail (if it has one)."""
        copied = True
        for offset, data in spans:  # every span, even after one failed
            copied = self._quarantine(seg.id, offset, data) and copied
        if seg.fd is None:  # finished, so deleted already
            return
        size = os.fstat(seg.fd).st_size
        if good_end == size:
            return
        if not copied:  # the bytes stay where they are; DONE records go after them
            seg.size = size
            return
        with seg.path.open("r+b") as f:
            f.truncate(good_end)
            os.fsync(f.fileno())

    def _quarantine(self, sid: int, offset: int, data: bytes) -> bool:
        """Copy a bad span to ``quarantine/``; False if the disk is too full for it."""
        target = self._dir / "quarantine" / f"seg-{sid:012d}-{offset}.bad"
        try:
            target.parent.mkdir(exist_ok=True)
            with target.open("wb") as f:
                f.write(data)
                os.fsync(f.fileno())
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            # Not starting at all would keep the mail already spooled from going out.
            target.unlink(missing_ok=True)
            if self._metrics is not None:
                self._metrics.spool_quarantined.inc()
            log.error(  # noqa: TRY400 - the reason is in the message, no traceback needed
                "torn or corrupt spool entry left in its segment: no space to quarantine it",
                extra={"segment": sid, "offset": offset, "bytes": len(data)},
            )
            return False
        quarantine_fd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(quarantine_fd)
        finally:
            os.close(quarantine_fd)
        if self._metrics is not None:
            self._metrics.spool_quarantined.inc()
        log.error(
            "torn or corrupt spool entry quarantined",
            extra={"segment": sid, "offset": offset, "bytes": len(data), "file": str(target)},
        )
        return True

    def start(self) -> None:
        if self._dir_fd is None:
            raise RuntimeError("call recover() before start()")
        self._task = asyncio.get_running_loop().create_task(self._run(), name="spool-writer")

    async def close(self) -> None:
        """Commit what is queued, stop the writer and close the files."""
        task = self._reclaim_task
        if task is not None and not task.done():  # the move in hand ends while the writer runs
            self._reclaim_stop = True
            with contextlib.suppress(Exception):
                await asyncio.shield(task)
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
        for seg in self._segments.values():
            if seg.fd is not None:
                os.close(seg.fd)
                seg.fd = None
        if self._dir_fd is not None:
            os.close(self._dir_fd)
            self._dir_fd = None

    # -- API -------------------------------------------------------------------------------

    def has_room(self, size: int = 0) -> bool:
        """Whether ``size`` more bytes leave the configured free space, counting everything
        the relay writes on the volume: measured now (one ``statvfs``, no cache: a burst must
        not outrun it), less the records queued and not yet written, less what the records'
        database may still add (``reserved``)."""
        free = self._io.disk_free(self._dir) - self._unwritten - self._reserved()
        if free - size >= self._min_free_bytes:
            return True
        current = self._segments.get(self._current)
        if current is not None and current.live == 0:  # finished: its space is ours again
            self._release(current, 0, idle=True)
        return False

    def unrecorded(self) -> int:
        """Recipients whose final outcome is known but not yet durable (a full disk)."""
        return sum(len(outcomes) for _, outcomes in self._unrecorded.values())

    async def append(
        self,
        mail_from: str,
        recipients: list[str],
        username: str,
        body: bytes,
        *,
        dsn: DsnEnvelope | None = None,
    ) -> SpooledMessage:
        """Make a message durable; raises SpoolFullError or SpoolError. ``dsn``: its RFC 3461
        parameters (an SMTP submission's; None: it never gets a DSN)."""
        if self._closing:
            raise SpoolError("spool is closing")
        if not self.has_room(len(body)):
            raise SpoolFullError("spool below its free-space reserve")
        msg = SpooledMessage(
            id=secrets.token_hex(8),
            mail_from=mail_from,
            recipients=tuple(recipients),
            username=username,
            received_at=self._clock(),
            body_length=len(body),
            dsn=dsn,
        )
        record, body_start = _message_record(msg, body)
        await self._submit(_Write(record, self._future(), message=msg, body_start=body_start))
        return msg

    async def record(self, msg: SpooledMessage, outcomes: Mapping[int, Outcome]) -> bool:
        """Cross recipients off (final outcomes only); True once that is durable.

        False when the commit failed (a full or failing disk): the outcomes stay crossed off
        in memory, so they are not sent again while the relay runs, and the spool writes them
        again until they land or their segment is deleted (which makes them moot). Only a
        crash before then sends these recipients again.
        """
        was_live = bool(msg.pending())
        msg.final.update(outcomes)
        if was_live and not msg.pending():
            seg = self._segments.get(msg.segment)
            if seg is not None:
                seg.messages.pop(msg.id, None)
                self._release(seg, 1)
        writes = [
            _Write(
                _done_record(msg, outcomes), self._future(), sid, done=msg, outcomes=dict(outcomes)
            )
            for sid in self._copies(msg)
        ]
        results = await asyncio.gather(*(self._submit(w) for w in writes), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, SpoolError):
                raise result
        return not any(isinstance(result, SpoolError) for result in results)

    def _copies(self, msg: SpooledMessage) -> list[int]:
        """The segments holding a copy of ``msg``: where it is, then any older one left."""
        msg.older &= self._segments.keys()  # those deleted since need nothing
        msg.older.discard(msg.segment)
        return [msg.segment, *sorted(msg.older)]

    async def defer(self, msg: SpooledMessage, next_attempt: float) -> bool:
        """Record that ``msg`` has had ``msg.attempts`` attempts and waits until
        ``next_attempt`` (a STATE record in its segment); True once durable. Best effort: on
        a failed commit the state is only in memory (a restart then retries it early)."""
        msg.next_attempt = next_attempt
        if msg.segment not in self._segments or self._closing:
            return False
        if not self.has_room(HEADER.size + 64):  # short of room: not worth a failed commit
            return False
        write = _Write(_state_record(msg, msg.attempts, next_attempt), self._future(), msg.segment)
        try:
            await self._submit(write)
        except SpoolError:
            return False
        return True

    async def reclaim(self, older_than: float) -> int:
        """Move the messages of every old segment held only by mail received more than
        ``older_than`` seconds ago (deferred that long), and mostly dead (more than
        :data:`RECLAIM_DEAD_FRACTION` of its bytes), into the current segment, then delete
        the old one; the number of messages moved.

        Each copy keeps the message's id, its crossed-off recipients, attempts, next attempt
        and DSN parameters; outcomes recorded while the copy was written follow it in a DONE
        record. A crash before the old segment is gone leaves both copies: recovery keeps the
        newest and counts the DONE records of both (see :meth:`_scan`)."""
        if self._reclaiming or self._closing:
            return 0
        self._reclaiming = True
        # Not stopped half-way when the caller is cancelled: a move ends by carrying over the
        # outcomes recorded meanwhile and letting the old segment go.
        task = asyncio.get_running_loop().create_task(self._reclaim(older_than))
        self._reclaim_task = task
        return await asyncio.shield(task)

    async def _reclaim(self, older_than: float) -> int:
        try:
            now = self._clock()
            old = [  # chosen first: a copy may start a new current segment
                seg
                for seg in sorted(self._segments.values(), key=lambda s: s.id)
                if seg.id != self._current
                and seg not in self._retire
                and seg.messages
                and all(now - m.received_at >= older_than for m in seg.messages.values())
                and self._dead_fraction(seg) > RECLAIM_DEAD_FRACTION
            ]
            moved = 0
            for seg in old:
                if self._reclaim_stop:
                    break
                if self._segments.get(seg.id) is seg and seg.messages:
                    moved += await self._move(seg)
            return moved
        finally:
            self._reclaiming = False

    @staticmethod
    def _dead_fraction(seg: _Segment) -> float:
        """The share of ``seg``'s bytes that no pending message needs."""
        live = sum(m.record_length for m in seg.messages.values())
        return 1.0 - live / seg.size if seg.size > 0 else 0.0

    def _chunks(self, msgs: list[SpooledMessage]) -> list[list[SpooledMessage]]:
        """``msgs`` in runs of about ``reclaim_chunk_bytes`` (at least one message each)."""
        chunks: list[list[SpooledMessage]] = []
        size = 0
        for msg in msgs:
            if not chunks or size + msg.record_length > self._reclaim_chunk_bytes:
                chunks.append([])
                size = 0
            chunks[-1].append(msg)
            size += msg.record_length
        return chunks

    async def _move(self, seg: _Segment) -> int:
        """Copy ``seg``'s pending messages into the current segment, a chunk at a time (the
        bodies of one chunk are in memory at once, never the whole segment's)."""
        # Held while its messages move: an outcome recorded meanwhile goes to the old segment
        # (and its last message finishing must not delete it) until that outcome is durable
        # next to the copy as well; a crash in between finds both and merges them.
        seg.live += 1
        moved = 0
        carried = True
        error: BaseException | None = None
        for planned in self._chunks(list(seg.messages.values())):
            if self._reclaim_stop:
                break
            chunk = [m for m in planned if seg.messages.get(m.id) is m]  # not finished since
            if not chunk:
                continue
            if not self.has_room(sum(m.record_length for m in chunk)):
                error = SpoolFullError("spool below its free-space reserve")
                break
            try:
                bodies = await asyncio.to_thread(self._read_all, chunk)
            except (OSError, SpoolError) as exc:
                log.exception("could not read a segment to reclaim", extra={"segment": seg.id})
                error = exc
                break
            copies = []
            for msg, body in zip(chunk, bodies, strict=True):
                record, body_start = _message_record(msg, body)
                write = _Write(
                    record, self._future(), message=msg, body_start=body_start, copy=True
                )
                copies.append((msg, dict(msg.final), (msg.attempts, msg.next_attempt), write))
            del bodies
            results = await asyncio.gather(
                *(self._submit(w) for *_, w in copies), return_exceptions=True
            )
            for (msg, copied, state, _), result in zip(copies, results, strict=True):
                if isinstance(result, BaseException):
                    error = error or result
                if msg.segment == seg.id:  # not moved
                    continue
                moved += 1
                later = {i: o for i, o in msg.final.items() if i not in copied}
                if later:  # recorded in the old segment meanwhile
                    carried = await self.record(msg, later) and carried
                if msg.pending() and (msg.attempts, msg.next_attempt) != state:
                    # Deferred meanwhile (a STATE record in the old segment): best effort, as
                    # every STATE record.
                    await self.defer(msg, msg.next_attempt)
            del copies
            if error is not None:
                break
        if not carried:  # the old segment still holds those outcomes: it stays until restart
            log.warning(
                "outcomes recorded during a reclaim not carried over; the old segment stays",
                extra={"segment": seg.id},
            )
            return moved
        self._release(seg, 1)  # each message moved has released it already (_complete)
        if error is not None:
            log.warning(
                "reclaiming a segment failed; it is tried again later",
                extra={"segment": seg.id, "error": str(error), "moved": moved},
            )
            return moved
        log.info("segment reclaimed", extra={"segment": seg.id, "messages": moved})
        return moved

    def _release(self, seg: _Segment, messages: int, *, idle: bool = False) -> None:
        """``messages`` of ``seg`` have nothing left to deliver; delete it if none has (the
        current one only if it is not small, or ``idle``: the spool is short of room)."""
        seg.live -= messages
        if seg.live > 0 or seg in self._retire or self._segments.get(seg.id) is not seg:
            return
        if seg.id == self._current and not self._rotate:  # new messages still go there
            if not idle and seg.size < min(self._segment_bytes, IDLE_SEGMENT_BYTES):
                return
            self._rotate = True  # the next message starts a new segment
        self._retire.append(seg)
        self._wakeup.set()

    async def read_body(self, msg: SpooledMessage) -> bytes:
        # Where the body is, read here on the event loop (a reclaim moves it there too); a
        # segment deleted after a reclaim moved the message is read again at the copy. A
        # small body is read on the loop: mostly written moments ago, so the pread is a copy
        # from the page cache, cheaper than the hop to a thread and back (one cold read of a
        # few KB after a restart is short); a large one goes to a thread, so the loop never
        # waits for a long copy or a long read from the disk.
        for _ in range(2):
            seg = self._segments.get(msg.segment)
            if seg is None:
                break
            try:
                if msg.body_length <= LOOP_READ_BYTES:
                    return self._pread(seg.path, msg.body_offset, msg.body_length, msg.id)
                return await asyncio.to_thread(
                    self._pread, seg.path, msg.body_offset, msg.body_length, msg.id
                )
            except FileNotFoundError:
                continue
        raise SpoolError(f"message {msg.id} is not in the spool")

    def _read_all(self, msgs: list[SpooledMessage]) -> list[bytes]:
        return [self._read(m) for m in msgs]

    def _read(self, msg: SpooledMessage) -> bytes:
        return self._pread(
            self._segments[msg.segment].path, msg.body_offset, msg.body_length, msg.id
        )

    @staticmethod
    def _pread(path: Path, offset: int, length: int, msg_id: str) -> bytes:
        fd = os.open(path, os.O_RDONLY)
        try:
            data = os.pread(fd, length, offset)
        finally:
            os.close(fd)
        if len(data) != length:
            raise SpoolError(f"short read of message {msg_id}")
        return data

    # -- group commit ----------------------------------------------------------------------

    @staticmethod
    def _future() -> asyncio.Future[None]:
        return asyncio.get_running_loop().create_future()

    async def _submit(self, write: _Write) -> None:
        assert write.future is not None  # noqa: S101 - only retries have none
        self._queue.append(write)
        self._unwritten += len(write.record)
        self._wakeup.set()
        await write.future

    def _retry_due(self) -> bool:
        if not self._unrecorded:
            return False
        if self._closing:
            return not self._flushed
        return time.monotonic() >= self._retry_at

    async def _run(self) -> None:
        while True:
            retry = self._retry_due()
            if not self._queue and not self._retire and not retry:
                if self._closing:
                    if self._unrecorded:
                        log.error(
                            "spool closed with outcomes not recorded; these recipients are"
                            " sent again after the restart",
                            extra={"recipients": self.unrecorded()},
                        )
                    return
                self._wakeup.clear()
                timeout = None
                if self._unrecorded:
                    timeout = max(0.0, self._retry_at - time.monotonic())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), timeout)
                continue
            if retry:
                # Alone in their batch: a DONE record that keeps failing must not fail the
                # commits of new messages with it.
                self._flushed = self._closing
                taken: list[_Write] = []
                batch = self._retries()
            else:
                taken, self._queue = self._queue, []
                batch = [w for w in taken if w.future is not None and not w.future.cancelled()]
            plan = self._plan(batch)
            started = time.perf_counter()
            try:
                await asyncio.to_thread(self._execute, plan)
            except OSError as exc:
                self._fail(batch, plan, exc, retry=retry)
                continue
            finally:
                self._unwritten -= sum(len(w.record) for w in taken)
            if self._failing:
                log.info("spool commits succeed again", extra={"unrecorded": self.unrecorded()})
            self._failing = False
            self.healthy = True
            self._retry_at = 0.0  # space came back (or was never short): try the rest now
            if self._metrics is not None and batch:
                self._metrics.spool_sync.observe(time.perf_counter() - started)
                self._metrics.spool_batch.observe(len(batch))
            self._complete(batch, plan)

    def _retries(self) -> list[_Write]:
        """The DONE records to write again: one per message, its outcomes merged."""
        pending, self._unrecorded = self._unrecorded, {}
        return [
            _Write(_done_record(msg, outcomes), None, sid, done=msg, outcomes=outcomes)
            for msg, outcomes in pending.values()
            for sid in self._copies(msg)
            if sid in self._segments  # else deleted: nothing left to record
        ]

    def _plan(self, batch: list[_Write]) -> _Plan:
        create = None
        current = self._segments.get(self._current)
        if any(w.segment is None for w in batch) and (
            self._rotate or current is None or current.size >= self._segment_bytes
        ):
            self._rotate = False
            if current is not None and current.live == 0 and current not in self._retire:
                self._retire.append(current)
            self._current += 1
            path = self._dir / f"seg-{self._current:012d}.log"
            create = self._segments[self._current] = _Segment(self._current, path)
        retire, self._retire = self._retire, []
        for finished in retire:  # from now on, writes for them have nothing to do
            self._segments.pop(finished.id, None)
        appends: dict[int, list[bytes]] = defaultdict(list)
        offsets = []
        sizes_before: dict[int, int] = {}
        for w in batch:
            sid = self._current if w.segment is None else w.segment
            target = self._segments.get(sid)
            if target is None:  # a DONE record for a deleted segment: the deletion records it
                offsets.append((sid, -1))
                continue
            seg = target
            sizes_before.setdefault(sid, seg.size)
            offsets.append((sid, seg.size))
            seg.size += len(w.record)
            appends[sid].append(w.record)
            if w.message is not None:
                seg.live += 1  # counted now, so the segment is not deleted under it
        return _Plan(create, dict(appends), offsets, sizes_before, retire)

    def _execute(self, plan: _Plan) -> None:
        """Runs in a worker thread; the event loop plans no other batch meanwhile."""
        self._delete(plan)  # first: it frees the space the writes may need
        try:
            if plan.create is not None:
                flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
                plan.create.fd = os.open(plan.create.path, flags, 0o600)
                self._io.sync_dir(self._open_dir_fd())
            for sid, chunks in plan.appends.items():
                fd = self._segments[sid].open_fd()
                self._io.pwrite(fd, b"".join(chunks), plan.sizes_before[sid])
            for sid in plan.appends:
                self._io.sync(self._segments[sid].open_fd())
        except OSError:
            self._truncate(plan)
            raise

    def _delete(self, plan: _Plan) -> None:
        """Delete the finished segments, durably (one directory ``fsync``): from then on a
        restart cannot deliver their messages again, DONE records or not."""
        if not plan.retire:
            plan.deleted = True
            return
        for seg in plan.retire:
            if seg.fd is not None:
                os.close(seg.fd)
                seg.fd = None
            seg.path.unlink(missing_ok=True)
        self._io.sync_dir(self._open_dir_fd())
        plan.deleted = True

    def _open_dir_fd(self) -> int:
        if self._dir_fd is None:
            raise OSError(errno.EBADF, "spool directory is not open")
        return self._dir_fd

    def _truncate(self, plan: _Plan) -> None:
        for sid, size in plan.sizes_before.items():
            fd = self._segments[sid].fd
            if fd is not None:
                try:
                    os.ftruncate(fd, size)
                except OSError:
                    log.warning("could not truncate a failed commit", extra={"segment": sid})

    def _close_segment(self, seg: _Segment) -> None:
        if seg.fd is not None:
            os.close(seg.fd)
            seg.fd = None
        seg.path.unlink(missing_ok=True)
        self._segments.pop(seg.id, None)

    def _fail(self, batch: list[_Write], plan: _Plan, exc: OSError, *, retry: bool) -> None:
        self.healthy = False
        self._rotate = True  # new messages never go after bytes whose fate is unknown
        for sid, size in plan.sizes_before.items():
            seg = self._segments.get(sid)
            if seg is not None:
                seg.size = size
        if not plan.deleted:  # tried again with the next commit
            self._retire.extend(s for s in plan.retire if s not in self._retire)
        full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
        if not (retry and self._failing):  # a retry that fails again is not news
            log.error("spool commit failed: %s", exc, extra={"records": len(batch)})
        self._failing = True
        self._retry_at = time.monotonic() + self._retry_interval
        if self._metrics is not None:
            self._metrics.spool_errors.inc()
        error = SpoolFullError(str(exc)) if full else SpoolError(str(exc))
        for w, (sid, offset) in zip(batch, plan.offsets, strict=True):
            if offset >= 0 and w.message is not None:
                seg = self._segments.get(sid)
                if seg is not None:
                    self._release(seg, 1)  # never written: a deleted segment loses nothing
            if offset >= 0 and w.done is not None:
                self._keep_unrecorded(w.done, w.outcomes)
            if w.future is not None and not w.future.done():
                w.future.set_exception(error)

    def _keep_unrecorded(self, msg: SpooledMessage, outcomes: Mapping[int, Outcome]) -> None:
        _, kept = self._unrecorded.setdefault(msg.id, (msg, {}))
        kept.update(outcomes)

    def _complete(self, batch: list[_Write], plan: _Plan) -> None:
        for w, (sid, offset) in zip(batch, plan.offsets, strict=True):
            msg = w.message
            if msg is not None:
                old = self._segments.get(msg.segment) if w.copy else None
                msg.segment = sid
                msg.body_offset = offset + w.body_start
                msg.record_length = len(w.record)
                seg = self._segments.get(sid)
                moved = old is not None and old is not seg
                if moved and old is not None:
                    msg.older.add(old.id)  # until it is deleted, its outcomes go there too
                    if old.messages.pop(msg.id, None) is not None:
                        self._release(old, 1)  # moved: the old segment no longer needs it
                if seg is not None and msg.pending():
                    seg.messages[msg.id] = msg
                elif seg is not None and w.copy:  # finished while it was copied
                    self._release(seg, 1)
                if w.copy:  # moved, not new: the queue has it already
                    if w.future is not None and not w.future.done():
                        w.future.set_result(None)
                    continue
                for callback in self._subscribers:
                    try:
                        callback(msg)
                    except Exception:  # a subscriber's bug must not stop the writer
                        log.exception("spool subscriber failed", extra={"msg_id": msg.id})
            if w.future is not None and not w.future.done():
                w.future.set_result(None)
