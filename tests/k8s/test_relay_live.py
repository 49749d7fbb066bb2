"""End to end: the operator and a relay process share one API server, as in a cluster.

The relay runs standalone with its Kubernetes config source pointed at the test kubeconfig,
so it sees exactly what the operator writes, through watches by name.
"""

from __future__ import annotations

import email as email_parser
import email.policy as email_policy
import http.client
import json
import re
import smtplib
import ssl
import time
import urllib.error
import urllib.request
from typing import Any

import pytest
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from k8s.conftest import ADDRESS, Live
from k8s.kit import GROUP, VERSION, Kit
from peers import Sink, auth_accepted, submit, wait_for
from txmail_relay import contract as c

pytestmark = pytest.mark.k8s


def message(n: int) -> bytes:
    return (
        f"From: Shop <orders@example.com>\r\nTo: ann@example.net\r\nSubject: order {n}\r\n"
        f"Message-ID: <order-{n}@example.com>\r\n\r\n"
        f"Thank you for order {n}.\r\nEND-OF-MESSAGE {n}\r\n"
    ).encode()


def test_relay_follows_tokens_live(kit: Kit, namespace: str, sink: Sink, live: Live) -> None:
    ip, port, relay = live.ip, live.port, live.relay
    kit.token(namespace, ip, "shop")
    secret = wait_for(lambda: kit.secret(namespace, "shop-smtp"), 10, "the app Secret")

    start = time.monotonic()
    wait_for(
        lambda: auth_accepted((ADDRESS, port), secret),
        5,
        "the new token to work at the relay",
        every=0.2,
    )
    created_to_auth = time.monotonic() - start
    submit((ADDRESS, port), secret, message(1), "orders@example.com", ["ann@example.net"])
    got = sink.wait(1)
    assert got[0].client_addr == "127.0.0.1"
    assert "order 1" in got[0].content

    def stats() -> dict[str, int] | None:
        token = kit.get("smtptokens", namespace, "shop") or {}
        figures = (token.get("status") or {}).get("stats")
        return figures if figures and figures.get("delivered", 0) >= 1 else None

    figures = wait_for(stats, 15, "the relay's stats in the token status", every=0.2)
    assert figures["sent"] >= 1

    # An app connected before the reset keeps its session while the password changes.
    context = ssl.create_default_context(cadata=secret["ca.crt"])
    open_conn = smtplib.SMTP(ADDRESS, port, timeout=15)
    open_conn._host = secret["host"]
    open_conn.starttls(context=context)
    open_conn.login(secret["username"], secret["password"])

    kit.objs.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, "smtptokens", "shop", {"spec": {"passwordGeneration": 2}}
    )
    rotated = kit.new_password(namespace, "shop-smtp", secret["password"])
    wait_for(
        lambda: auth_accepted((ADDRESS, port), rotated), 5, "the new password to work", every=0.2
    )
    wait_for(
        lambda: not auth_accepted((ADDRESS, port), rotated, secret["password"]),
        5,
        "the old password refused",
        every=0.2,
    )

    open_conn.sendmail("orders@example.com", ["bob@example.net"], message(2))
    open_conn.quit()
    assert any("order 2" in m.content for m in sink.wait(2))

    kit.objs.delete_namespaced_custom_object(GROUP, VERSION, namespace, "smtptokens", "shop")
    wait_for(
        lambda: not auth_accepted((ADDRESS, port), rotated),
        5,
        "the deleted token refused",
        every=0.2,
    )
    assert created_to_auth < 5
    for password in (secret["password"], rotated["password"]):
        assert password not in relay.output()


def api_send(live: Live, password: str, doc: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        f"http://{ADDRESS}:{live.api_port}/marketing/v3/transactional/single-email/send",
        data=json.dumps(doc).encode(),
        headers={"Authorization": f"Bearer {password}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=15) as reply:
        body: dict[str, Any] = json.loads(reply.read())
        return body


def get(live: Live, path: str) -> tuple[int, str | None]:
    """GET on the tracking port without following redirects: (status, Location)."""
    conn = http.client.HTTPConnection(ADDRESS, live.tracking_port, timeout=15)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status, response.getheader("Location")
    finally:
        conn.close()


def test_api_send_opens_and_clicks_reach_the_token_status(
    kit: Kit, namespace: str, sink: Sink, live: Live
) -> None:
    """An app sends with HubSpot's request shape; a reader opens and clicks; stats follow."""
    kit.token(namespace, live.ip, "shop")
    kit.email(
        namespace,
        live.ip,
        "receipt",
        html="<p>Hi {{ contact.firstname }}</p>"
        '<a href="https://shop.example.com/o/{{ custom.id }}">order</a>',
        text="Hi {{ contact.firstname }}\nEND-OF-MESSAGE\n",
        tracking={"opens": True, "clicks": True},
    )
    secret = wait_for(lambda: kit.secret(namespace, "shop-smtp"), 10, "the app Secret")
    email = wait_for(
        lambda: (
            kit.is_ready("transactionalemails", namespace, "receipt")
            and kit.get("transactionalemails", namespace, "receipt")
        ),
        10,
        "the email Ready",
    )
    wait_for(
        lambda: auth_accepted((ADDRESS, live.port), secret), 5, "the token at the relay", every=0.2
    )
    doc = {
        "emailId": email["status"]["emailId"],
        "message": {"to": "ann@example.net", "sendId": "receipt-1"},
        "contactProperties": {"firstname": "Ann"},
        "customProperties": {"id": "42"},
    }
    wait_for(lambda: kit.template(live.ip, doc["emailId"]), 5, "the template at the relay")
    reply = wait_for(
        lambda: _try_send(live, secret["password"], doc),
        10,
        "the relay to accept the send",
        every=0.3,
    )
    assert reply["sendResult"] in ("QUEUED", "SENT")  # already delivered on a fast run

    got = sink.wait(1)[0]
    message = email_parser.message_from_string(
        "Received: from " + got.content, policy=email_policy.default
    )
    html_part = message.get_body(preferencelist=("html",))
    assert html_part is not None
    html = html_part.get_content()
    pixel = re.search(r'src="http://[^/]+(/o/[^"]+)"', html)
    click = re.search(r'href="http://[^/]+(/c/[^"]+)"', html)
    assert pixel and click, html
    assert get(live, pixel[1])[0] == 200
    assert get(live, click[1]) == (302, "https://shop.example.com/o/42")

    def stats() -> dict[str, Any] | None:
        figures = ((kit.get("smtptokens", namespace, "shop") or {}).get("status") or {}).get(
            "stats"
        )
        return figures if figures and figures["clicks"] >= 1 and figures["opens"] >= 1 else None

    figures = wait_for(stats, 20, "opens and clicks in the token status", every=0.3)
    assert (figures["uniqueOpens"], figures["uniqueClicks"]) == (1, 1)
    assert figures["delivered"] == 1 and figures["openRate"] == 1.0 and figures["clickRate"] == 1.0


def _try_send(live: Live, password: str, doc: dict[str, Any]) -> dict[str, Any] | None:
    try:
        return api_send(live, password, doc)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code in (400, 401):  # credential or template not at the relay yet
            return None
        raise


def test_the_relay_identity_reaches_only_its_own_objects(kit: Kit, live: Live) -> None:
    """The Role the operator writes is enough for the relay above, and no more."""
    relay_api = client.CoreV1Api(config.new_client_from_config(config_file=str(live.kubeconfig)))
    ns = kit.operator_namespace

    def status_of(call: Any) -> int:
        try:
            call()
        except ApiException as exc:
            return int(exc.status)
        return 200

    shard = c.credentials_secret_name(live.ip, 0)
    assert status_of(lambda: relay_api.read_namespaced_secret(shard, ns)) == 200
    assert status_of(lambda: relay_api.read_namespaced_config_map(c.relay_name(live.ip), ns)) == 200
    denied = {
        "list Secrets": lambda: relay_api.list_namespaced_secret(ns),
        "read its TLS key": lambda: relay_api.read_namespaced_secret(
            c.tls_secret_name(live.ip), ns
        ),
        "read the scheduler Secret": lambda: relay_api.read_namespaced_secret(
            c.scheduler_secret_name(live.ip), ns
        ),
        "list ConfigMaps": lambda: relay_api.list_namespaced_config_map(ns),
        "change its own configuration": lambda: relay_api.patch_namespaced_config_map(
            c.relay_name(live.ip), ns, {"data": {"x": "y"}}
        ),
        "write a credentials shard": lambda: relay_api.patch_namespaced_secret(
            shard, ns, {"data": {"x": "eQ=="}}
        ),
        "read another namespace": lambda: relay_api.list_namespaced_secret("default"),
    }
    assert {what: status_of(call) for what, call in denied.items()} == dict.fromkeys(denied, 403)
    stats = c.stats_config_map_name(live.ip)
    assert status_of(lambda: relay_api.patch_namespaced_config_map(stats, ns, {"data": {}})) == 200
