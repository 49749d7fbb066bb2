"""The operator side of the feedback loop against the real API server.

SmtpToken spec.webhooks: the signing key goes from the app's Secret into the relay's
credential shard (nowhere else: not the status, the Events, the annotations, the log), a
missing Secret is a condition a person can act on, and the relay's webhook report (its stats
ConfigMap, written here as the relay writes it) lands in status.webhooks with an Event when a
subscription starts or stops failing. DedicatedIP: the relay Service's port 25 'smtp-in', the
return path and its MX record, the DSN policy.
"""

from __future__ import annotations

import base64
import datetime as dt
import secrets
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

from k8s.kit import GROUP, VERSION, Kit, read_or_none
from k8s.operator_process import OperatorProcess, wait_for
from txmail_relay import contract as c

pytestmark = pytest.mark.k8s
IPS, TOKENS = "dedicatedips", "smtptokens"
FOLLOW = 30.0


def new_key() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


@pytest.fixture
def ip(kit: Kit) -> Iterator[str]:
    name = kit.dedicated_ip()
    yield name
    kit.objs.delete_cluster_custom_object(GROUP, VERSION, IPS, name)


def put_secret(kit: Kit, namespace: str, name: str, **data: str) -> None:
    body = client.V1Secret(metadata=client.V1ObjectMeta(name=name), string_data=data)
    try:
        kit.core.create_namespaced_secret(namespace, body)
    except ApiException as exc:
        if exc.status != 409:
            raise
        kit.core.replace_namespaced_secret(name, namespace, body)


def username(kit: Kit, namespace: str, token: str) -> str:
    def issued() -> str | None:
        status = (kit.get(TOKENS, namespace, token) or {}).get("status") or {}
        name: str | None = status.get("username")
        return name

    return wait_for(issued, FOLLOW, "the token's username")


def webhooks_of(kit: Kit, ip: str, user: str) -> list[c.WebhookEndpoint] | None:
    entry = kit.entry(ip, user)
    return None if entry is None else list(entry.webhooks)


def hook(name: str, url: str, secret: str, **more: Any) -> dict[str, Any]:
    return {"name": name, "url": url, "secretRef": {"name": secret, **more}}


def assert_nowhere_but_the_shard(
    kit: Kit, operator: OperatorProcess, namespace: str, token: str, *keys: str
) -> None:
    """No key in the token (spec, status, annotations), its Events, or the operator's log."""
    body = str(kit.get(TOKENS, namespace, token))
    events = str([(e.reason, e.message) for e in kit.events(namespace, token)])
    log = operator.output()
    for key in keys:
        for text in (key, key.removeprefix("whsec_")):
            assert text not in body
            assert text not in events
            assert text not in log


def test_a_tokens_webhooks_reach_the_relays_credential_shard_with_their_keys(
    kit: Kit, operator: OperatorProcess, ip: str, namespace: str
) -> None:
    first, second = new_key(), new_key()
    put_secret(kit, namespace, "hooks", secret=first, other=second)
    kit.token(
        namespace,
        ip,
        "shop",
        webhooks=[
            hook("all", "https://hooks.example.com/txmail", "hooks"),
            {
                **hook("bounces", "http://receiver.shop.svc:8080/in", "hooks", key="other"),
                "eventTypes": ["BOUNCE", "SPAMREPORT"],
            },
        ],
    )
    user = username(kit, namespace, "shop")

    def both() -> list[c.WebhookEndpoint] | None:
        found = webhooks_of(kit, ip, user)
        return found if found and len(found) == 2 else None

    endpoints = wait_for(both, FOLLOW, "both webhooks in the relay's credential entry")
    assert [(e.name, e.url) for e in endpoints] == [
        ("all", "https://hooks.example.com/txmail"),
        ("bounces", "http://receiver.shop.svc:8080/in"),
    ]
    assert endpoints[0].event_types == []
    assert endpoints[1].event_types == [c.WebhookEventType.BOUNCE, c.WebhookEventType.SPAMREPORT]
    assert endpoints[0].secret.get_secret_value() == first
    assert endpoints[1].secret.get_secret_value() == second
    ready = wait_for(
        lambda: kit.condition(TOKENS, namespace, "shop", "WebhooksReady"), FOLLOW, "WebhooksReady"
    )
    assert (ready["status"], ready["reason"]) == ("True", "WebhooksConfigured")
    assert kit.is_ready(TOKENS, namespace, "shop")

    # A rotated key reaches the relay at the next periodic check (1 s in this tier).
    rotated = new_key()
    put_secret(kit, namespace, "hooks", secret=rotated, other=second)

    def rotated_in_shard() -> bool:
        found = webhooks_of(kit, ip, user)
        return bool(found) and found is not None and found[0].secret.get_secret_value() == rotated

    wait_for(rotated_in_shard, FOLLOW, "the rotated key in the shard")
    assert_nowhere_but_the_shard(kit, operator, namespace, "shop", first, second, rotated)

    # Removed from the spec: gone from the entry, and the condition with it.
    kit.objs.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, TOKENS, "shop", {"spec": {"webhooks": None}}
    )
    wait_for(lambda: webhooks_of(kit, ip, user) == [], FOLLOW, "no webhooks in the entry")
    wait_for(
        lambda: kit.condition(TOKENS, namespace, "shop", "WebhooksReady") is None,
        FOLLOW,
        "WebhooksReady gone",
    )


def test_a_missing_secret_or_key_is_a_reason_and_the_token_works_on(
    kit: Kit, operator: OperatorProcess, ip: str, namespace: str
) -> None:
    kit.token(
        namespace,
        ip,
        "shop",
        webhooks=[hook("events", "https://hooks.example.com/txmail", "hooks")],
    )
    user = username(kit, namespace, "shop")

    def not_ready() -> dict[str, Any] | None:
        found = kit.condition(TOKENS, namespace, "shop", "WebhooksReady")
        return found if found and found["status"] == "False" else None

    cond = wait_for(not_ready, FOLLOW, "WebhooksReady False")
    assert cond["reason"] == "WebhookSecretMissing"
    assert f"Secret {namespace}/hooks does not exist" in cond["message"]
    assert "whsec_" in cond["message"]  # what to put there
    assert kit.is_ready(TOKENS, namespace, "shop")  # SMTP works without its webhook
    assert webhooks_of(kit, ip, user) == []
    assert kit.secret(namespace, "shop-smtp") is not None

    # The Secret without the key, then with a key that is not one: each its own reason.
    put_secret(kit, namespace, "hooks", token="not-it")
    wait_for(
        lambda: kit.reason(TOKENS, namespace, "shop", "WebhooksReady") == "WebhookSecretKeyMissing",
        FOLLOW,
        "WebhookSecretKeyMissing",
    )
    short = "whsec_" + base64.b64encode(b"too short").decode()
    put_secret(kit, namespace, "hooks", secret=short)
    wait_for(
        lambda: kit.reason(TOKENS, namespace, "shop", "WebhooksReady") == "WebhookSecretInvalid",
        FOLLOW,
        "WebhookSecretInvalid",
    )
    assert webhooks_of(kit, ip, user) == []

    # Fixed: the webhook is added, with no change to the token.
    key = new_key()
    put_secret(kit, namespace, "hooks", secret=key)
    endpoints = wait_for(lambda: webhooks_of(kit, ip, user), FOLLOW, "the webhook in the entry")
    assert endpoints[0].secret.get_secret_value() == key
    wait_for(
        lambda: kit.reason(TOKENS, namespace, "shop", "WebhooksReady") == "WebhooksConfigured",
        FOLLOW,
        "WebhooksReady True",
    )
    assert_nowhere_but_the_shard(kit, operator, namespace, "shop", key, short)


def test_the_api_server_refuses_a_plain_http_url_and_twice_the_same_name(
    kit: Kit, ip: str, namespace: str
) -> None:
    def refused(webhooks: list[dict[str, Any]]) -> str:
        with pytest.raises(ApiException) as info:
            kit.token(namespace, ip, "bad", webhooks=webhooks)
        assert info.value.status == 422
        return str(info.value.body)

    body = refused([hook("a", "http://hooks.example.com/x", "s")])
    assert "url must be https://, or http:// to a cluster Service" in body
    assert "Duplicate value" in refused(
        [hook("a", "https://a.example.com/", "s"), hook("a", "https://b.example.com/", "s")]
    )
    assert "eventTypes" in refused(
        [{**hook("a", "https://a.example.com/", "s"), "eventTypes": ["X"]}]
    )
    # Outside the cluster over http only when the spec says so.
    kit.token(
        namespace,
        ip,
        "plain",
        webhooks=[{**hook("a", "http://hooks.example.com/x", "s"), "insecureHTTP": True}],
    )


def stats(user: str | None, *hooks: c.WebhookStats, sent: int = 3) -> str:
    """A relay's report naming ``user`` (None: no token at all)."""
    report = c.RelayStats(
        tokens={user: c.TokenStats(sent=sent, soft_bounces=1, dropped=2, machine_opens=4)}
        if user
        else {},
        webhooks={user: list(hooks)} if user else {},
        updated_at=dt.datetime.now(dt.UTC),
    )
    return report.to_json()


def test_the_relays_webhook_report_is_the_tokens_status_with_an_event_on_each_change(
    kit: Kit, ip: str, namespace: str
) -> None:
    put_secret(kit, namespace, "hooks", secret=new_key())
    kit.token(
        namespace, ip, "shop", webhooks=[hook("events", "https://hooks.example.com/x", "hooks")]
    )
    user = username(kit, namespace, "shop")

    def report(*hooks: c.WebhookStats, sent: int = 3, to: str | None = user) -> None:
        # as the relay patches its stats ConfigMap
        kit.core.patch_namespaced_config_map(
            c.stats_config_map_name(ip),
            kit.operator_namespace,
            {"data": {c.STATS_KEY: stats(to, *hooks, sent=sent)}},
        )

    def sent() -> int | None:
        status = (kit.get(TOKENS, namespace, "shop") or {}).get("status") or {}
        figure: int | None = (status.get("stats") or {}).get("sent")
        return figure

    def shown() -> list[dict[str, Any]]:
        status = (kit.get(TOKENS, namespace, "shop") or {}).get("status") or {}
        return list(status.get("webhooks") or [])

    since = dt.datetime(2026, 12, 1, 20, 0, tzinfo=dt.UTC)
    report(
        c.WebhookStats(
            name="events",
            state="Failing",
            last_error="HTTP 503 Service Unavailable",
            failing_since=since,
            backlog=12,
        )
    )
    wait_for(lambda: shown() and shown()[0]["state"] == "Failing", FOLLOW, "Failing in status")
    (webhook,) = shown()
    assert webhook == {
        "name": "events",
        "state": "Failing",
        "lastError": "HTTP 503 Service Unavailable",
        "failingSince": "2026-12-01T20:00:00Z",
        "backlog": 12,
        "dropped": 0,
    }
    figures = (kit.get(TOKENS, namespace, "shop") or {})["status"]["stats"]
    assert (figures["softBounces"], figures["dropped"], figures["machineOpens"]) == (1, 2, 4)

    def events(reason: str) -> list[Any]:
        return [e for e in kit.events(namespace, "shop") if e.reason == reason]

    failing = wait_for(lambda: events("WebhookFailing"), FOLLOW, "a WebhookFailing Event")
    assert failing[0].type == "Warning"
    assert "events" in failing[0].message and "HTTP 503" in failing[0].message

    # The same webhook state again (one more mail sent): once the operator has read it (the
    # figure shows), there is no second Event.
    report(
        c.WebhookStats(
            name="events", state="Failing", last_error="HTTP 503 Service Unavailable",
            failing_since=since, backlog=12,
        ),
        sent=4,
    )  # fmt: skip
    wait_for(lambda: sent() == 4, FOLLOW, "the second report read")
    assert len(events("WebhookFailing")) == 1

    # It recovers, and more mail went out: both land in one status write (every version of
    # the token shows the old figure and state, or the new ones, never one without the other).
    rv = (kit.get(TOKENS, namespace, "shop") or {})["metadata"]["resourceVersion"]
    ok_at = dt.datetime(2026, 12, 1, 20, 5, tzinfo=dt.UTC)
    report(c.WebhookStats(name="events", state="Healthy", last_success_at=ok_at), sent=5)
    versions = token_versions(kit, namespace, "shop", rv, lambda b: sent_of(b) == 5)
    assert [(sent_of(b), state_of(b)) for b in versions][-1] == (5, "Healthy")
    assert all((sent_of(b), state_of(b)) in {(4, "Failing"), (5, "Healthy")} for b in versions)
    recovered = wait_for(lambda: events("WebhookRecovered"), FOLLOW, "a WebhookRecovered Event")
    assert recovered[0].type == "Normal"
    assert shown()[0]["lastSuccessAt"] == "2026-12-01T20:05:00Z"
    assert len(events("WebhookFailing")) == 1

    # The relay no longer names the token (its webhooks are gone there): nor does the status.
    report(to=None)
    wait_for(lambda: not shown(), FOLLOW, "status.webhooks cleared")


def sent_of(body: dict[str, Any]) -> int | None:
    figure: int | None = ((body.get("status") or {}).get("stats") or {}).get("sent")
    return figure


def state_of(body: dict[str, Any]) -> str | None:
    hooks = (body.get("status") or {}).get("webhooks") or []
    return str(hooks[0]["state"]) if hooks else None


def token_versions(
    kit: Kit, namespace: str, name: str, after: str, until: Any
) -> list[dict[str, Any]]:
    """Every version of the token written after resourceVersion ``after``, as a watch sees
    them, up to the first for which ``until`` holds."""
    seen: list[dict[str, Any]] = []
    stream = watch.Watch()  # type: ignore[no-untyped-call]
    for event in stream.stream(  # type: ignore[no-untyped-call]
        kit.objs.list_namespaced_custom_object,
        GROUP,
        VERSION,
        namespace,
        TOKENS,
        field_selector=f"metadata.name={name}",
        resource_version=after,
        timeout_seconds=int(FOLLOW),
    ):
        body = event["object"]
        seen.append(body)
        if until(body):
            stream.stop()  # type: ignore[no-untyped-call]
    assert seen and until(seen[-1]), f"no version of {name} came within {FOLLOW} s"
    return seen


def test_the_relay_takes_dsns_on_service_port_25_and_the_return_paths_mx_is_listed(
    kit: Kit,
) -> None:
    ip = kit.dedicated_ip(
        dns={"requireVerified": False, "returnPathDomain": "bounces.example.net"},
        bounces={"notifySender": "Always"},
    )
    try:
        service = wait_for(
            lambda: read_or_none(
                lambda: kit.core.read_namespaced_service(c.relay_name(ip), kit.operator_namespace)
            ),
            FOLLOW,
            "the relay Service",
        )
        assert service.spec is not None and service.spec.ports is not None
        ports = {p.name: (p.port, p.target_port) for p in service.spec.ports}
        assert ports["smtp-in"] == (c.SERVICE_INBOUND_PORT, "smtp-in")
        # The operator applies the Deployment after the Service: wait for it too.
        deployment = wait_for(
            lambda: read_or_none(
                lambda: client.AppsV1Api(kit.api).read_namespaced_deployment(
                    c.relay_name(ip), kit.operator_namespace
                )
            ),
            FOLLOW,
            "the relay Deployment",
        )
        pod = deployment.spec.template.spec
        assert pod is not None
        (container,) = pod.containers
        assert container.ports is not None
        assert {p.name: p.container_port for p in container.ports}["smtp-in"] == c.INBOUND_PORT

        config = wait_for(lambda: kit.relay_config(ip), FOLLOW, "the RelayConfig")
        assert config.return_path.domain == "bounces.example.net"
        assert config.dsn.notify is c.DsnPolicy.ALWAYS

        def records() -> list[dict[str, Any]] | None:
            status = (kit.get(IPS, None, ip) or {}).get("status") or {}
            listed: list[dict[str, Any]] = status.get("dnsRecords") or []
            return listed if any(r["purpose"] == "ReturnPathMX" for r in listed) else None

        mx = [r for r in wait_for(records, FOLLOW, "the MX record") if r["type"] == "MX"]
        assert [(r["name"], r["value"], r["purpose"], r["required"]) for r in mx] == [
            ("bounces.example.net", ["10 mta1.example.com"], "ReturnPathMX", True)
        ]
        assert mx[0]["result"] != "Verified"  # the tier's DNS server publishes none
    finally:
        kit.objs.delete_cluster_custom_object(GROUP, VERSION, IPS, ip)


def test_a_return_path_domain_that_is_a_sending_domain_is_refused(kit: Kit) -> None:
    with pytest.raises(ApiException) as info:
        kit.dedicated_ip(dns={"requireVerified": False, "returnPathDomain": "example.com"})
    assert info.value.status == 422
    assert "dns.returnPathDomain must be a domain of its own" in str(info.value.body)


def test_relay_ports_alike_are_refused(kit: Kit) -> None:
    """smtp-in (port 25 by default, with a return path) beside submission on port 25 would
    make the relay's Service invalid: refused with the model's message."""
    with pytest.raises(ApiException) as info:
        kit.dedicated_ip(
            dns={"requireVerified": False, "returnPathDomain": "bounces.example.net"},
            relay={"ports": {"submission": 25}},
        )
    assert info.value.status == 422
    assert "relay.ports must be distinct" in str(info.value.body)
    ip = kit.dedicated_ip(dns={"requireVerified": False}, relay={"ports": {"submission": 25}})
    kit.objs.delete_cluster_custom_object(GROUP, VERSION, IPS, ip)  # no smtp-in: accepted
