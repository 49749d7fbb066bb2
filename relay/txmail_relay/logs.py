"""Logging: plain or JSON lines with structured fields, and no secrets or bodies at any level.

Our modules never log a password, an AUTH payload or message content. aiosmtpd (logger
``mail.log``) logs every DATA line and undecodable AUTH responses at DEBUG; the
:class:`Redactor` filter drops those records before any handler sees them.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

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


def configure(*, json_format: bool, level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_format else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    install_redaction()
