"""Machine opens and clicks through the real tracking listener, with a real HTTP client.

Scanners and prefetchers get the same answers as people (a redirect, the pixel); their hits
are events with ``filteredEvent`` and count as machineOpens/machineClicks, never as opens,
clicks or their uniques.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping
from typing import Any

import aiohttp
import pytest

from relay.relaykit import (
    RelayEnv,
    RelayThread,
    bearer,
    credential,
    http,
    parsed,
    template_doc,
    tracking_keys_file,
    wait_for,
    wait_token_stats,
)
from txmail_relay.http.api import SEND_PATH
from txmail_relay.records.model import Event, EventType
from txmail_relay.tracking.tokens import TRANSPARENT_GIF

EMAIL = 21
BASE = "https://t.example.com"
LINK = re.compile(r"https://t\.example\.com(/[co]/[A-Za-z0-9_-]+(?:\.gif)?)")
TARGETS = ["https://shop.example.com/a", "https://shop.example.com/b", "https://shop.example.com/c"]
HTML = "<p>Hi</p>" + "".join(
    f'<p><a href="{url}">link {i}</a></p>' for i, url in enumerate(TARGETS)
)
CHROME = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko)"
    " Chrome/131.0.0.0 Safari/537.36"
)
BING = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko)"
    " BingPreview/1.0b"
)
GMAIL_PROXY = (
    "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)"
)


def _start(env: RelayEnv, **tracking: Any) -> RelayThread:
    keys = tracking_keys_file(env.directory, 1)
    settings = env.settings(
        credentials=[credential(env.username, env.password)],
        overrides={
            "relay": {"tracking": {"baseURL": BASE}},
            "templates": [
                template_doc(
                    EMAIL, track=True, html=HTML, subject="Hi", text="Hi\nEND-OF-MESSAGE\n"
                )
            ],
            "trackingKeysFile": str(keys),
            "statsFile": "stats.json",
            "statsInterval": 0.1,
            "tracking": tracking,
        },
    )
    return env.start(settings)


@pytest.fixture
def relay(env: RelayEnv) -> RelayThread:
    return _start(env)


def _send(env: RelayEnv, relay: RelayThread, to: str) -> tuple[str, list[str]]:
    """Send one tracked message to ``to`` (one message per recipient in a test); its pixel
    path and its click paths in order."""
    doc = {"emailId": EMAIL, "message": {"to": to}}
    reply = http(relay.api_port, "POST", SEND_PATH, body=doc, headers=bearer(env.password))
    assert reply.status == 200, reply.body
    captured = wait_for(
        lambda: next((m for m in env.sink.messages() if m.rcpts == [f"<{to}>"]), None),
        15,
        f"the message to {to}",
    )
    paths = LINK.findall(parsed(captured).get_body(("html",)).get_content())
    pixel = next(p for p in paths if p.endswith(".gif"))
    return pixel, [p for p in paths if p.startswith("/c/")]


async def _fetch(
    port: int,
    requests: list[tuple[str, str, str | None]],
) -> list[tuple[int, Mapping[str, str], bytes]]:
    """(method, path, user agent or None for none at all) each, one after the other."""
    answers: list[tuple[int, Mapping[str, str], bytes]] = []
    async with aiohttp.ClientSession() as session:
        for method, path, agent in requests:
            headers = {} if agent is None else {"User-Agent": agent}
            skip = ["User-Agent"] if agent is None else []
            async with session.request(
                method,
                f"http://127.0.0.1:{port}{path}",
                headers=headers,
                skip_auto_headers=skip,
                allow_redirects=False,
            ) as response:
                answers.append((response.status, dict(response.headers), await response.read()))
    return answers


def fetch(
    relay: RelayThread, *requests: tuple[str, str, str | None]
) -> list[tuple[int, Mapping[str, str], bytes]]:
    return asyncio.run(_fetch(relay.tracking_port, list(requests)))


def engagement_events(relay: RelayThread) -> list[Event]:
    assert relay.relay is not None and relay._loop is not None
    future = asyncio.run_coroutine_threadsafe(
        relay.relay.records.events.after(0, types=(EventType.OPEN, EventType.CLICK), limit=1000),
        relay._loop,
    )
    return future.result(10)


def _machine_metric(relay: RelayThread, kind: str, rule: str) -> float:
    return relay.metric("txmail_relay_tracking_machine_total", {"kind": kind, "rule": rule})


def test_a_scanner_click_redirects_and_is_flagged_a_persons_counts(
    env: RelayEnv, relay: RelayThread
) -> None:
    _, clicks = _send(env, relay, "ada@dest.test")
    [(status, headers, _)] = fetch(relay, ("GET", clicks[0], BING))
    assert status == 302 and headers["Location"] == TARGETS[0]
    stats = wait_token_stats(env, machineClicks=1)
    assert (stats["clicks"], stats["uniqueClicks"], stats["clickRate"]) == (0, 0, 0.0)
    assert _machine_metric(relay, "click", "user-agent") == 1

    [(status, headers, _)] = fetch(relay, ("GET", clicks[0], CHROME))
    assert status == 302 and headers["Location"] == TARGETS[0]
    stats = wait_token_stats(env, clicks=1, uniqueClicks=1, machineClicks=1)
    assert stats["clickRate"] == 1.0

    def both() -> list[Event] | None:
        found = [e for e in engagement_events(relay) if e.type is EventType.CLICK]
        return found if len(found) == 2 else None

    scanner, person = wait_for(both, what="two click events")
    assert scanner.view()["filteredEvent"] is True and person.view()["filteredEvent"] is False
    assert scanner.view()["userAgent"] == BING and person.view()["userAgent"] == CHROME
    assert scanner.view()["url"] == person.view()["url"] == TARGETS[0]
    assert scanner.recipient == person.recipient == "ada@dest.test"


def test_head_requests_are_answered_and_flagged(env: RelayEnv, relay: RelayThread) -> None:
    pixel, clicks = _send(env, relay, "ada@dest.test")
    (open_status, open_headers, body), (click_status, click_headers, _) = fetch(
        relay, ("HEAD", pixel, CHROME), ("HEAD", clicks[1], CHROME)
    )
    assert open_status == 200 and open_headers["Content-Type"] == "image/gif" and body == b""
    assert click_status == 302 and click_headers["Location"] == TARGETS[1]
    stats = wait_token_stats(env, machineOpens=1, machineClicks=1)
    assert _machine_metric(relay, "open", "head") == _machine_metric(relay, "click", "head") == 1
    assert (stats["opens"], stats["uniqueOpens"], stats["clicks"], stats["uniqueClicks"]) == (
        0,
        0,
        0,
        0,
    )


def test_opens_mpp_is_a_machine_gmail_proxy_a_person(env: RelayEnv, relay: RelayThread) -> None:
    pixel, _ = _send(env, relay, "ada@dest.test")
    answers = fetch(relay, ("GET", pixel, "Mozilla/5.0"), ("GET", pixel, GMAIL_PROXY))
    assert [(status, body) for status, _, body in answers] == [(200, TRANSPARENT_GIF)] * 2
    stats = wait_token_stats(env, machineOpens=1, opens=1, uniqueOpens=1)
    assert stats["openRate"] == 1.0


def test_a_click_without_a_user_agent_is_flagged(env: RelayEnv, relay: RelayThread) -> None:
    _, clicks = _send(env, relay, "ada@dest.test")
    [(status, headers, _)] = fetch(relay, ("GET", clicks[2], None))
    assert status == 302 and headers["Location"] == TARGETS[2]
    stats = wait_token_stats(env, machineClicks=1)
    assert stats["clicks"] == 0


def test_every_link_of_a_message_clicked_at_once_is_a_burst_of_machine_clicks(
    env: RelayEnv, relay: RelayThread
) -> None:
    """A scanner with a browser's user agent clicks all three links within a second: all
    three are machine clicks, the first one included. Another recipient's click is not."""
    _, clicks = _send(env, relay, "ada@dest.test")
    _, other = _send(env, relay, "bob@dest.test")
    answers = fetch(relay, *(("GET", path, CHROME) for path in [*clicks, other[0]]))
    assert [(s, h["Location"]) for s, h, _ in answers] == [
        (302, url) for url in [*TARGETS, TARGETS[0]]
    ]
    stats = wait_token_stats(env, machineClicks=3, clicks=1)
    assert stats["uniqueClicks"] == 1
    assert _machine_metric(relay, "click", "burst") == 3


def test_a_click_right_after_delivery_is_flagged(env: RelayEnv) -> None:
    """With the timing rule on (settings tracking.machineClickWindow), a click seconds after
    the message was delivered is a gateway's."""
    relay = _start(env, machineClickWindow=60)
    _, clicks = _send(env, relay, "ada@dest.test")
    [(status, _, _)] = fetch(relay, ("GET", clicks[0], CHROME))
    assert status == 302
    stats = wait_token_stats(env, machineClicks=1)
    assert stats["clicks"] == 0


def test_a_click_waiting_for_its_burst_window_is_recorded_when_the_relay_stops(
    env: RelayEnv, relay: RelayThread
) -> None:
    _, clicks = _send(env, relay, "ada@dest.test")
    [(status, _, _)] = fetch(relay, ("GET", clicks[0], CHROME))
    assert status == 302
    relay.stop()
    env.threads.remove(relay)
    again = env.start(relay.settings_path)
    wait_token_stats(env, clicks=1, uniqueClicks=1, machineClicks=0)
    [click] = engagement_events(again)
    assert click.view()["filteredEvent"] is False
