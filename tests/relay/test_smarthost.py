"""Smarthost delivery against a real upstream that speaks TLS and AUTH (aiosmtpd, upstream.py).

End to end: a client submits to a relay (in a thread), the relay delivers to the upstream
with STARTTLS or implicit TLS, verifying its certificate, and logs in with the credentials
in ``credentialsDir``. Pooled connections are reused, and replaced after a 421 or a drop.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from peers import make_authority
from relay.relaykit import Recorder, RelayEnv, RelayThread, TLSFiles, message, wait_for
from relay.upstream import Upstream

USERNAME = "relay-user"
PASSWORD = "S3cret-relay-password-1f6c"


@pytest.fixture
def upstreams(tls_files: TLSFiles) -> Iterator[Callable[..., Upstream]]:
    started: list[Upstream] = []

    def start(mode: str, authority: TLSFiles | None = None) -> Upstream:
        files = authority or tls_files
        upstream = Upstream(
            mode,
            cert_file=files.cert_file,
            key_file=files.key_file,
            username=USERNAME,
            password=PASSWORD,
        )
        started.append(upstream)
        return upstream

    yield start
    for upstream in started:
        upstream.stop()


@pytest.fixture
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    return make_authority(tmp_path_factory.mktemp("other-ca"), "unrelated")


def credentials_dir(directory: Path, password: str = PASSWORD) -> Path:
    """A mounted Secret: one file per key."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "username").write_text(USERNAME + "\n")
    (directory / "password").write_text(password + "\n")
    return directory


def start_relay(
    env: RelayEnv,
    upstream: Upstream,
    tls: str,
    *,
    creds: Path,
    ca_file: Path | None,
    recorder: Recorder,
    outbound: dict[str, Any] | None = None,
) -> RelayThread:
    smarthost = {
        "host": "127.0.0.1",
        "port": upstream.port,
        "tls": tls,
        "verifyTLS": True,
        "credentialsDir": str(creds),
    }
    settings = env.settings(
        overrides={
            "relay": {"delivery": {"smarthost": smarthost}},
            "outbound": {"caFile": str(ca_file) if ca_file else None, **(outbound or {})},
        }
    )
    return env.start(settings, listeners=[recorder])


def submit(env: RelayEnv, relay: RelayThread, seq: int | str, rcpt: str = "user@dest.test") -> None:
    with env.client(relay) as smtp:
        smtp.sendmail("app@example.com", [rcpt], message(seq))


def copies(upstream: Upstream, seq: int | str) -> int:
    marker = f"END-OF-MESSAGE {seq}\r\n".encode()
    return sum(marker in r.content for r in upstream.received())


def arrived(upstream: Upstream, seq: int | str) -> bool:
    return copies(upstream, seq) > 0


# -- TLS and AUTH ----------------------------------------------------------------------------


@pytest.mark.parametrize("tls", ["StartTLS", "Implicit"])
def test_tls_and_auth_with_credentials_from_files(
    env: RelayEnv,
    upstreams: Callable[..., Upstream],
    tls_files: TLSFiles,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    tls: str,
) -> None:
    caplog.set_level(logging.DEBUG)
    upstream = upstreams("starttls" if tls == "StartTLS" else "implicit")
    recorder = Recorder()
    relay = start_relay(
        env,
        upstream,
        tls,
        creds=credentials_dir(tmp_path / "creds"),
        ca_file=tls_files.ca_file,
        recorder=recorder,
    )
    submit(env, relay, 1)
    wait_for(lambda: arrived(upstream, 1), what="the message upstream")
    [received] = upstream.received()
    assert received.tls
    assert received.login == USERNAME
    assert received.mail_from == "app@example.com"
    assert received.rcpts == ["user@dest.test"]
    # One AUTH, with the files' content (whitespace stripped), over TLS.
    assert upstream.auth_attempts() == [(USERNAME, PASSWORD, True)]
    wait_for(lambda: recorder.outcomes("user@dest.test") == ["delivered"], what="delivered")

    records = list(caplog.records)
    assert any(r.name.startswith("txmail_relay") for r in records)
    logged = "\n".join(f"{r.getMessage()} {vars(r)!r}" for r in records)
    for secret in (
        PASSWORD,
        base64.b64encode(PASSWORD.encode()).decode(),
        base64.b64encode(f"\0{USERNAME}\0{PASSWORD}".encode()).decode(),
    ):
        assert secret not in logged


# -- certificate verification ----------------------------------------------------------------


def _deferrals(recorder: Recorder, at_least: int) -> None:
    wait_for(
        lambda: recorder.outcomes("user@dest.test").count("deferred") >= at_least,
        what=f"{at_least} deferrals",
    )


def _nothing_in_the_clear(upstream: Upstream) -> None:
    assert upstream.received() == []
    assert upstream.auth_attempts() == []
    assert upstream.mail_commands() == 0


@pytest.mark.parametrize("tls", ["StartTLS", "Implicit"])
def test_unknown_ca_defers_and_sends_nothing_until_the_ca_is_supplied(
    env: RelayEnv,
    upstreams: Callable[..., Upstream],
    tls_files: TLSFiles,
    other_ca: TLSFiles,
    tmp_path: Path,
    tls: str,
) -> None:
    upstream = upstreams("starttls" if tls == "StartTLS" else "implicit")
    creds = credentials_dir(tmp_path / "creds")
    # The system's trust store only, then an unrelated CA: no attempt gets past TLS.
    for ca_file in (None, other_ca.ca_file):
        recorder = Recorder()
        relay = start_relay(env, upstream, tls, creds=creds, ca_file=ca_file, recorder=recorder)
        if ca_file is None:
            submit(env, relay, 1)
        _deferrals(recorder, 2)  # retried, still deferred
        relay.stop()
        assert "delivered" not in recorder.outcomes("user@dest.test")
        assert all("certificate verify failed" in e.reply for e in recorder.events)
        _nothing_in_the_clear(upstream)
    # The right CA (outbound.caFile): the spooled message goes out, once.
    recorder = Recorder()
    start_relay(env, upstream, tls, creds=creds, ca_file=tls_files.ca_file, recorder=recorder)
    wait_for(lambda: recorder.outcomes("user@dest.test") == ["delivered"], what="delivered")
    assert copies(upstream, 1) == 1
    assert upstream.received()[0].tls


def test_starttls_not_offered_is_not_a_reason_to_send_in_the_clear(
    env: RelayEnv, upstreams: Callable[..., Upstream], tls_files: TLSFiles, tmp_path: Path
) -> None:
    upstream = upstreams("plain")  # no STARTTLS in EHLO (and so no AUTH either)
    recorder = Recorder()
    relay = start_relay(
        env,
        upstream,
        "StartTLS",
        creds=credentials_dir(tmp_path / "creds"),
        ca_file=tls_files.ca_file,
        recorder=recorder,
    )
    submit(env, relay, 1)
    _deferrals(recorder, 2)
    assert upstream.peers()
    _nothing_in_the_clear(upstream)


def test_outbound_ca_file_adds_to_the_system_trust_store(
    env: RelayEnv,
    upstreams: Callable[..., Upstream],
    tls_files: TLSFiles,
    other_ca: TLSFiles,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The upstream's CA stands in for a public one: it is the (OpenSSL) default trust store.
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_files.ca_file))
    upstream = upstreams("starttls")
    recorder = Recorder()
    relay = start_relay(
        env,
        upstream,
        "StartTLS",
        creds=credentials_dir(tmp_path / "creds"),
        ca_file=other_ca.ca_file,  # an extra CA must not replace the default ones
        recorder=recorder,
    )
    submit(env, relay, 1)
    wait_for(lambda: recorder.outcomes("user@dest.test") == ["delivered"], what="delivered")


# -- AUTH failure ----------------------------------------------------------------------------


def test_wrong_upstream_password_defers_until_the_secret_is_fixed(
    env: RelayEnv, upstreams: Callable[..., Upstream], tls_files: TLSFiles, tmp_path: Path
) -> None:
    upstream = upstreams("starttls")
    creds = credentials_dir(tmp_path / "creds", password="wrong-password")
    recorder = Recorder()
    relay = start_relay(
        env, upstream, "StartTLS", creds=creds, ca_file=tls_files.ca_file, recorder=recorder
    )
    submit(env, relay, 1)
    _deferrals(recorder, 2)  # 535 is our configuration problem: retried, never bounced
    deferred = [e for e in recorder.events if e.recipient == "user@dest.test"]
    assert deferred[0].reply.startswith("535")
    assert set(recorder.outcomes("user@dest.test")) == {"deferred"}
    assert not any("wrong-password" in e.reply for e in recorder.events)
    assert upstream.received() == []
    assert {(login, tls) for login, _, tls in upstream.auth_attempts()} == {(USERNAME, True)}
    # The Secret is rotated (files rewritten in place): the next attempt uses it.
    credentials_dir(creds)
    wait_for(lambda: "delivered" in recorder.outcomes("user@dest.test"), what="delivered")
    assert recorder.outcomes("user@dest.test").count("delivered") == 1
    assert copies(upstream, 1) == 1


# -- the connection pool ---------------------------------------------------------------------


def test_connections_are_reused_and_replaced_after_421_or_a_drop(
    env: RelayEnv, upstreams: Callable[..., Upstream], tls_files: TLSFiles, tmp_path: Path
) -> None:
    upstream = upstreams("starttls")
    recorder = Recorder()
    relay = start_relay(
        env,
        upstream,
        "StartTLS",
        creds=credentials_dir(tmp_path / "creds"),
        ca_file=tls_files.ca_file,
        recorder=recorder,
    )

    def outcomes(seq: int) -> list[str]:
        return recorder.outcomes(f"user{seq}@dest.test")

    def send(seq: int) -> None:
        submit(env, relay, seq, rcpt=f"user{seq}@dest.test")
        wait_for(lambda: "delivered" in outcomes(seq), what=f"message {seq} delivered")

    # One at a time: four messages, one connection, one AUTH.
    for seq in range(1, 5):
        send(seq)
    first = {r.peer for r in upstream.received()}
    assert len(first) == 1
    assert len(upstream.peers()) == 1
    assert len(upstream.auth_attempts()) == 1

    # 421 after the final dot (the server is going away): not delivered there; deferred,
    # then delivered over a new connection.
    upstream.fail_next("DATA", "421 4.3.2 shutting down")
    send(5)
    assert outcomes(5) == ["deferred", "delivered"]
    assert copies(upstream, 5) == 1
    assert upstream.received()[-1].peer not in first

    # A pooled connection answered with 421 at MAIL (an idle timeout racing our command):
    # nothing was sent, so it is replaced at once, without a deferral.
    seen = set(upstream.peers())
    upstream.fail_next("MAIL", "421 4.4.2 idle timeout")
    send(6)
    assert outcomes(6) == ["delivered"]
    assert upstream.received()[-1].peer not in seen

    # A pooled connection the server dropped silently: replaced at once.
    seen = set(upstream.peers())
    upstream.drop_connections()
    wait_for(lambda: upstream.open_connections() == 0, what="the drop")
    send(7)
    assert outcomes(7) == ["delivered"]
    assert upstream.received()[-1].peer not in seen

    # Nothing lost, nothing duplicated, and everything over TLS as the same login.
    assert [copies(upstream, seq) for seq in range(1, 8)] == [1] * 7
    assert all(r.tls and r.login == USERNAME for r in upstream.received())
