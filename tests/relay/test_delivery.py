"""Outbound: source address binding, MX routing, retries, expiry and bounces."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from relay.relaykit import DnsServer, Recorder, RelayEnv, Sink, message, wait_for


def _send(env: RelayEnv, recipients: list[str]) -> None:
    with env.client(env.threads[-1]) as smtp:
        smtp.sendmail("app@example.com", recipients, message(1))


@pytest.mark.parametrize("source", ["127.0.0.2", "127.0.0.3"])
def test_bind_address_is_the_source_of_outbound_connections(env: RelayEnv, source: str) -> None:
    settings = env.settings(overrides={"relay": {"delivery": {"bindAddress": source}}})
    env.start(settings)
    _send(env, ["user@dest.test"])
    [captured] = env.sink.wait(1)
    assert captured.client_addr == source


def test_soft_failures_are_retried_then_expire_once(
    env: RelayEnv, sink_factory: Callable[..., Sink]
) -> None:
    failing = sink_factory("-r", "RCPT")  # 450 to every RCPT
    recorder = Recorder()
    settings = env.settings(
        overrides={
            "relay": {"delivery": {"smarthost": {"port": failing.port}}},
            "retry": {"minBackoff": 0.1, "maxBackoff": 0.2, "maxLifetime": 1.0},
        }
    )
    relay = env.start(settings, listeners=[recorder])
    _send(env, ["user@dest.test"])
    outcomes = wait_for(
        lambda: o if "expired" in (o := recorder.outcomes("user@dest.test")) else None,
        what="expiry",
    )
    assert outcomes.count("deferred") >= 2
    assert outcomes[-1] == "expired"
    assert outcomes.count("expired") == 1
    assert (
        relay.metric(
            "txmail_relay_recipient_outcomes_total", {"token": "app1", "outcome": "expired"}
        )
        == 1
    )
    wait_for(lambda: relay.relay is not None and relay.relay.queue.depth() == 0, what="empty")


def test_hard_failures_bounce_once_without_retry(
    env: RelayEnv, sink_factory: Callable[..., Sink]
) -> None:
    refusing = sink_factory("-f", "RCPT")  # 500 to every RCPT
    recorder = Recorder()
    settings = env.settings(
        overrides={"relay": {"delivery": {"smarthost": {"port": refusing.port}}}}
    )
    relay = env.start(settings, listeners=[recorder])
    _send(env, ["user@dest.test"])
    wait_for(lambda: recorder.outcomes("user@dest.test"), what="an outcome")
    wait_for(lambda: relay.relay is not None and relay.relay.queue.depth() == 0, what="empty")
    assert recorder.outcomes("user@dest.test") == ["bounced"]


@pytest.fixture
def dns_server(sink: Sink) -> Iterator[DnsServer]:
    server = DnsServer(
        {
            "dest.test": {"MX": ["20 mx2.dest.test.", "10 mx1.dest.test."]},
            "mx1.dest.test": {"A": ["127.0.0.9"]},  # nothing listens there: next MX
            "mx2.dest.test": {"A": ["127.0.0.1"]},
            "implicit.test": {"A": ["127.0.0.1"]},
            "null.test": {"MX": ["0 ."]},
        }
    )
    yield server
    server.stop()


def test_direct_delivery_follows_mx_preference_and_rfc5321_fallbacks(
    env: RelayEnv, dns_server: DnsServer
) -> None:
    recorder = Recorder()
    settings = env.settings(
        overrides={
            "relay": {
                "delivery": {
                    "mode": "Direct",
                    "resolver": [dns_server.address],
                    "mxPort": env.sink.port,
                    "smarthost": None,
                },
                # No DSNs to the sender (example.com has no mail server in this DNS): the
                # bounces are the subject here (test_dsn.py has the DSNs).
                "dsn": {"notify": "Never"},
            },
            "retry": {"connectTimeout": 2.0},
        }
    )
    relay = env.start(settings, listeners=[recorder])
    recipients = ["a@dest.test", "b@implicit.test", "c@nxdomain.test", "d@null.test"]
    _send(env, recipients)
    captured = env.sink.wait(2)
    assert sorted(r for m in captured for r in m.rcpts) == ["<a@dest.test>", "<b@implicit.test>"]
    wait_for(lambda: relay.relay is not None and relay.relay.queue.depth() == 0, what="empty")
    assert recorder.outcomes("a@dest.test") == ["delivered"]
    assert recorder.outcomes("b@implicit.test") == ["delivered"]
    assert recorder.outcomes("c@nxdomain.test") == ["bounced"]
    assert recorder.outcomes("d@null.test") == ["bounced"]
