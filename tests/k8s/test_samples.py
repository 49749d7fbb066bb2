"""`kubectl apply -f crds/samples/`, as a user runs it, leads to a usable SmtpToken.

kubectl applies a directory's files in name order; that order must also be the order the
objects depend on each other (the app namespace before the objects in it). Applied here with
server-side apply through the dynamic client, file by file, as `kubectl apply --server-side`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic import DynamicClient

from k8s.kit import Kit
from k8s.operator_process import wait_for
from project import CRDS

pytestmark = pytest.mark.k8s
SAMPLES = CRDS / "samples"


def documents() -> list[dict[str, Any]]:
    return [
        doc
        for path in sorted(SAMPLES.glob("*.yaml"))  # kubectl's order for a directory
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    ]


@pytest.fixture
def applied(api: client.ApiClient, kit: Kit) -> Iterator[list[dict[str, Any]]]:
    dyn = DynamicClient(api)  # type: ignore[no-untyped-call]
    done: list[tuple[Any, dict[str, Any]]] = []
    try:
        for doc in documents():
            resource = dyn.resources.get(api_version=doc["apiVersion"], kind=doc["kind"])
            resource_ns = doc["metadata"].get("namespace") if resource.namespaced else None
            if resource.namespaced:
                assert resource_ns, f"{doc['kind']} {doc['metadata']['name']} names no namespace"
            dyn.server_side_apply(  # type: ignore[no-untyped-call]
                resource, body=doc, namespace=resource_ns, field_manager="kubectl"
            )
            done.append((resource, doc))
        yield [doc for _, doc in done]
    finally:
        for resource, doc in reversed(done):
            try:
                dyn.delete(  # type: ignore[no-untyped-call]
                    resource,
                    name=doc["metadata"]["name"],
                    namespace=doc["metadata"].get("namespace"),
                )
            except ApiException as exc:
                if exc.status != 404:
                    raise
        for resource, doc in done:  # the next test may apply the same names
            name, ns = doc["metadata"]["name"], doc["metadata"].get("namespace")
            wait_for(_gone(dyn, resource, name, ns), 60, f"{doc['kind']} {name} gone")


def _gone(
    dyn: DynamicClient, resource: Any, name: str, namespace: str | None
) -> Callable[[], bool]:
    def probe() -> bool:
        try:
            dyn.get(resource, name=name, namespace=namespace)  # type: ignore[no-untyped-call]
        except ApiException as exc:
            if exc.status == 404:
                return True
            raise
        return False

    return probe


def test_samples_apply_in_file_order_and_the_token_becomes_a_secret(
    applied: list[dict[str, Any]], kit: Kit
) -> None:
    kinds = [doc["kind"] for doc in applied]
    assert kinds == ["DedicatedIP", "Namespace", "SmtpToken", "TransactionalEmail"]
    token = next(doc for doc in applied if doc["kind"] == "SmtpToken")
    ns, name = token["metadata"]["namespace"], token["metadata"]["name"]

    def ready() -> dict[str, str] | None:
        return kit.secret(ns, f"{name}-smtp") if kit.is_ready("smtptokens", ns, name) else None

    secret = wait_for(ready, 20, f"SmtpToken {ns}/{name} Ready with its Secret")
    assert set(secret) >= {"host", "port", "username", "password", "tls", "url", "ca.crt"}
    email = next(doc for doc in applied if doc["kind"] == "TransactionalEmail")
    wait_for(
        lambda: kit.is_ready("transactionalemails", ns, email["metadata"]["name"]),
        20,
        "the TransactionalEmail sample Ready",
    )
    ip = next(doc for doc in applied if doc["kind"] == "DedicatedIP")
    wait_for(
        lambda: (
            ((kit.get("dedicatedips", None, ip["metadata"]["name"]) or {}).get("status") or {}).get(
                "tokens"
            )
            == 1
        ),
        10,
        "the sample DedicatedIP counting the sample token",
    )
