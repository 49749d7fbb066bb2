"""The Postfix fixture alone (tests/postfix.py): the far MTA the feedback-loop tests rely on.

Mail goes in with smtplib; the DSNs Postfix writes go to an smtp-sink standing in for a
return-path domain's inbound listener.
"""

from __future__ import annotations

import secrets
import smtplib
from collections.abc import Callable
from email import message_from_string, policy
from email.message import EmailMessage

import pytest

from peers import Captured, Sink, wait_for
from postfix import BOUNCE_DOMAIN, DEFER_DOMAIN, KNOWN_USER, Postfix, dsn_parts, postfix_factory

__all__ = ["postfix_factory"]

RETURN = "returns.test"


def _message(to: str, tag: str) -> bytes:
    # smtp-sink's dump counts as complete at a line "END-OF-MESSAGE..." before a blank line
    # (tests/peers.py). A DSN returns the original's header section (a delay warning: only
    # that), so the marker is the last header field, just before the blank line.
    return (
        f"From: App <app@example.com>\r\nTo: {to}\r\nSubject: {tag}\r\n"
        f"Date: Tue, 1 Dec 2026 12:00:00 +0000\r\nMessage-ID: <{tag}@example.com>\r\n"
        f"END-OF-MESSAGE: {tag}\r\n\r\nhello {tag}\r\n"
    ).encode()


def _report(captured: Captured) -> EmailMessage:
    msg = message_from_string("Received: from " + captured.content, policy=policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def _rcpts(captured: Captured) -> list[str]:
    """RCPT addresses without their ESMTP parameters (Postfix passes ORCPT= on)."""
    return [r.split()[0] for r in captured.rcpts]


def _with_log(postfix: Postfix, sink: Sink, count: int, timeout: float = 20) -> list[Captured]:
    try:
        return sink.wait(count, timeout)
    except AssertionError as e:
        raise AssertionError(f"{e}\n--- Postfix log ---\n{postfix.log()[-4000:]}") from None


def test_unknown_user_is_accepted_then_bounced_with_an_rfc3464_dsn_to_the_sender(
    postfix_factory: Callable[..., Postfix], sink: Sink
) -> None:
    postfix = postfix_factory({RETURN: (sink.host, sink.port)})
    tag = secrets.token_hex(6)
    sender = f"bounces+{tag}@{RETURN}"
    # Accepted at RCPT (no 550): the bounce comes later, asynchronously.
    postfix.send(sender, [f"nobody-{tag}@{BOUNCE_DOMAIN}"], _message("x", tag))

    [dsn] = _with_log(postfix, sink, 1)
    # A DSN has a null reverse path (RFC 3464 2, RFC 5321 4.5.5); ESMTP parameters follow.
    assert dsn.mail_from.split()[0] == "<>"
    assert _rcpts(dsn) == [f"<{sender}>"]
    report = _report(dsn)
    assert report.get_param("report-type") == "delivery-status"
    message_fields, [recipient] = dsn_parts(report)
    assert message_fields["reporting-mta"] == "dns; mx.bounce.test"
    assert recipient["final-recipient"] == f"rfc822; nobody-{tag}@{BOUNCE_DOMAIN}"
    assert recipient["action"] == "failed"
    assert recipient["status"] == "5.1.1"  # RFC 3463: bad destination mailbox address
    # The original's headers come back, so the Message-ID ties the DSN to the message too.
    assert f"<{tag}@example.com>" in dsn.content


def test_known_user_gets_the_mail_and_nothing_comes_back(
    postfix_factory: Callable[..., Postfix], sink: Sink
) -> None:
    postfix = postfix_factory({RETURN: (sink.host, sink.port)})
    tag = secrets.token_hex(6)
    postfix.send(f"bounces+{tag}@{RETURN}", [f"{KNOWN_USER}@{BOUNCE_DOMAIN}"], _message("k", tag))

    [delivered] = wait_for(postfix.delivered, 20, "the known user's maildir")
    assert delivered["Message-ID"] == f"<{tag}@example.com>"
    postfix.wait_log("status=sent")
    assert sink.messages() == []


def test_deferred_domain_sends_a_delayed_dsn_then_a_failed_one(
    postfix_factory: Callable[..., Postfix], sink: Sink
) -> None:
    postfix = postfix_factory({RETURN: (sink.host, sink.port)}, delay_warning=1, lifetime=4)
    tag = secrets.token_hex(6)
    sender = f"bounces+{tag}@{RETURN}"
    postfix.send(sender, [f"user-{tag}@{DEFER_DOMAIN}"], _message("d", tag))

    delayed, failed = _with_log(postfix, sink, 2, timeout=30)
    assert _rcpts(delayed) == _rcpts(failed) == [f"<{sender}>"]
    _, [warning] = dsn_parts(_report(delayed))
    assert warning["action"] == "delayed"
    assert warning["status"].startswith("4.")
    assert warning["final-recipient"] == f"rfc822; user-{tag}@{DEFER_DOMAIN}"
    _, [final] = dsn_parts(_report(failed))
    assert final["action"] == "failed"
    assert postfix.queue_ids() == []


def test_other_domains_are_refused_at_rcpt(postfix_factory: Callable[..., Postfix]) -> None:
    postfix = postfix_factory()
    with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
        postfix.send("a@example.com", ["b@elsewhere.test"], _message("o", "o"))
    [(code, _)] = refused.value.recipients.values()
    assert code == 554  # Relay access denied


def test_route_changes_while_it_runs(
    postfix_factory: Callable[..., Postfix], sink_factory: Callable[..., Sink]
) -> None:
    first, second = sink_factory(), sink_factory()
    postfix = postfix_factory({RETURN: (first.host, first.port)})
    postfix.route(RETURN, second.host, second.port)
    tag = secrets.token_hex(6)
    postfix.send(f"b+{tag}@{RETURN}", [f"gone-{tag}@{BOUNCE_DOMAIN}"], _message("r", tag))
    [dsn] = _with_log(postfix, second, 1)
    assert _rcpts(dsn) == [f"<b+{tag}@{RETURN}>"]
    assert first.messages() == []
