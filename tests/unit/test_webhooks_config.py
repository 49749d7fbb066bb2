"""SmtpToken spec.webhooks: what the spec accepts, and the credential entry's endpoints built
from the signing-key Secrets (builders/token.py, pure). The same against the real API server
(CEL, the relay's shard, status, Events): tests/k8s/test_webhooks_config.py."""

from __future__ import annotations

import base64
import secrets
from typing import Any

import pytest
from pydantic import ValidationError

from txmail_operator import builders
from txmail_operator.api import SmtpTokenSpec
from txmail_relay import contract as c

KEY = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
NS = "shop"


def spec(*hooks: dict[str, Any]) -> SmtpTokenSpec:
    return SmtpTokenSpec.model_validate({"dedicatedIPRef": {"name": "demo"}, "webhooks": hooks})


def hook(name: str = "events", **fields: Any) -> dict[str, Any]:
    base = {"name": name, "url": "https://hooks.example.com/txmail", "secretRef": {"name": "wh"}}
    return base | fields


def secret(**data: str) -> dict[str, Any]:
    return {"data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}}


@pytest.mark.parametrize(
    "url",
    [
        "https://hooks.example.com/txmail",
        "https://hooks.example.com:8443/a?b=c",
        "http://receiver.shop.svc/events",
        "http://receiver.shop.svc.cluster.local:8080/events",
        "https://[2001:db8::1]:8443/events",
        "https://hooks.example.com/" + "p" * 486,  # 512 characters, the most
    ],
)
def test_https_and_http_to_a_cluster_service_are_accepted(url: str) -> None:
    (parsed,) = spec(hook(url=url)).webhooks or []
    assert parsed.url == url
    assert parsed.secret_ref.key == "secret"  # the default key
    assert parsed.event_types is None  # all of them


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"url": "http://hooks.example.com/x"}, "url must be https://, or http:// to a cluster"),
        ({"url": "http://svc.example.com/x"}, "url must be https://"),
        # A cluster Service is <name>.<namespace>.svc[.cluster.local], nothing after it.
        ({"url": "http://a.svc.evil.example.com/x"}, "url must be https://"),
        ({"url": "http://a.shop.svc.evil.example.com/x"}, "url must be https://"),
        ({"url": "http://a.shop.svc.cluster.local.evil.example.com/x"}, "url must be https://"),
        ({"url": "http://receiver.svc/x"}, "url must be https://"),
        # A host is required (these were WebhookSecretInvalid at the builder before).
        ({"url": "https://:443/x"}, "url"),
        ({"url": "https://[bad/x"}, "url"),
        ({"url": "https:///x"}, "url"),
        ({"url": "https://hooks.example.com/" + "p" * 487}, "url"),  # 513 characters
        ({"url": "ftp://hooks.example.com/x"}, "url"),
        ({"url": "https://user:pw@hooks.example.com/x"}, "url"),
        ({"name": "Not_A_Label"}, "name"),
        ({"eventTypes": ["BOUNCE", "OPENED"]}, "eventTypes"),
        ({"secretRef": {"name": "wh", "key": "a/b"}}, "key"),
    ],
)
def test_what_the_spec_refuses_is_named(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        spec(hook(**fields))


def test_at_most_four_webhooks_a_token() -> None:
    """Each is in the token's credential entry, in a shard Secret many tokens share (1 MiB)."""
    assert len(spec(*(hook(f"h{i}") for i in range(4))).webhooks or []) == 4
    with pytest.raises(ValidationError, match="webhooks"):
        spec(*(hook(f"h{i}") for i in range(5)))


def test_a_url_the_relay_cannot_use_is_named_as_the_url_not_the_secret() -> None:
    """An object stored before the pattern required a host (the API server keeps it): the
    webhook is left out as WebhookURLInvalid, never blamed on its signing key."""
    token = spec(hook("bad"), hook("ok"))
    hooks = token.webhooks or []
    bad = hooks[0].model_copy(update={"url": "https://[bad/x"})
    token = token.model_copy(update={"webhooks": [bad, hooks[1]]})
    endpoints, problems = builders.webhook_endpoints(NS, token, {"wh": secret(secret=KEY)})
    assert [e.name for e in endpoints] == ["ok"]
    assert [(p.webhook, p.reason) for p in problems] == [("bad", "WebhookURLInvalid")]
    assert "url 'https://[bad/x' is not an http:// or https:// URL with a host" in (
        problems[0].message
    )
    assert KEY not in problems[0].message


def test_http_outside_the_cluster_needs_insecure_http_and_names_must_be_unique() -> None:
    (parsed,) = spec(hook(url="http://hooks.example.com/x", insecureHTTP=True)).webhooks or []
    assert parsed.insecure_http
    with pytest.raises(ValidationError, match="each name at most once"):
        spec(hook("a"), hook("a", url="https://other.example.com/"))


def test_endpoints_carry_the_key_the_url_and_the_event_types() -> None:
    token = spec(
        hook("all"),
        hook("bounces", eventTypes=["BOUNCE", "SPAMREPORT"], secretRef={"name": "wh", "key": "k2"}),
    )
    other = "whsec_" + base64.b64encode(b"k" * 24).decode()
    endpoints, problems = builders.webhook_endpoints(
        NS, token, {"wh": secret(secret=KEY + "\n", k2=other)}
    )
    assert problems == []
    assert [e.name for e in endpoints] == ["all", "bounces"]
    assert endpoints[0].secret.get_secret_value() == KEY  # a trailing newline is not the key's
    assert endpoints[0].event_types == []  # empty: every type
    assert endpoints[1].event_types == [c.WebhookEventType.BOUNCE, c.WebhookEventType.SPAMREPORT]
    assert endpoints[1].key() == b"k" * 24
    assert builders.webhook_secret_names(token) == ["wh"]  # read once for both
    assert builders.webhooks_condition(token, problems) == (
        True,
        "WebhooksConfigured",
        "the relay signs and sends events to: all, bounces",
    )
    # The relay reads the key back from the entry's JSON (a Secret), and only from there.
    digest = c.PasswordDigest(sha256="a" * 64, generation=1)
    entry = builders.credential_entry(
        "app", NS, token, ["example.com"], "txm-1", [digest], 7, endpoints
    )
    again = c.CredentialEntry.model_validate_json(entry.to_json())
    assert again == entry
    assert again.webhooks[0].secret.get_secret_value() == KEY
    assert KEY not in repr(entry) and KEY not in str(entry)


def test_a_missing_secret_key_or_unusable_key_leaves_that_webhook_out_and_says_why() -> None:
    token = spec(
        hook("gone", secretRef={"name": "absent"}),
        hook("nokey", secretRef={"name": "wh", "key": "other"}),
        hook("bad", secretRef={"name": "bad"}),
        hook("ok"),
    )
    bad_key = "whsec_" + base64.b64encode(b"short").decode()
    endpoints, problems = builders.webhook_endpoints(
        NS, token, {"absent": None, "wh": secret(secret=KEY), "bad": secret(secret=bad_key)}
    )
    assert [e.name for e in endpoints] == ["ok"]
    assert [(p.webhook, p.reason) for p in problems] == [
        ("gone", "WebhookSecretMissing"),
        ("nokey", "WebhookSecretKeyMissing"),
        ("bad", "WebhookSecretInvalid"),
    ]
    assert "Secret shop/absent does not exist" in problems[0].message
    assert "has no key 'other'" in problems[1].message
    assert "24 to 64 bytes" in problems[2].message
    ok, reason, message = builders.webhooks_condition(token, problems) or (True, "", "")
    assert (ok, reason) == (False, "WebhookSecretMissing")
    for key in (KEY, bad_key, bad_key.removeprefix("whsec_")):
        assert key not in message
    assert builders.webhooks_condition(spec(), []) is None  # no webhooks: no condition


def test_a_secret_that_could_not_be_read_keeps_the_key_the_relay_has() -> None:
    """A passing failure of the Secret's GET (the API server's 500, a timeout) does not fail
    the token's reconcile: a webhook the relay already has keeps its key (with the spec's URL
    and types as they are now), a new one waits; the condition says which and why."""
    token = spec(
        hook("known", eventTypes=["BOUNCE"], url="https://moved.example.com/x"),
        hook("new", secretRef={"name": "wh"}),
        hook("other", secretRef={"name": "fine"}),
    )
    had = c.WebhookEndpoint(
        name="known", url="https://hooks.example.com/txmail", event_types=[], secret=KEY
    )
    endpoints, problems = builders.webhook_endpoints(
        NS, token, {"fine": secret(secret=KEY)}, unreadable={"wh": "HTTP 500"}, previous=[had]
    )
    assert [e.name for e in endpoints] == ["known", "other"]
    assert endpoints[0].secret.get_secret_value() == KEY
    assert endpoints[0].url == "https://moved.example.com/x"
    assert endpoints[0].event_types == [c.WebhookEventType.BOUNCE]
    assert [(p.webhook, p.reason) for p in problems] == [
        ("known", "WebhookSecretUnreadable"),
        ("new", "WebhookSecretUnreadable"),
    ]
    assert "Secret shop/wh could not be read (HTTP 500)" in problems[0].message
    assert "keeps signing with the key it has" in problems[0].message
    assert "left out until then" in problems[1].message
    assert all(KEY not in p.message for p in problems)
