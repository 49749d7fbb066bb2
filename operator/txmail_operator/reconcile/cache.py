"""What reconciles read, served from memory instead of one GET per token.

- The operator's own namespace (relay objects, credential and template shards, the TLS and
  any other Secret a DedicatedIP names): kept by the drift watch's lists and watches, and by
  the answers to the operator's own writes (so a reconcile sees its write at once).
- DedicatedIPs and namespace labels: kopf's indexes, which kopf fills before any handler
  runs and keeps current from its watches; SmtpTokens: the urgent watch's index (tokens.py).

A miss falls back to one GET: an object created a moment ago may not have reached the
watch yet, and nothing may ever be answered wrongly from a cache that is not filled yet.
App Secrets (in app namespaces) are not here: the operator may not list or watch them.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Mapping
from typing import Any

from ..kube import OWNED_KINDS, Change, Kube
from .tokens import TokenIndex

Obj = dict[str, Any]
log = logging.getLogger(__name__)
IP_KEY = "body"  # the DedicatedIP index key ("body", name) -> the slim object
SYNC_WAIT = 10.0  # seconds a read waits for the first listing of its kind, once


def slim(body: Mapping[str, Any]) -> Obj:
    """The parts of an object a reconcile reads (no managedFields, no kopf annotations)."""
    meta = body.get("metadata") or {}
    kept = ("name", "namespace", "uid", "generation", "deletionTimestamp", "resourceVersion")
    return {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": {k: meta[k] for k in kept if meta.get(k) is not None},
        "spec": dict(body.get("spec") or {}),
        "status": dict(body.get("status") or {}),
    }


def _version(obj: Obj) -> int | None:
    try:
        return int((obj.get("metadata") or {}).get("resourceVersion") or "")
    except ValueError:
        return None


def _first(index: Mapping[Any, Any] | None, key: tuple[str, ...]) -> Any:
    """The first value under ``key`` of a kopf index (a read that meets a change retries)."""
    if index is None:
        return None
    for _ in range(5):
        try:
            store = index.get(key)
            return next(iter(store), None) if store is not None else None
        except RuntimeError:  # changed while we looked
            continue
    return None


class Cache:
    def __init__(self, kube: Kube, namespace: str, tokens: TokenIndex) -> None:
        self.kube, self.namespace, self.token_index = kube, namespace, tokens
        self._guard = threading.Lock()
        self._objects: dict[tuple[str, str], Obj] = {}
        self._synced = {kind: asyncio.Event() for kind in OWNED_KINDS}
        self._waited: set[str] = set()
        self.ips: Mapping[Any, Any] | None = None
        self.namespaces: Mapping[Any, Any] | None = None

    # --- fed by the watch and by our own writes -----------------------------------------

    def on_list(self, kind: str, items: list[Obj]) -> None:
        with self._guard:
            for key in [k for k in self._objects if k[0] == kind]:
                del self._objects[key]
            for item in items:
                self._objects[(kind, item["metadata"]["name"])] = item
        self._synced[kind].set()

    def on_change(self, change: Change) -> None:
        if change.obj is None:
            return
        if change.type == "DELETED":
            with self._guard:
                self._objects.pop((change.kind, change.name), None)
        else:
            self.put(change.obj)

    def put(self, obj: Obj) -> None:
        """Remember an object of the operator's namespace unless a newer one is known."""
        meta = obj.get("metadata") or {}
        kind = obj.get("kind")
        if kind not in OWNED_KINDS or meta.get("namespace", self.namespace) != self.namespace:
            return
        key = (kind, meta.get("name", ""))
        with self._guard:
            old = self._objects.get(key)
            new_version, old_version = _version(obj), _version(old) if old else None
            if old_version is not None and new_version is not None and new_version < old_version:
                return  # an older event arriving after our write's answer
            self._objects[key] = obj

    def forget(self, kind: str, name: str) -> None:
        with self._guard:
            self._objects.pop((kind, name), None)

    # --- reads --------------------------------------------------------------------------

    async def synced(self, kind: str) -> bool:
        """Whether ``kind`` has been listed; waits for the first listing once, briefly."""
        event = self._synced[kind]
        if event.is_set():
            return True
        if kind in self._waited:
            return False
        try:
            await asyncio.wait_for(event.wait(), SYNC_WAIT)
            ok = True
        except TimeoutError:
            ok = False
        if not ok:
            self._waited.add(kind)
            log.warning("no listing of %ss yet: reading them from the API", kind)
        return ok

    async def known(self, kind: str, name: str) -> Obj | None:
        """The object as last seen, without asking the API (None: unknown or absent).

        Waits for the kind's first listing (once, briefly): at startup the DedicatedIPs
        resume while the shards are still being listed.
        """
        if kind not in self._synced or not await self.synced(kind):
            return None
        with self._guard:
            return self._objects.get((kind, name))

    async def owned(self, kind: str, name: str) -> Obj | None:
        """An object of the operator's namespace, as last seen (None: it does not exist)."""
        if await self.synced(kind):
            with self._guard:
                found = self._objects.get((kind, name))
            if found is not None:
                return found
        obj = await self.kube.get(OWNED_KINDS[kind], kind, self.namespace, name)
        if obj is not None:
            self.put({**obj, "kind": kind})
        return obj

    async def read(
        self, api_version: str, kind: str, namespace: str | None, name: str
    ) -> Obj | None:
        """``Kube.get`` from memory where the object is one the cache holds."""
        if namespace == self.namespace and kind in OWNED_KINDS:
            return await self.owned(kind, name)
        return await self.kube.get(api_version, kind, namespace, name)

    async def ip(self, name: str) -> Obj | None:
        """A DedicatedIP (not being deleted), from kopf's index; one GET when not in it."""
        found = _first(self.ips, (IP_KEY, name))
        if found is not None:
            return dict(found)
        body = await self.kube.get("txmail.dev/v1alpha1", "DedicatedIP", None, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return None
        return body

    async def token(self, namespace: str, name: str) -> Obj | None:
        """An SmtpToken (not being deleted), from the token index; one GET when not in it."""
        found = self.token_index.body(namespace, name)
        if found is not None:
            return dict(found)
        body = await self.kube.get("txmail.dev/v1alpha1", "SmtpToken", namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return None
        return body

    async def namespace_labels(self, name: str) -> dict[str, str] | None:
        """A namespace's labels (None: it does not exist), from kopf's index or one GET."""
        found = _first(self.namespaces, (name,))
        if found is not None:
            return dict(found)
        ns = await self.kube.get("v1", "Namespace", None, name)
        if ns is None:
            return None
        return dict((ns.get("metadata") or {}).get("labels") or {})
