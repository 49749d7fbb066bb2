"""Per-destination shaping, the pure parts: MX rollup, rates, the token bucket, the backoff,
and what a destination's attempts do to its pause (delivery/shaping.py)."""

from __future__ import annotations

import asyncio
import logging
import re
from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from txmail_operator.api.dedicatedip import DedicatedIPSpec, DedicatedIPStatus
from txmail_operator.builders.relay_config import relay_config
from txmail_operator.reconcile.shaping import destinations_status
from txmail_relay.config.live import DynamicConfig, LiveConfig
from txmail_relay.contract import (
    OutboundSettings,
    PausedDestination,
    RelayConfig,
    RelayStats,
    RetrySettings,
    ShapingConfig,
    ShapingLimits,
    ShapingPause,
)
from txmail_relay.delivery import shaping
from txmail_relay.delivery.shaping import (
    BUILTIN_SITES,
    Backoff,
    Limits,
    Policy,
    Shaper,
    TokenBucket,
    parse_rate,
)
from txmail_relay.delivery.transport import Destination, SmtpTransport


def policy(**shaping: object) -> Policy:
    return Policy.of(ShapingConfig.model_validate(shaping))


@pytest.mark.parametrize(
    ("hosts", "site"),
    [
        (["gmail-smtp-in.l.google.com", "alt1.gmail-smtp-in.l.google.com"], "gmail"),
        (["aspmx.l.google.com."], "gmail"),  # Google Workspace: the same servers
        (["gmail-smtp-in.l.googlemail.com"], "gmail"),
        (["outlook-com.olc.protection.outlook.com"], "outlook"),
        (["contoso-com.mail.protection.outlook.com"], "office365"),
        (["contoso-com.o-v1.mx.microsoft"], "office365"),
        (["mta5.am0.yahoodns.net", "mta6.am0.yahoodns.net"], "yahoo"),
        (["mx01.mail.icloud.com"], "icloud"),
        (["MX1A1.COMCAST.NET"], "comcast"),  # case does not matter
        (["smtp-in.orange.fr"], "orange"),
    ],
)
def test_the_big_providers_are_rolled_up_by_their_mx_hosts(hosts: list[str], site: str) -> None:
    assert Policy.of(None).site(hosts).name == site


def test_a_domain_matching_no_pattern_is_named_by_its_mx_host_set() -> None:
    rollup = Policy.of(None)
    one = rollup.site(["mx2.example.net", "MX1.example.net."])
    assert one.name == "mx mx1.example.net,mx2.example.net"
    assert rollup.site(["mx1.example.net", "mx2.example.net"]).name == one.name
    assert rollup.site(["mx1.example.net"]).name != one.name
    assert one.limits == Limits()  # the built-in default: nothing beyond the queue's share
    # google.com itself is not *.google.com, and a suffix is not a match
    assert rollup.site(["google.com"]).name == "mx google.com"
    assert rollup.site(["mx.notgoogle.com"]).name == "mx mx.notgoogle.com"


def test_a_destination_named_by_many_mx_hosts_has_a_short_name() -> None:
    """Its name goes into metrics, the stats ConfigMap and the status: past 100 characters
    it is the first host, how many more, and a digest that tells sets apart."""
    rollup = Policy.of(None)
    hosts = [f"mx{i:02}.{'a' * 30}.example.net" for i in range(40)]
    name = rollup.site(hosts).name
    assert len(name) <= 100
    assert name.startswith(f"mx {hosts[0]} +39 ")
    assert rollup.site(list(reversed(hosts))).name == name  # the same set
    assert rollup.site(hosts[:-1]).name != name
    other = [*hosts[:-1], "mx99.other.example.net"]
    assert rollup.site(other).name not in (name, rollup.site(hosts[:-1]).name)
    long_one = "mx." + "b" * 240 + ".example"
    assert len(rollup.site([long_one, "mx2.example.net"]).name) <= 100


def test_every_built_in_destination_has_limits() -> None:
    for site in BUILTIN_SITES:
        assert site.patterns
        assert site.limits.connections is not None
        assert site.limits.rate is not None


def test_overrides_merge_into_a_built_in_destination_and_add_new_ones() -> None:
    rules = policy(
        sites=[
            {"name": "gmail", "connections": 2, "rate": "30/min"},
            {"name": "corp", "mx": ["*.mx.corp.test"], "messagesPerConnection": 3},
        ],
        default={"rate": "5/s"},
    )
    gmail = rules.site(["gmail-smtp-in.l.google.com"])
    assert gmail.limits == Limits(connections=2, messages_per_connection=50, rate=0.5, burst=10)
    corp = rules.site(["a.mx.corp.test"])
    assert corp.name == "corp"
    assert corp.limits == Limits(messages_per_connection=3)
    assert rules.site(["mx.elsewhere.test"]).limits == Limits(rate=5.0)


def test_the_users_patterns_win_over_a_built_in_one() -> None:
    rules = policy(sites=[{"name": "ours", "mx": ["*.google.com"], "connections": 1}])
    assert rules.site(["aspmx.l.google.com"]).name == "ours"


def test_the_smarthost_has_limits_of_its_own() -> None:
    assert Policy.of(None).smarthost == Limits()
    assert policy(sites=[{"name": "smarthost", "connections": 3}]).smarthost == Limits(3)


@pytest.mark.parametrize(
    ("text", "per_second"),
    [("10/s", 10.0), ("30/min", 0.5), ("7200/h", 2.0), ("1.5/s", 1.5), (" 6 / min ", 0.1)],
)
def test_rates(text: str, per_second: float) -> None:
    assert parse_rate(text) == pytest.approx(per_second)


@pytest.mark.parametrize("text", ["10", "10/d", "-1/s", "0/s", "fast", "/s"])
def test_bad_rates(text: str) -> None:
    with pytest.raises(ValueError, match="rate"):
        parse_rate(text)


@pytest.mark.parametrize("rate", ["0/s", "0/min", "0.0/h", "00.000/s"])
def test_a_zero_rate_is_refused_by_the_contract_and_the_spec(rate: str) -> None:
    """A rate of zero would stop a destination for good: neither the relay's contract nor
    the DedicatedIP's schema (the same pattern goes into the CRD) takes it."""
    with pytest.raises(ValidationError, match="rate"):
        ShapingConfig.model_validate({"sites": [{"name": "gmail", "rate": rate}]})
    with pytest.raises(ValidationError, match="rate"):
        ShapingConfig.model_validate({"default": {"rate": rate}})
    with pytest.raises(ValidationError):
        _spec(sites=[{"name": "gmail", "rate": rate}])
    schema = DedicatedIPSpec.model_json_schema(by_alias=True)
    pattern = schema["$defs"]["ShapingLimits"]["properties"]["rate"]["anyOf"][0]["pattern"]
    assert re.fullmatch(pattern, rate) is None
    assert re.fullmatch(pattern, "0.5/s") and re.fullmatch(pattern, "10/min")


async def test_a_configuration_the_shaper_cannot_use_keeps_the_previous_policy(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Should a configuration it cannot use slip past validation, the shaper keeps the
    limits it had (and says so once) instead of failing every delivery."""
    clock = FakeClock()
    shaper = _shaper(clock, sites=[{"name": "gmail", "connections": 2}])
    site = shaper.site("gmail.com", ["gmail-smtp-in.l.google.com"])
    assert site.connection_limit == 2
    store = shaper._store
    assert store.current is not None
    bad = ShapingConfig.model_construct(
        enabled=True,
        default=ShapingLimits.model_construct(rate="0/s"),
        sites=[],
        pause=ShapingPause(),
    )
    store.publish(DynamicConfig(store.current.relay.model_copy(update={"shaping": bad})))
    with caplog.at_level(logging.ERROR, logger="txmail_relay.delivery.shaping"):
        for _ in range(3):
            assert shaper.enabled
            assert shaper.site("gmail.com", ["gmail-smtp-in.l.google.com"]) is site
    assert site.connection_limit == 2
    assert len([r for r in caplog.records if "shaping configuration" in r.message]) == 1
    await asyncio.sleep(0)


def test_the_token_bucket_spends_its_burst_then_spreads() -> None:
    bucket = TokenBucket(rate=2.0, burst=3, now=100.0)
    assert [bucket.take(100.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(100.0) == pytest.approx(0.5)  # none taken: wait half a second
    assert bucket.take(100.25) == pytest.approx(0.25)
    assert bucket.take(100.5) == 0.0
    assert bucket.take(100.5) == pytest.approx(0.5)
    # a long quiet spell saves up no more than the burst
    assert [bucket.take(1000.0) for _ in range(4)][-1] == pytest.approx(0.5)


def test_the_token_bucket_counts_against_its_clock() -> None:
    bucket = TokenBucket(rate=1 / 60, burst=1, now=0.0)  # "1/min"
    sent = 0
    for second in range(0, 600):
        if bucket.take(float(second)) == 0.0:
            sent += 1
    assert sent == 10  # one a minute over ten minutes


def test_the_backoff_doubles_up_to_its_maximum_and_resets() -> None:
    backoff = Backoff(initial=60.0, maximum=3600.0)
    assert [backoff.next() for _ in range(8)] == [60, 120, 240, 480, 960, 1920, 3600, 3600]
    backoff.reset()
    assert backoff.next() == 60


class FakeClock:
    def __init__(self) -> None:
        self.value = 1000.0

    def now(self) -> float:
        return self.value

    async def sleep(self, seconds: float) -> None:
        self.value += seconds


def _shaper(clock: FakeClock, **shaping: object) -> Shaper:
    store = LiveConfig()
    relay = RelayConfig(
        dedicated_ip="ip",
        address="127.0.0.1",
        hostname="relay.test",
        domains=["example.com"],
        shaping=ShapingConfig.model_validate(shaping),
    )
    store.publish(DynamicConfig(relay))
    return Shaper(store, clock=clock)


# (delivered, reply, answered): as SmtpTransport reports an attempt's recipients
OK = (True, "250 2.0.0 ok", True)
BUSY = (False, "451 4.3.2 try later", True)
CLOSING = (False, "421 4.7.0 too many connections from your IP", True)
UNREACHABLE = (False, "451 4.4.1 SMTPConnectError: [Errno 111] Connection refused", False)
TIMED_OUT = (False, "451 4.4.1 SMTPConnectTimeoutError: Timed out connecting", False)


async def test_a_421_pauses_with_a_doubling_backoff_until_a_delivery() -> None:
    clock = FakeClock()
    shaper = _shaper(clock, pause={"initialSeconds": 10, "maxSeconds": 35})
    site = shaper.site("gmail.com", ["gmail-smtp-in.l.google.com"])
    assert shaper.known("gmail.com") is site
    assert shaper.known("googlemail.com") is None  # not looked up yet
    assert shaper.site("googlemail.com", ["gmail-smtp-in.l.googlemail.com"]) is site
    shaper.refused(site, CLOSING[1])  # a 421 to a new connection
    assert shaper.paused_for(site) == 10
    assert shaper.paused_count() == 1
    [shown] = shaper.paused()
    assert (shown.name, shown.reason) == ("gmail", CLOSING[1])
    shaper.refused(site, CLOSING[1])  # an attempt in flight as it was paused: the same pause
    assert shaper.paused_for(site) == 10
    clock.value += 10
    assert shaper.paused_for(site) == 0
    assert site.connection_limit == 1  # probed, one connection at a time
    shaper.record(site, [BUSY])  # the probe fails: paused again, twice as long
    assert shaper.paused_for(site) == 20
    clock.value += 20
    shaper.record(site, [CLOSING])  # a 421 closing the probe's transaction fails it too
    assert shaper.paused_for(site) == 35  # at most maxSeconds
    clock.value += 35
    shaper.record(site, [OK])
    assert site.connection_limit == 5  # gmail's limit again
    shaper.refused(site, CLOSING[1])
    assert shaper.paused_for(site) == 10  # the backoff starts over
    shaper.record(site, [OK])  # another of its servers took mail: the pause ends
    assert shaper.paused_for(site) == 0
    await asyncio.sleep(0)


async def test_a_probe_answered_5xx_ends_the_probing() -> None:
    """A destination that answers only 5xx after a pause is answering, not refusing: it is
    not held to one connection for good (a 5xx while the pause lasts changes nothing)."""
    clock = FakeClock()
    shaper = _shaper(clock, sites=[{"name": "corp", "mx": ["*.corp.test"], "connections": 4}])
    site = shaper.site("corp.test", ["mx.corp.test"])
    shaper.refused(site, CLOSING[1])
    rejected = (False, "550 5.7.1 rejected by policy", True)
    shaper.record(site, [rejected])  # in flight as it was paused
    assert shaper.paused_for(site) == 60
    clock.value += 60
    assert site.connection_limit == 1
    shaper.record(site, [rejected])  # the probe's answer
    assert site.connection_limit == 4
    shaper.refused(site, CLOSING[1])
    assert shaper.paused_for(site) == 60  # the backoff started over
    await asyncio.sleep(0)


async def test_a_421_closing_a_transaction_counts_as_a_4xx() -> None:
    shaper = _shaper(FakeClock(), pause={"afterFailures": 2})
    site = shaper.site("corp.test", ["mx.corp.test"])
    shaper.record(site, [CLOSING])
    assert shaper.paused_for(site) == 0
    shaper.record(site, [CLOSING])
    assert shaper.paused_for(site) == 60
    await asyncio.sleep(0)


async def test_many_4xx_in_a_row_pause_and_an_answer_resets_the_count() -> None:
    clock = FakeClock()
    shaper = _shaper(clock, pause={"afterFailures": 3})
    site = shaper.site("corp.test", ["mx.corp.test"])
    shaper.record(site, [BUSY])
    shaper.record(site, [BUSY, BUSY])
    shaper.record(site, [(False, "550 5.1.1 no such user", True)])  # it answers: not failing
    shaper.record(site, [BUSY])
    shaper.record(site, [BUSY])
    assert shaper.paused_for(site) == 0
    shaper.record(site, [BUSY])
    assert shaper.paused_for(site) == 60  # the default initial pause
    await asyncio.sleep(0)


async def test_connections_that_fail_neither_pause_nor_count_nor_reset() -> None:
    """Refused, timed out, TLS failure, lost: no answer, so no pause (the queue's retry
    schedule and probe handle a dead server); the 4xx streak around them goes on."""
    clock = FakeClock()
    shaper = _shaper(clock, pause={"afterFailures": 3})
    site = shaper.site("corp.test", ["mx.corp.test"])
    for _ in range(20):
        shaper.record(site, [UNREACHABLE])
        shaper.record(site, [TIMED_OUT, TIMED_OUT])
    assert shaper.paused_for(site) == 0
    assert site.connection_limit is None  # not probed either: the queue's own schedule
    shaper.record(site, [BUSY])
    shaper.record(site, [UNREACHABLE])
    shaper.record(site, [BUSY])
    shaper.record(site, [UNREACHABLE])
    assert shaper.paused_for(site) == 0
    shaper.record(site, [BUSY])  # the third 4xx answer in a row
    assert shaper.paused_for(site) == 60
    assert shaper.paused()[0].reason == BUSY[1]
    clock.value += 60
    shaper.record(site, [UNREACHABLE])  # a probe without an answer: not paused again
    assert shaper.paused_for(site) == 0
    assert site.connection_limit == 1  # still probed, one connection at a time
    shaper.record(site, [OK])
    assert site.connection_limit is None
    await asyncio.sleep(0)


async def test_the_destination_map_forgets_failing_ones_nobody_uses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """At its cap the map drops idle destinations, and failing or probed ones unused for
    longer than the longest pause and retry backoff (their mail is delivered or expired);
    ones in use, paused or failing lately stay."""
    monkeypatch.setattr(shaping, "SITE_CACHE_SIZE", 5)
    clock = FakeClock()
    shaper = _shaper(clock, pause={"maxSeconds": 100, "afterFailures": 5})
    shaper.max_backoff = 50
    failing = shaper.site("fail.test", ["mx.fail.test"])
    shaper.record(failing, [BUSY])  # one 4xx: a streak to remember
    probed = shaper.site("probed.test", ["mx.probed.test"])
    shaper.refused(probed, CLOSING[1])
    clock.value += 100  # the pause is over: probed, one connection at a time
    busy = shaper.site("busy.test", ["mx.busy.test"])
    shaper.opened(busy)
    shaper.site("idle.test", ["mx.idle.test"])
    recent = shaper.site("recent.test", ["mx.recent.test"])
    shaper.record(recent, [BUSY])
    clock.value += 51  # failing and probed unused for 151 s, longer than 100 + 50 s
    shaper.site("new.test", ["mx.new.test"])  # at the cap (5): the map is swept
    assert shaper.known("fail.test") is None
    assert shaper.known("probed.test") is None
    assert shaper.known("idle.test") is None
    assert shaper.known("busy.test") is busy  # a connection open
    assert shaper.known("recent.test") is recent  # failing, but used lately
    assert shaper.known("new.test") is not None
    await asyncio.sleep(0)


async def test_throttle_waits_on_the_injected_clock() -> None:
    clock = FakeClock()
    shaper = _shaper(clock, sites=[{"name": "corp", "mx": ["*.corp.test"], "rate": "6/min"}])
    site = shaper.site("corp.test", ["mx.corp.test"])
    start = clock.value
    for _ in range(4):
        await shaper.throttle(site)
    assert clock.value - start == pytest.approx(30.0)  # burst 1, then one every 10 s


async def test_shaping_off_leaves_the_queue_as_it_was() -> None:
    """enabled: false: each domain is scheduled on its own with the relay's share (a quarter
    of 8 workers), whatever the shaper knows: no connection limit, no pause. Turned on, the
    same domains are one destination within its limit, paused."""
    clock = FakeClock()
    shaper = _shaper(clock, enabled=False, sites=[{"name": "gmail", "connections": 1}])
    transport = SmtpTransport(
        shaper._store, RetrySettings(), OutboundSettings(concurrency=8), shaper=shaper
    )
    site = shaper.site("gmail.com", ["gmail-smtp-in.l.google.com"])  # as a lookup tells
    shaper.site("googlemail.com", ["gmail-smtp-in.l.googlemail.com"])
    shaper.refused(site, CLOSING[1])
    off = [transport.destination(r) for r in ("a@gmail.com", "b@googlemail.com")]
    assert off == [Destination("domain gmail.com", 2), Destination("domain googlemail.com", 2)]
    assert [d.delay for d in off] == [0.0, 0.0]
    store = shaper._store
    assert store.current is not None
    on = store.current.relay.shaping.model_copy(update={"enabled": True})
    store.publish(DynamicConfig(store.current.relay.model_copy(update={"shaping": on})))
    shaped = [transport.destination(r) for r in ("a@gmail.com", "b@googlemail.com")]
    assert shaped == [Destination("site gmail", 1)] * 2
    assert [d.delay for d in shaped] == [60.0, 60.0]
    await transport.close()


# -- the operator's side: spec.shaping -> RelayConfig.shaping, status.destinations -----------


def _spec(**shaping: object) -> DedicatedIPSpec:
    return DedicatedIPSpec.model_validate(
        {
            "address": "192.0.2.10",
            "hostname": "mta1.example.com",
            "domains": ["example.com"],
            **({"shaping": shaping} if shaping else {}),
        }
    )


def test_spec_shaping_reaches_the_relay_config_and_its_policy() -> None:
    spec = _spec(
        sites=[
            {"name": "gmail", "connections": 2, "rate": "30/min"},
            {"name": "corp", "mx": ["*.mx.corp.example"], "messagesPerConnection": 10},
        ],
        default={"rate": "5/s", "burst": 5},
        pause={"initialSeconds": 30, "afterFailures": 3},
    )
    config = relay_config("demo", spec)
    # The document the relay reads, parsed back as the relay does.
    shaping = RelayConfig.model_validate_json(config.to_json()).shaping
    rules = Policy.of(shaping)
    assert rules.site(["aspmx.l.google.com"]).limits == Limits(2, 50, 0.5, 10)
    assert rules.site(["a.mx.corp.example"]).limits == Limits(messages_per_connection=10)
    assert rules.site(["mx.small.example"]).limits == Limits(rate=5.0, burst=5)
    assert (rules.pause.initial_seconds, rules.pause.after_failures) == (30, 3)
    assert rules.pause.max_seconds == 3600  # unset: the relay's default


def test_without_spec_shaping_the_relay_keeps_its_defaults() -> None:
    shaping = relay_config("demo", _spec()).shaping
    assert shaping == ShapingConfig()
    assert Policy.of(shaping).sites == BUILTIN_SITES


@pytest.mark.parametrize(
    "bad",
    [
        {"sites": [{"name": "gmail", "rate": "10 per second"}]},
        {"sites": [{"name": "Gmail"}]},
        {"sites": [{"name": "x", "mx": ["bad pattern"]}]},
        {"sites": [{"name": "x", "connections": 0}]},
        {"pause": {"initialSeconds": 0}},
        {"default": {"unknown": 1}},
    ],
)
def test_spec_shaping_is_validated(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        _spec(**bad)


def test_paused_destinations_are_shown_in_the_status() -> None:
    until = datetime(2026, 12, 1, 18, 30, tzinfo=UTC)
    report = RelayStats(
        updated_at=until,
        destinations=[PausedDestination(name="gmail", until=until, reason="421 4.7.0 later")],
    )
    shown = destinations_status(report)
    assert shown == [
        {"name": "gmail", "until": "2026-12-01T18:30:00Z", "reason": "421 4.7.0 later"}
    ]
    # the API model takes what the operator writes
    assert DedicatedIPStatus.model_validate({"destinations": shown}).destinations
    assert destinations_status(RelayStats(updated_at=until)) is None  # none: field removed
