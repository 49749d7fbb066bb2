"""The relay's dynamic configuration: snapshots, the live holder, and the source protocol.

A :class:`ConfigSource` publishes complete :class:`DynamicConfig` snapshots into a
:class:`LiveConfig`; readers (AUTH, sender policy, delivery) take ``store.current`` at the
moment they need it, so a new snapshot applies to the next AUTH without touching open
connections. The sources: :mod:`.file` (standalone) and :mod:`.kube` (Kubernetes).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from txmail_relay.contract import CredentialEntry, RelayConfig, TemplateEntry


@dataclass(frozen=True)
class DynamicConfig:
    relay: RelayConfig
    credentials: Mapping[str, CredentialEntry] = field(default_factory=dict)
    templates: Mapping[int, TemplateEntry] = field(default_factory=dict)


class LiveConfig:
    """Holds the latest snapshot; ``ready`` once the first one arrived."""

    def __init__(self) -> None:
        self._current: DynamicConfig | None = None
        self._ready = asyncio.Event()

    @property
    def current(self) -> DynamicConfig | None:
        return self._current

    @property
    def ready(self) -> bool:
        return self._current is not None

    def publish(self, config: DynamicConfig) -> None:
        self._current = config
        self._ready.set()

    async def wait_ready(self) -> DynamicConfig:
        while self._current is None:
            await self._ready.wait()
        return self._current


class ConfigSource(Protocol):
    async def run(self, store: LiveConfig) -> None:
        """Publish snapshots into ``store`` until cancelled."""
