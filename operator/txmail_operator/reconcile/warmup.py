"""IP warm-up glue: status.warmup from the spec, the Ready condition and the relay's report.

* :func:`status_block`: what :func:`~.dedicatedip._write_status` writes under ``warmup``;
  the first time the IP is Ready with ``spec.warmup`` set it records ``startedAt`` (never moved
  afterwards). The reconcile that wrote it then builds the RelayConfig again with that start
  (:func:`~txmail_operator.builders.warmup.start_recorded`).
* :func:`copy_report`: the stats timer copies the relay's day, budget, sent and deferred
  figures (``RelayStats.warmup``) into status.warmup, writing only what changed.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import ValidationError

from txmail_relay import contract as c

from ..api import DedicatedIPSpec
from ..builders import status_patch
from ..builders.warmup import recorded_start, warmup_status
from .context import Context

Obj = dict[str, Any]
IP_API = ("txmail.dev/v1alpha1", "DedicatedIP")


async def relay_report(ctx: Context, ip: str) -> c.WarmupStats | None:
    """The warm-up figures of the relay's last stats report (None: none yet, or off)."""
    config_map = await ctx.cache.owned("ConfigMap", c.stats_config_map_name(ip))
    raw = ((config_map or {}).get("data") or {}).get(c.STATS_KEY)
    if not raw:
        return None
    try:
        return c.RelayStats.model_validate_json(raw).warmup
    except ValidationError:
        return None


def known_warmup(starts: dict[str, str], body: Obj, spec: DedicatedIPSpec) -> Obj:
    """The body's status.warmup, with the start this process recorded or read (``starts``,
    by uid: Context.warmup_starts) when the body (kopf's index, which can lag the operator's
    own status write) does not show it yet: a stale body never records a second start.
    Warm-up turned off forgets it."""
    uid = str(body["metadata"].get("uid") or body["metadata"]["name"])
    previous = dict((body.get("status") or {}).get("warmup") or {})
    if spec.warmup is None:
        starts.pop(uid, None)
    elif previous.get("startedAt"):
        starts[uid] = str(previous["startedAt"])
    elif uid in starts:
        previous["startedAt"] = starts[uid]
    return previous


def remember_start(starts: dict[str, str], body: Obj, shown: Obj) -> None:
    """Keep the start ``shown`` (a status.warmup about to be written) records."""
    if shown.get("startedAt"):
        starts[str(body["metadata"].get("uid") or body["metadata"]["name"])] = shown["startedAt"]


def started(ctx: Context, body: Obj, spec: DedicatedIPSpec) -> datetime | None:
    """The warm-up start for the relay's configuration (:func:`recorded_start`, or the one
    this process recorded when the body lags)."""
    return recorded_start({"warmup": known_warmup(ctx.warmup_starts, body, spec)}, spec.warmup)


async def status_block(ctx: Context, body: Obj, spec: DedicatedIPSpec, ready: bool) -> Obj:
    """status.warmup for a status write whose Ready condition is ``ready``."""
    previous = known_warmup(ctx.warmup_starts, body, spec)
    report = None if spec.warmup is None else await relay_report(ctx, body["metadata"]["name"])
    shown = warmup_status(spec.warmup, previous, ready, ctx.now(), report)
    if spec.warmup is not None:
        remember_start(ctx.warmup_starts, body, shown)
    return shown


async def copy_report(ctx: Context, ip: str, report: c.RelayStats) -> bool:
    """Copy the relay's warm-up figures into the DedicatedIP's status; True if written."""
    async with ctx.locks.hold(f"dedicatedip/{ip}"):
        body = await ctx.cache.ip(ip)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return False
        spec = DedicatedIPSpec.model_validate(body["spec"])
        status = body.get("status") or {}
        if spec.warmup is None and not status.get("warmup"):
            return False
        # The start is recorded by the status writes that compute Ready, never here.
        shown = warmup_status(spec.warmup, status.get("warmup"), False, ctx.now(), report.warmup)
        patch = status_patch(status, {"warmup": shown})
        if patch is None:
            return False
        await ctx.kube.patch_status(*IP_API, None, ip, patch)
        return True
