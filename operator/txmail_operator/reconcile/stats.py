"""Relay stats -> SmtpToken.status.stats.

Each relay patches its own ConfigMap ``txmail-relay-<ip>-stats`` (its Role allows exactly
that); the operator reads it by name on a timer and copies each token's figures into the
token's status, writing only what changed since the last copy.
"""

from __future__ import annotations

from collections.abc import Callable

from txmail_relay import contract as c

from .context import Context
from .shaping import copy_destinations
from .warmup import copy_report
from .webhooks import copy_webhooks

Ref = tuple[str, str]
TOKEN_API = ("txmail.dev/v1alpha1", "SmtpToken")


async def publish_stats(ctx: Context, ip: str, token_of: Callable[[str], Ref | None]) -> int:
    """Copy the relay's figures into token statuses; returns how many tokens were updated."""
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
    for username, figures in sorted(report.tokens.items()):
        ref = token_of(username)
        if ref is None:
            continue
        stats = figures.model_dump(mode="json", by_alias=True)
        if not ctx.stats.changed(username, stats):
            continue
        shown = dict(((await ctx.cache.token(*ref) or {}).get("status") or {}).get("stats") or {})
        shown.pop("updatedAt", None)
        # After a restart the memory above is empty: the status may show these figures
        # already (a null in a merge patch removes the field, so None is absent there).
        if shown == {k: v for k, v in stats.items() if v is not None}:
            continue
        # A new dict: the one remembered above must stay without updatedAt (which changes with
        # every report), or every report would look changed.
        stamped = {**stats, "updatedAt": updated_at["updatedAt"]}
        if await ctx.kube.patch_status(*TOKEN_API, ref[0], ref[1], {"stats": stamped}) is not None:
            updated += 1
    # Each token's webhook subscriptions (status.webhooks, an Event when one starts or stops
    # failing); a token the report names without webhooks has none left to show.
    for username in sorted(set(report.tokens) | set(report.webhooks)):
        ref = token_of(username)
        if ref is not None:
            hooks = report.webhooks.get(username, [])
            if await copy_webhooks(ctx, ref, await ctx.cache.token(*ref), hooks):
                updated += 1
    return updated
