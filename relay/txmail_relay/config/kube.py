"""Kubernetes mode: the documents the operator writes, watched one object at a time by name.

The relay's Role grants ``get`` and ``watch`` on named objects only, so every object is
read with ``get`` and then watched with ``fieldSelector=metadata.name=<name>`` from the
resourceVersion it was read at. A watch that ends (server timeout) or fails is resumed
after a fresh ``get``; ``410 Gone`` does the same at once, other errors back off.
Each watch runs in a thread (the client is synchronous); changes are published on the
event loop. A snapshot is published once the relay ConfigMap exists.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException
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

WATCH_TIMEOUT = 300  # seconds; the server ends the watch, we get and watch again
MAX_BACKOFF = 30.0


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
    """Keeps one named object in sync; calls ``on_change`` with its data (None: absent)."""

    def __init__(
        self,
        read: Callable[..., Any],
        list_for_watch: Callable[..., Any],
        *,
        namespace: str,
        name: str,
        on_change: Callable[[Mapping[str, str] | None], None],
        stop: threading.Event,
    ) -> None:
        self._read = read
        self._list = list_for_watch
        self._namespace = namespace
        self.name = name
        self._on_change = on_change
        self._stop = stop

    def run(self) -> None:
        delay = 1.0
        while not self._stop.is_set():
            try:
                self._watch(self._get())
                delay = 1.0
            except ApiException as exc:
                if exc.status == 410:
                    continue  # resourceVersion too old: read again
                log.warning("watch of %s failed: %s", self.name, exc.status)
                self._stop.wait(delay)
                delay = min(delay * 2, MAX_BACKOFF)
            except Exception as exc:  # connection errors of all kinds
                log.warning("watch of %s failed: %s", self.name, type(exc).__name__)
                self._stop.wait(delay)
                delay = min(delay * 2, MAX_BACKOFF)

    def _get(self) -> str | None:
        try:
            obj = self._read(self.name, self._namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise
            self._on_change(None)
            return None
        self._on_change(obj.data)
        return str(obj.metadata.resource_version)

    def _watch(self, resource_version: str | None) -> None:
        w = watch.Watch()  # type: ignore[no-untyped-call]
        kwargs: dict[str, Any] = {
            "field_selector": f"metadata.name={self.name}",
            "timeout_seconds": WATCH_TIMEOUT,
            "allow_watch_bookmarks": True,
            "_request_timeout": WATCH_TIMEOUT + 30,
        }
        if resource_version is not None:
            kwargs["resource_version"] = resource_version
        for event in w.stream(self._list, self._namespace, **kwargs):  # type: ignore[no-untyped-call]
            if self._stop.is_set():
                w.stop()  # type: ignore[no-untyped-call]
                return
            kind = event["type"]
            if kind in ("ADDED", "MODIFIED"):
                self._on_change(event["object"].data)
            elif kind == "DELETED":
                self._on_change(None)


class KubernetesConfigSource:
    def __init__(self, settings: KubernetesSettings) -> None:
        self._settings = settings
        self._state = KubeState()
        self._stop = threading.Event()
        self._credential_shards = 0
        self._template_shards = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._store: LiveConfig | None = None
        self._core: client.CoreV1Api | None = None

    async def run(self, store: LiveConfig) -> None:
        self._loop = asyncio.get_running_loop()
        self._store = store
        api = await asyncio.to_thread(self._api_client)
        self._core = client.CoreV1Api(api)
        ip, ns = self._settings.dedicated_ip, self._settings.namespace
        log.info("watching relay configuration", extra={"namespace": ns, "object": relay_name(ip)})
        self._spawn(
            self._core.read_namespaced_config_map,
            self._core.list_namespaced_config_map,
            relay_name(ip),
            self._relay_changed,
        )
        try:
            await asyncio.Event().wait()
        finally:
            self._stop.set()

    def _api_client(self) -> client.ApiClient:
        configuration = client.Configuration()
        if self._settings.kubeconfig is not None:
            config.load_kube_config(  # type: ignore[no-untyped-call]
                config_file=str(self._settings.kubeconfig), client_configuration=configuration
            )
        else:
            config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        configuration.connection_pool_maxsize = 64
        return client.ApiClient(configuration)

    def _spawn(
        self,
        read: Callable[..., Any],
        list_for_watch: Callable[..., Any],
        name: str,
        on_change: Callable[[Mapping[str, str] | None], None],
    ) -> None:
        watcher = ObjectWatch(
            read,
            list_for_watch,
            namespace=self._settings.namespace,
            name=name,
            on_change=on_change,
            stop=self._stop,
        )
        threading.Thread(target=watcher.run, name=f"watch-{name}", daemon=True).start()

    def _post(self, apply: Callable[[], None]) -> None:
        """Run ``apply`` (a state change) on the event loop, then publish."""
        if self._loop is None:
            return

        def step() -> None:
            apply()
            self._publish()

        self._loop.call_soon_threadsafe(step)

    def _relay_changed(self, data: Mapping[str, str] | None) -> None:
        try:
            relay = parse_relay_config_map(data)
        except (ValueError, ValidationError) as exc:
            log.error("invalid relay configuration ignored: %s", exc)  # noqa: TRY400
            return

        def apply() -> None:
            self._state.relay = relay
            if relay is not None:
                self._ensure_shards(relay)

        self._post(apply)

    def _ensure_shards(self, relay: RelayConfig) -> None:
        core = self._core
        if core is None:
            return
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

    def _credentials_changed(self, shard: int) -> Callable[[Mapping[str, str] | None], None]:
        def changed(data: Mapping[str, str] | None) -> None:
            entries = parse_credentials_secret(data)
            self._post(lambda: self._state.credentials.__setitem__(shard, entries))

        return changed

    def _templates_changed(self, shard: int) -> Callable[[Mapping[str, str] | None], None]:
        def changed(data: Mapping[str, str] | None) -> None:
            entries = parse_templates_config_map(data)
            self._post(lambda: self._state.templates.__setitem__(shard, entries))

        return changed

    def _publish(self) -> None:
        snapshot = self._state.snapshot()
        if snapshot is not None and self._store is not None:
            self._store.publish(snapshot)


class KubernetesStatsPublisher:
    """Patches ``stats.json`` of the ConfigMap ``txmail-relay-<ip>-stats`` (created by the
    operator; the relay's Role grants ``get``/``patch`` on exactly that name). A merge patch
    of one key, so nothing else in the object is touched."""

    def __init__(self, settings: KubernetesSettings) -> None:
        self._settings = settings
        self._core: client.CoreV1Api | None = None

    async def publish(self, stats: RelayStats) -> None:
        await asyncio.to_thread(self._patch, stats.to_json())

    def _patch(self, text: str) -> None:
        if self._core is None:
            configuration = client.Configuration()
            if self._settings.kubeconfig is not None:
                config.load_kube_config(  # type: ignore[no-untyped-call]
                    config_file=str(self._settings.kubeconfig),
                    client_configuration=configuration,
                )
            else:
                config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
            self._core = client.CoreV1Api(client.ApiClient(configuration))
        self._core.patch_namespaced_config_map(
            stats_config_map_name(self._settings.dedicated_ip),
            self._settings.namespace,
            {"data": {STATS_KEY: text}},
        )
