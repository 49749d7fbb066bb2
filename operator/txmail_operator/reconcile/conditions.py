"""metav1.Condition bookkeeping: lastTransitionTime moves only when the status changes."""

from __future__ import annotations

import datetime as dt
from typing import Any

Obj = dict[str, Any]


def condition(
    previous: list[Obj] | None,
    type_: str,
    ok: bool,
    reason: str,
    message: str,
    generation: int,
    now: dt.datetime,
) -> Obj:
    status = "True" if ok else "False"
    old = next((c for c in previous or [] if c.get("type") == type_), None)
    since = old["lastTransitionTime"] if old and old.get("status") == status else stamp(now)
    return {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": since,
        "observedGeneration": generation,
    }


def stamp(now: dt.datetime) -> str:
    return now.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
