"""SmtpToken revocations at once, even while kopf is still starting: a watch of their own.

After a restart kopf lists and indexes every object, and handles each object's events one
after another, before it runs a single deletion or update handler: at 5,000 tokens that is
more than 30 s in which a deleted token, or one whose ``passwordGeneration`` was raised,
kept working. This watch lists SmtpTokens itself (raw JSON, in pages, keeping only each
token's generation) and puts two things straight onto URGENT work:

- a token being deleted (``deletionTimestamp`` set), or gone: its credential is removed;
- a spec change of a token reconciled before (``metadata.generation`` above the status's
  ``observedGeneration``, at the listing or in a later event): it is reconciled.

kopf's own handlers still run (kopf removes its finalizer only after its deletion handler);
``Context.handled`` makes the second of the two a no-op. Creations are left to kopf, which
adds its finalizer first.
"""

from __future__ import annotations

import logging
import threading
from enum import Enum
from typing import Any

from ..api import GROUP, VERSION
from ..kube import AsyncWatch, Watches
from .cache import slim
from .context import Context
from .smtptoken import reconcile_token, revoke_token
from .work import URGENT

Obj = dict[str, Any]
log = logging.getLogger(__name__)
TOKEN = "SmtpToken"  # noqa: S105 - a kind, not a secret


class Urgent(Enum):
    REVOKE = "revoke"  # being deleted: remove the credential
    GONE = "gone"  # deleted: remove the credential if that was not done, then forget it
    RECONCILE = "reconcile"  # a spec change of a token reconciled before


def decide(event: str, obj: Obj, seen: int | None) -> Urgent | None:
    """What a watch event of an SmtpToken calls for; ``seen``: its generation seen before."""
    meta = obj.get("metadata") or {}
    if event == "DELETED":
        return Urgent.GONE
    if meta.get("deletionTimestamp"):
        return Urgent.REVOKE
    generation = meta.get("generation") or 0
    observed = (obj.get("status") or {}).get("observedGeneration")
    if observed is None or generation <= observed:
        return None  # not reconciled yet (a creation: kopf's), or nothing new
    if seen is not None and generation <= seen:
        return None  # a change already acted on (kopf's own patches come back like this)
    return Urgent.RECONCILE


class UrgentTokens:
    """The watch, and the URGENT jobs it queues (one waiting job per token and kind)."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._guard = threading.Lock()
        self._seen: dict[str, int] = {}  # uid -> generation
        self._bodies: dict[tuple[str, str], Obj] = {}  # the newest body a queued job reads
        self._unlisted: set[str | None] = set()  # scopes not listed completely yet
        self._listed: dict[str | None, set[tuple[str, str]]] = {}  # scope -> refs listed so far
        self.refs: dict[str, tuple[str, str]] = {}  # uid -> (namespace, name), for the sweep
        self.version = 0  # changes whenever refs does
        self._reconcile = ctx.metrics.measured(TOKEN, self._reconcile_latest)
        self._revoke = ctx.metrics.measured(TOKEN, revoke_token)

    def start(self, watches: Watches) -> None:
        """One watch per watched namespace (one in all when cluster-wide)."""
        scopes: tuple[str | None, ...] = self.ctx.settings.watch_namespaces or (None,)
        self._unlisted = set(scopes)
        for namespace in scopes:
            path = f"/apis/{GROUP}/{VERSION}"
            path += f"/namespaces/{namespace}/smtptokens" if namespace else "/smtptokens"

            def on_event(event: str, obj: Obj, scope: str | None = namespace) -> None:
                if event == "SYNCED":
                    self.synced(scope)
                else:
                    self.on_event(event, obj, scope)

            watches.start(
                AsyncWatch(watches.api, path, TOKEN, on_event, on_error=self.ctx.kube.on_error)
            )

    def synced(self, scope: str | None) -> None:
        """A listing of ``scope`` (a namespace, None: all) ended: tokens it did not list are
        gone (deleted while a re-list was due); the index is complete once every scope was."""
        index = self.ctx.tokens
        listed = self._listed.pop(scope, set())
        gone = {r for r in index.refs() if (scope is None or r[0] == scope) and r not in listed}
        for ref in gone:
            index.remove(ref)
        with self._guard:
            for uid in [uid for uid, ref in self.refs.items() if ref in gone]:
                del self.refs[uid]  # nor checked by the sweep any longer
                self._seen.pop(uid, None)
                self.version += 1
        self._unlisted.discard(scope)
        if not self._unlisted:
            index.synced.set()

    def on_event(self, event: str, obj: Obj, scope: str | None = None) -> None:
        meta = obj.get("metadata") or {}
        uid, namespace, name = meta.get("uid"), meta.get("namespace"), meta.get("name")
        if not (uid and namespace and name and obj.get("spec")):
            return
        index = self.ctx.tokens
        body = slim(obj)
        if event == "DELETED":
            index.remove((namespace, name))
        else:
            index.put(body)
            if event == "LISTED":
                self._listed.setdefault(scope, set()).add((namespace, name))
        with self._guard:
            action = decide(event, obj, self._seen.get(uid))
            if event == "DELETED":
                self._seen.pop(uid, None)
                if self.refs.pop(uid, None) is not None:
                    self.version += 1
            elif not meta.get("deletionTimestamp"):
                self._seen[uid] = meta.get("generation") or 0
            if event != "DELETED" and uid not in self.refs:
                self.refs[uid] = (namespace, name)
                self.version += 1
            if action is Urgent.RECONCILE:
                self._bodies[(namespace, name)] = body
        if action is None:
            return
        work = self.ctx.work
        if action is Urgent.RECONCILE:
            log.debug("SmtpToken %s/%s: generation %s, now", namespace, name, meta["generation"])
            work.submit(
                ("urgent", namespace, name), self._reconcile, namespace, name, priority=URGENT
            )
        elif action is Urgent.REVOKE:
            if not self.ctx.handled.revoked(uid):
                work.submit(("revoke", uid), self._revoke, self.ctx, body, priority=URGENT)
        else:
            work.submit(("gone", uid), self._gone, body, priority=URGENT)

    def tokens(self) -> tuple[int, dict[str, tuple[str, str]]]:
        """Every SmtpToken seen, for the periodic check (sweep.py)."""
        return self.version, self.refs

    async def _reconcile_latest(self, namespace: str, name: str) -> None:
        """Reconcile the newest body seen; kept for the retry when this fails."""
        key = (namespace, name)
        with self._guard:
            body = self._bodies.get(key)
        if body is None:
            return
        await reconcile_token(self.ctx, namespace, name, body, changed=True)
        with self._guard:
            if self._bodies.get(key) is body:
                del self._bodies[key]

    async def _gone(self, body: Obj) -> None:
        """Deleted: revoked if kopf's handler did not (a token that never had the finalizer)."""
        await revoke_token(self.ctx, body)
        self.ctx.handled.forget(body["metadata"]["uid"])
