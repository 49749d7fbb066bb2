"""What to write to an object's status: the changed keys, or nothing.

Timers and watches reconcile often and mostly find nothing new; a status write costs a
request and wakes every watcher of the object, so it is made only when something differs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .naming import Obj


def status_patch(current: Mapping[str, Any] | None, desired: Mapping[str, Any]) -> Obj | None:
    """The merge patch that makes the top-level keys of ``desired`` hold in ``current``.

    Only keys whose value differs are in it; None when none does. Keys of ``current`` that
    ``desired`` does not name (written by someone else) are left as they are.
    """
    have = current or {}
    changed = {key: value for key, value in desired.items() if have.get(key) != value}
    return changed or None
