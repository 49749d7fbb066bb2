"""A platform team's install, on a real node: Helm, the three objects, an app sending mail.

Every step goes through the product's own surface: ``helm install``, objects applied through
the API, an app pod that reads the generated Secret, the relay Service, the tracking Service.
"""

from __future__ import annotations

import base64
import os
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from kubernetes import client

from cluster.kubeapi import meta_of, name_of, uid_of
from dns_server import DnsServer, txt
from node.kit import (
    CHART,
    NAMESPACE,
    RELEASE,
    TRACK_HOST,
    Cluster,
    NodeSink,
    dedicated_ip,
    html_of,
    send_script,
    spec_of,
)
from peers import Captured, wait_for
from txmail_relay import contract as c

pytestmark = pytest.mark.node

IP = "shop-ip"
APP_NS = "shop"
TOKEN = "shop"
DOMAIN = "example.com"  # the app's From domain, the DedicatedIP's one sending domain
LINK = "https://example.com/orders/42"
RELAY_SELECTOR = f"{c.LABEL_NAME}={c.RELAY_APP_NAME},{c.LABEL_INSTANCE}={IP}"
OPERATOR_SELECTOR = f"app.kubernetes.io/instance={RELEASE},app.kubernetes.io/component=operator"


@dataclass
class Shop:
    cluster: Cluster
    sink: NodeSink
    host: str  # the relay host in the app Secret
    relay_ip: str  # the relay Service's ClusterIP

    def send(self, subject: str) -> None:
        """An app pod sends one mail with the Secret's credentials, verifying ca.crt."""
        name = f"app-{uuid.uuid4().hex[:6]}"
        script = send_script(subject, LINK)
        log = self.cluster.run_app(
            APP_NS,
            name,
            f"{TOKEN}-smtp",
            script,
            host_aliases=[{"ip": self.relay_ip, "hostnames": [self.host]}],
        )
        assert f"250: accepted {subject}" in log


def _pv(cluster: Cluster) -> None:
    """A hostPath PersistentVolume for the relay's spool claim (no provisioner runs here)."""
    path = cluster.node.workdir / "pv-spool"
    path.mkdir(mode=0o770)
    os.chown(path, 65532, 65532)
    # The API call validates a dict into this model anyway; model_validate makes it typed.
    pv = client.V1PersistentVolume.model_validate(
        {
            "metadata": {"name": "txmail-spool"},
            "spec": {
                "capacity": {"storage": "1Gi"},
                "accessModes": ["ReadWriteOnce"],
                "storageClassName": "txmail-local",
                "persistentVolumeReclaimPolicy": "Retain",
                "hostPath": {"path": str(path), "type": "Directory"},
            },
        }
    )
    cluster.core.create_persistent_volume(pv)


@pytest.fixture(scope="module")
def shop(installed: Cluster) -> Iterator[Shop]:
    """A DedicatedIP with a spool on a PVC, an app namespace, an SmtpToken, as in the README."""
    cluster = installed
    sink = NodeSink(cluster.node)
    _pv(cluster)
    spool = {"persistentVolumeClaim": {"size": "1Gi", "storageClassName": "txmail-local"}}
    cluster.apply_cluster("dedicatedips", dedicated_ip(IP, sink, spool))
    cluster.namespace(APP_NS, {"txmail.dev/sending": "allowed"})
    cluster.smtp_token(APP_NS, TOKEN, IP, allowedFromDomains=["example.com"])
    try:
        secret = wait_for(
            lambda: cluster.secret(APP_NS, f"{TOKEN}-smtp"), 60, "the app Secret", every=0.5
        )
    except AssertionError as exc:
        token = cluster.get_namespaced(APP_NS, "smtptokens", TOKEN).get("status")
        ip = cluster.get_cluster("dedicatedips", IP).get("status")
        raise AssertionError(
            f"{exc}\nSmtpToken status: {token}\nDedicatedIP status: {ip}\n"
            + cluster.describe(NAMESPACE, OPERATOR_SELECTOR)
        ) from None
    shop = Shop(cluster, sink, secret["host"], cluster.service_ip(NAMESPACE, c.relay_name(IP)))
    try:
        yield shop
    finally:
        shop.sink.stop()  # a test may have replaced the first sink


def test_the_operator_pod_runs_restricted(installed: Cluster) -> None:
    pod = installed.wait_ready_pod(NAMESPACE, OPERATOR_SELECTOR, what="the operator pod")
    container = spec_of(pod).containers[0]
    assert container.security_context is not None
    assert container.security_context.read_only_root_filesystem is True
    pod_security = spec_of(pod).security_context
    assert pod_security is not None
    assert pod_security.run_as_non_root is True
    labels = meta_of(installed.core.read_namespace(NAMESPACE)).labels or {}
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


def test_a_dedicated_ip_becomes_a_ready_relay_pod(shop: Shop) -> None:
    cluster = shop.cluster
    pod = cluster.wait_ready_pod(NAMESPACE, RELAY_SELECTOR, what="the relay pod")
    operator = cluster.apps.read_namespaced_deployment(f"{RELEASE}-operator", NAMESPACE).spec
    assert operator is not None and operator.template.spec is not None
    assert spec_of(pod).containers[0].image == operator.template.spec.containers[0].image, (
        "relays run the image the chart installed"
    )

    def ready() -> dict[str, Any] | None:
        cond = cluster.condition(cluster.get_cluster("dedicatedips", IP), "Ready")
        return cond if cond and cond["status"] == "True" else None

    wait_for(ready, 60, "DedicatedIP Ready", every=0.5)
    # The relay reads its configuration through the in-cluster API config of its pod (its own
    # ServiceAccount's projected token, the API at KUBERNETES_SERVICE_HOST).
    log = cluster.core.read_namespaced_pod_log(name_of(pod), NAMESPACE)
    assert "watching relay configuration" in log
    assert "Traceback" not in log


def _dkim_key(cluster: Cluster) -> tuple[str, list[str]]:
    """The active selector of DOMAIN and its DKIM record's value, once the DedicatedIP's status
    lists them (the relay's configuration names the selector from then on)."""

    def listed() -> tuple[str, list[str]] | None:
        status = cluster.get_cluster("dedicatedips", IP).get("status") or {}
        domain = next((d for d in status.get("domains") or [] if d["name"] == DOMAIN), None)
        active = ((domain or {}).get("dkim") or {}).get("active") or []
        if not active:
            return None
        name = f"{active[0]}._domainkey.{DOMAIN}"
        for record in status.get("dnsRecords") or []:
            if record["purpose"] == "DKIM" and record["name"] == name:
                return active[0], list(record["value"])
        return None

    return wait_for(listed, 60, f"{DOMAIN}'s active DKIM selector in the status", every=0.5)


def dkim_verifies(message: bytes, name: str, value: list[str]) -> bool:
    """dkimpy's verdict on ``message``, its key lookups going through dnspython to a Knot
    server where ``name`` TXT is published as given (one record of these strings)."""
    with DnsServer() as server:
        server.set(name, "TXT", " ".join(txt(s) for s in value))
        return bool(dkim.verify(message, dnsfunc=server.txt_lookup()))


def _assert_signed(cluster: Cluster, mail: Captured, selector: str, value: list[str]) -> None:
    """``mail`` carries a DKIM-Signature d=DOMAIN s=``selector`` that verifies against the
    record the status lists, whose key is the one in the operator's key Secret."""
    # smtp-sink's own Received header on top: a trace field, not signed.
    message = ("Received: from " + mail.content).encode()
    sigs = [
        dkim.util.parse_tag_value(v)
        for k, v in dkim.DKIM(message).headers
        if k.lower() == b"dkim-signature"
    ]
    assert [(s[b"d"], s[b"s"]) for s in sigs] == [(DOMAIN.encode(), selector.encode())], sigs
    name = f"{selector}._domainkey.{DOMAIN}"
    assert dkim_verifies(message, name, value), f"the signature does not verify:\n{mail.content}"
    # The record's key is the public half of the key file the operator mounts into the relay.
    keys = cluster.secret(NAMESPACE, c.dkim_secret_name(IP))
    assert keys is not None, "no DKIM key Secret"
    private = serialization.load_pem_private_key(keys[f"{selector}.{DOMAIN}.pem"].encode(), None)
    der = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert f"p={base64.b64encode(der).decode()}" in "".join(value)


def test_an_app_pod_sends_through_the_relay_and_a_click_is_counted(shop: Shop) -> None:
    """... and the mail arrives DKIM-signed with the key the operator made, verifying against
    the record the DedicatedIP's status says to publish."""
    cluster = shop.cluster
    cluster.wait_ready_pod(NAMESPACE, RELAY_SELECTOR, what="the relay pod")
    selector, record = _dkim_key(cluster)
    shop.send("order 42")
    try:
        mail = next(
            m
            for m in wait_for(shop.sink.messages, 60, "mail at the sink", every=0.5)
            if "order 42" in m.content
        )
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{cluster.describe(NAMESPACE, RELAY_SELECTOR)}") from None
    assert mail.rcpts == ["buyer@example.net"] or "buyer@example.net" in mail.rcpts[0]
    _assert_signed(cluster, mail, selector, record)
    links = re.findall(rf"http://{re.escape(TRACK_HOST)}(/c/[^\"'\s<>]+)", html_of(mail.content))
    assert links, f"no tracked link in:\n{mail.content[:2000]}"
    tracking = cluster.service_ip(NAMESPACE, c.relay_name(IP))
    status, headers = cluster.http_get(tracking, 80, links[0], TRACK_HOST)
    assert status in (302, 303), status
    assert headers["location"] == LINK

    def clicked() -> dict[str, Any] | None:
        stats = (cluster.get_namespaced(APP_NS, "smtptokens", TOKEN).get("status") or {}).get(
            "stats"
        ) or {}
        # A click within tracking.machineClickWindow (2 s) of delivery is a machine's (a
        # gateway's scanner clicks that fast, and so may this test): counted in machineClicks.
        clicks = stats.get("clicks", 0) + stats.get("machineClicks", 0)
        return stats if clicks >= 1 and stats.get("sent", 0) >= 1 else None

    wait_for(clicked, 120, "the click in SmtpToken.status.stats", every=1)


def test_the_password_is_in_no_pod_log_or_event(shop: Shop) -> None:
    """After a send: the app's password appears nowhere a person or a log collector reads."""
    cluster = shop.cluster
    cluster.wait_ready_pod(NAMESPACE, RELAY_SELECTOR, what="the relay pod")
    shop.send("no secrets in logs")
    secret = cluster.secret(APP_NS, f"{TOKEN}-smtp")
    assert secret is not None
    password = secret["password"]
    for selector in (RELAY_SELECTOR, OPERATOR_SELECTOR):
        for pod in cluster.pods(NAMESPACE, selector):
            log = cluster.core.read_namespaced_pod_log(name_of(pod), NAMESPACE)
            assert password not in log, f"the password leaked into {name_of(pod)}'s log"
    for ns in (NAMESPACE, APP_NS):
        for event in cluster.core.list_namespaced_event(ns).items:
            assert password not in (event.message or ""), f"the password leaked into {event}"
    token = cluster.get_namespaced(APP_NS, "smtptokens", TOKEN)
    assert password not in str(token), "the password leaked into the SmtpToken"


def test_mail_accepted_before_the_relay_pod_is_deleted_is_delivered_after(shop: Shop) -> None:
    cluster = shop.cluster
    before = cluster.wait_ready_pod(NAMESPACE, RELAY_SELECTOR, what="the relay pod")
    shop.sink.stop()  # the upstream is down: the relay answers 250 and keeps the mail
    try:
        shop.send("survives a pod delete")
        # The old pod tried once and retries only after its first backoff (15 s,
        # spec.relay.retry): it is deleted before then, so only the new pod, recovering the
        # spool and its retry schedule from the claim, can deliver the mail.
        cluster.core.delete_namespaced_pod(name_of(before), NAMESPACE)
    finally:
        shop.sink = NodeSink(cluster.node)
    after = wait_for(
        lambda: (
            p
            if (p := cluster.ready_pod(NAMESPACE, RELAY_SELECTOR)) and uid_of(p) != uid_of(before)
            else None
        ),
        120,
        "a new relay pod",
        every=0.5,
    )
    assert uid_of(after) != uid_of(before)
    wait_for(
        lambda: [m for m in shop.sink.messages() if "survives a pod delete" in m.content],
        90,
        "the spooled mail delivered by the new pod",
        every=0.5,
    )


def test_helm_upgrade_rolls_the_operator(installed: Cluster) -> None:
    before = installed.wait_ready_pod(NAMESPACE, OPERATOR_SELECTOR, what="the operator pod")
    installed.helm(
        "upgrade",
        RELEASE,
        str(CHART),
        "-n",
        NAMESPACE,
        "--reuse-values",
        "--set",
        "operator.logFormat=plain",
        "--wait",
        "--timeout",
        "3m",
    )
    after = installed.wait_ready_pod(NAMESPACE, OPERATOR_SELECTOR, what="the new operator pod")
    assert uid_of(after) != uid_of(before)
    env = {e.name: e.value for e in spec_of(after).containers[0].env or []}
    assert env["TXMAIL_LOG_FORMAT"] == "plain"
