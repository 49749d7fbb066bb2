"""The only module that talks to the Kubernetes API.

Objects are written with server-side apply under one field manager, so a re-run changes
nothing and a person's edits to fields we do not own are kept. Shard entries (one token or
template in a shared Secret/ConfigMap) are merge patches of single keys under a second,
equally fixed manager, so concurrent reconciles of different tokens never overwrite each
other and an apply of the shard's metadata never prunes them.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import random
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines
from urllib3.exceptions import HTTPError

FIELD_MANAGER = "txmail-operator"
ENTRY_FIELD_MANAGER = "txmail-operator-entries"

Obj = dict[str, Any]
log = logging.getLogger(__name__)

# Connections the reconciles may hold at once (the work pool's threads plus a margin): the
# client library's pool blocks a request beyond this rather than opening more sockets.
POOL_SIZE = 10
# 429 (the API server's priority and fairness) and 5xx are retried this many times in all.
ATTEMPTS = 5
RETRIED = frozenset({429, 500, 502, 503, 504})

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


def _ignore(verb: str) -> None:
    pass


def retry_delay(attempt: int, headers: Any) -> float:
    """Seconds before retry ``attempt`` (1-based): the server's Retry-After when it sent one
    (capped at 30 s), else exponential backoff from 0.25 s with jitter."""
    after: object = headers.get("Retry-After") if hasattr(headers, "get") else None
    if after:
        try:
            return min(max(float(str(after)), 0.0), 30.0)
        except ValueError:
            pass  # an HTTP date: rare from the API server, fall back to backoff
    backoff: float = min(0.25 * 2.0 ** (attempt - 1), 8.0)
    return backoff * random.uniform(0.5, 1.0)  # noqa: S311 - jitter, not a secret


class Kube:
    """Typed access to the few API calls the operator makes.

    ``on_error`` hears the verb of every request that failed unexpectedly (a 404 on a read
    or delete is an answer, not a failure); the operator counts them in its metrics.
    """

    def __init__(self, api: client.ApiClient, on_error: Callable[[str], None] = _ignore) -> None:
        self.api = api
        self.on_error = on_error

    @classmethod
    def from_environment(cls, on_error: Callable[[str], None] = _ignore) -> Kube:
        """In-cluster credentials, else the kubeconfig; ``ConfigException`` when neither."""
        try:
            config.load_incluster_config()  # type: ignore[no-untyped-call]
        except config.ConfigException:
            config.load_kube_config()  # type: ignore[no-untyped-call]
        configuration = client.Configuration.get_default_copy()
        configuration.connection_pool_maxsize = POOL_SIZE
        return cls(client.ApiClient(configuration), on_error)

    def _call(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: list[tuple[str, str]] | None = None,
        content_type: str = "application/json",
        *,
        verb: str,
        missing_ok: bool = False,
    ) -> Obj:
        request = self.api.param_serialize(
            method=method,
            resource_path=path,
            query_params=query or [],
            header_params={"Content-Type": content_type, "Accept": "application/json"},
            body=body,
            auth_settings=["BearerToken"],
        )
        for attempt in range(1, ATTEMPTS + 1):
            try:
                response = self.api.call_api(*request, _request_timeout=30)
                response.read()  # type: ignore[no-untyped-call]
                out = self.api.response_deserialize(
                    response_data=response, response_types_map={"2XX": "object"}
                ).data
                return out if isinstance(out, dict) else {}
            except ApiException as exc:
                if missing_ok and exc.status == 404:
                    raise
                if exc.status not in RETRIED or attempt == ATTEMPTS:
                    self.on_error(verb)
                    raise
                time.sleep(retry_delay(attempt, exc.headers))
            except HTTPError:  # no answer at all (connection refused, timeout)
                if attempt == ATTEMPTS:
                    self.on_error(verb)
                    raise
                time.sleep(retry_delay(attempt, None))
        raise AssertionError("unreachable")  # the loop returns or raises

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
            verb="apply",
        )

    def get(self, api_version: str, kind: str, namespace: str | None, name: str) -> Obj | None:
        try:
            return self._call(
                "GET", _path(api_version, kind, namespace, name), verb="get", missing_ok=True
            )
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
            verb="patch",
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
                verb="patch",
                missing_ok=True,
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def delete(self, api_version: str, kind: str, namespace: str | None, name: str) -> None:
        try:
            self._call(
                "DELETE", _path(api_version, kind, namespace, name), verb="delete", missing_ok=True
            )
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
        self._call("POST", _path("v1", "Event", namespace), body, verb="create")


# --- watching what the operator owns ------------------------------------------------------


@dataclass(frozen=True)
class Change:
    """One change to an object the operator owns, as a watch reports it.

    ``type`` is ADDED, MODIFIED or DELETED, or SYNC for an object seen again by a re-list
    (after the watch expired with 410 Gone: changes in between may have been missed).
    ``obj`` is the object as the API server sent it (None only in tests).
    """

    type: str
    kind: str
    name: str
    labels: dict[str, str]
    resource_version: str
    generation: int | None
    obj: Obj | None = None


# The kinds the operator watches in its own namespace, with their typed list call. Relay
# objects by the relay label selector; Secrets all (a DedicatedIP may name a certificate or
# smarthost Secret a person made), so they are served from memory instead of one GET each.
OWNED_KINDS: dict[str, tuple[type[Any], str]] = {
    "Deployment": (client.AppsV1Api, "list_namespaced_deployment"),
    "Service": (client.CoreV1Api, "list_namespaced_service"),
    "ConfigMap": (client.CoreV1Api, "list_namespaced_config_map"),
    "ServiceAccount": (client.CoreV1Api, "list_namespaced_service_account"),
    "Role": (client.RbacAuthorizationV1Api, "list_namespaced_role"),
    "RoleBinding": (client.RbacAuthorizationV1Api, "list_namespaced_role_binding"),
    "PersistentVolumeClaim": (client.CoreV1Api, "list_namespaced_persistent_volume_claim"),
    "Secret": (client.CoreV1Api, "list_namespaced_secret"),
}
UNSELECTED_KINDS = frozenset({"Secret"})


def _change(type_: str, kind: str, obj: Obj) -> Change:
    meta = obj.get("metadata") or {}
    return Change(
        type_,
        kind,
        meta.get("name", ""),
        dict(meta.get("labels") or {}),
        meta.get("resourceVersion", ""),
        meta.get("generation"),
        obj,
    )


def _ignore_list(kind: str, items: list[Obj]) -> None:
    pass


def _shutdown(response: Any) -> None:
    """Shut a streaming response's socket down, so a read blocked on it returns at once."""
    try:
        sock = response.connection.sock if response.connection is not None else None
        if sock is not None:
            sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class OwnedWatch:
    """Watches the operator's own objects in one namespace.

    One thread per kind: list once, then watch from that resourceVersion, resuming from the
    last one seen (bookmarks included) when the server ends a watch, re-listing after 410
    Gone, and backing off on errors. ``on_list`` hears every full listing (the first one and
    each re-list), ``on_change`` every change after it; both run on the watch threads.
    Objects arrive as plain dicts (the API's JSON), never as the client library's models.
    """

    def __init__(
        self,
        api: client.ApiClient,
        namespace: str,
        selector: str,
        on_change: Callable[[Change], None],
        on_error: Callable[[str], None] = _ignore,
        server_timeout: int = 300,
        on_list: Callable[[str, list[Obj]], None] = _ignore_list,
    ) -> None:
        # A client of its own: long-lived watches must not hold the connections that
        # reconciles use.
        self.api = client.ApiClient(configuration=api.configuration)
        self.namespace, self.selector = namespace, selector
        self.on_change, self.on_error, self.on_list = on_change, on_error, on_list
        self.server_timeout = server_timeout
        self._stopping = threading.Event()
        self._guard = threading.Lock()
        self._responses: dict[str, Any] = {}
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for kind in OWNED_KINDS:
            thread = threading.Thread(
                target=self._run, args=(kind,), name=f"watch-{kind}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        with self._guard:
            for response in self._responses.values():
                _shutdown(response)
        for thread in self._threads:
            thread.join(timeout)
        self.api.close()  # type: ignore[no-untyped-call]

    def _run(self, kind: str) -> None:
        api_class, method = OWNED_KINDS[kind]
        list_fn = getattr(api_class(self.api), method)
        selector = {} if kind in UNSELECTED_KINDS else {"label_selector": self.selector}
        version: str | None = None
        listed = False
        backoff = 0.5
        while not self._stopping.is_set():
            try:
                if version is None:
                    version, items = self._list(kind, list_fn, selector)
                    self.on_list(kind, items)
                    if listed:
                        for item in items:
                            self.on_change(_change("SYNC", kind, item))
                    listed = True
                version = self._watch(kind, list_fn, selector, version)
                backoff = 0.5
            except Exception as exc:  # an API error, a connection reset, or stop()'s shutdown
                if isinstance(exc, ApiException) and exc.status == 410:  # too old: list again
                    version = None
                    continue
                if self._stopping.is_set():
                    break
                self.on_error("watch")
                why = f"HTTP {exc.status}" if isinstance(exc, ApiException) else type(exc).__name__
                log.warning("watching %ss failed (%s), retrying", kind, why)
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, 30.0)

    def _list(
        self, kind: str, list_fn: Callable[..., Any], selector: dict[str, str]
    ) -> tuple[str, list[Obj]]:
        response = list_fn(self.namespace, **selector, _request_timeout=30, _preload_content=False)
        listing = json.loads(response.data)
        # A list's items carry no apiVersion and kind (the list does): put them back.
        api_version = listing.get("apiVersion", "v1")
        items = [{**x, "apiVersion": api_version, "kind": kind} for x in listing.get("items") or []]
        return str(listing["metadata"]["resourceVersion"]), items

    def _watch(
        self, kind: str, list_fn: Callable[..., Any], selector: dict[str, str], version: str
    ) -> str:
        """One watch request, until the server ends it; the last resourceVersion seen.

        By hand, not with the client library's Watch: that turns each event back into a
        model, which for a 100 KB credential shard costs more than everything else.
        """
        response = list_fn(
            self.namespace,
            **selector,
            watch=True,
            resource_version=version,
            allow_watch_bookmarks=True,
            timeout_seconds=self.server_timeout,
            _request_timeout=(10, self.server_timeout + 30),
            _preload_content=False,
        )
        try:
            with self._guard:
                if self._stopping.is_set():
                    return version
                self._responses[kind] = response
            for line in iter_resp_lines(response):  # type: ignore[no-untyped-call]
                if not line.strip():
                    continue
                event = json.loads(line)
                obj = event.get("object") or {}
                if event.get("type") == "ERROR":
                    raise ApiException(status=obj.get("code", 500), reason=obj.get("message", ""))
                version = (obj.get("metadata") or {}).get("resourceVersion") or version
                if event.get("type") in ("ADDED", "MODIFIED", "DELETED"):
                    self.on_change(_change(event["type"], kind, {**obj, "kind": kind}))
            return version
        finally:
            with self._guard:
                self._responses.pop(kind, None)
            response.close()
            response.release_conn()


# --- watching a custom resource, raw ------------------------------------------------------

LIST_PAGE = 500  # objects per list page: a listing of 5,000 never sits in memory at once


class ResourceWatch:
    """Lists and watches one custom resource (cluster-wide, or in the given namespaces).

    Like :class:`OwnedWatch`: one thread per namespace (one in all when cluster-wide), the
    API's JSON as plain dicts, a re-list after 410 Gone, backoff on errors. The listing is
    read in pages, each handed on as it arrives. ``on_event(type, obj)`` hears LISTED for
    each listed object (the first listing and each re-list), then ADDED, MODIFIED, DELETED;
    it runs on the watch's thread and must be quick.
    """

    def __init__(
        self,
        api: client.ApiClient,
        group: str,
        version: str,
        plural: str,
        namespaces: tuple[str, ...],
        on_event: Callable[[str, Obj], None],
        on_error: Callable[[str], None] = _ignore,
        server_timeout: int = 300,
    ) -> None:
        self.api = client.ApiClient(configuration=api.configuration)  # watches apart
        self.custom = client.CustomObjectsApi(self.api)
        self.group, self.version, self.plural = group, version, plural
        self.namespaces: tuple[str | None, ...] = namespaces or (None,)
        self.on_event, self.on_error = on_event, on_error
        self.server_timeout = server_timeout
        self._stopping = threading.Event()
        self._guard = threading.Lock()
        self._responses: dict[str | None, Any] = {}
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for namespace in self.namespaces:
            thread = threading.Thread(
                target=self._run,
                args=(namespace,),
                name=f"watch-{self.plural}-{namespace or 'all'}",
                daemon=True,
            )
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        with self._guard:
            for response in self._responses.values():
                _shutdown(response)
        for thread in self._threads:
            thread.join(timeout)
        self.api.close()  # type: ignore[no-untyped-call]

    def _request(self, namespace: str | None, **query: Any) -> Any:
        """The raw response of one list or watch request."""
        query["_preload_content"] = False
        if namespace is None:
            return self.custom.list_cluster_custom_object(
                self.group, self.version, self.plural, **query
            )
        return self.custom.list_namespaced_custom_object(
            self.group, self.version, namespace, self.plural, **query
        )

    def _run(self, namespace: str | None) -> None:
        version: str | None = None
        backoff = 0.5
        while not self._stopping.is_set():
            try:
                if version is None:
                    version = self._list(namespace)
                version = self._watch(namespace, version)
                backoff = 0.5
            except Exception as exc:  # an API error, a connection reset, or stop()'s shutdown
                if isinstance(exc, ApiException) and exc.status == 410:  # too old: list again
                    version = None
                    continue
                if self._stopping.is_set():
                    break
                self.on_error("watch")
                why = f"HTTP {exc.status}" if isinstance(exc, ApiException) else type(exc).__name__
                log.warning("watching %s failed (%s), retrying", self.plural, why)
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, 30.0)

    def _list(self, namespace: str | None) -> str:
        """The whole listing, page by page (one consistent snapshot); its resourceVersion."""
        token: str | None = None
        while True:
            query: dict[str, Any] = {"limit": LIST_PAGE, "_request_timeout": 30}
            if token:
                query["_continue"] = token
            page = json.loads(self._request(namespace, **query).data)
            api_version = page.get("apiVersion")
            for item in page.get("items") or []:
                self.on_event("LISTED", {**item, "apiVersion": api_version})
            token = (page.get("metadata") or {}).get("continue")
            if not token:
                return str(page["metadata"]["resourceVersion"])

    def _watch(self, namespace: str | None, version: str) -> str:
        """One watch request, until the server ends it; the last resourceVersion seen."""
        response = self._request(
            namespace,
            watch=True,
            resource_version=version,
            allow_watch_bookmarks=True,
            timeout_seconds=self.server_timeout,
            _request_timeout=(10, self.server_timeout + 30),
        )
        try:
            with self._guard:
                if self._stopping.is_set():
                    return version
                self._responses[namespace] = response
            for line in iter_resp_lines(response):  # type: ignore[no-untyped-call]
                if not line.strip():
                    continue
                event = json.loads(line)
                obj = event.get("object") or {}
                if event.get("type") == "ERROR":
                    raise ApiException(status=obj.get("code", 500), reason=obj.get("message", ""))
                version = (obj.get("metadata") or {}).get("resourceVersion") or version
                if event.get("type") in ("ADDED", "MODIFIED", "DELETED"):
                    self.on_event(event["type"], obj)
            return version
        finally:
            with self._guard:
                self._responses.pop(namespace, None)
            response.close()
            response.release_conn()
