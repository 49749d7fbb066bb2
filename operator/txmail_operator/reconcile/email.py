"""TransactionalEmail -> a validated template published to its DedicatedIP's relay."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kubernetes_asyncio.client.exceptions import ApiException

from txmail_relay import contract as c
from txmail_relay.templates.policy import validate

from .. import builders
from ..api import TransactionalEmailSpec
from .access import attach
from .conditions import condition
from .context import Context

Obj = dict[str, Any]
EMAIL_API = ("txmail.dev/v1alpha1", "TransactionalEmail")
IdTaken = Callable[[int], bool]


def assign_email_id(uid: str, current: int | None, taken: IdTaken) -> int:
    """Keep the id once given; otherwise derive one from the uid, probing past any clash."""
    if current:
        return current
    attempt = 0
    while taken(candidate := builders.stable_id(uid, attempt)):
        attempt += 1
    return candidate


async def reconcile_email(ctx: Context, namespace: str, name: str, taken: IdTaken) -> None:
    async with ctx.locks.hold(f"transactionalemail/{namespace}/{name}"):
        body = await ctx.kube.get(*EMAIL_API, namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return
        await _reconcile(ctx, body, taken)


async def _reconcile(ctx: Context, body: Obj, taken: IdTaken) -> None:
    meta, status = body["metadata"], body.get("status") or {}
    name, namespace, generation = meta["name"], meta["namespace"], meta.get("generation", 0)
    spec = TransactionalEmailSpec.model_validate(body["spec"])
    now, previous = ctx.now(), status.get("conditions")
    email_id = assign_email_id(meta["uid"], status.get("emailId"), taken)
    ip_name = spec.dedicated_ip_ref.name

    errors = validate(spec.subject, spec.html, spec.text)
    if errors:
        first = errors[0]
        where = f"{first.part} line {first.line}" if first.line else first.part
        valid = condition(
            previous,
            "TemplateValid",
            False,
            "TemplateInvalid",
            f"{where}: {first.message}",
            generation,
            now,
        )
    else:
        valid = condition(
            previous,
            "TemplateValid",
            True,
            "Parsed",
            "subject, html and text parse",
            generation,
            now,
        )

    attachment = await attach(ctx, ip_name, namespace)
    sender_domain = spec.sender.address.rsplit("@", 1)[-1].lower()
    if not attachment.ok:
        ready = (False, attachment.reason, attachment.message)
    elif attachment.spec is not None and sender_domain not in attachment.spec.domains:
        ready = (
            False,
            "FromDomainNotAllowed",
            f"from.address domain {sender_domain} is not one of DedicatedIP {ip_name}'s domains "
            f"({', '.join(attachment.spec.domains)})",
        )
    elif errors:
        ready = (
            False,
            "TemplateInvalid",
            "the template does not parse: see condition TemplateValid",
        )
    else:
        ready = (True, "Ready", f"published to DedicatedIP {ip_name} as emailId {email_id}")

    if attachment.ip is not None:
        entry = (
            builders.template_entry(name, namespace, generation, spec, email_id)
            if ready[0]
            else None
        )
        await _publish(ctx, ip_name, email_id, entry)
    new_status = {
        "emailId": email_id,
        "observedGeneration": generation,
        "conditions": [condition(previous, "Ready", *ready, generation, now), valid],
    }
    patch = builders.status_patch(status, new_status)
    if patch is not None:
        await ctx.kube.patch_status(*EMAIL_API, namespace, name, patch)


async def _publish(ctx: Context, ip: str, email_id: int, entry: c.TemplateEntry | None) -> None:
    key = str(email_id)
    shard = c.templates_config_map_name(ip, c.shard_of(key, c.TEMPLATE_SHARDS))
    ns = ctx.settings.namespace
    current = await ctx.cache.owned("ConfigMap", shard)
    if current is None:
        return  # the relay is being set up; its reconcile fans out to us again
    have = (current.get("data") or {}).get(key)
    want = entry.to_json() if entry else None
    if have == want:
        return
    try:
        ctx.cache.put(
            await ctx.kube.merge_patch(
                "v1", "ConfigMap", ns, shard, builders.shard_patch(key, want, secret=False)
            )
        )
    except ApiException as exc:
        if exc.status != 404:
            raise


async def withdraw_email(ctx: Context, body: Obj) -> None:
    """Before the email goes: remove its template from the relay."""
    status = body.get("status") or {}
    if status.get("emailId"):
        spec = TransactionalEmailSpec.model_validate(body["spec"])
        await _publish(ctx, spec.dedicated_ip_ref.name, int(status["emailId"]), None)
