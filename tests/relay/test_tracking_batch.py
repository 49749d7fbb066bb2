"""The tracking endpoints record opens and clicks in batches, with a bounded queue.

A real aiohttp server (the tracking application the relay serves) and a real HTTP client,
over real records (SQLite) of a real send: many clicks end up as one event each, written
in fewer records writes than clicks; past the queue's bound a click still gets its
redirect and is counted as dropped; a stop records what is waiting.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry

from relay.relaykit import tracking_keys_file
from txmail_relay.http.apps import make_tracking_app
from txmail_relay.metrics import RelayMetrics
from txmail_relay.records.model import Event, EventType, Kind, SentCopy
from txmail_relay.records.records import Records
from txmail_relay.tracking.endpoints import HIT_BYTES, KeyFile, TrackingEndpoints
from txmail_relay.tracking.machine import Policy
from txmail_relay.tracking.tokens import TrackingKeys

EVENT = bytes(range(16))
TARGET = "https://shop.example.com/a"
CHROME = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/131.0.0.0 Safari/537.36"
# Clicks within seconds of the send are a gateway's (the timing rule): off here.
PERSON = Policy(click_window=0)


@pytest.fixture
async def records(tmp_path: Path) -> AsyncIterator[Records]:
    records = Records(tmp_path / "spool")
    await records.open()
    await records.sends.record(
        "app1", 4, [SentCopy("m1", "ada@dest.test", "<m1@x>", EVENT)], namespace="apps",
        token="app1",
    )  # fmt: skip
    yield records
    await records.close()


async def _poll(probe: Callable[[], Any], what: str) -> Any:
    """``await probe()`` until it is truthy, for 30 s at most."""
    deadline = time.monotonic() + 30.0
    while True:
        value = await probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what} (last: {value!r})")
        await asyncio.sleep(0.05)


async def _clicks(records: Records) -> list[Event]:
    return await records.events.after(0, types=(EventType.CLICK,), limit=10_000)


def _sample(registry: CollectorRegistry, name: str, labels: dict[str, str] | None = None) -> float:
    return registry.get_sample_value(name, labels or {}) or 0.0


async def _get(session: aiohttp.ClientSession, url: str) -> tuple[int, str | None]:
    async with session.get(url, headers={"User-Agent": CHROME}, allow_redirects=False) as reply:
        await reply.read()
        return reply.status, reply.headers.get("Location")


def _endpoints(
    tmp_path: Path, records: Records, registry: CollectorRegistry, **kwargs: Any
) -> tuple[TrackingEndpoints, str]:
    keys = KeyFile(tracking_keys_file(tmp_path / "keys", 1))
    assert keys.current is not None
    token = keys.current.sign_click(EVENT, 0, TARGET)
    return TrackingEndpoints(keys, records, RelayMetrics(registry), **kwargs), f"/c/{token}"


async def test_a_burst_of_clicks_is_recorded_once_each_in_fewer_writes(
    tmp_path: Path, records: Records
) -> None:
    registry = CollectorRegistry()
    endpoints, path = _endpoints(tmp_path, records, registry, policy=PERSON)
    server = TestServer(make_tracking_app([endpoints.install]))
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            answers = await asyncio.gather(
                *(_get(session, str(server.make_url(path))) for _ in range(300))
            )
        assert set(answers) == {(302, TARGET)}

        async def all_recorded() -> list[Event] | None:
            found = await _clicks(records)
            return found if len(found) >= 300 else None

        events = await _poll(all_recorded, "300 click events")
    finally:
        await server.close()
    assert len(events) == 300 and len({e.id for e in events}) == 300
    assert all(e.view()["url"] == TARGET and e.view()["filteredEvent"] is False for e in events)
    counts = (await records.counters.totals()).counts["app1"]
    assert (counts[Kind.CLICKED], counts[Kind.UNIQUE_CLICKED]) == (300, 1)
    writes = _sample(registry, "txmail_relay_tracking_batch_hits_count")
    assert _sample(registry, "txmail_relay_tracking_batch_hits_sum") == 300
    assert 1 <= writes < 300  # batched: several clicks per records write
    assert _sample(registry, "txmail_relay_tracking_dropped_total", {"kind": "click"}) == 0


async def test_past_the_bound_a_click_is_redirected_and_counted_dropped_and_a_stop_records_the_rest(
    tmp_path: Path, records: Records
) -> None:
    """Clicks wait for their burst window (an hour here): five fit in the bound, the next
    seven are answered but dropped; stopping the listener records the five at once."""
    registry = CollectorRegistry()
    per_hit = HIT_BYTES + len(TARGET) + len(CHROME)
    endpoints, path = _endpoints(
        tmp_path,
        records,
        registry,
        policy=Policy(click_window=0, burst_window=3600),
        max_pending_bytes=5 * per_hit,
    )
    server = TestServer(make_tracking_app([endpoints.install]))
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            answers = [await _get(session, str(server.make_url(path))) for _ in range(12)]
        assert answers == [(302, TARGET)] * 12
        dropped = _sample(registry, "txmail_relay_tracking_dropped_total", {"kind": "click"})
        assert dropped == 7
        assert await _clicks(records) == []  # still waiting for their window
    finally:
        await server.close()  # the listener's cleanup: what is pending is recorded now
    events = await _clicks(records)
    assert len(events) == 5
    counts = (await records.counters.totals()).counts["app1"]
    assert (counts[Kind.CLICKED], counts[Kind.UNIQUE_CLICKED]) == (5, 1)


async def test_opens_are_batched_too_and_an_unknown_event_records_nothing(
    tmp_path: Path, records: Records
) -> None:
    registry = CollectorRegistry()
    endpoints, _ = _endpoints(tmp_path, records, registry, policy=PERSON)
    keys = endpoints._keys.current
    assert keys is not None
    pixel = f"/o/{keys.sign_open(EVENT)}.gif"
    stranger = f"/o/{keys.sign_open(bytes(16))}.gif"  # valid, but no send has this id
    server = TestServer(make_tracking_app([endpoints.install]))
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            for url in [pixel] * 20 + [stranger] * 5:
                status, _ = await _get(session, str(server.make_url(url)))
                assert status == 200

        async def opened() -> Mapping[Kind, int] | None:
            counts = (await records.counters.totals()).counts["app1"]
            return counts if counts.get(Kind.OPENED) == 20 else None

        counts = await _poll(opened, "20 opens counted")
    finally:
        await server.close()
    assert counts[Kind.UNIQUE_OPENED] == 1
    opens = await records.events.after(0, types=(EventType.OPEN,), limit=100)
    assert len(opens) == 20 and {e.recipient for e in opens} == {"ada@dest.test"}


def test_a_click_verified_once_is_remembered_but_only_by_its_own_ring() -> None:
    """A link clicked again is answered from memory; a tampered twin of it is still refused,
    and a ring without its key (a rotation that retired it) does not know it."""
    ring = TrackingKeys({1: b"1" * 32, 2: b"2" * 32}, current=1)
    token = ring.sign_click(EVENT, 3, TARGET)
    first = ring.click(token)
    assert first is not None and ring.click(token) is first
    assert ring.click(token[:-2] + ("AA" if token[-2:] != "AA" else "BB")) is None
    assert TrackingKeys({2: b"2" * 32}, current=2).click(token) is None
