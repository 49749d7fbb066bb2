"""Every SmtpToken not being deleted, as the urgent watch (urgent.py) last saw it.

This was a kopf index. kopf runs no handler before all its indexes are filled, and tracks
that with one toggle per object of an indexed kind, each toggle waking every waiting object
worker: at 5,000 tokens a restart spent more than two CPU minutes in those wakeups before
its first handler. The urgent watch lists every token anyway, so it keeps this index, and
what needs the counts (a DedicatedIP's status, fan-outs, stats) waits for its first
complete listing (``synced``) instead.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ..builders import username_for

Obj = dict[str, Any]
Ref = tuple[str, str]


class TokenIndex:
    def __init__(self) -> None:
        self._bodies: dict[Ref, Obj] = {}
        self._users: dict[str, Ref] = {}
        self._by_ip: dict[str, set[Ref]] = {}
        self._by_ns: dict[str, set[Ref]] = {}
        self.synced = asyncio.Event()  # set after the first complete listing

    def __len__(self) -> int:
        return len(self._bodies)

    def put(self, body: Obj) -> None:
        """A token as seen (a slim body); one being deleted leaves the index."""
        meta = body["metadata"]
        ref = (meta["namespace"], meta["name"])
        self.remove(ref)
        if meta.get("deletionTimestamp"):
            return
        self._bodies[ref] = body
        self._users[username_for(meta["uid"])] = ref
        ip = ((body.get("spec") or {}).get("dedicatedIPRef") or {}).get("name")
        if ip:
            self._by_ip.setdefault(ip, set()).add(ref)
        self._by_ns.setdefault(ref[0], set()).add(ref)

    def remove(self, ref: Ref) -> None:
        old = self._bodies.pop(ref, None)
        if old is None:
            return
        self._users.pop(username_for(old["metadata"]["uid"]), None)
        ip = ((old.get("spec") or {}).get("dedicatedIPRef") or {}).get("name")
        for table, key in ((self._by_ip, ip), (self._by_ns, ref[0])):
            refs = table.get(key or "")
            if refs is not None:
                refs.discard(ref)
                if not refs:
                    del table[key or ""]

    def refs(self) -> list[Ref]:
        return list(self._bodies)

    def body(self, namespace: str, name: str) -> Obj | None:
        return self._bodies.get((namespace, name))

    def user(self, username: str) -> Ref | None:
        return self._users.get(username)

    def on_ip(self, ip: str) -> list[Ref]:
        return sorted(self._by_ip.get(ip, ()))

    def in_namespace(self, namespace: str) -> list[Ref]:
        return sorted(self._by_ns.get(namespace, ()))
