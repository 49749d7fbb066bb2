"""The only module that talks to the Kubernetes API.

Objects are written with server-side apply under one field manager, so a re-run changes
nothing and a person's edits to fields we do not own are kept. Shard entries (one token or
template in a shared Secret/ConfigMap) are merge patches of single keys under a second,
equally fixed manager, so concurrent reconciles of different tokens never overwrite each
other and an apply of the shard's metadata never prunes them.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

FIELD_MANAGER = "txmail-operator"
ENTRY_FIELD_MANAGER = "txmail-operator-entries"

Obj = dict[str, Any]

# (apiVersion, kind) -> (url prefix, plural, namespaced)
_RESOURCES: dict[tuple[str, str], tuple[str, str, bool]] = {
    ("v1", "Secret"): ("/api/v1", "secrets", True),
    ("v1", "ConfigMap"): ("/api/v1", "configmaps", True),
    ("v1", "Service"): ("/api/v1", "services", True),
    ("v1", "ServiceAccount"): ("/api/v1", "serviceaccounts", True),
    ("v1", "PersistentVolumeClaim"): ("/api/v1", "persistentvolumeclaims", True),
    ("v1", "Namespace"): ("/api/v1", "namespaces", False),
    ("v1", "Event"): ("/api/v1", "events", True),
    ("apps/v1", "Deployment"): ("/apis/apps/v1", "deployments", True),
    ("rbac.authorization.k8s.io/v1", "Role"): ("/apis/rbac.authorization.k8s.io/v1", "roles", True),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): (
        "/apis/rbac.authorization.k8s.io/v1",
        "rolebindings",
        True,
    ),
    ("txmail.dev/v1alpha1", "DedicatedIP"): ("/apis/txmail.dev/v1alpha1", "dedicatedips", False),
    ("txmail.dev/v1alpha1", "SmtpToken"): ("/apis/txmail.dev/v1alpha1", "smtptokens", True),
    ("txmail.dev/v1alpha1", "TransactionalEmail"): (
        "/apis/txmail.dev/v1alpha1",
        "transactionalemails",
        True,
    ),
}


def _path(api_version: str, kind: str, namespace: str | None, name: str | None = None) -> str:
    prefix, plural, namespaced = _RESOURCES[(api_version, kind)]
    path = f"{prefix}/namespaces/{namespace}/{plural}" if namespaced else f"{prefix}/{plural}"
    return f"{path}/{name}" if name else path


class Kube:
    """Typed access to the few API calls the operator makes."""

    def __init__(self, api: client.ApiClient) -> None:
        self.api = api

    @classmethod
    def from_environment(cls) -> Kube:
        try:
            config.load_incluster_config()  # type: ignore[no-untyped-call]
        except config.ConfigException:
            config.load_kube_config()  # type: ignore[no-untyped-call]
        return cls(client.ApiClient())

    def _call(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: list[tuple[str, str]] | None = None,
        content_type: str = "application/json",
    ) -> Obj:
        request = self.api.param_serialize(
            method=method,
            resource_path=path,
            query_params=query or [],
            header_params={"Content-Type": content_type, "Accept": "application/json"},
            body=body,
            auth_settings=["BearerToken"],
        )
        response = self.api.call_api(*request, _request_timeout=30)
        response.read()  # type: ignore[no-untyped-call]
        out = self.api.response_deserialize(
            response_data=response, response_types_map={"2XX": "object"}
        ).data
        return out if isinstance(out, dict) else {}

    def apply(self, obj: Obj) -> Obj:
        """Server-side apply of a whole object we own."""
        meta = obj["metadata"]
        path = _path(obj["apiVersion"], obj["kind"], meta.get("namespace"), meta["name"])
        return self._call(
            "PATCH",
            path,
            obj,
            [("fieldManager", FIELD_MANAGER), ("force", "true")],
            "application/apply-patch+yaml",
        )

    def get(self, api_version: str, kind: str, namespace: str | None, name: str) -> Obj | None:
        try:
            return self._call("GET", _path(api_version, kind, namespace, name))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def merge_patch(
        self, api_version: str, kind: str, namespace: str | None, name: str, patch: Obj
    ) -> Obj:
        return self._call(
            "PATCH",
            _path(api_version, kind, namespace, name),
            patch,
            [("fieldManager", ENTRY_FIELD_MANAGER)],
            "application/merge-patch+json",
        )

    def patch_status(
        self, api_version: str, kind: str, namespace: str | None, name: str, status: Obj
    ) -> Obj | None:
        """Merge-patch the status subresource; None when the object is gone."""
        try:
            return self._call(
                "PATCH",
                _path(api_version, kind, namespace, name) + "/status",
                {"status": status},
                [("fieldManager", FIELD_MANAGER)],
                "application/merge-patch+json",
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def delete(self, api_version: str, kind: str, namespace: str | None, name: str) -> None:
        try:
            self._call("DELETE", _path(api_version, kind, namespace, name))
        except ApiException as exc:
            if exc.status != 404:
                raise

    def event(
        self, involved: Obj, reason: str, message: str, *, warning: bool = False, now: dt.datetime
    ) -> None:
        """Record an Event a user should notice (kubectl describe shows it)."""
        meta = involved["metadata"]
        namespace = meta.get("namespace") or "default"
        stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": namespace},
            "involvedObject": {
                "apiVersion": involved["apiVersion"],
                "kind": involved["kind"],
                "name": meta["name"],
                "namespace": meta.get("namespace"),
                "uid": meta["uid"],
            },
            "reason": reason,
            "message": message,
            "type": "Warning" if warning else "Normal",
            "source": {"component": FIELD_MANAGER},
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
        }
        self._call("POST", _path("v1", "Event", namespace), body)
