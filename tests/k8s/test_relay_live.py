"""End to end: the operator and a relay process share one API server, as in a cluster.

The relay runs standalone with its Kubernetes config source pointed at the test kubeconfig,
so it sees exactly what the operator writes, through watches by name. The last tests run the
relay's config source and stats publisher in this process against the same API server.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email as email_parser
import email.policy as email_policy
import http.client
import json
import os
import re
import smtplib
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from cluster.controlplane import ControlPlane, control_plane
from cluster.kubeapi import close_api_client, new_api_client
from k8s.conftest import ADDRESS, Live
from k8s.kit import GROUP, VERSION, Kit
from peers import Sink, auth_accepted, submit, wait_for
from relay.relaykit import credential
from txmail_relay import contract as c
from txmail_relay.config.kube import (
    KubeApi,
    KubernetesConfigSource,
    KubernetesStatsPublisher,
    ObjectWatch,
)
from txmail_relay.config.live import DynamicConfig, LiveConfig
from txmail_relay.settings import KubernetesSettings

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
    open_conn._host = secret["host"]  # type: ignore[attr-defined] # smtplib's TLS server name
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
        # A browser's user agent: a click without one is a machine's (not counted in clicks).
        conn.request(
            "GET", path, headers={"User-Agent": "Mozilla/5.0 (X11; Linux x86_64) txmail-tests"}
        )
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
    email: dict[str, Any] = wait_for(
        lambda: (
            kit.get("transactionalemails", namespace, "receipt")
            if kit.is_ready("transactionalemails", namespace, "receipt")
            else None
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
    relay_api = client.CoreV1Api(new_api_client(live.kubeconfig))
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


# --- the relay's Kubernetes config source on its own, against the API server -----------------

RELAY_IP = "203.0.113.9"


def relay_document(hostname: str, *, credential_shards: int, template_shards: int) -> str:
    return c.RelayConfig(
        dedicated_ip=RELAY_IP,
        address=RELAY_IP,
        hostname=hostname,
        domains=["example.com"],
        credential_shards=credential_shards,
        template_shards=template_shards,
    ).to_json()


def config_map(name: str, data: dict[str, str] | None = None) -> client.V1ConfigMap:
    return client.V1ConfigMap(metadata=client.V1ObjectMeta(name=name), data=data)


def credentials_data(*usernames: str) -> dict[str, str]:
    return {
        name: base64.b64encode(credential(name, "pw").to_json().encode()).decode()
        for name in usernames
    }


class RecordingConfig(LiveConfig):
    """A LiveConfig that keeps every snapshot it was given, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.published: list[DynamicConfig] = []

    def publish(self, config: DynamicConfig) -> None:
        self.published.append(config)
        super().publish(config)


async def eventually(probe: Callable[[], object], what: str, within: float = 10) -> None:
    """Poll ``probe`` on the event loop until it is truthy, or fail after ``within`` s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not probe():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what}")
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def running(source: KubernetesConfigSource, store: LiveConfig) -> AsyncIterator[None]:
    task = asyncio.create_task(source.run(store))
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_the_config_source_publishes_complete_configurations_and_keeps_the_last_good(
    api: client.ApiClient, kubeconfig: Path, namespace: str
) -> None:
    """Unready until the relay ConfigMap and every shard were read; a broken relay.json is
    ignored while the shards still apply; a deleted shard counts as empty."""
    core = client.CoreV1Api(api)
    relay_cm = c.relay_name(RELAY_IP)
    document = relay_document("mx1.example.com", credential_shards=2, template_shards=1)
    core.create_namespaced_config_map(
        namespace, config_map(relay_cm, {c.RELAY_CONFIG_KEY: document})
    )
    for shard, users in ((0, ("ann",)), (1, ("bob",))):
        name = c.credentials_secret_name(RELAY_IP, shard)
        secret = client.V1Secret(
            metadata=client.V1ObjectMeta(name=name), data=credentials_data(*users)
        )
        core.create_namespaced_secret(namespace, secret)
    # the template shard does not exist: it counts as empty once read
    settings = relay_settings(namespace, kubeconfig)
    kube = KubeApi(settings)
    store = RecordingConfig()
    try:
        async with running(KubernetesConfigSource(settings, kube), store):
            first = await asyncio.wait_for(store.wait_ready(), 15)
            assert set(first.credentials) == {"ann", "bob"}  # never a partial snapshot
            assert store.published[0] is first

            shard1 = c.credentials_secret_name(RELAY_IP, 1)
            core.patch_namespaced_secret(shard1, namespace, {"data": credentials_data("bob", "cy")})
            await eventually(lambda: "cy" in current(store).credentials, "cy's credential")

            core.patch_namespaced_config_map(
                relay_cm, namespace, {"data": {c.RELAY_CONFIG_KEY: "{not json"}}
            )
            shard0 = c.credentials_secret_name(RELAY_IP, 0)
            core.patch_namespaced_secret(
                shard0, namespace, {"data": credentials_data("ann", "dee")}
            )
            await eventually(lambda: "dee" in current(store).credentials, "dee's credential")
            assert current(store).relay.hostname == "mx1.example.com"  # the last good one

            core.patch_namespaced_config_map(
                relay_cm,
                namespace,
                {
                    "data": {
                        c.RELAY_CONFIG_KEY: relay_document(
                            "mx2.example.com", credential_shards=2, template_shards=1
                        )
                    }
                },
            )
            await eventually(
                lambda: current(store).relay.hostname == "mx2.example.com", "the fixed relay.json"
            )
            core.delete_namespaced_secret(shard1, namespace)
            await eventually(
                lambda: set(current(store).credentials) == {"ann", "dee"}, "bob and cy gone"
            )
    finally:
        await kube.close()


def relay_settings(namespace: str, kubeconfig: Path) -> KubernetesSettings:
    return KubernetesSettings(namespace=namespace, dedicated_ip=RELAY_IP, kubeconfig=kubeconfig)


def current(store: LiveConfig) -> DynamicConfig:
    assert store.current is not None
    return store.current


@pytest.fixture(scope="module")
def uncached() -> Iterator[ControlPlane]:
    """A control plane of its own, without the API server's watch cache, so that a watch
    from a compacted resourceVersion gets 410 Gone from etcd as soon as it is compacted."""
    if os.environ.get("TXMAIL_TEST_KUBECONFIG"):
        pytest.skip("needs a control plane of its own (etcd compaction, no watch cache)")
    with control_plane(apiserver_args=["--watch-cache=false"]) as cp:
        yield cp


def compact_etcd(cp: ControlPlane) -> None:
    """Compact etcd at its current revision, as the API server does every 5 minutes."""
    args = cp.processes["etcd"].args
    assert isinstance(args, list)
    flag = next(str(a) for a in args if str(a).startswith("--listen-client-urls="))
    url = flag.partition("=")[2]

    def call(path: str, body: dict[str, Any]) -> dict[str, Any]:
        request = urllib.request.Request(f"{url}{path}", data=json.dumps(body).encode())
        with urllib.request.urlopen(request, timeout=10) as reply:
            doc: dict[str, Any] = json.loads(reply.read())
            return doc

    header = call("/v3/kv/range", {"key": base64.b64encode(b"/").decode()})["header"]
    call("/v3/kv/compaction", {"revision": int(header["revision"]), "physical": True})


async def test_a_watch_too_old_to_resume_reads_the_object_again(uncached: ControlPlane) -> None:
    """A watch the server ends resumes from the last resourceVersion; when that was compacted
    meanwhile (410 Gone), the object is read again and watched from now, once, not in a loop
    (its own resourceVersion is just as old)."""
    admin_api = new_api_client(uncached.kubeconfig)
    admin = client.CoreV1Api(admin_api)
    ns = "default"
    admin.create_namespaced_config_map(ns, config_map("watched", {"v": "1"}))
    kube = KubeApi(relay_settings(ns, uncached.kubeconfig))
    try:
        core = await kube.core()
        reads: list[str] = []

        async def read(name: str, namespace: str) -> Any:
            obj = await core.read_namespaced_config_map(name, namespace)
            reads.append(obj.metadata.resource_version)
            return obj

        seen: list[Mapping[str, str] | None] = []
        watch = ObjectWatch(
            read,
            core.list_namespaced_config_map,
            namespace=ns,
            name="watched",
            on_change=seen.append,
            timeout=2,  # the server ends each watch after 2 s
        )
        task = asyncio.create_task(watch.run())
        try:
            admin.patch_namespaced_config_map("watched", ns, {"data": {"v": "2"}})
            await eventually(lambda: seen and seen[-1] == {"v": "2"}, "the change, watched")
            assert len(reads) == 1
            for n in range(3):  # history moves on past the watch's resourceVersion
                admin.create_namespaced_config_map(ns, config_map(f"other-{n}"))
            compact_etcd(uncached)
            await eventually(lambda: len(reads) == 2, "a fresh read after 410 Gone")
            admin.patch_namespaced_config_map("watched", ns, {"data": {"v": "3"}})
            await eventually(lambda: seen[-1] == {"v": "3"}, "the next change, watched again")
            admin.delete_namespaced_config_map("watched", ns)
            await eventually(lambda: seen[-1] is None, "the deletion")
            assert len(reads) == 2
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    finally:
        await kube.close()
        close_api_client(admin_api)


async def test_the_stats_publisher_patches_only_the_stats_key(
    api: client.ApiClient, kubeconfig: Path, namespace: str
) -> None:
    core = client.CoreV1Api(api)
    name = c.stats_config_map_name(RELAY_IP)
    core.create_namespaced_config_map(namespace, config_map(name, {"other": "kept"}))
    settings = relay_settings(namespace, kubeconfig)
    kube = KubeApi(settings)
    try:
        stats = c.RelayStats(tokens={"u": c.TokenStats(sent=3)}, updated_at="2026-01-01T00:00:00Z")
        await KubernetesStatsPublisher(settings, kube).publish(stats)
    finally:
        await kube.close()
    data = core.read_namespaced_config_map(name, namespace).data or {}
    assert data["other"] == "kept"
    parsed = c.RelayStats.model_validate_json(data[c.STATS_KEY])
    assert parsed.tokens["u"].sent == 3
    assert '"uniqueOpens"' in data[c.STATS_KEY]
