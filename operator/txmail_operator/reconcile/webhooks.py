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
from collections.abc import Mapping
from typing import Any

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

__all__ = ["WEBHOOKS_READY", "copy_webhooks", "webhook_endpoints"]


async def webhook_endpoints(
    ctx: Context, namespace: str, spec: SmtpTokenSpec
) -> tuple[list[c.WebhookEndpoint], list[builders.WebhookProblem]]:
    """The token's subscriptions whose key could be read, and why the others were left out."""
    secrets: dict[str, Obj | None] = {}
    forbidden: list[builders.WebhookProblem] = []
    for name in builders.webhook_secret_names(spec):
        try:
            secrets[name] = await ctx.kube.get("v1", "Secret", namespace, name)
        except ApiException as exc:
            if exc.status != 403:
                raise
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
    endpoints, problems = builders.webhook_endpoints(namespace, spec, secrets)
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


async def copy_webhooks(
    ctx: Context,
    ref: Ref,
    body: Obj | None,
    reported: list[c.WebhookStats],
) -> bool:
    """Write ``reported`` (the relay's view of the token's subscriptions) into
    status.webhooks when it differs, and post an Event for each subscription whose state
    changed since the status last showed it. Whether the status was written."""
    if body is None:
        return False
    status = body.get("status") or {}
    shown: list[Obj] = list(status.get("webhooks") or [])
    wanted = [_shown(w) for w in reported]
    if shown == wanted:
        return False
    written = await ctx.kube.patch_status(*TOKEN_API, ref[0], ref[1], {"webhooks": wanted})
    if written is None:
        return False
    before: Mapping[str, str] = {w.get("name", ""): w.get("state", "Healthy") for w in shown}
    for hook in reported:
        was = before.get(hook.name, "Healthy")
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
    return True
