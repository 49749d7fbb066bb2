"""The relay's buffered log handler: lines in batches, errors at once, nothing lost at a stop."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from relay.relaykit import wait_for
from txmail_relay import logs


class Stream(io.StringIO):
    """Counts the writes the handler makes."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


@pytest.fixture
def logger() -> Iterator[logging.Logger]:
    found = logging.getLogger("txmail_relay.test_logs")
    found.propagate = False
    found.setLevel(logging.INFO)
    yield found
    for handler in found.handlers:
        handler.close()
    found.handlers.clear()


def _attach(logger: logging.Logger, **kwargs: float) -> tuple[Stream, logs.BufferedStreamHandler]:
    stream = Stream()
    handler = logs.BufferedStreamHandler(stream, **kwargs)  # type: ignore[arg-type]
    handler.setFormatter(logs.JsonFormatter())
    logger.addHandler(handler)
    return stream, handler


def _messages(stream: Stream) -> list[str]:
    return [json.loads(line)["message"] for line in stream.getvalue().splitlines()]


def test_lines_are_written_in_batches_of_capacity(logger: logging.Logger) -> None:
    stream, _ = _attach(logger, capacity=10, interval=3600)
    for n in range(9):
        logger.info("line %d", n)
    assert stream.writes == 0
    logger.info("line 9")
    assert stream.writes == 1
    assert _messages(stream) == [f"line {n}" for n in range(10)]


def test_a_warning_is_written_at_once_after_the_lines_before_it(logger: logging.Logger) -> None:
    stream, _ = _attach(logger, capacity=100, interval=3600)
    logger.info("before")
    logger.warning("trouble", extra={"peer": "192.0.2.1"})
    assert stream.writes == 1
    assert _messages(stream) == ["before", "trouble"]
    assert json.loads(stream.getvalue().splitlines()[1])["peer"] == "192.0.2.1"


def test_lines_come_out_within_the_interval(logger: logging.Logger) -> None:
    stream, _ = _attach(logger, capacity=100, interval=0.05)
    logger.info("message accepted", extra={"msg_id": "abc"})
    wait_for(lambda: _messages(stream) == ["message accepted"], 10, "the timer's flush")
    logger.info("second")
    wait_for(lambda: _messages(stream) == ["message accepted", "second"], 10, "a second flush")


def test_flush_and_close_write_what_waits(logger: logging.Logger) -> None:
    stream, handler = _attach(logger, capacity=100, interval=3600)
    logger.info("one")
    handler.flush()
    assert _messages(stream) == ["one"]
    logger.info("two")
    handler.close()
    assert _messages(stream) == ["one", "two"]


def test_a_closed_stream_loses_the_lines_without_raising(logger: logging.Logger) -> None:
    stream, handler = _attach(logger, capacity=100, interval=3600)
    logger.info("one")
    stream.close()
    handler.flush()  # nothing to write to: dropped, no exception into the caller
