"""Small helpers for the k8s tier: create txmail objects, read what the operator wrote."""

from __future__ import annotations

import base64
import datetime as dt
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from cluster.kubeapi import name_of
from peers import wait_for
from txmail_relay import contract as c

GROUP, VERSION = "txmail.dev", "v1alpha1"
Obj = dict[str, Any]
T = TypeVar("T")


def read_or_none(call: Callable[[], T]) -> T | None:
    """``call()``, or None when the API answers 404."""
    try:
        return call()
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def short(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@dataclass
class Kit:
    api: client.ApiClient
    operator_namespace: str

    @property
    def objs(self) -> client.CustomObjectsApi:
        return client.CustomObjectsApi(self.api)

    @property
    def core(self) -> client.CoreV1Api:
        return client.CoreV1Api(self.api)

    # --- create ---------------------------------------------------------------------------

    def dedicated_ip(self, name: str | None = None, **spec: Any) -> str:
        """A DedicatedIP; its DNS does not gate Ready unless ``dns=`` says otherwise (the
        tier's DNS server has no records for it: tests/k8s/test_dns_verified.py publishes)."""
        name = name or short("ip")
        spec.setdefault("dns", {"requireVerified": False})
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "DedicatedIP",
            "metadata": {"name": name},
            "spec": {
                "address": "127.0.0.2",
                "hostname": "mta1.example.com",
                "domains": ["example.com", "example.org"],
                **spec,
            },
        }
        self.objs.create_cluster_custom_object(GROUP, VERSION, "dedicatedips", body)
        return name

    def token(self, namespace: str, ip: str, name: str = "app", **spec: Any) -> str:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "SmtpToken",
            "metadata": {"name": name},
            "spec": {"dedicatedIPRef": {"name": ip}, **spec},
        }
        self.objs.create_namespaced_custom_object(GROUP, VERSION, namespace, "smtptokens", body)
        return name

    def email(self, namespace: str, ip: str, name: str = "welcome", **spec: Any) -> str:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "TransactionalEmail",
            "metadata": {"name": name},
            "spec": {
                "dedicatedIPRef": {"name": ip},
                "from": {"name": "Shop", "address": "orders@example.com"},
                "subject": "Hello {{ contact.firstname }}",
                "html": "<p>Hello {{ contact.firstname }}</p>",
                "text": "Hello {{ contact.firstname }}",
                **spec,
            },
        }
        self.objs.create_namespaced_custom_object(
            GROUP, VERSION, namespace, "transactionalemails", body
        )
        return name

    # --- read -----------------------------------------------------------------------------

    def get(self, plural: str, namespace: str | None, name: str) -> Obj | None:
        try:
            if namespace is None:
                out = self.objs.get_cluster_custom_object(GROUP, VERSION, plural, name)
            else:
                out = self.objs.get_namespaced_custom_object(
                    GROUP, VERSION, namespace, plural, name
                )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        assert isinstance(out, dict)
        return out

    def condition(
        self, plural: str, namespace: str | None, name: str, type_: str = "Ready"
    ) -> Obj | None:
        body = self.get(plural, namespace, name) or {}
        conds = (body.get("status") or {}).get("conditions") or []
        return next((x for x in conds if x["type"] == type_), None)

    def is_ready(self, plural: str, namespace: str | None, name: str) -> bool:
        cond = self.condition(plural, namespace, name)
        return bool(cond and cond["status"] == "True")

    def reason(
        self, plural: str, namespace: str | None, name: str, type_: str = "Ready"
    ) -> str | None:
        cond = self.condition(plural, namespace, name, type_)
        return cond["reason"] if cond else None

    def secret(self, namespace: str, name: str) -> dict[str, str] | None:
        raw = self.raw_secret(namespace, name)
        if raw is None:
            return None
        return {k: base64.b64decode(v).decode() for k, v in (raw.data or {}).items()}

    def new_password(
        self, namespace: str, name: str, old: str, timeout: float = 10.0
    ) -> dict[str, str]:
        """Wait until the app Secret holds a password other than ``old``; return its data."""

        def changed() -> dict[str, str] | None:
            data = self.secret(namespace, name)
            return data if data and data.get("password") != old else None

        return wait_for(changed, timeout, f"a new password in Secret {namespace}/{name}")

    def raw_secret(self, namespace: str, name: str) -> Any:
        try:
            return self.core.read_namespaced_secret(name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def entry(self, ip: str, username: str) -> c.CredentialEntry | None:
        shard = c.credentials_secret_name(ip, c.shard_of(username, c.CREDENTIAL_SHARDS))
        data = self.secret(self.operator_namespace, shard) or {}
        return c.CredentialEntry.model_validate_json(data[username]) if username in data else None

    def template(self, ip: str, email_id: int) -> c.TemplateEntry | None:
        key = str(email_id)
        name = c.templates_config_map_name(ip, c.shard_of(key, c.TEMPLATE_SHARDS))
        try:
            cm = self.core.read_namespaced_config_map(name, self.operator_namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        raw = (cm.data or {}).get(key)
        return c.TemplateEntry.model_validate_json(raw) if raw else None

    def accepts(self, ip: str, username: str, password: str) -> bool:
        """What the relay would answer to AUTH with these credentials right now."""
        entry = self.entry(ip, username)
        return entry is not None and entry.accepts(password, dt.datetime.now(dt.UTC))

    def relay_config(self, ip: str) -> c.RelayConfig | None:
        """The RelayConfig the operator wrote for ``ip``, or None before it did."""
        try:
            cm = self.core.read_namespaced_config_map(c.relay_name(ip), self.operator_namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        raw = (cm.data or {}).get(c.RELAY_CONFIG_KEY)
        return c.RelayConfig.model_validate_json(raw) if raw else None

    def mark_relay_ready(self, ip: str) -> None:
        """Play the kubelet (none runs in this tier): ``ip``'s relay pod is Running and Ready,
        and the operator has seen it (RelayAvailable)."""
        ns = self.operator_namespace
        selector = f"{c.LABEL_INSTANCE}={ip},{c.LABEL_NAME}={c.RELAY_APP_NAME}"
        pod = wait_for(
            lambda: next(
                iter(self.core.list_namespaced_pod(ns, label_selector=selector).items), None
            ),
            30,
            "the relay pod",
        )
        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        ready = [
            {"type": t, "status": "True", "lastTransitionTime": now}
            for t in ("Ready", "ContainersReady")
        ]
        self.core.patch_namespaced_pod_status(
            name_of(pod), ns, {"status": {"phase": "Running", "conditions": ready}}
        )
        wait_for(
            lambda: self.reason("dedicatedips", None, ip, "RelayAvailable") == "RelayAvailable",
            30,
            "RelayAvailable",
        )

    def events(self, namespace: str, name: str) -> list[Any]:
        evs = self.core.list_namespaced_event(namespace).items
        return [e for e in evs if e.involved_object.name == name]


@contextmanager
def refused_token_status(kit: Kit, namespace: str, message: str) -> Iterator[None]:
    """A ValidatingAdmissionPolicy that refuses SmtpToken status writes in ``namespace``, in
    effect when the block starts (policies apply asynchronously: probed with a throwaway
    token), removed when it ends."""
    admission = client.AdmissionregistrationV1Api(kit.api)
    name = f"refuse-status-{namespace}"
    # The API methods validate a dict body into their model; model_validate does the same here.
    policy = client.V1ValidatingAdmissionPolicy.model_validate(
        {
            "metadata": {"name": name},
            "spec": {
                "failurePolicy": "Fail",
                "matchConstraints": {
                    "resourceRules": [
                        {
                            "apiGroups": [GROUP],
                            "apiVersions": [VERSION],
                            "operations": ["UPDATE"],
                            "resources": ["smtptokens/status"],
                        }
                    ]
                },
                "validations": [{"expression": "false", "message": message}],
            },
        }
    )
    binding = client.V1ValidatingAdmissionPolicyBinding.model_validate(
        {
            "metadata": {"name": name},
            "spec": {
                "policyName": name,
                "validationActions": ["Deny"],
                "matchResources": {
                    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}}
                },
            },
        }
    )
    admission.create_validating_admission_policy(policy)
    admission.create_validating_admission_policy_binding(binding)
    try:
        probe = kit.token(namespace, "no-such-ip", "policy-probe")

        def denied() -> bool:
            try:
                kit.objs.patch_namespaced_custom_object_status(
                    GROUP, VERSION, namespace, "smtptokens", probe, {"status": {"username": "x"}}
                )
            except ApiException as exc:
                return exc.status in (403, 422) and message in str(exc.body)
            return False

        wait_for(denied, 10, "the admission policy to take effect", every=0.2)
        kit.objs.delete_namespaced_custom_object(GROUP, VERSION, namespace, "smtptokens", probe)
        yield
    finally:
        admission.delete_validating_admission_policy_binding(name)
        admission.delete_validating_admission_policy(name)
