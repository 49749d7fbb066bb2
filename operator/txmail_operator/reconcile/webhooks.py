"""SmtpToken webhooks: the signing keys into the credential entry, the relay's delivery state
into status.webhooks, and an Event when a subscription starts or stops failing.

The keys live in Secrets of the app's namespace, which the operator may read by name only (no
list, no watch: it never sees the namespace's other Secrets, docs/install.md "RBAC"). So a
token with webhooks costs one GET per Secret it names, per reconcile (on a spec change, and at
each periodic check, which is how a rotated key reaches the relay); a token without costs
nothing. No key is ever logged, put in a status, an Event or an exception message.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
from kubernetes_asyncio.client.exceptions import ApiException

from txmail_relay import contract as c

from .. import builders
from ..api import SmtpTokenSpec
from ..api.webhooks import WEBHOOKS_READY, WebhookStatus
from .context import Context

Obj = dict[str, Any]
Ref = tuple[str, str]
TOKEN_API = ("txmail.dev/v1alpha1", "SmtpToken")
log = logging.getLogger(__name__)
FAILING, RECOVERED = "WebhookFailing", "WebhookRecovered"

__all__ = ["WEBHOOKS_READY", "webhook_endpoints", "webhook_events", "webhooks_patch"]


async def webhook_endpoints(
    ctx: Context,
    namespace: str,
    spec: SmtpTokenSpec,
    previous: Sequence[c.WebhookEndpoint] = (),
) -> tuple[list[c.WebhookEndpoint], list[builders.WebhookProblem]]:
    """The token's subscriptions whose key could be read, and why the others were left out.

    A Secret that could not be read for another reason than RBAC (the API server failing, a
    timeout) does not fail the token's reconcile (its SMTP credentials): each webhook naming
    it keeps the key the relay has (``previous``, the token's current credential entry), or is
    left out when it had none, as WebhookSecretUnreadable; the next periodic check reads it
    again."""
    secrets: dict[str, Obj | None] = {}
    unread: dict[str, str] = {}  # Secret name -> why (no key in it)
    forbidden: list[builders.WebhookProblem] = []
    for name in builders.webhook_secret_names(spec):
        try:
            secrets[name] = await ctx.kube.get("v1", "Secret", namespace, name)
        except ApiException as exc:
            if exc.status != 403:
                unread[name] = f"HTTP {exc.status}"
                continue
            secrets[name] = {"data": {}}  # not read: reported below, never as missing
            forbidden += [
                builders.WebhookProblem(
                    w.name,
                    "WebhookSecretForbidden",
                    f"webhook {w.name}: the operator may not read Secret {namespace}/{name} "
                    "(its RBAC grants get on Secrets of the namespaces it serves: "
                    "docs/install.md)",
                )
                for w in spec.webhooks or []
                if w.secret_ref.name == name
            ]
        except (aiohttp.ClientError, TimeoutError) as exc:
            unread[name] = type(exc).__name__
    endpoints, problems = builders.webhook_endpoints(
        namespace, spec, secrets, unreadable=unread, previous=previous
    )
    refused = {p.webhook for p in forbidden}
    return endpoints, [*forbidden, *(p for p in problems if p.webhook not in refused)]


# What status.webhooks[] holds of a WebhookStats: the fields its schema has (the API server
# prunes others, and a copy that always differs would be written at every report).
_STATUS_FIELDS = {f.alias or n for n, f in WebhookStatus.model_fields.items()}
_ERROR_MAX = WebhookStatus.model_fields["last_error"].metadata[0].max_length


def _shown(stats: c.WebhookStats) -> Obj:
    out = {
        k: v
        for k, v in stats.model_dump(mode="json", by_alias=True, exclude_none=True).items()
        if k in _STATUS_FIELDS
    }
    if isinstance(out.get("lastError"), str):
        out["lastError"] = out["lastError"][:_ERROR_MAX]
    return out


@dataclass(frozen=True)
class WebhooksChange:
    """status.webhooks to write (None: remove it) and the states the status showed before."""

    wanted: list[Obj] | None
    before: Mapping[str, str]
    reported: list[c.WebhookStats]


def webhooks_patch(body: Obj, reported: list[c.WebhookStats]) -> WebhooksChange | None:
    """What status.webhooks becomes for ``reported`` (the relay's view of the token's
    subscriptions), or None when the status shows exactly that already. Written in the same
    status patch as the token's figures (reconcile/stats.py): one write per report."""
    status = body.get("status") or {}
    shown: list[Obj] = list(status.get("webhooks") or [])
    wanted = [_shown(w) for w in reported]
    if shown == wanted:
        return None
    before = {w.get("name", ""): w.get("state", "Healthy") for w in shown}
    return WebhooksChange(wanted or None, before, reported)


async def webhook_events(ctx: Context, written: Obj, change: WebhooksChange) -> None:
    """An Event for each subscription whose state changed since the status last showed it."""
    for hook in change.reported:
        was = change.before.get(hook.name, "Healthy")
        if hook.state == was:
            continue
        if hook.state == "Failing":
            error = f": {hook.last_error}" if hook.last_error else ""
            reason, message, warning = (
                FAILING,
                f"webhook {hook.name} is failing{error}; its events are kept and retried "
                f"({hook.backlog} waiting)",
                True,
            )
        else:
            reason, message, warning = (
                RECOVERED,
                f"webhook {hook.name} delivers again ({hook.backlog} waiting)",
                False,
            )
        await ctx.kube.event(written, reason, message[:1024], warning=warning, now=ctx.now())
