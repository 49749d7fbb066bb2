"""The CRDs on a real API server: installed, Established, validating, self-describing."""

from __future__ import annotations

import copy
import json
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from project import CRDS

pytestmark = pytest.mark.k8s
GROUP, VERSION = "txmail.dev", "v1alpha1"
SAMPLES = CRDS / "samples"


def sample(kind: str) -> dict[str, Any]:
    """A shipped sample, moved to the test's namespace (the samples name namespace `shop`)."""
    body: dict[str, Any] = yaml.safe_load((SAMPLES / f"{kind}.yaml").read_text())
    body["metadata"].pop("namespace", None)
    return body


def create(api: client.ApiClient, body: dict[str, Any], namespace: str) -> dict[str, Any]:
    objs = client.CustomObjectsApi(api)
    plural = body["kind"].lower() + "s"
    if body["kind"] == "DedicatedIP":
        out = objs.create_cluster_custom_object(
            GROUP, VERSION, plural, body, field_validation="Strict"
        )
    else:
        out = objs.create_namespaced_custom_object(
            GROUP, VERSION, namespace, plural, body, field_validation="Strict"
        )
    assert isinstance(out, dict)
    return out


def unique_ip(body: dict[str, Any]) -> dict[str, Any]:
    body = copy.deepcopy(body)
    body["metadata"]["name"] = f"ip-{uuid.uuid4().hex[:8]}"
    return body


def test_crds_are_established_with_names_and_category(
    api: client.ApiClient, crds: list[str]
) -> None:
    ext = client.ApiextensionsV1Api(api)
    short = {}
    for name in crds:
        crd = ext.read_custom_resource_definition(name)
        assert crd.spec.names.categories == ["txmail"]
        subresources = crd.spec.versions[0].subresources
        assert subresources is not None and subresources.status is not None
        short[crd.spec.names.kind] = crd.spec.names.short_names
    assert short == {
        "DedicatedIP": ["dip"],
        "SmtpToken": ["smtpt"],
        "TransactionalEmail": ["temail"],
    }


def _covers(stored: Any, sent: Any) -> bool:
    """Every value of the sample is stored as sent (the API server adds defaults beside)."""
    if isinstance(sent, dict):
        return isinstance(stored, dict) and all(_covers(stored.get(k), v) for k, v in sent.items())
    return bool(stored == sent)


@pytest.mark.parametrize("kind", ["dedicatedip", "smtptoken", "transactionalemail"])
def test_shipped_samples_are_accepted(
    api: client.ApiClient, crds: list[str], namespace: str, kind: str
) -> None:
    body = sample(kind)
    if kind == "dedicatedip":
        body = unique_ip(body)
    out = create(api, body, namespace)
    assert _covers(out["spec"], body["spec"]), (out["spec"], body["spec"])
    if kind == "dedicatedip":
        client.CustomObjectsApi(api).delete_cluster_custom_object(
            GROUP, VERSION, "dedicatedips", out["metadata"]["name"]
        )


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(body: dict[str, Any]) -> None:
        *parents, leaf = path.split(".")
        node = body
        for p in parents:
            node = node[p]
        if value is _DELETE:
            del node[leaf]
        else:
            node[leaf] = value

    return mutate


_DELETE = object()

INVALID = [
    ("dedicatedip", "spec.address", "300.1.2.3", "address must be an IPv4 or IPv6 address"),
    ("dedicatedip", "spec.address", "not-an-ip", "address must be an IPv4 or IPv6 address"),
    ("dedicatedip", "spec.bogus", True, 'unknown field "spec.bogus"'),
    ("dedicatedip", "spec.hostname", _DELETE, "spec.hostname: Required value"),
    ("dedicatedip", "spec.domains", [], "spec.domains: Invalid value"),
    ("dedicatedip", "spec.delivery.smarthost", _DELETE, "delivery.smarthost is required"),
    ("dedicatedip", "metadata.name", "x" * 51, "metadata.name must be at most 50 characters"),
    (
        "dedicatedip",
        "spec.relay",
        {"retry": {"minBackoffSeconds": 600, "maxBackoffSeconds": 60}},
        "retry.minBackoffSeconds must not exceed retry.maxBackoffSeconds",
    ),
    ("smtptoken", "spec.passwordGeneration", -1, "should be greater than or equal to 1"),
    ("smtptoken", "spec.rotationGracePeriod", "ten minutes", "spec.rotationGracePeriod"),
    ("smtptoken", "spec.dedicatedIPRef", _DELETE, "spec.dedicatedIPRef: Required value"),
    ("smtptoken", "metadata.name", "t" * 64, "metadata.name must be at most 63 characters"),
    ("transactionalemail", "spec.from.address", "not an address", "spec.from.address"),
    ("transactionalemail", "spec.html", _DELETE, None),  # text alone is fine
    ("transactionalemail", "spec.subject", "", "spec.subject"),
]


@pytest.mark.parametrize(("kind", "path", "value", "message"), INVALID)
def test_invalid_objects_are_rejected_with_a_clear_message(
    api: client.ApiClient,
    crds: list[str],
    namespace: str,
    kind: str,
    path: str,
    value: Any,
    message: str | None,
) -> None:
    body = sample(kind)
    if kind == "dedicatedip":
        body = unique_ip(body)
    _set(path, value)(body)
    if message is None:
        create(api, body, namespace)
        return
    with pytest.raises(ApiException) as err:
        create(api, body, namespace)
    # Strict decoding answers 400 for unknown fields; schema and CEL violations are 422.
    assert err.value.status == (400 if "unknown field" in message else 422), err.value.body
    assert message in status_message(err.value)


def status_message(err: ApiException) -> str:
    """The message of the Status the API server answered with, as kubectl prints it."""
    assert err.body is not None, err
    text: str = json.loads(err.body)["message"]
    return text


def test_email_needs_html_or_text(api: client.ApiClient, crds: list[str], namespace: str) -> None:
    body = sample("transactionalemail")
    del body["spec"]["html"], body["spec"]["text"]
    with pytest.raises(ApiException) as err:
        create(api, body, namespace)
    assert "at least one of html and text is required" in status_message(err.value)


def test_address_is_immutable(api: client.ApiClient, crds: list[str]) -> None:
    body = unique_ip(sample("dedicatedip"))
    create(api, body, "")
    objs = client.CustomObjectsApi(api)
    name = body["metadata"]["name"]
    try:
        with pytest.raises(ApiException) as err:
            objs.patch_cluster_custom_object(
                GROUP, VERSION, "dedicatedips", name, {"spec": {"address": "127.0.0.9"}}
            )
        assert "address is immutable" in status_message(err.value)
        objs.patch_cluster_custom_object(  # other fields stay editable
            GROUP, VERSION, "dedicatedips", name, {"spec": {"hostname": "mta2.example.com"}}
        )
    finally:
        objs.delete_cluster_custom_object(GROUP, VERSION, "dedicatedips", name)


def test_password_generation_can_only_be_raised(
    api: client.ApiClient, crds: list[str], namespace: str
) -> None:
    body = sample("smtptoken")
    body["spec"]["passwordGeneration"] = 3
    create(api, body, namespace)
    objs = client.CustomObjectsApi(api)
    with pytest.raises(ApiException) as err:
        objs.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, "smtptokens", "shop", {"spec": {"passwordGeneration": 2}}
        )
    assert "passwordGeneration can only be raised" in status_message(err.value)
    objs.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, "smtptokens", "shop", {"spec": {"passwordGeneration": 4}}
    )


def _undocumented(schema: dict[str, Any], path: str) -> list[str]:
    missing = []
    for name, prop in (schema.get("properties") or {}).items():
        here = f"{path}.{name}"
        if name not in {"metadata"} and not prop.get("description"):
            missing.append(here)
        missing += _undocumented(prop, here)
        if "items" in prop:
            missing += _undocumented(prop["items"], f"{here}[]")
    return missing


def test_every_field_is_described_for_kubectl_explain(
    api: client.ApiClient, crds: list[str]
) -> None:
    """What `kubectl explain` shows comes from the schema the server holds."""
    ext = client.ApiextensionsV1Api(api)
    for name in crds:
        crd = ext.read_custom_resource_definition(name)
        raw: dict[str, Any] = api.sanitize_for_serialization(crd)  # type: ignore[no-untyped-call]
        schema = raw["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        assert schema["description"]
        assert _undocumented(schema, name.split(".")[0]) == []
        assert "hostname" in schema["properties"]["spec"].get("properties", {}) or name != (
            "dedicatedips.txmail.dev"
        )
