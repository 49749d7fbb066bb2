"""The operator's asyncio API client and watches, as the operator's ServiceAccount, against
the real API server: field managers, 404 as an answer, Events, and a watch that carries an
object far larger than aiohttp's line buffer (a credential shard at 5,000 tokens)."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from kubernetes import client
from kubernetes_asyncio import client as aio_client

from k8s.operator_process import OperatorProcess
from txmail_operator.kube import (
    ENTRY_FIELD_MANAGER,
    FIELD_MANAGER,
    AsyncWatch,
    Kube,
    NamespaceTerminatingError,
    Watches,
    retry_delay,
)

pytestmark = pytest.mark.k8s
Obj = dict[str, Any]


@pytest.fixture
async def kube(operator: OperatorProcess) -> AsyncIterator[Kube]:
    api = Kube(await Kube.load_configuration(kubeconfig=str(operator.kubeconfig)))
    yield api
    await api.close()
    # aiohttp has closed its connections' transports; each closes its socket on the next loop
    # iteration (call_soon). Let that happen before pytest-asyncio ends this test's loop, or
    # the socket is left to the garbage collector and its ResourceWarning fails a later test
    # (seen in a clean-clone CI run, in tests/k8s/test_operator.py).
    await asyncio.sleep(0)
    await asyncio.sleep(0)


def config_map(namespace: str, name: str, data: dict[str, str]) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": namespace},
        "data": data,
    }


async def test_apply_patch_get_delete_with_the_fixed_field_managers(
    kube: Kube, operator_namespace: str
) -> None:
    name = f"kube-{uuid.uuid4().hex[:6]}"
    await kube.apply(config_map(operator_namespace, name, {"a": "1"}))
    await kube.merge_patch("v1", "ConfigMap", operator_namespace, name, {"data": {"entry": "x"}})
    # an apply of the object's own fields keeps the entry another manager wrote
    await kube.apply(config_map(operator_namespace, name, {"a": "2"}))
    got = await kube.get("v1", "ConfigMap", operator_namespace, name)
    assert got is not None and got["data"] == {"a": "2", "entry": "x"}
    managers = {m["manager"] for m in got["metadata"]["managedFields"]}
    assert managers == {FIELD_MANAGER, ENTRY_FIELD_MANAGER}
    await kube.delete("v1", "ConfigMap", operator_namespace, name)
    assert await kube.get("v1", "ConfigMap", operator_namespace, name) is None
    await kube.delete("v1", "ConfigMap", operator_namespace, name)  # gone: not an error
    missing = await kube.patch_status(
        "txmail.dev/v1alpha1", "SmtpToken", operator_namespace, name, {"x": 1}
    )
    assert missing is None


async def test_a_namespace_being_deleted_is_no_permission_problem(
    kube: Kube, api: client.ApiClient
) -> None:
    """Writes into a namespace that is being deleted are refused (403 NamespaceTerminating).
    That is not a missing permission, so it is told apart: one line without the HTTP body
    (what kopf logs, and tests/k8s/test_rbac.py checks for 403s), and no Event is missed."""
    core = client.CoreV1Api(api)
    namespace = f"t-{uuid.uuid4().hex[:10]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace)))
    hold = config_map(namespace, "hold", {})
    hold["metadata"]["finalizers"] = ["txmail.dev/test-hold"]  # keeps it Terminating
    core.create_namespaced_config_map(namespace, client.V1ConfigMap.model_validate(hold))
    core.delete_namespace(namespace)

    def phase() -> str | None:
        return (core.read_namespace(namespace).status or client.V1NamespaceStatus()).phase

    try:
        deadline = asyncio.get_running_loop().time() + 30
        while phase() != "Terminating":
            assert asyncio.get_running_loop().time() < deadline, "the namespace never terminated"
            await asyncio.sleep(0.1)
        with pytest.raises(NamespaceTerminatingError) as refused:
            # a Secret: what the operator writes into app namespaces (an app Secret put back)
            await kube.apply(
                {
                    "apiVersion": "v1",
                    "kind": "Secret",
                    "metadata": {"name": "app-smtp", "namespace": namespace},
                    "stringData": {"password": "x"},
                }
            )
        assert refused.value.status == 403
        assert "403" not in str(refused.value) and "Forbidden" not in str(refused.value)
        # an Event about an object there is dropped, not raised
        obj = config_map(namespace, "hold", {})
        obj["metadata"]["uid"] = str(uuid.uuid4())
        await kube.event(obj, "Tested", "an Event", now=_now())
    finally:
        core.patch_namespaced_config_map("hold", namespace, {"metadata": {"finalizers": None}})


async def test_events_name_the_object(
    kube: Kube, operator_namespace: str, api: client.ApiClient
) -> None:
    name = f"kube-{uuid.uuid4().hex[:6]}"
    obj = await kube.apply(config_map(operator_namespace, name, {}))
    await kube.event(obj, "Tested", "an Event", warning=True, now=_now())
    events = client.CoreV1Api(api).list_namespaced_event(
        operator_namespace, field_selector=f"involvedObject.name={name}"
    )
    (event,) = events.items
    assert (event.reason, event.type, event.message) == ("Tested", "Warning", "an Event")
    assert event.source is not None and event.source.component == FIELD_MANAGER
    await kube.delete("v1", "ConfigMap", operator_namespace, name)


async def test_a_watch_lists_then_carries_changes_of_any_size(
    operator: OperatorProcess, operator_namespace: str, api: client.ApiClient
) -> None:
    name = f"kube-{uuid.uuid4().hex[:6]}"
    core = client.CoreV1Api(api)
    core.create_namespaced_config_map(
        operator_namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name=name))
    )
    seen: list[tuple[str, str, int]] = []
    listed: list[int] = []

    def on_event(type_: str, obj: Obj) -> None:
        if (obj.get("metadata") or {}).get("name") == name:  # SYNCED: an empty object
            seen.append((type_, obj["kind"], len((obj.get("data") or {}).get("big", ""))))

    watches = Watches(
        aio_client.ApiClient(await Kube.load_configuration(kubeconfig=str(operator.kubeconfig)))
    )
    path = f"/api/v1/namespaces/{operator_namespace}/configmaps"
    watches.start(
        AsyncWatch(
            watches.api, path, "ConfigMap", on_event, on_listed=lambda items: listed.append(1)
        )
    )
    try:
        await _until(lambda: listed and ("LISTED", "ConfigMap", 0) in seen, "the listing")
        big = "x" * 700_000  # one watch event, one line of JSON, far above 64 KiB
        core.patch_namespaced_config_map(name, operator_namespace, {"data": {"big": big}})
        await _until(lambda: ("MODIFIED", "ConfigMap", len(big)) in seen, "the big change")
        core.delete_namespaced_config_map(name, operator_namespace)
        await _until(lambda: any(s[0] == "DELETED" for s in seen), "the deletion")
    finally:
        await watches.stop()


def test_retry_after_is_honoured_and_capped() -> None:
    assert retry_delay(1, {"Retry-After": "3"}) == 3.0
    assert retry_delay(1, {"Retry-After": "3600"}) == 30.0
    assert 0.125 <= retry_delay(1, {}) <= 0.25  # no header: backoff with jitter
    assert 4.0 <= retry_delay(10, None) <= 8.0


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


async def _until(probe: Any, what: str, seconds: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while not probe():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {seconds} s waiting for {what}")
        await asyncio.sleep(0.05)
