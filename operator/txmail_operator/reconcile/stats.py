"""Relay stats -> SmtpToken.status.stats.

Each relay patches its own ConfigMap ``txmail-relay-<ip>-stats`` (its Role allows exactly
that); the operator reads it by name on a timer and copies each token's figures into the
token's status, writing only what changed since the last copy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from txmail_relay import contract as c

from .context import Context
from .shaping import copy_destinations
from .warmup import copy_report
from .webhooks import webhook_events, webhooks_patch

Obj = dict[str, Any]
Ref = tuple[str, str]
TOKEN_API = ("txmail.dev/v1alpha1", "SmtpToken")


async def publish_stats(
    ctx: Context,
    ip: str,
    token_of: Callable[[str], Ref | None],
    attached: Iterable[Ref] = (),
) -> int:
    """Copy the relay's figures into token statuses; returns how many tokens were updated.

    One status patch per token and report at most: its figures (status.stats) and its
    webhook subscriptions (status.webhooks) together. ``attached``: the IP's tokens; one the
    report no longer names loses the webhooks its status showed (the relay dropped them)."""
    config_map = await ctx.cache.owned("ConfigMap", c.stats_config_map_name(ip))
    raw = ((config_map or {}).get("data") or {}).get(c.STATS_KEY)
    if not raw:
        return 0
    report = c.RelayStats.model_validate_json(raw)
    await copy_report(ctx, ip, report)  # the warm-up figures into the DedicatedIP's status
    await copy_destinations(ctx, ip, report)  # and its paused destinations (shaping)
    # Once per report: dumping the whole report for each token was quadratic (5,000 tokens:
    # a fifth of the operator's CPU while they were being created).
    updated_at = report.model_dump(mode="json", by_alias=True, include={"updated_at"})
    updated = 0
    named = set(report.tokens) | set(report.webhooks)
    seen: set[Ref] = set()
    for username in sorted(named):
        ref = token_of(username)
        if ref is None:
            continue
        seen.add(ref)
        body = await ctx.cache.token(*ref)  # from memory: the token index holds it
        if body is None:
            continue
        patch: Obj = {}
        figures = report.tokens.get(username)
        stats = figures.model_dump(mode="json", by_alias=True) if figures is not None else None
        if stats is not None and ctx.stats.changed(username, stats):
            shown = dict((body.get("status") or {}).get("stats") or {})
            shown.pop("updatedAt", None)
            # After a restart the memory above is empty: the status may show these figures
            # already (a null in a merge patch removes the field, so None is absent there).
            if shown != {k: v for k, v in stats.items() if v is not None}:
                # A new dict: the one remembered above must stay without updatedAt (which
                # changes with every report), or every report would look changed.
                patch["stats"] = {**stats, "updatedAt": updated_at["updatedAt"]}
        # Each token's webhook subscriptions (status.webhooks, an Event when one starts or
        # stops failing); a token the report names without webhooks has none left to show.
        if await _write(ctx, ref, body, patch, report.webhooks.get(username, [])):
            updated += 1
    for ref in attached:
        if ref in seen:
            continue
        gone = await ctx.cache.token(*ref)
        if gone is not None and await _write(ctx, ref, gone, {}, []):  # removes status.webhooks
            updated += 1
    return updated


async def _write(
    ctx: Context, ref: Ref, body: Obj, patch: Obj, hooks: list[c.WebhookStats]
) -> bool:
    """One status patch: ``patch`` plus status.webhooks when ``hooks`` differ from what the
    status shows (then the Events of the subscriptions whose state changed)."""
    webhooks = webhooks_patch(body, hooks)
    if webhooks is not None:
        patch["webhooks"] = webhooks.wanted
    if not patch:
        return False
    written = await ctx.kube.patch_status(*TOKEN_API, ref[0], ref[1], patch)
    if written is None:
        return False
    if webhooks is not None:
        await webhook_events(ctx, written, webhooks)
    return True
