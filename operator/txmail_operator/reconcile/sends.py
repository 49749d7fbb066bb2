"""TransactionalEmail spec.send -> one-off and scheduled sends, made through the relay's API.

Each recipient's sendId derives from the email's uid, the sendGeneration and the address, so
the relay sends each recipient at most once per generation, whatever happens to the operator
in between (a restart re-posts, the relay answers IDEMPOTENT_IGNORE). Progress lives in
status.send; a send that completed or was canceled only runs again when sendGeneration rises.
"""

from __future__ import annotations

import asyncio
import base64
import csv
import io
from typing import Any

import kopf

from txmail_relay import contract as c

from .. import builders
from ..api import TransactionalEmailSpec
from ..api.transactionalemail import OneOffSend, Recipient, SendPhase
from ..relayclient import RelayClient, RelayUnavailable
from .access import attach
from .conditions import stamp
from .context import Context
from .smtptoken import current_entry, put_entry

Obj = dict[str, Any]
EMAIL_API = ("txmail.dev/v1alpha1", "TransactionalEmail")
FINISHED = {SendPhase.COMPLETE.value, SendPhase.CANCELED.value, SendPhase.FAILED.value}
RECHECK_EVERY = 50  # recipients between re-reads of the object (suspend, delete)


class _Waiting(Exception):  # noqa: N818 - a state, not an error
    """The send cannot start yet; the message says what it waits for."""


async def reconcile_send(ctx: Context, namespace: str, name: str) -> None:
    async with ctx.locks.hold(f"transactionalemail/{namespace}/{name}"):
        body = await ctx.kube.get(*EMAIL_API, namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return
        spec = TransactionalEmailSpec.model_validate(body["spec"])
        if spec.send is not None:
            await _reconcile(ctx, body, spec, spec.send, ctx.relay)


async def _reconcile(
    ctx: Context, body: Obj, spec: TransactionalEmailSpec, send: OneOffSend, relay: RelayClient
) -> None:
    meta, status = body["metadata"], body.get("status") or {}
    generation = send.send_generation
    current = status.get("send") or {}
    same = current.get("generation") == generation
    if same and current.get("phase") in FINISHED:
        return
    progress = {
        k: current[k] for k in ("total", "accepted", "failed", "startedAt") if same and k in current
    }
    if send.suspend:
        await _write(ctx, body, SendPhase.CANCELED, generation, message="suspended", **progress)
        return
    now = ctx.now()
    if send.at is not None and now < send.at:
        await _write(
            ctx, body, SendPhase.SCHEDULED, generation, message=f"sends at {stamp(send.at)}"
        )
        return
    try:
        email_id, url, password = await _prepare(ctx, body, spec)
        recipients = await _recipients(ctx, meta["namespace"], send)
    except _Waiting as wait:
        await _write(ctx, body, SendPhase.SCHEDULED, generation, message=str(wait))
        return
    started = progress.get("startedAt") or stamp(now)
    counts = {"total": len(recipients), "accepted": 0, "failed": 0}
    await _write(ctx, body, SendPhase.SENDING, generation, startedAt=started, **counts)
    problem: str | None = None
    for index, recipient in enumerate(recipients):
        if index and index % RECHECK_EVERY == 0 and await _stopped(ctx, meta, generation):
            await _write(
                ctx,
                body,
                SendPhase.CANCELED,
                generation,
                startedAt=started,
                message="suspended",
                **counts,
            )
            return
        payload = {
            "emailId": email_id,
            "message": {
                "to": recipient.address,
                "sendId": builders.send_id(meta["uid"], generation, recipient.address),
            },
            "contactProperties": recipient.contact_properties or {},
            "customProperties": send.custom_properties or {},
        }
        try:
            reply = await asyncio.to_thread(relay.send, url, password, payload)
        except RelayUnavailable as exc:
            raise kopf.TemporaryError(
                f"the relay is unreachable ({exc}); will retry", delay=5
            ) from None
        if reply.status == 200:
            counts["accepted"] += 1
        elif reply.status == 400:
            counts["failed"] += 1
            problem = problem or f"{recipient.address}: {reply.send_result}: {reply.message}"
        else:  # 401 while the relay learns the credential, 429, 5xx: all temporary
            raise kopf.TemporaryError(f"the relay answered {reply.status}; will retry", delay=5)
    phase = SendPhase.FAILED if counts["failed"] and not counts["accepted"] else SendPhase.COMPLETE
    await _write(
        ctx,
        body,
        phase,
        generation,
        startedAt=started,
        completedAt=stamp(ctx.now()),
        message=problem,
        **counts,
    )


async def _prepare(ctx: Context, body: Obj, spec: TransactionalEmailSpec) -> tuple[int, str, str]:
    """The emailId, the relay's URL and the scheduler password, or why the send waits."""
    status = body.get("status") or {}
    ready = next((x for x in status.get("conditions") or [] if x.get("type") == "Ready"), None)
    if not status.get("emailId") or not ready or ready.get("status") != "True":
        reason = ready.get("message") if ready else "not reconciled yet"
        raise _Waiting(f"waiting for the email to be Ready: {reason}")
    attachment = await attach(ctx, spec.dedicated_ip_ref.name, body["metadata"]["namespace"])
    if attachment.ip is None or attachment.spec is None:
        raise _Waiting(attachment.message)
    password = await _scheduler_credential(ctx, attachment.ip, list(attachment.spec.domains))
    url = builders.relay_api_url(
        attachment.ip["metadata"]["name"],
        ctx.settings.namespace,
        ctx.settings.cluster_domain,
        attachment.spec,
    )
    return int(status["emailId"]), url, password


async def _scheduler_credential(ctx: Context, ip: Obj, domains: list[str]) -> str:
    """The operator's credential for this relay: created once, its digest published."""
    name, uid = ip["metadata"]["name"], ip["metadata"]["uid"]
    ns = ctx.settings.namespace
    secret = await ctx.cache.owned("Secret", c.scheduler_secret_name(name))
    encoded = ((secret or {}).get("data") or {}).get("password")
    password = base64.b64decode(encoded).decode() if encoded else ctx.password()
    if not encoded:
        ctx.cache.put(
            await ctx.kube.apply(
                builders.scheduler_secret(builders.RelayOwner.of(ip, ns), password)
            )
        )
    username = c.SCHEDULER_USERNAME_PREFIX + name
    wanted = c.CredentialEntry(
        username=username,
        namespace="",
        token="",
        digests=[c.PasswordDigest(sha256=c.password_digest(password), generation=1)],
        allowed_from_domains=domains,
        email_campaign_id=builders.stable_id(f"{uid}/scheduler"),
        scheduler=True,
    )
    exists, entry = await current_entry(ctx, name, username)
    if not exists:
        raise _Waiting(f"the relay of DedicatedIP {name} is being set up")
    if entry != wanted:
        await put_entry(ctx, name, username, wanted)
    return password


async def _recipients(ctx: Context, namespace: str, send: OneOffSend) -> list[Recipient]:
    if send.recipients is not None:
        return list(send.recipients)
    ref = send.recipients_from
    if ref is None:
        return []
    config_map = await ctx.kube.get("v1", "ConfigMap", namespace, ref.name)
    text = ((config_map or {}).get("data") or {}).get(ref.key)
    if text is None:
        raise _Waiting(f"ConfigMap {namespace}/{ref.name} has no key {ref.key}")
    rows = csv.DictReader(io.StringIO(text))
    if "email" not in (rows.fieldnames or []):
        raise _Waiting(
            f"ConfigMap {namespace}/{ref.name} key {ref.key}: the CSV needs an 'email' column"
        )
    return [
        Recipient(
            address=row["email"].strip(),
            contact_properties={k: v for k, v in row.items() if k != "email" and k and v},
        )
        for row in rows
        if (row.get("email") or "").strip()
    ]


async def _stopped(ctx: Context, meta: Obj, generation: int) -> bool:
    """Re-read the object mid-send: suspended, deleted or re-generated means stop."""
    body = await ctx.kube.get(*EMAIL_API, meta["namespace"], meta["name"])
    if body is None or body["metadata"].get("deletionTimestamp"):
        return True
    send = (body.get("spec") or {}).get("send") or {}
    return bool(send.get("suspend")) or send.get("sendGeneration", 1) != generation


async def _write(ctx: Context, body: Obj, phase: SendPhase, generation: int, **fields: Any) -> None:
    new = {
        "phase": phase.value,
        "generation": generation,
        **{k: v for k, v in fields.items() if v is not None},
    }
    current = (body.get("status") or {}).get("send")
    if current == new:
        return
    meta = body["metadata"]
    # A merge patch replaces status.send as a whole (null clears fields of an earlier phase).
    cleared = {k: None for k in (current or {}) if k not in new}
    await ctx.kube.patch_status(
        *EMAIL_API, meta["namespace"], meta["name"], {"send": {**new, **cleared}}
    )
    body.setdefault("status", {})["send"] = new
