"""The machine-engagement classifier (tracking/machine.py): who is a scanner, who a person."""

from __future__ import annotations

import pytest

from txmail_relay.tracking.machine import (
    MPP_USER_AGENT,
    SCANNERS,
    Hit,
    HitKind,
    Policy,
    classify,
    scanner,
)

NOW = 1_800_000_000.0
CHROME = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko)"
    " Chrome/131.0.0.0 Safari/537.36"
)
APPLE_MAIL = (
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko)"
)
GMAIL_PROXY = (
    "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)"
)
YAHOO_PROXY = "YahooMailProxy; https://help.yahoo.com/kb/yahoo-mail-proxy-SLN28749.html"
OUTLOOK = "Microsoft Office/16.0 (Windows NT 10.0; Microsoft Outlook 16.0.17928; Pro)"
BING = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko)"
    " BingPreview/1.0b"
)
SCANNER_AGENTS = {
    BING: "BingPreview",
    "Mozilla/5.0 AppleWebKit/537.36 (KHTML, like Gecko; compatible; MicrosoftPreview/2.0;"
    " +https://aka.ms/MicrosoftPreview) Chrome/120.0 Safari/537.36": "MicrosoftPreview",
    "Mozilla/5.0 (compatible; Barracuda Link Protection)": "Barracuda",
    "proofpoint-urldefense/1.0": "Proofpoint",
    "Mimecast URL Protect": "Mimecast",
    "CiscoSecureEmail/14.2": "Cisco Secure Email",
    "Mozilla/5.0 (compatible; TMES/2.0)": "Trend Micro",
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko)"
    " HeadlessChrome/120.0.0.0 Safari/537.36": "HeadlessChrome",
}


def click(
    agent: str | None = CHROME, *, method: str = "GET", delivered_at: float | None = None
) -> Hit:
    return Hit(HitKind.CLICK, method, agent, NOW, delivered_at)


def open_(agent: str | None = CHROME, method: str = "GET") -> Hit:
    return Hit(HitKind.OPEN, method, agent, NOW)


@pytest.mark.parametrize(("agent", "name"), SCANNER_AGENTS.items())
def test_scanner_user_agents_are_machines_on_opens_and_clicks(agent: str, name: str) -> None:
    assert scanner(agent) == name
    for hit in (click(agent), open_(agent)):
        verdict = classify(hit)
        assert verdict.machine and verdict.reason == f"user agent: {name}"
        assert verdict.rule == "user-agent"


def test_every_scanner_entry_says_where_it_comes_from() -> None:
    assert all(source for _, _, source in SCANNERS)


@pytest.mark.parametrize("agent", [CHROME, APPLE_MAIL, GMAIL_PROXY, YAHOO_PROXY, OUTLOOK])
def test_people_and_proxies_that_fetch_on_their_behalf_count(agent: str) -> None:
    assert classify(open_(agent)).machine is False
    assert classify(click(agent)).machine is False


def test_a_short_token_only_matches_as_a_word() -> None:
    """'TMES' inside another word (a product name, 'Times') is not Trend Micro."""
    assert scanner("Mozilla/5.0 (compatible; NYTimesReader/3.1)") is None
    assert classify(click("Mozilla/5.0 (compatible; NYTimesReader/3.1)")).machine is False


def test_apple_mail_privacy_protection_opens_are_machine_opens() -> None:
    verdict = classify(open_(MPP_USER_AGENT))
    assert verdict.machine and verdict.reason == "Apple Mail Privacy Protection"
    # Apple Mail loading images on the device itself sends its full user agent.
    assert classify(open_(APPLE_MAIL)).machine is False


def test_head_requests_are_machines() -> None:
    assert classify(click(method="HEAD")).reason == "HEAD request"
    assert classify(open_(method="HEAD")).reason == "HEAD request"


@pytest.mark.parametrize("agent", [None, "", "   "])
def test_a_click_without_a_user_agent_is_a_machine_an_open_is_not(agent: str | None) -> None:
    assert classify(click(agent)).reason == "no user agent"
    assert classify(open_(agent)).machine is False


def test_a_click_right_after_delivery_is_a_machine() -> None:
    policy = Policy(click_window=2.0)
    soon = classify(click(delivered_at=NOW - 1.5), policy)
    assert soon.machine and soon.reason == "clicked within seconds of delivery"
    # A gateway scanning before it answered the delivery: the click precedes it.
    assert classify(click(delivered_at=NOW + 0.5), policy).machine
    assert classify(click(delivered_at=NOW - 2.0), policy).machine is False
    assert classify(click(delivered_at=NOW - 3600), policy).machine is False
    assert classify(click(delivered_at=None), policy).machine is False  # unknown message
    assert classify(click(delivered_at=NOW - 0.1), Policy(click_window=0)).machine is False


def test_opens_right_after_delivery_count() -> None:
    """A person's client may well load images as the message arrives: no timing rule."""
    hit = Hit(HitKind.OPEN, "GET", CHROME, NOW, delivered_at=NOW - 0.1)
    assert classify(hit, Policy(click_window=2.0)).machine is False


def test_several_links_clicked_in_the_same_second_are_machines() -> None:
    policy = Policy(burst_window=1.0, burst_links=3)
    # Three different links within a second: each of them, the first one included.
    burst = [(NOW, 0), (NOW + 0.2, 1), (NOW + 0.9, 2)]
    for at, link in burst:
        others = [c for c in burst if c != (at, link)]
        hit = Hit(HitKind.CLICK, "GET", CHROME, at, link=link, nearby=others)
        verdict = classify(hit, policy)
        assert verdict.machine and verdict.reason == "several links clicked at once"
        assert verdict.rule == "burst"


def test_two_links_or_one_link_again_or_slower_clicks_are_a_persons() -> None:
    policy = Policy(burst_window=1.0, burst_links=3)
    two = Hit(HitKind.CLICK, "GET", CHROME, NOW, link=0, nearby=[(NOW + 0.3, 1)])
    assert classify(two, policy).machine is False  # middle-clicking two links into tabs
    again = [(NOW + 0.1, 0), (NOW + 0.2, 0), (NOW + 0.3, 1)]
    same = Hit(HitKind.CLICK, "GET", CHROME, NOW, link=0, nearby=again)
    assert classify(same, policy).machine is False  # a double click is one link
    slow = [(NOW + 0.8, 1), (NOW + 1.6, 2)]
    spread = Hit(HitKind.CLICK, "GET", CHROME, NOW, link=0, nearby=slow)
    assert classify(spread, policy).machine is False  # three links over 1.6 s
    # ... though the middle one of a sliding second can complete a burst on either side.
    middle = Hit(HitKind.CLICK, "GET", CHROME, NOW + 0.8, link=1, nearby=[(NOW, 0), (NOW + 0.9, 2)])
    assert classify(middle, policy).machine


def test_the_verdict_is_the_first_rule_that_holds() -> None:
    hit = Hit(HitKind.CLICK, "HEAD", BING, NOW, delivered_at=NOW)
    assert classify(hit, Policy(click_window=2.0)).reason == "HEAD request"


def test_odd_values_do_not_raise() -> None:
    for agent in ("\x00\udcff", "é" * 10_000, "BingPreview" * 1000, "\r\n"):
        classify(click(agent))
        classify(open_(agent))
    classify(Hit(HitKind.CLICK, "", None, float("nan"), float("inf"), -1, [(float("nan"), 0)]))
