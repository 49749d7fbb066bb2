"""Kubernetes mode: the documents the operator writes, watched one object at a time by name.

One asyncio API client (:class:`KubeApi`: kubernetes_asyncio, one aiohttp connection pool)
serves every watch and the stats patch, on the event loop: no thread per object.

The relay's Role grants ``get`` and ``watch`` on named objects only, so every object is
read with ``get`` and then watched with ``fieldSelector=metadata.name=<name>`` from the
resourceVersion it was read at, each in an asyncio task (:class:`ObjectWatch`). A watch the
server ends (its timeout) resumes from the last resourceVersion seen (bookmarks keep it
fresh); ``410 Gone`` reads the object again at once and watches from now; other errors back
off, then read again. A relay ConfigMap that does not parse is logged and the last good one
stays. A snapshot is published once the relay ConfigMap and every shard have been read, so
the relay stays unready until its first complete configuration.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException
from pydantic import ValidationError

from txmail_relay.config.live import DynamicConfig, LiveConfig
from txmail_relay.contract import (
    RELAY_CONFIG_KEY,
    STATS_KEY,
    CredentialEntry,
    RelayConfig,
    RelayStats,
    TemplateEntry,
    credentials_secret_name,
    relay_name,
    stats_config_map_name,
    templates_config_map_name,
)
from txmail_relay.settings import KubernetesSettings

log = logging.getLogger(__name__)

WATCH_TIMEOUT = 300  # seconds; the server ends the watch, we watch again from where it was
MAX_BACKOFF = 30.0
# Each watch holds one HTTP/1.1 connection for its lifetime (1 relay ConfigMap + the shards,
# 17 by default), plus the GETs and the stats patch; the client's default is 5 per core.
MAX_CONNECTIONS = 64

#: A CoreV1Api method (the generated client is untyped): read_* or list_* of one kind.
ApiCall = Callable[..., Awaitable[Any]]
Changed = Callable[[Mapping[str, str] | None], None]


class KubeApi:
    """The relay's one Kubernetes API client, created on first use: from the kubeconfig
    file the settings name, else the in-cluster service account (its token re-read as the
    kubelet rotates it). The owner closes it after the last call."""

    def __init__(self, settings: KubernetesSettings) -> None:
        self._settings = settings
        self._api: client.ApiClient | None = None
        self._lock = asyncio.Lock()

    async def core(self) -> client.CoreV1Api:
        async with self._lock:
            if self._api is None:
                configuration = client.Configuration()
                if self._settings.kubeconfig is not None:
                    await config.load_kube_config(
                        config_file=str(self._settings.kubeconfig),
                        client_configuration=configuration,
                        persist_config=False,  # never write to the user's kubeconfig
                    )
                else:
                    # kubernetes_asyncio's in-cluster loader carries no annotations
                    config.load_incluster_config(  # type: ignore[no-untyped-call]
                        client_configuration=configuration
                    )
                configuration.connection_pool_maxsize = MAX_CONNECTIONS
                self._api = client.ApiClient(configuration)
            return client.CoreV1Api(self._api)

    async def close(self) -> None:
        async with self._lock:
            if self._api is not None:
                await self._api.close()
                self._api = None


def parse_relay_config_map(data: Mapping[str, str] | None) -> RelayConfig | None:
    if not data or RELAY_CONFIG_KEY not in data:
        return None
    return RelayConfig.model_validate_json(data[RELAY_CONFIG_KEY])


def parse_credentials_secret(data: Mapping[str, str] | None) -> dict[str, CredentialEntry]:
    """Secret data (base64 values): username -> CredentialEntry JSON. Bad keys are skipped."""
    entries = {}
    for key, value in (data or {}).items():
        try:
            entry = CredentialEntry.model_validate_json(base64.b64decode(value, validate=True))
        except (binascii.Error, ValueError, ValidationError):
            log.warning("ignoring an invalid credential entry", extra={"key": key})
            continue
        if entry.username != key:
            log.warning("ignoring a credential stored under another name", extra={"key": key})
            continue
        entries[key] = entry
    return entries


def parse_templates_config_map(data: Mapping[str, str] | None) -> dict[int, TemplateEntry]:
    templates = {}
    for key, value in (data or {}).items():
        try:
            entry = TemplateEntry.model_validate_json(value)
        except (ValueError, ValidationError):
            log.warning("ignoring an invalid template entry", extra={"key": key})
            continue
        templates[entry.email_id] = entry
    return templates


@dataclass
class KubeState:
    """The latest content of every watched object."""

    relay: RelayConfig | None = None
    credentials: dict[int, dict[str, CredentialEntry]] = field(default_factory=dict)
    templates: dict[int, dict[int, TemplateEntry]] = field(default_factory=dict)

    def snapshot(self) -> DynamicConfig | None:
        """The merged view, once the relay ConfigMap and every shard have been read."""
        if self.relay is None:
            return None
        if not (
            set(range(self.relay.credential_shards)) <= self.credentials.keys()
            and set(range(self.relay.template_shards)) <= self.templates.keys()
        ):
            return None
        credentials: dict[str, CredentialEntry] = {}
        for shard in range(self.relay.credential_shards):
            credentials.update(self.credentials.get(shard, {}))
        templates: dict[int, TemplateEntry] = {}
        for shard in range(self.relay.template_shards):
            templates.update(self.templates.get(shard, {}))
        return DynamicConfig(self.relay, credentials, templates)


class ObjectWatch:
    """Keeps one named object in sync; calls ``on_change`` with its data (None: absent).

    The watch stream is read here rather than with ``kubernetes_asyncio.watch.Watch``: that
    class builds a second ApiClient (an aiohttp session and TLS context) per watch and
    turns every event into a model, where the relay needs one shared client and only the
    object's ``data`` and ``resourceVersion``.
    """

    def __init__(
        self,
        read: ApiCall,
        list_for_watch: ApiCall,
        *,
        namespace: str,
        name: str,
        on_change: Changed,
        timeout: int = WATCH_TIMEOUT,
    ) -> None:
        self._read = read
        self._list = list_for_watch
        self._namespace = namespace
        self.name = name
        self._on_change = on_change
        self._timeout = timeout

    async def run(self) -> None:
        """Until cancelled: read, watch, resume; every failure is retried."""
        delay = 1.0
        read = True  # read the object (again) before watching
        expired = False
        version: str | None = None
        while True:
            try:
                if read:
                    version = await self._get()
                    read = False
                    if expired:
                        # The object's own resourceVersion may be as old as the one that
                        # expired (it changes only when the object does): watch from now,
                        # the server then sends the object's current state first.
                        version, expired = None, False
                version = await self._watch(version)
                read = version is None  # nothing seen yet: read again, as at the start
                delay = 1.0
            except ApiException as exc:
                read = True
                if exc.status == 410:
                    log.info("watch of %s expired (410), reading it again", self.name)
                    expired = True
                    continue  # resourceVersion too old: read again at once
                log.warning("watch of %s failed: %s", self.name, exc.status)
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_BACKOFF)
            except Exception as exc:  # connection errors of all kinds
                read = True
                log.warning("watch of %s failed: %s", self.name, type(exc).__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_BACKOFF)

    async def _get(self) -> str | None:
        """Read the object and report it; its resourceVersion (None: it does not exist)."""
        try:
            obj = await self._read(self.name, self._namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise
            self._on_change(None)
            return None
        self._on_change(obj.data)
        return str(obj.metadata.resource_version)

    async def _watch(self, version: str | None) -> str | None:
        """One watch request, until the server ends it; the last resourceVersion seen."""
        kwargs: dict[str, Any] = {
            "field_selector": f"metadata.name={self.name}",
            "watch": True,
            "timeout_seconds": self._timeout,
            "allow_watch_bookmarks": True,  # keeps the resourceVersion fresh while idle
            "_preload_content": False,  # the aiohttp response, read line by line
            "_request_timeout": aiohttp.ClientTimeout(
                sock_connect=30, sock_read=self._timeout + 30
            ),
        }
        if version is not None:
            kwargs["resource_version"] = version
        response: aiohttp.ClientResponse = await self._list(self._namespace, **kwargs)
        async with response:
            if response.status != 200:
                raise ApiException(status=response.status, reason=response.reason)
            async for line in response.content:
                if not line.strip():
                    continue
                event = json.loads(line)
                kind = event.get("type")
                obj = event.get("object") or {}
                if kind == "ERROR":  # 410 when the resourceVersion is too old
                    raise ApiException(status=obj.get("code", 500), reason=obj.get("reason"))
                version = (obj.get("metadata") or {}).get("resourceVersion") or version
                if kind in ("ADDED", "MODIFIED"):
                    self._on_change(obj.get("data"))
                elif kind == "DELETED":
                    self._on_change(None)
        return version


class KubernetesConfigSource:
    """Watches the relay ConfigMap, and the credential and template shards it announces."""

    def __init__(self, settings: KubernetesSettings, api: KubeApi) -> None:
        self._settings = settings
        self._api = api
        self._state = KubeState()
        self._credential_shards = 0
        self._template_shards = 0
        self._store: LiveConfig | None = None
        self._core: client.CoreV1Api | None = None
        self._watches: asyncio.TaskGroup | None = None

    async def run(self, store: LiveConfig) -> None:
        self._store = store
        self._core = core = await self._api.core()
        ip, ns = self._settings.dedicated_ip, self._settings.namespace
        log.info("watching relay configuration", extra={"namespace": ns, "object": relay_name(ip)})
        async with asyncio.TaskGroup() as watches:  # cancelling run() ends every watch
            self._watches = watches
            self._spawn(
                core.read_namespaced_config_map,
                core.list_namespaced_config_map,
                relay_name(ip),
                self._relay_changed,
            )

    def _spawn(self, read: ApiCall, list_for_watch: ApiCall, name: str, on_change: Changed) -> None:
        if self._watches is None:
            raise RuntimeError("watches are started by run()")
        watcher = ObjectWatch(
            read, list_for_watch, namespace=self._settings.namespace, name=name, on_change=on_change
        )
        self._watches.create_task(watcher.run(), name=f"watch-{name}")

    def _relay_changed(self, data: Mapping[str, str] | None) -> None:
        try:
            relay = parse_relay_config_map(data)
        except (ValueError, ValidationError) as exc:
            log.error("invalid relay configuration ignored: %s", exc)  # noqa: TRY400
            return
        self._state.relay = relay
        if relay is not None:
            self._ensure_shards(relay)
        self._publish()

    def _ensure_shards(self, relay: RelayConfig) -> None:
        core = self._core
        if core is None:
            raise RuntimeError("shards are watched by run()")
        ip = self._settings.dedicated_ip
        for shard in range(self._credential_shards, relay.credential_shards):
            self._spawn(
                core.read_namespaced_secret,
                core.list_namespaced_secret,
                credentials_secret_name(ip, shard),
                self._credentials_changed(shard),
            )
        for shard in range(self._template_shards, relay.template_shards):
            self._spawn(
                core.read_namespaced_config_map,
                core.list_namespaced_config_map,
                templates_config_map_name(ip, shard),
                self._templates_changed(shard),
            )
        self._credential_shards = max(self._credential_shards, relay.credential_shards)
        self._template_shards = max(self._template_shards, relay.template_shards)

    def _credentials_changed(self, shard: int) -> Changed:
        def changed(data: Mapping[str, str] | None) -> None:
            self._state.credentials[shard] = parse_credentials_secret(data)
            self._publish()

        return changed

    def _templates_changed(self, shard: int) -> Changed:
        def changed(data: Mapping[str, str] | None) -> None:
            self._state.templates[shard] = parse_templates_config_map(data)
            self._publish()

        return changed

    def _publish(self) -> None:
        snapshot = self._state.snapshot()
        if snapshot is not None and self._store is not None:
            self._store.publish(snapshot)


class KubernetesStatsPublisher:
    """Patches ``stats.json`` of the ConfigMap ``txmail-relay-<ip>-stats`` (created by the
    operator; the relay's Role grants ``get``/``patch`` on exactly that name). A (strategic)
    merge patch of one key, so nothing else in the object is touched."""

    def __init__(self, settings: KubernetesSettings, api: KubeApi) -> None:
        self._settings = settings
        self._api = api

    async def publish(self, stats: RelayStats) -> None:
        core = await self._api.core()
        await core.patch_namespaced_config_map(
            stats_config_map_name(self._settings.dedicated_ip),
            self._settings.namespace,
            {"data": {STATS_KEY: stats.to_json()}},
        )
