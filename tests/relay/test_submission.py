"""Submission over STARTTLS and implicit TLS with real clients, delivered to smtp-sink."""

from __future__ import annotations

import base64
import datetime as dt
import logging
import secrets
import smtplib
import socket
import subprocess
import tracemalloc
from typing import Any

import pytest

from relay.relaykit import (
    DOMAINS,
    RelayEnv,
    credential,
    message,
    parsed,
    swaks_available,
    wait_for,
    write_credentials,
)
from txmail_relay.mail.submission import TemplateFields, parse_submission
from txmail_relay.spool.segments import SpooledMessage


def _reply(smtp: smtplib.SMTP, command: str) -> tuple[int, bytes]:
    return smtp.docmd(command)


def _auth(smtp: smtplib.SMTP, username: str, password: str) -> None:
    """One AUTH PLAIN attempt (smtplib's login() tries every mechanism in turn)."""
    smtp.user, smtp.password = username, password
    smtp.auth("PLAIN", smtp.auth_plain)


def test_message_is_relayed_to_the_smarthost(env: RelayEnv) -> None:
    relay = env.start()
    with env.client(relay) as smtp:
        smtp.sendmail("app@example.com", ["user@dest.test"], message(1))
    [captured] = env.sink.wait(1)
    assert captured.mail_from == "<app@example.com>"
    assert captured.rcpts == ["<user@dest.test>"]
    assert "Subject: seq 1" in captured.content
    assert "by relay.test (txmail)" in captured.content
    assert relay.metric("txmail_relay_messages_accepted_total", {"token": "app1"}) == 1
    wait_for(
        lambda: relay.metric(
            "txmail_relay_recipient_outcomes_total", {"token": "app1", "outcome": "delivered"}
        ),
        what="delivered metric",
    )


def test_before_starttls_no_auth_is_offered_or_accepted(env: RelayEnv) -> None:
    relay = env.start()
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as smtp:
        code, _ = smtp.ehlo("client.test")
        assert code == 250
        assert smtp.has_extn("starttls")
        assert not smtp.has_extn("auth")
        code, text = _reply(smtp, "AUTH PLAIN " + base64.b64encode(b"\0app1\0x").decode())
        assert (code, text[:6]) == (538, b"5.7.11")
        code, text = _reply(smtp, "MAIL FROM:<app@example.com>")
        assert (code, text[:5]) == (530, b"5.7.0")
        smtp.starttls(context=env.tls.client_context())
        smtp.ehlo("client.test")
        assert "PLAIN" in smtp.esmtp_features["auth"]
        assert "LOGIN" in smtp.esmtp_features["auth"]


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_auth_mechanisms(env: RelayEnv, mechanism: str) -> None:
    relay = env.start()
    with env.client(relay, login=False) as smtp:
        smtp.user, smtp.password = env.username, env.password
        code, _ = smtp.auth(mechanism, getattr(smtp, f"auth_{mechanism.lower()}"))
        assert code == 235


def test_implicit_tls_port(env: RelayEnv) -> None:
    relay = env.start()
    with smtplib.SMTP_SSL(
        "127.0.0.1", relay.tls_port, context=env.tls.client_context(), timeout=10
    ) as smtp:
        smtp.ehlo("client.test")
        assert not smtp.has_extn("starttls")
        smtp.login(env.username, env.password)
        smtp.sendmail("app@example.com", ["user@dest.test"], message("tls"))
    env.sink.wait(1)


def test_swaks_submission(env: RelayEnv) -> None:
    # A generated password may start with "-" (token_urlsafe's alphabet has it). swaks reads such
    # an argument as an option (even as --auth-password=VALUE or in SWAKS_OPT_auth_password), so
    # swaks prompts for it and reads it from standard input; that keeps it off the process list too.
    env.password = "-" + env.password
    relay = env.start()
    result = subprocess.run(
        [
            swaks_available(),
            "--server", f"127.0.0.1:{relay.port}",
            "--tls", "--tls-verify", "--tls-ca-path", str(env.tls.ca_file),
            "--tls-sni", "relay.test",
            "--auth", "LOGIN", "--auth-user", env.username,
            "--from", "app@example.com", "--to", "user@dest.test",
            "--header", "From: app@example.com",
            "--body", "via swaks\nEND-OF-MESSAGE swaks",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        input=env.password + "\n",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    [captured] = env.sink.wait(1)
    assert "via swaks" in captured.content


def test_failed_auth_limit_per_connection(env: RelayEnv) -> None:
    relay = env.start()
    with env.client(relay, login=False) as smtp:
        for _ in range(4):
            with pytest.raises(smtplib.SMTPAuthenticationError) as failed:
                _auth(smtp, env.username, "wrong")
            assert failed.value.smtp_code == 535
        with pytest.raises(smtplib.SMTPAuthenticationError) as failed:
            _auth(smtp, env.username, "wrong")
        assert failed.value.smtp_code == 421
        with pytest.raises(smtplib.SMTPServerDisconnected):
            smtp.noop()
    assert relay.metric("txmail_relay_auth_failures_total") == 5


def test_three_failures_then_success(env: RelayEnv) -> None:
    relay = env.start()
    with env.client(relay, login=False) as smtp:
        for _ in range(3):
            with pytest.raises(smtplib.SMTPAuthenticationError):
                _auth(smtp, env.username, "wrong")
        _auth(smtp, env.username, env.password)
        smtp.sendmail("app@example.com", ["user@dest.test"], message(3))


def test_failures_are_limited_per_client_ip(env: RelayEnv) -> None:
    relay = env.start(env.settings(overrides={"limits": {"ipAuthFailures": 6}}))
    for _ in range(2):
        with env.client(relay, login=False) as smtp:
            for _ in range(3):
                with pytest.raises(smtplib.SMTPAuthenticationError):
                    _auth(smtp, env.username, "wrong")
    with env.client(relay, login=False) as smtp:
        with pytest.raises(smtplib.SMTPAuthenticationError) as blocked:
            _auth(smtp, env.username, env.password)  # right password, but blocked
        assert blocked.value.smtp_code == 421


def test_unknown_expired_and_revoked_fail_alike(env: RelayEnv) -> None:
    past = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)
    settings = env.settings(
        credentials=[
            credential(env.username, env.password),
            credential("expired", env.password, expires_at=past),
            credential("rotated", env.password, not_after=past),
        ]
    )
    relay = env.start(settings)
    replies = set()
    for username in ("nobody", "expired", "rotated"):
        with env.client(relay, login=False) as smtp:
            with pytest.raises(smtplib.SMTPAuthenticationError) as failed:
                _auth(smtp, username, env.password)
            replies.add((failed.value.smtp_code, failed.value.smtp_error))
    assert replies == {(535, b"5.7.8 Authentication credentials invalid")}


def test_credential_rotation_applies_to_new_auth_without_dropping(env: RelayEnv) -> None:
    relay = env.start()
    old = env.client(relay)  # authenticated with the old password, stays open
    new_password = secrets.token_urlsafe(32)
    write_credentials(env.directory / "credentials.json", [credential("app1", new_password)])

    def new_password_works() -> bool:
        with env.client(relay, login=False) as smtp:
            try:
                smtp.login("app1", new_password)
            except smtplib.SMTPAuthenticationError:
                return False
            return True

    wait_for(new_password_works, timeout=5, what="the rotated password")
    with env.client(relay, login=False) as smtp, pytest.raises(smtplib.SMTPAuthenticationError):
        smtp.login("app1", env.password)
    old.sendmail("app@example.com", ["user@dest.test"], message("old-connection"))
    old.quit()
    env.sink.wait(1)


def test_sender_domains_are_enforced(env: RelayEnv) -> None:
    relay = env.start()
    with env.client(relay) as smtp:
        code, text = _reply(smtp, "MAIL FROM:<app@tenant-b.com>")  # the IP's, not the token's
        assert code == 553
        assert b"tenant-b.com" in text
        code, text = _reply(smtp, "MAIL FROM:<app@elsewhere.org>")
        assert code == 553
        assert b"elsewhere.org" in text
        with pytest.raises(smtplib.SMTPDataError) as refused:
            smtp.sendmail("app@example.com", ["u@dest.test"], message(1, sender="ceo@tenant-b.com"))
        assert refused.value.smtp_code == 553
        assert b"tenant-b.com" in refused.value.smtp_error
    assert "tenant-b.com" in DOMAINS


def test_message_size_limit_discards_while_streaming(env: RelayEnv) -> None:
    relay = env.start(env.settings(overrides={"limits": {"maxMessageSize": 1_000_000}}))
    with env.client(relay) as smtp:
        assert smtp.esmtp_features["size"] == "1000000"
        code, _ = _reply(smtp, "MAIL FROM:<app@example.com> SIZE=2000000")
        assert code == 552
        smtp.rset()
        line = b"x" * 998 + b"\r\n"
        tracemalloc.start()
        try:
            smtp.mail("app@example.com")
            smtp.rcpt("u@dest.test")
            smtp.putcmd("DATA")
            assert smtp.getreply()[0] == 354
            chunk = line * 1000  # 1 MB
            for _ in range(30):
                smtp.send(chunk)
            smtp.send(b".\r\n")
            code, _ = smtp.getreply()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert code == 552
        assert peak < 8_000_000, f"peak {peak} bytes while discarding 30 MB"
        assert smtp.noop()[0] == 250


def test_recipient_limit(env: RelayEnv) -> None:
    relay = env.start()
    with env.client(relay) as smtp:
        smtp.mail("app@example.com")
        for i in range(100):
            assert smtp.rcpt(f"u{i}@dest.test")[0] == 250
        code, text = smtp.rcpt("one-too-many@dest.test")
        assert (code, text[:5]) == (452, b"4.5.3")


@pytest.mark.parametrize("bad", ["a\x01b@example.com", "a\x00@example.com", "a\rb@example.com"])
def test_control_characters_in_addresses(env: RelayEnv, bad: str) -> None:
    relay = env.start()
    with env.client(relay) as smtp:
        smtp.send(f"MAIL FROM:<{bad}>\r\n".encode())
        assert smtp.getreply()[0] == 501
        smtp.mail("app@example.com")
        smtp.send(f"RCPT TO:<{bad}>\r\n".encode())
        assert smtp.getreply()[0] == 501


def test_long_line_in_data_is_refused(env: RelayEnv) -> None:
    relay = env.start()
    with env.client(relay) as smtp, pytest.raises(smtplib.SMTPDataError) as refused:
        smtp.sendmail("app@example.com", ["u@dest.test"], message(1, body="y" * 2000))
    assert refused.value.smtp_code == 500


def test_idle_connections_are_closed(env: RelayEnv) -> None:
    relay = env.start(env.settings(overrides={"limits": {"idleTimeout": 0.5}}))
    with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as sock:
        assert sock.recv(1024).startswith(b"220")
        sock.settimeout(5)
        assert sock.recv(1024).startswith(b"421 4.4.2 ")  # told, then closed by the server
        assert sock.recv(1024) == b""


def test_junk_commands_disconnect(env: RelayEnv) -> None:
    relay = env.start()
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as smtp:
        codes = [smtp.docmd(f"JUNK{i}")[0] for i in range(5)]
        assert codes == [500, 500, 500, 500, 502]
        with pytest.raises(smtplib.SMTPServerDisconnected):
            smtp.noop()


class ExplodingSpool:
    """A spool whose store raises a bug-like error: the client must get 451, not 500."""

    def has_room(self, size: int = 0) -> bool:
        return True

    async def append(
        self, mail_from: str, recipients: list[str], username: str, body: bytes, **dsn: Any
    ) -> SpooledMessage:
        raise RuntimeError("boom")


def test_internal_error_is_451(env: RelayEnv) -> None:
    relay = env.start()
    relay.call(lambda: setattr(relay.relay.sends, "_spool", ExplodingSpool()))  # type: ignore[union-attr]
    with env.client(relay) as smtp:
        with pytest.raises(smtplib.SMTPDataError) as failed:
            smtp.sendmail("app@example.com", ["u@dest.test"], message(1))
        assert failed.value.smtp_code == 451
        assert failed.value.smtp_error[:5] == b"4.3.0"
        assert b"boom" not in failed.value.smtp_error
        assert smtp.noop()[0] == 250


def test_no_secrets_or_bodies_in_logs(env: RelayEnv, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    relay = env.start()
    secret_body = "BODY-" + secrets.token_hex(8)
    plain = base64.b64encode(f"\0{env.username}\0{env.password}".encode()).decode()
    with env.client(relay, login=False) as smtp:
        assert smtp.docmd("AUTH PLAIN " + plain)[0] == 235
        smtp.sendmail("app@example.com", ["u@dest.test"], message(1, body=secret_body))
    with env.client(relay, login=False) as smtp:  # a failed LOGIN, and undecodable input
        smtp.docmd("AUTH LOGIN " + base64.b64encode(env.username.encode()).decode())
        smtp.docmd(base64.b64encode(b"wrong-" + env.password.encode()).decode())
        smtp.docmd("AUTH LOGIN")
        smtp.docmd("not base64 " + env.password)
    env.sink.wait(1)
    logged = "\n".join(r.getMessage() + repr(vars(r)) + (caplog.text or "") for r in caplog.records)
    assert caplog.records
    for secret in (
        env.password,
        plain,
        secret_body,
        base64.b64encode(env.password.encode()).decode(),
    ):
        assert secret not in logged


@pytest.mark.parametrize(
    ("head", "reply"),
    [
        (b"", "5.7.1 Exactly one valid From header needed"),
        (b"From: a@example.com\r\nFrom: b@example.com\r\n", "5.7.1 Exactly one valid From"),
        (b"From: a@example.com, ceo@tenant-b.com\r\n", "5.7.1 From header domain tenant-b.com"),
    ],
)
def test_the_from_header_is_checked_like_the_sender(env: RelayEnv, head: bytes, reply: str) -> None:
    relay = env.start()
    content = head + b"To: u@dest.test\r\nSubject: s\r\n\r\nFrom: body@example.com\r\n"
    with env.client(relay) as smtp, pytest.raises(smtplib.SMTPDataError) as refused:
        smtp.sendmail("app@example.com", ["u@dest.test"], content)
    assert refused.value.smtp_code in {550, 553}
    error = refused.value.smtp_error
    assert (error.decode() if isinstance(error, bytes) else error).startswith(reply)
    assert relay.metric("txmail_relay_smtp_rejections_total", {"reason": "from-header"}) == 1


def test_the_received_header_names_the_client(env: RelayEnv) -> None:
    relay = env.start()
    with env.client(relay) as smtp:
        smtp.ehlo("client.test\x7f")  # unsafe characters are left out of the header
        smtp.sendmail("app@example.com", ["user@dest.test"], message(1))
    [captured] = env.sink.wait(1)
    [received] = [
        " ".join(str(v).split()) for v in parsed(captured).get_all("Received") if "txmail" in v
    ]
    assert received.startswith(
        "from client.test ([127.0.0.1]) by relay.test (txmail) with ESMTPSA;"
    )


def test_a_submission_is_parsed_once_into_one_value() -> None:
    content = (
        b"From: App <app@Example.COM>, ops@example.com\r\n"
        b"To: Ada <ada@dest.test>, bob@dest.test\r\nCc: carl@dest.test\r\n"
        b"Message-ID: <m1@example.com>\r\nX-Txmail-Track: OFF\r\n"
        b"X-Txmail-Email-Id: 7 \r\nX-Txmail-Send-Id: s-1\r\n"
        b"\r\nTo: not-a-header@dest.test\r\n"
    )
    submitted = parse_submission("app@example.com", ["ada@dest.test", "x@dest.test"], content)
    headers = submitted.headers
    assert submitted.recipients == ("ada@dest.test", "x@dest.test")
    assert submitted.content == content  # spooled as received
    assert headers.from_domains == ("example.com", "example.com")
    assert headers.to == ("ada@dest.test", "bob@dest.test")
    assert headers.cc == ("carl@dest.test",)
    assert (headers.message_id, headers.track_off, headers.dkim_signed) == (
        "<m1@example.com>",
        True,
        False,
    )
    assert headers.template == TemplateFields(email_id="7", properties=None, send_id="s-1")
    assert parse_submission("a@example.com", [], b"Subject: x\r\n\r\n").headers.template is None


def test_a_failed_starttls_handshake_closes_only_that_connection(env: RelayEnv) -> None:
    """A client that answers the 220 with bytes that are no TLS handshake is disconnected;
    its session is over (the relay's session count goes back) and the next client is
    served over STARTTLS as usual."""
    relay = env.start()
    with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as raw:
        reader = raw.makefile("rb")
        assert reader.readline().startswith(b"220 ")
        raw.sendall(b"EHLO client.test\r\n")
        while not reader.readline().startswith(b"250 "):
            pass
        raw.sendall(b"STARTTLS\r\n")
        assert reader.readline().startswith(b"220 ")
        assert relay.metric("txmail_relay_smtp_sessions") == 1
        raw.sendall(b"this is not a TLS ClientHello\r\n" * 20)
        assert reader.read() == b""  # closed, nothing in clear text after the 220
    wait_for(lambda: relay.metric("txmail_relay_smtp_sessions") == 0, what="the session ended")
    with env.client(relay) as smtp:
        smtp.sendmail("app@example.com", ["user@dest.test"], message("after"))
    env.sink.wait(1)
