"""The only module that talks to the Kubernetes API.

Objects are written with server-side apply under one field manager, so a re-run changes
nothing and a person's edits to fields we do not own are kept. Shard entries (one token or
template in a shared Secret/ConfigMap) are merge patches of single keys under a second,
equally fixed manager, so concurrent reconciles of different tokens never overwrite each
other and an apply of the shard's metadata never prunes them.
"""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
import json
import logging
import os
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from kubernetes_asyncio import client as aio_client
from kubernetes_asyncio import config as aio_config
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.config.kube_config import KUBE_CONFIG_DEFAULT_LOCATION

FIELD_MANAGER = "txmail-operator"
ENTRY_FIELD_MANAGER = "txmail-operator-entries"

Obj = dict[str, Any]
log = logging.getLogger(__name__)

# Connections the reconciles may hold at once (the work pool's workers plus a margin): the
# client's aiohttp connector makes a request beyond this wait rather than open more sockets.
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
    # external-dns's CRD source (DedicatedIP spec.dns.externalDNS), when it is installed.
    ("externaldns.k8s.io/v1alpha1", "DNSEndpoint"): (
        "/apis/externaldns.k8s.io/v1alpha1",
        "dnsendpoints",
        True,
    ),
    ("txmail.dev/v1alpha1", "SmtpToken"): ("/apis/txmail.dev/v1alpha1", "smtptokens", True),
    ("txmail.dev/v1alpha1", "TransactionalEmail"): (
        "/apis/txmail.dev/v1alpha1",
        "transactionalemails",
        True,
    ),
}


class NamespaceTerminatingError(ApiException):
    """A write into a namespace that is being deleted (403, reason NamespaceTerminating).

    Not a missing permission: the API server refuses new objects there while the namespace
    goes, and what the operator wanted to write goes with it. One line (no HTTP body) where
    kopf logs it; still an ApiException for the callers that look at ``status``."""

    def __init__(self, exc: ApiException) -> None:
        super().__init__(status=exc.status, reason=exc.reason)
        self.body, self.headers = exc.body, exc.headers

    def __str__(self) -> str:
        return "the namespace is being deleted: the API server refuses new objects in it"

    @staticmethod
    def matches(exc: ApiException) -> bool:
        body = exc.body.decode(errors="replace") if isinstance(exc.body, bytes) else exc.body
        return exc.status == 403 and "NamespaceTerminating" in str(body or "")


def _path(api_version: str, kind: str, namespace: str | None, name: str | None = None) -> str:
    prefix, plural, namespaced = _RESOURCES[(api_version, kind)]
    path = f"{prefix}/namespaces/{namespace}/{plural}" if namespaced else f"{prefix}/{plural}"
    return f"{path}/{name}" if name else path


class _ApiClient(aio_client.ApiClient):
    """kubernetes_asyncio's client on an aiohttp session that does not read proxies and
    netrc from the environment: the library's session does (``trust_env``), in a thread,
    twice for every request, which was 5 % of the operator's CPU at 5,000 tokens. The sync
    client it replaces never read them either. The library's session keeps its connector
    (TLS, the pool limit); ours uses it, and both are closed with the client."""

    def __init__(self, configuration: aio_client.Configuration) -> None:
        super().__init__(configuration)
        rest = self.rest_client
        self._theirs = rest.pool_manager
        rest.pool_manager = aiohttp.ClientSession(
            connector=self._theirs.connector,
            connector_owner=False,
            trust_env=False,
            read_bufsize=2**21,  # as the library's: a watch event of a large object
        )

    async def close(self) -> None:
        await super().close()
        await self._theirs.close()


def _any_file(paths: str) -> bool:
    """Whether one of the kubeconfig paths (``os.pathsep``-separated, ``~`` allowed) exists."""
    return any(Path(p).expanduser().is_file() for p in paths.split(os.pathsep) if p)


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


def event_body(involved: Obj, reason: str, message: str, *, warning: bool, now: dt.datetime) -> Obj:
    """The one Event the operator posts about ``involved`` (both clients post this)."""
    meta = involved["metadata"]
    namespace = meta.get("namespace") or "default"
    stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
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


# The kinds the operator watches in its own namespace, with their apiVersion. Relay objects
# by the relay label selector; Secrets all (a DedicatedIP may name a certificate or
# smarthost Secret a person made), so they are served from memory instead of one GET each.
OWNED_KINDS: dict[str, str] = {
    "Deployment": "apps/v1",
    "Service": "v1",
    "ConfigMap": "v1",
    "ServiceAccount": "v1",
    "Role": "rbac.authorization.k8s.io/v1",
    "RoleBinding": "rbac.authorization.k8s.io/v1",
    "PersistentVolumeClaim": "v1",
    "Secret": "v1",
}
UNSELECTED_KINDS = frozenset({"Secret"})
LIST_PAGE = 500  # objects per list page: a listing of 5,000 never sits in memory at once
WATCH_CONNECTIONS = 16  # the watches' own client: one connection per watch, and a margin


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


async def _lines(response: Any) -> AsyncIterator[bytes]:
    """The lines of a streaming response, however long (a watch event of a 600 KB shard is
    one line: aiohttp's own line reader refuses lines above its buffer size)."""
    buffer = b""
    async for chunk in response.content.iter_any():
        buffer += chunk
        while (end := buffer.find(b"\n")) >= 0:
            line, buffer = buffer[:end], buffer[end + 1 :]
            if line.strip():
                yield line
    if buffer.strip():
        yield buffer


class AsyncWatch:
    """Lists and watches one kind at one path, as an asyncio task, raw JSON.

    The listing is read in pages (one consistent snapshot); ``on_event(type, obj)`` hears
    LISTED for each listed object (the first listing and each re-list, after 410 Gone), then
    ADDED, MODIFIED, DELETED, and SYNCED (an empty object) at the end of each listing;
    ``on_listed(items)``, when given, every complete listing. A
    watch the server ends resumes from the last resourceVersion seen (bookmarks included);
    errors back off. Callbacks run on the event loop and must be quick. Objects are plain
    dicts with their apiVersion and kind (a list's items carry none).
    """

    def __init__(
        self,
        api: aio_client.ApiClient,
        path: str,
        kind: str,
        on_event: Callable[[str, Obj], None],
        *,
        on_listed: Callable[[list[Obj]], None] | None = None,
        selector: str = "",
        on_error: Callable[[str], None] = _ignore,
        server_timeout: int = 300,
    ) -> None:
        self.api, self.path, self.kind = api, path, kind
        self.on_event, self.on_listed, self.on_error = on_event, on_listed, on_error
        self.selector, self.server_timeout = selector, server_timeout

    async def _get(self, query: list[tuple[str, str]], limit: Any) -> Any:
        if self.selector:
            query = [*query, ("labelSelector", self.selector)]
        return await self.api.call_api(
            self.path,
            "GET",
            query_params=query,
            header_params={"Accept": "application/json"},
            auth_settings=["BearerToken"],
            _preload_content=False,
            _request_timeout=limit,
        )

    async def run(self) -> None:
        """Until cancelled."""
        version: str | None = None
        backoff = 0.5
        while True:
            try:
                if version is None:
                    version = await self._list()
                version = await self._watch(version)
                backoff = 0.5
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # an API error or a connection reset
                if isinstance(exc, ApiException) and exc.status == 410:  # too old: list again
                    version = None
                    continue
                self.on_error("watch")
                why = f"HTTP {exc.status}" if isinstance(exc, ApiException) else type(exc).__name__
                log.warning("watching %ss failed (%s), retrying", self.kind, why)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)

    async def _list(self) -> str:
        token: str | None = None
        items: list[Obj] = []
        while True:
            query = [("limit", str(LIST_PAGE))]
            if token:
                query.append(("continue", token))
            response = await self._get(query, 30)
            try:
                page = json.loads(await response.read())
            finally:
                response.release()
            api_version = page.get("apiVersion")
            for item in page.get("items") or []:
                obj = {**item, "apiVersion": api_version, "kind": self.kind}
                self.on_event("LISTED", obj)
                if self.on_listed is not None:
                    items.append(obj)
            token = (page.get("metadata") or {}).get("continue")
            if not token:
                if self.on_listed is not None:
                    self.on_listed(items)
                self.on_event("SYNCED", {})
                return str(page["metadata"]["resourceVersion"])

    async def _watch(self, version: str) -> str:
        """One watch request, until the server ends it; the last resourceVersion seen."""
        query = [
            ("watch", "true"),
            ("resourceVersion", version),
            ("allowWatchBookmarks", "true"),
            ("timeoutSeconds", str(self.server_timeout)),
        ]
        response = await self._get(
            query, aiohttp.ClientTimeout(sock_connect=10, sock_read=self.server_timeout + 30)
        )
        try:
            async for line in _lines(response):
                event = json.loads(line)
                obj = event.get("object") or {}
                if event.get("type") == "ERROR":
                    raise ApiException(status=obj.get("code", 500), reason=obj.get("message"))
                version = (obj.get("metadata") or {}).get("resourceVersion") or version
                if event.get("type") in ("ADDED", "MODIFIED", "DELETED"):
                    self.on_event(event["type"], {**obj, "kind": self.kind})
            return version
        finally:
            response.release()


class Watches:
    """The operator's watches: one client of their own (a connection each, apart from the
    reconciles' pool), one task each, on the event loop that starts them."""

    def __init__(self, api: aio_client.ApiClient) -> None:
        self.api = api
        self._tasks: list[asyncio.Task[None]] = []

    @classmethod
    def of(cls, kube: Kube) -> Watches:
        """The watches' client, with the same credentials as ``kube`` (made on the loop)."""
        configuration = copy.deepcopy(kube.configuration)
        configuration.connection_pool_maxsize = WATCH_CONNECTIONS
        return cls(_ApiClient(configuration))

    def start(self, watch: AsyncWatch) -> None:
        self._tasks.append(asyncio.get_running_loop().create_task(watch.run()))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        await self.api.close()


def owned_watches(
    watches: Watches,
    namespace: str,
    selector: str,
    on_change: Callable[[Change], None],
    on_error: Callable[[str], None] = _ignore,
    on_list: Callable[[str, list[Obj]], None] = _ignore_list,
) -> None:
    """Watch the operator's own objects in ``namespace``, one watch per kind.

    ``on_list`` hears every full listing (the first and each re-list), ``on_change`` every
    change after it (SYNC for an object seen again by a re-list: changes in between may have
    been missed).
    """
    listed: set[str] = set()  # the kinds listed once: a later listing is a re-list
    for kind, api_version in OWNED_KINDS.items():

        def on_event(type_: str, obj: Obj, kind: str = kind) -> None:
            if type_ not in ("LISTED", "SYNCED"):
                on_change(_change(type_, kind, obj))

        def on_listed(items: list[Obj], kind: str = kind) -> None:
            on_list(kind, items)
            if kind in listed:
                for item in items:
                    on_change(_change("SYNC", kind, item))
            listed.add(kind)

        watches.start(
            AsyncWatch(
                watches.api,
                _path(api_version, kind, namespace),
                kind,
                on_event,
                on_listed=on_listed,
                selector="" if kind in UNSELECTED_KINDS else selector,
                on_error=on_error,
            )
        )


# --- the asyncio client (kubernetes_asyncio) ------------------------------------------------


class Kube:
    """Typed access to the few API calls the operator makes, on the event loop
    (kubernetes_asyncio, aiohttp).

    Objects are written with server-side apply under one field manager; 429 and 5xx are
    retried with backoff honouring Retry-After; at most ``POOL_SIZE`` connections (the
    client's aiohttp connector limit). The long-lived watches (:class:`Watches`) have a
    client of their own. ``on_error`` hears the verb of every request that failed
    unexpectedly (a 404 on a read or delete is an answer, not a failure); the operator
    counts them in its metrics. The client is made on first use, on the running loop.
    """

    def __init__(
        self,
        configuration: aio_client.Configuration,
        on_error: Callable[[str], None] = _ignore,
    ) -> None:
        self.configuration = configuration
        self.on_error = on_error
        self._api: aio_client.ApiClient | None = None

    @property
    def api(self) -> aio_client.ApiClient:
        if self._api is None:
            self._api = _ApiClient(self.configuration)
        return self._api

    @staticmethod
    async def load_configuration(
        pool: int = POOL_SIZE, kubeconfig: str | None = None
    ) -> aio_client.Configuration:
        """In-cluster credentials, else the kubeconfig (``ConfigException`` when neither);
        ``kubeconfig`` names the file (default: $KUBECONFIG, ~/.kube/config)."""
        configuration = aio_client.Configuration()
        if kubeconfig is None:
            try:
                aio_config.load_incluster_config(  # type: ignore[no-untyped-call]
                    client_configuration=configuration
                )
            except aio_config.ConfigException:
                pass  # not in a pod: the kubeconfig
            else:
                configuration.connection_pool_maxsize = pool
                return configuration
        paths = kubeconfig or KUBE_CONFIG_DEFAULT_LOCATION
        if not _any_file(paths):  # the library would only log this, then fail obscurely
            raise aio_config.ConfigException(f"no kubeconfig at {paths}")
        await aio_config.load_kube_config(
            config_file=kubeconfig, client_configuration=configuration, persist_config=False
        )
        configuration.connection_pool_maxsize = pool
        return configuration

    async def close(self) -> None:
        if self._api is not None:
            await self._api.close()
            self._api = None

    async def _call(
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
        for attempt in range(1, ATTEMPTS + 1):
            try:
                out = await self.api.call_api(
                    path,
                    method,
                    query_params=query or [],
                    header_params={"Content-Type": content_type, "Accept": "application/json"},
                    body=body,
                    auth_settings=["BearerToken"],
                    response_types_map={200: "object", 201: "object"},
                    _return_http_data_only=True,
                    _request_timeout=30,
                )
                return out if isinstance(out, dict) else {}
            except ApiException as exc:
                if missing_ok and exc.status == 404:
                    raise
                if NamespaceTerminatingError.matches(exc):
                    raise NamespaceTerminatingError(exc) from None
                if exc.status not in RETRIED or attempt == ATTEMPTS:
                    self.on_error(verb)
                    raise
                await asyncio.sleep(retry_delay(attempt, exc.headers))
            except (aiohttp.ClientError, TimeoutError):  # no answer at all
                if attempt == ATTEMPTS:
                    self.on_error(verb)
                    raise
                await asyncio.sleep(retry_delay(attempt, None))
        raise AssertionError("unreachable")  # the loop returns or raises

    async def apply(self, obj: Obj) -> Obj:
        """Server-side apply of a whole object we own."""
        meta = obj["metadata"]
        path = _path(obj["apiVersion"], obj["kind"], meta.get("namespace"), meta["name"])
        return await self._call(
            "PATCH",
            path,
            obj,
            [("fieldManager", FIELD_MANAGER), ("force", "true")],
            "application/apply-patch+yaml",
            verb="apply",
        )

    async def get(
        self, api_version: str, kind: str, namespace: str | None, name: str
    ) -> Obj | None:
        try:
            return await self._call(
                "GET", _path(api_version, kind, namespace, name), verb="get", missing_ok=True
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    async def merge_patch(
        self, api_version: str, kind: str, namespace: str | None, name: str, patch: Obj
    ) -> Obj:
        return await self._call(
            "PATCH",
            _path(api_version, kind, namespace, name),
            patch,
            [("fieldManager", ENTRY_FIELD_MANAGER)],
            "application/merge-patch+json",
            verb="patch",
        )

    async def patch_status(
        self, api_version: str, kind: str, namespace: str | None, name: str, status: Obj
    ) -> Obj | None:
        """Merge-patch the status subresource; None when the object is gone."""
        try:
            return await self._call(
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

    async def delete(self, api_version: str, kind: str, namespace: str | None, name: str) -> None:
        try:
            await self._call(
                "DELETE", _path(api_version, kind, namespace, name), verb="delete", missing_ok=True
            )
        except ApiException as exc:
            if exc.status != 404:
                raise

    async def event(
        self, involved: Obj, reason: str, message: str, *, warning: bool = False, now: dt.datetime
    ) -> None:
        """Record an Event a user should notice (kubectl describe shows it)."""
        body = event_body(involved, reason, message, warning=warning, now=now)
        path = _path("v1", "Event", body["metadata"]["namespace"])
        try:
            await self._call("POST", path, body, verb="create")
        except NamespaceTerminatingError:  # the object and its Events go with the namespace
            log.debug("no Event %s: namespace %s is being deleted", reason, path)
