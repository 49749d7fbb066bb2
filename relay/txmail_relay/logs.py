"""Logging: plain or JSON lines with structured fields, and no secrets or bodies at any level.

Our modules never log a password, an AUTH payload or message content. aiosmtpd (logger
``mail.log``) logs every DATA line and undecodable AUTH responses at DEBUG; the
:class:`Redactor` filter drops those records before any handler sees them. aiosmtpd also logs
every command and connection at INFO (five lines per message): its logger is at WARNING
unless the relay logs at DEBUG. Lines are written in batches (:class:`BufferedStreamHandler`).
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from datetime import UTC, datetime
from typing import Any, TextIO

AIOSMTPD_LOGGER = "mail.log"
_SECRET_BEARING = frozenset({"DATA readline: %s", "%r can't decode base64: %s"})
_STANDARD = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class Redactor(logging.Filter):
    """Drops aiosmtpd records that carry message content or AUTH responses."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg not in _SECRET_BEARING


def install_redaction() -> None:
    """Idempotent: attach the Redactor to aiosmtpd's logger."""
    logger = logging.getLogger(AIOSMTPD_LOGGER)
    if not any(isinstance(f, Redactor) for f in logger.filters):
        logger.addFilter(Redactor())


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        doc.update(_extras(record))
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        extras = _extras(record)
        if extras:
            text += " " + " ".join(f"{k}={v}" for k, v in extras.items())
        return text


class BufferedStreamHandler(logging.StreamHandler[TextIO]):
    """A stream handler that writes its lines in batches: when ``capacity`` lines wait, at
    once for a record at ``flush_level`` or above (and everything before it), within
    ``interval`` seconds otherwise, and on :meth:`flush` and close (``logging.shutdown`` at
    exit).

    Written here because ``logging.handlers`` has no such handler: ``MemoryHandler`` keeps
    records but hands them to its target one by one, so a ``StreamHandler`` target still
    writes and flushes once per line (the relay's cost at INFO was that write per line, on
    the event loop), and it has no time limit; ``QueueHandler`` moves the write to a thread
    but still one per record. The timer is a thread, not an event-loop callback, so lines
    come out on time even while the loop is busy or before it runs.
    """

    def __init__(
        self,
        stream: TextIO,
        *,
        capacity: int = 256,
        interval: float = 0.1,
        flush_level: int = logging.WARNING,
    ) -> None:
        super().__init__(stream)
        self._capacity = capacity
        self._interval = interval
        self._flush_level = flush_level
        self._lines: list[str] = []
        self._pending = threading.Event()  # set: lines wait for the timer
        self._closed = False
        self._timer = threading.Thread(target=self._flush_later, name="log-flush", daemon=True)
        self._timer.start()

    def emit(self, record: logging.LogRecord) -> None:  # called with self.lock held
        try:
            self._lines.append(self.format(record) + self.terminator)
            if len(self._lines) >= self._capacity or record.levelno >= self._flush_level:
                self._write()
            elif len(self._lines) == 1:
                self._pending.set()
        except Exception:
            self.handleError(record)

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr] # created in Handler.__init__
            try:
                self._write()
            except (OSError, ValueError):  # the stream is closed or broken: nothing to do
                self._lines.clear()

    def close(self) -> None:
        self._closed = True
        self._pending.set()
        self.flush()
        super().close()

    def _write(self) -> None:
        if self._lines:
            text = "".join(self._lines)
            self._lines.clear()
            self.stream.write(text)
            self.stream.flush()

    def _flush_later(self) -> None:
        while not self._closed:
            self._pending.wait()
            if self._closed:
                return
            time.sleep(self._interval)
            self._pending.clear()  # before the flush: a line written after it sets it again
            self.flush()


def flush() -> None:
    """Write out the lines the root logger's handlers hold (before a last line on stderr)."""
    for handler in logging.getLogger().handlers:
        handler.flush()


def configure(*, json_format: bool, level: str) -> None:
    handler = BufferedStreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_format else TextFormatter())
    root = logging.getLogger()
    for old in root.handlers:
        if isinstance(old, BufferedStreamHandler):  # configured before: its lines first
            old.close()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiosmtpd's per-command and per-connection lines only when the relay logs at DEBUG.
    aiosmtpd = logging.getLogger(AIOSMTPD_LOGGER)
    aiosmtpd.setLevel(logging.NOTSET if root.level <= logging.DEBUG else logging.WARNING)
    install_redaction()
