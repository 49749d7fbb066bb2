"""End to end: the operator and a relay process share one API server, as in a cluster.

The relay runs standalone with its Kubernetes config source pointed at the test kubeconfig,
so it sees exactly what the operator writes, through watches by name.
"""

from __future__ import annotations

import smtplib
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client

from k8s.kit import GROUP, VERSION, Kit
from k8s.operator_process import OperatorProcess
from peers import RelayProcess, Sink, auth_accepted, free_port, submit, wait_for
from txmail_relay import contract as c

pytestmark = pytest.mark.k8s
ADDRESS = "127.0.0.2"


@pytest.fixture
def kit(api: client.ApiClient, operator: OperatorProcess, operator_namespace: str) -> Kit:
    return Kit(api, operator_namespace)


@pytest.fixture
def sink() -> Iterator[Sink]:
    s = Sink()
    yield s
    s.stop()


@pytest.fixture
def live(
    kit: Kit, sink: Sink, kubeconfig: Path, tmp_path: Path
) -> Iterator[tuple[str, int, RelayProcess]]:
    """A DedicatedIP relaying to smtp-sink, and its relay process."""
    ip = kit.dedicated_ip(
        address=ADDRESS,
        delivery={
            "mode": "Smarthost",
            "smarthost": {"host": "127.0.0.1", "port": sink.port, "tls": "None"},
        },
    )
    tls = wait_for(
        lambda: kit.secret(kit.operator_namespace, c.tls_secret_name(ip)),
        10,
        "the relay's TLS Secret",
    )
    (tmp_path / "tls.crt").write_text(tls["tls.crt"])
    (tmp_path / "tls.key").write_text(tls["tls.key"])
    port = free_port(ADDRESS)
    relay = RelayProcess(
        {
            "kubernetes": {
                "namespace": kit.operator_namespace,
                "dedicatedIP": ip,
                "kubeconfig": str(kubeconfig),
            },
            "listen": {"host": ADDRESS, "submission": port, "submissions": None, "http": None},
            "tls": {"certFile": str(tmp_path / "tls.crt"), "keyFile": str(tmp_path / "tls.key")},
            "spool": {"directory": str(tmp_path / "spool")},
            "retry": {"minBackoff": 1, "maxBackoff": 2, "maxLifetime": 60},
            "statsInterval": 1,
            "logging": {"level": "DEBUG"},
        },
        tmp_path,
    )
    relay.start(wait_port=(ADDRESS, port))
    try:
        yield ip, port, relay
    finally:
        relay.stop()
        kit.objs.delete_cluster_custom_object(GROUP, VERSION, "dedicatedips", ip)


def message(n: int) -> bytes:
    return (
        f"From: Shop <orders@example.com>\r\nTo: ann@example.net\r\nSubject: order {n}\r\n"
        f"Message-ID: <order-{n}@example.com>\r\n\r\n"
        f"Thank you for order {n}.\r\nEND-OF-MESSAGE {n}\r\n"
    ).encode()


def secret_of(kit: Kit, namespace: str, old: str | None = None) -> dict[str, str] | None:
    s = kit.secret(namespace, "shop-smtp")
    return s if s and s.get("password") != old else None


def test_relay_follows_tokens_live(
    kit: Kit, namespace: str, sink: Sink, live: tuple[str, int, RelayProcess]
) -> None:
    ip, port, relay = live
    kit.token(namespace, ip, "shop")
    secret = wait_for(lambda: secret_of(kit, namespace), 10, "the app Secret")

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
    rotated = wait_for(
        lambda: secret_of(kit, namespace, secret["password"]), 10, "the reset password"
    )
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
