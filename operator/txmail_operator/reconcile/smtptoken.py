"""SmtpToken -> app Secret (holds the password) + credential entry in the relay (holds a digest).

The app Secret is the only place the password lives. A reconcile keeps it when the Secret
is ours for the current passwordGeneration and no digest contradicts it; otherwise it issues
a new one. The Secret is written before the digest, so an operator killed between the two
converges on restart to exactly one Secret, one password and one digest.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import kopf
from kubernetes_asyncio.client.exceptions import ApiException

from txmail_relay import contract as c

from .. import builders
from ..api import DedicatedIPSpec, SmtpTokenSpec
from .access import attach
from .conditions import condition, stamp
from .context import Context
from .dedicatedip import relay_ca
from .webhooks import WEBHOOKS_READY, webhook_endpoints

Obj = dict[str, Any]
TOKEN_API = ("txmail.dev/v1alpha1", "SmtpToken")


@dataclass(frozen=True)
class _Issue:
    """Why a new password was issued: the Event a user sees (None: nothing to tell)."""

    reason: str
    message: str
    warning: bool
    revoke_previous: bool


def _decode(secret: Obj | None, key: str) -> str | None:
    value = ((secret or {}).get("data") or {}).get(key)
    return base64.b64decode(value).decode() if value else None


async def current_entry(
    ctx: Context, ip: str, username: str
) -> tuple[bool, c.CredentialEntry | None]:
    shard = await ctx.cache.owned("Secret", _shard_name(ip, username))
    if shard is None:
        return False, None
    raw = _decode(shard, username)
    return True, c.CredentialEntry.model_validate_json(raw) if raw else None


def _shard_name(ip: str, username: str) -> str:
    return c.credentials_secret_name(ip, c.shard_of(username, c.CREDENTIAL_SHARDS))


def _choose_password(
    ctx: Context,
    spec: SmtpTokenSpec,
    secret: Obj | None,
    entry: c.CredentialEntry | None,
    issued_before: bool,
) -> tuple[str, _Issue | None]:
    gen = spec.password_generation
    existing = _decode(secret, "password")
    annotations = ((secret or {}).get("metadata") or {}).get("annotations") or {}
    secret_gen = int(annotations.get(builders.PASSWORD_GENERATION_ANNOTATION, "0") or 0)
    published = [d for d in (entry.digests if entry else []) if d.generation == gen]
    if existing and secret_gen == gen:
        if not published or c.digest_matches(existing, published[0].sha256):
            return existing, None
        return ctx.password(), _Issue(
            "PasswordReplaced",
            "the app Secret held a password this token did not issue; issued a new password",
            warning=True,
            revoke_previous=True,
        )
    if secret is None and issued_before:
        return ctx.password(), _Issue(
            "SecretRecreated",
            "the app Secret was deleted, and only it held the password: issued a new password "
            "(the old one no longer works)",
            warning=True,
            revoke_previous=True,
        )
    if existing and secret_gen < gen:
        return ctx.password(), _Issue(
            "PasswordReset",
            f"issued a new password for passwordGeneration {gen}",
            warning=False,
            revoke_previous=False,
        )
    return ctx.password(), None


async def reconcile_token(
    ctx: Context, namespace: str, name: str, body: Obj | None = None, *, changed: bool = False
) -> None:
    """Reconcile one SmtpToken: ``body`` as handed over, else as kopf's index holds it.

    ``changed``: the call is for a creation or a spec change, which is skipped when this
    generation was reconciled already (by the urgent watch or by kopf, whichever came
    first). A view older than what was done, or of a token already revoked, is skipped too.
    """
    key = f"smtptoken/{namespace}/{name}"
    async with ctx.locks.hold(key):
        if body is None:
            body = await ctx.cache.token(namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return
        uid, generation = body["metadata"]["uid"], body["metadata"].get("generation", 0)
        if ctx.handled.revoked(uid):
            return
        done = ctx.handled.generation(uid)
        if done is not None and (done > generation or (changed and done == generation)):
            return
        await _reconcile(ctx, body)
        ctx.handled.reconciled(uid, generation)
        ctx.checked.mark(key)


async def _reconcile(ctx: Context, body: Obj) -> None:
    meta, status = body["metadata"], body.get("status") or {}
    name, namespace, uid = meta["name"], meta["namespace"], meta["uid"]
    spec = SmtpTokenSpec.model_validate(body["spec"])
    now = ctx.now()
    ip_name = spec.dedicated_ip_ref.name
    username = builders.username_for(uid)
    secret_name = builders.app_secret_name(name, spec)
    base = {
        "username": username,
        "secretName": secret_name,
        "emailCampaignId": status.get("emailCampaignId") or builders.stable_id(uid),
        "createdAt": status.get("createdAt") or stamp(now),
        "observedGeneration": meta.get("generation", 0),
    }
    attachment = await attach(ctx, ip_name, namespace)
    expired = spec.expires_at is not None and now >= spec.expires_at
    ip_spec = attachment.spec
    no_domain = _no_allowed_domain(spec, ip_name, ip_spec)
    if not attachment.ok or expired or ip_spec is None or no_domain:
        if attachment.ip is not None:
            await _remove_entry(ctx, ip_name, username)
        reason, message = (
            ("Expired", f"the token expired at {stamp(spec.expires_at)}")
            if expired and spec.expires_at is not None
            else ("FromDomainNotAllowed", no_domain)
            if attachment.ok and no_domain
            else (attachment.reason, attachment.message)
        )
        await _write_status(ctx, body, base, False, reason, message)
        return

    exists, entry = await current_entry(ctx, ip_name, username)
    if not exists:
        raise kopf.TemporaryError(f"the relay of DedicatedIP {ip_name} is being set up", delay=2)
    secret = await ctx.kube.get("v1", "Secret", namespace, secret_name)
    password, issue = _choose_password(
        ctx, spec, secret, entry, issued_before=status.get("passwordGeneration") is not None
    )
    fresh = c.PasswordDigest(
        sha256=c.password_digest(password), generation=spec.password_generation
    )
    previous = (
        [] if issue is not None and issue.revoke_previous else list(entry.digests if entry else [])
    )
    grace = builders.parse_duration(spec.rotation_grace_period)
    digests = builders.rotated_digests(previous, fresh, now, grace)

    host = builders.smtp_host(ip_name, ctx.settings.namespace, ctx.settings.cluster_domain)
    desired = builders.app_secret(
        name,
        uid,
        namespace,
        spec,
        username,
        password,
        host,
        builders.submission_port(ip_spec),
        await relay_ca(ctx, ip_name, ip_spec),
    )
    if secret is None or _drifted(secret, desired):
        await ctx.kube.apply(desired)  # first the Secret: it is the only copy of the password
    hooks, problems = await webhook_endpoints(
        ctx, namespace, spec, entry.webhooks if entry is not None else ()
    )
    wanted = builders.credential_entry(
        name,
        namespace,
        spec,
        list(ip_spec.domains),
        username,
        digests,
        base["emailCampaignId"],
        hooks,
    )
    if entry != wanted:
        await put_entry(ctx, ip_name, username, wanted)
    if issue is not None:
        await ctx.kube.event(body, issue.reason, issue.message, warning=issue.warning, now=now)
    elif secret is not None and _drifted(secret, desired):
        await ctx.kube.event(
            body, "SecretRestored", f"put back the edited app Secret {secret_name}", now=now
        )
    base["passwordGeneration"] = spec.password_generation
    await _write_status(
        ctx,
        body,
        base,
        True,
        "Ready",
        f"credentials for DedicatedIP {ip_name} are in Secret {secret_name}",
        webhooks=builders.webhooks_condition(spec, problems),
    )


def _no_allowed_domain(spec: SmtpTokenSpec, ip: str, ip_spec: DedicatedIPSpec | None) -> str:
    """Why the token could send from no domain at all ("" when it can send from some)."""
    if ip_spec is None or spec.allowed_from_domains is None:
        return ""
    if any(d in ip_spec.domains for d in spec.allowed_from_domains):
        return ""
    return (
        f"allowedFromDomains ({', '.join(spec.allowed_from_domains)}) names no domain of "
        f"DedicatedIP {ip} ({', '.join(ip_spec.domains)}): the token could send nothing"
    )


def _drifted(actual: Obj, desired: Obj) -> bool:
    """Whether the live Secret lost anything we wrote (extra keys or labels are the user's)."""
    if actual.get("type") != desired["type"]:
        return True
    data = actual.get("data") or {}
    if any(data.get(k) != v for k, v in desired["data"].items()):
        return True
    meta, want = actual.get("metadata") or {}, desired["metadata"]
    for field in ("labels", "annotations"):
        have = meta.get(field) or {}
        if any(have.get(k) != v for k, v in want[field].items()):
            return True
    owners = {o.get("uid") for o in meta.get("ownerReferences") or []}
    return want["ownerReferences"][0]["uid"] not in owners


async def put_entry(ctx: Context, ip: str, username: str, entry: c.CredentialEntry) -> None:
    patch = builders.shard_patch(username, entry.to_json(), secret=True)
    shard = _shard_name(ip, username)
    ctx.cache.put(await ctx.kube.merge_patch("v1", "Secret", ctx.settings.namespace, shard, patch))


async def _remove_entry(ctx: Context, ip: str, username: str, *, always: bool = False) -> None:
    """Remove the token's entry; unless ``always``, only when the cached shard has one
    (a token that is not attached is checked periodically: that must cost no write)."""
    patch = builders.shard_patch(username, None, secret=True)
    shard = _shard_name(ip, username)
    if not always:
        current = await ctx.cache.owned("Secret", shard)
        if current is None or username not in (current.get("data") or {}):
            return
    try:
        ctx.cache.put(
            await ctx.kube.merge_patch("v1", "Secret", ctx.settings.namespace, shard, patch)
        )
    except ApiException as exc:
        if exc.status != 404:  # no shard: the relay (and every entry) is gone already
            raise


async def _write_status(
    ctx: Context,
    body: Obj,
    base: Obj,
    ok: bool,
    reason: str,
    message: str,
    *,
    webhooks: tuple[bool, str, str] | None = None,
) -> None:
    """Ready, and WebhooksReady when the token has webhooks (``webhooks``: its status,
    reason and message; a missing signing key leaves Ready alone: the token works on)."""
    meta = body["metadata"]
    previous = (body.get("status") or {}).get("conditions")
    generation, now = meta.get("generation", 0), ctx.now()
    conditions = [condition(previous, "Ready", ok, reason, message, generation, now)]
    if webhooks is not None:
        conditions.append(condition(previous, WEBHOOKS_READY, *webhooks, generation, now))
    patch = builders.status_patch(body.get("status"), {**base, "conditions": conditions})
    if patch is not None:
        await ctx.kube.patch_status(*TOKEN_API, meta["namespace"], meta["name"], patch)


async def revoke_token(ctx: Context, body: Obj) -> None:
    """Before the token goes: remove its credential from the relay (the Secret goes by GC).

    Once per token: the urgent watch and kopf's deletion handler both call this.
    """
    meta = body["metadata"]
    key = f"smtptoken/{meta['namespace']}/{meta['name']}"
    async with ctx.locks.hold(key):
        ctx.checked.forget(key)
        if ctx.handled.revoked(meta["uid"]):
            return
        spec = SmtpTokenSpec.model_validate(body["spec"])
        await _remove_entry(
            ctx, spec.dedicated_ip_ref.name, builders.username_for(meta["uid"]), always=True
        )
        ctx.handled.revoke(meta["uid"])
