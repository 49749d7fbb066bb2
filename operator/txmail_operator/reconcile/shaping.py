"""Per-destination shaping glue: the relay's paused destinations into status.destinations.

The stats timer (:func:`~.stats.publish_stats`) hands each relay report here; the
destinations it lists as paused (``RelayStats.destinations``) are copied into the
DedicatedIP's status, writing only when they changed; none paused removes the field.
"""

from __future__ import annotations

from typing import Any

from txmail_relay import contract as c

from ..builders import status_patch
from .context import Context

IP_API = ("txmail.dev/v1alpha1", "DedicatedIP")


def destinations_status(report: c.RelayStats) -> list[dict[str, Any]] | None:
    shown = [d.model_dump(mode="json", by_alias=True) for d in report.destinations]
    return shown or None


async def copy_destinations(ctx: Context, ip: str, report: c.RelayStats) -> bool:
    """Copy the relay's paused destinations into the DedicatedIP's status; True if written."""
    shown = destinations_status(report)
    async with ctx.locks.hold(f"dedicatedip/{ip}"):
        body = await ctx.cache.ip(ip)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return False
        patch = status_patch(body.get("status"), {"destinations": shown})
        if patch is None:
            return False
        await ctx.kube.patch_status(*IP_API, None, ip, patch)
        return True
