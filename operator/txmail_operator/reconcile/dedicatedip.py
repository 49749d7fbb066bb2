"""DedicatedIP -> a relay: Deployment, Service, ServiceAccount, Role, configuration, TLS."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import secrets
from typing import Any

from kubernetes_asyncio.client.exceptions import ApiException

from txmail_relay import contract as c

from .. import builders
from ..api import DedicatedIPSpec
from ..api.dedicatedip import uses_inbound
from ..builders.warmup import start_recorded, with_status
from . import pki
from .conditions import condition
from .context import Context
from .dkim import (
    DkimPlan,
    dkim_domains_status,
    dkim_outdated,
    dkim_problem,
    ensure_dkim,
    rotate_dkim,
)
from .dns import (
    DnsReport,
    announcement,
    check_dns,
    dns_status,
    dns_verified,
    kept_dns,
    return_path_verified,
    sync_external_dns,
)
from .warmup import started as warmup_started
from .warmup import status_block as warmup_status

Obj = dict[str, Any]
log = logging.getLogger(__name__)
IP_API = ("txmail.dev/v1alpha1", "DedicatedIP")
# On each object the operator applies: a digest of what it applied (see _unchanged).
APPLIED_ANNOTATION = "txmail.dev/applied-digest"


async def _ensure_tls(
    ctx: Context, owner: builders.RelayOwner, spec: DedicatedIPSpec
) -> tuple[str, bytes | None, str | None]:
    """The serving certificate's Secret, the CA apps should trust, and a problem if any."""
    name, ns = owner.name, owner.namespace
    ref = spec.tls.certificate_secret_ref
    if ref is not None:
        secret = await ctx.cache.owned("Secret", ref.name)
        if secret is None:
            return ref.name, None, f"certificate Secret {ns}/{ref.name} does not exist"
        ca = (secret.get("data") or {}).get("ca.crt")
        return ref.name, base64.b64decode(ca) if ca else None, None
    secret_name = c.tls_secret_name(name)
    secret = await ctx.cache.owned("Secret", secret_name)
    if secret is not None and (secret.get("data") or {}).get("ca.crt"):
        return secret_name, base64.b64decode(secret["data"]["ca.crt"]), None
    dns = builders.service_dns_names(name, ns, ctx.settings.cluster_domain)
    material = pki.issue(name, dns, ctx.now())
    ctx.cache.put(
        await ctx.kube.apply(
            builders.relay_tls_secret(owner, material.ca_pem, material.cert_pem, material.key_pem)
        )
    )
    return secret_name, material.ca_pem, None


async def _ensure_tracking_keys(
    ctx: Context, owner: builders.RelayOwner, spec: DedicatedIPSpec
) -> str | None:
    """The tracking keys Secret to mount, created with one random key when tracking is on.

    Created only when missing and never rewritten: a rotation is a person adding a line. A
    Secret left from when tracking was on stays mounted, so links in mail already delivered
    keep verifying.
    """
    secret_name = c.tracking_secret_name(owner.name)
    secret = await ctx.cache.owned("Secret", secret_name)
    if secret is not None and (secret.get("data") or {}).get(c.TRACKING_KEYS_KEY):
        return secret_name
    if spec.tracking.base_url is None:
        return None
    ctx.cache.put(
        await ctx.kube.apply(builders.relay_tracking_secret(owner, secrets.token_bytes(32)))
    )
    return secret_name


async def relay_ca(ctx: Context, ip: str, spec: DedicatedIPSpec) -> bytes | None:
    """The CA an app should trust for this IP's relay (None when unknown)."""
    secret_name = (
        spec.tls.certificate_secret_ref.name
        if spec.tls.certificate_secret_ref
        else c.tls_secret_name(ip)
    )
    secret = await ctx.cache.owned("Secret", secret_name)
    ca = ((secret or {}).get("data") or {}).get("ca.crt")
    return base64.b64decode(ca) if ca else None


def availability(deployment: Obj | None) -> tuple[bool, str, str]:
    """RelayAvailable from the Deployment status the controller-manager writes."""
    if deployment is None:
        return False, "DeploymentMissing", "the relay Deployment does not exist yet"
    status = deployment.get("status") or {}
    available = next(
        (x for x in status.get("conditions") or [] if x.get("type") == "Available"), None
    )
    if available is None:
        return False, "RelayPending", "the relay Deployment has not reported its status yet"
    if available.get("status") == "True" and (status.get("availableReplicas") or 0) >= 1:
        return True, "RelayAvailable", "the relay pod is running and ready"
    return (
        False,
        available.get("reason") or "RelayUnavailable",
        available.get("message") or "the relay pod is not ready",
    )


async def reconcile_ip(ctx: Context, body: Obj, tokens: int, emails: int) -> None:
    """Apply every child of the DedicatedIP, then record its status."""
    meta = body["metadata"]
    name = meta["name"]
    spec = DedicatedIPSpec.model_validate(body["spec"])
    owner = builders.RelayOwner.of(body, ctx.settings.namespace)
    async with ctx.locks.hold(f"dedicatedip/{name}"):
        if await _namespace_missing(ctx, body, spec, tokens, emails):
            return
        tls_secret, _ca, tls_problem = await _ensure_tls(ctx, owner, spec)
        tracking_secret = await _ensure_tracking_keys(ctx, owner, spec)
        dkim = await ensure_dkim(ctx, owner, body, spec)  # keys, and next keys to publish
        written = (body.get("status") or {}).get("dnsRecords")
        # The VERP return path as the relay has it now (its MX verified then), like signing
        # with a DKIM key: what the check below says changes it.
        verp = await _return_path_live(ctx, owner, spec)
        # The relay's objects first, signing as it does now: DNS (slow, or unreachable) and
        # the rotation step never hold them back, nor does any error of theirs.
        deployment = await _apply_children(
            ctx, owner, body, spec, tls_secret, tracking_secret, dkim, return_path=verp
        )
        # DNS readiness: the kept report, re-checked on a change of the records or when due.
        # Lookups do not raise: a failed one is that record's LookupFailed (reconcile/dns.py).
        dns = await check_dns(ctx.dns, name, spec, dkim.active, dkim.optional, written=written)
        # Signing switches to a next key once its record verifies (reconcile/dkim.py).
        switched = await rotate_dkim(ctx, owner, body, spec, dns.dkim_verified)
        if switched.state != dkim.state:  # which keys sign changed: so do the required records
            dns = await check_dns(
                ctx.dns, name, spec, switched.active, switched.optional, written=written
            )
        # The relay's configuration names the signing keys and the return path (once its MX
        # verifies; off again when it no longer does).
        verified = (
            return_path_verified(spec, dns, unknown=verp) if spec.dns.require_verified else verp
        )
        if switched.signing != dkim.signing or verified != verp:
            deployment = await _apply_children(
                ctx, owner, body, spec, tls_secret, tracking_secret, switched, return_path=verified
            )
        dkim = switched
        await sync_external_dns(ctx.kube, ctx.dns, owner, spec, dns)  # spec.dns.externalDNS
        # TLS and DKIM were just checked
        problem = tls_problem or dkim.problem or await _smarthost_problem(ctx, spec)
        status = await _write_status(ctx, body, spec, deployment, tokens, emails, problem, dns=dns)
    if start_recorded(body.get("status"), status):  # first Ready: the relay needs the start
        await reconcile_ip(ctx, with_status(body, status), tokens, emails)


async def _return_path_live(
    ctx: Context, owner: builders.RelayOwner, spec: DedicatedIPSpec
) -> bool:
    """Whether the RelayConfig the relay has now sends with spec.dns.returnPathDomain."""
    config_map = await ctx.cache.owned("ConfigMap", c.relay_name(owner.name))
    raw = ((config_map or {}).get("data") or {}).get(c.RELAY_CONFIG_KEY)
    if not raw or spec.dns.return_path_domain is None:
        return False
    try:
        config = c.RelayConfig.model_validate_json(raw)
    except ValueError:  # not ours to read: rebuilt below
        return False
    return config.return_path.domain == spec.dns.return_path_domain


async def _apply_children(
    ctx: Context,
    owner: builders.RelayOwner,
    body: Obj,
    spec: DedicatedIPSpec,
    tls_secret: str,
    tracking_secret: str | None,
    dkim: DkimPlan,
    *,
    return_path: bool,
) -> Obj:
    """Apply the relay's objects (an unchanged one is not written again); its Deployment.
    ``return_path``: the return-path domain's MX verified (builders.relay_config)."""
    started = warmup_started(ctx, body, spec)  # warm-up's, if any
    config = builders.relay_config(
        owner.name,
        spec,
        warmup_started=started,
        dkim=dkim.signing,
        return_path_verified=return_path,
    )
    children: list[Obj | None] = [
        builders.relay_service_account(owner),
        builders.relay_role(owner),
        builders.relay_role_binding(owner),
        builders.relay_config_map(
            owner,
            config,
            tracking_keys=tracking_secret is not None,
            limits=spec.relay.limits,
            inbound=uses_inbound(spec),
            retry=spec.relay.retry,
        ),
        *(builders.template_shard(owner, k) for k in range(c.TEMPLATE_SHARDS)),
        builders.stats_config_map(owner),
        # Last of the configuration: a token waits for its shard, so once it is Ready
        # the relay's other objects exist too.
        *(builders.credential_shard(owner, k) for k in range(c.CREDENTIAL_SHARDS)),
        builders.relay_spool_claim(owner, spec),
        builders.relay_service(owner, spec),
    ]
    for child in children:
        if child is not None:
            await _apply(ctx, child)
    return await _apply(
        ctx,
        builders.relay_deployment(
            owner, spec, ctx.settings.relay_image, tls_secret, tracking_secret, dkim.secret
        ),
    )


async def _apply(ctx: Context, obj: Obj) -> Obj:
    """Server-side apply, remembering the version written so the drift watch skips it.

    A Service's ports are a list keyed by port: a port someone changed is a new entry that an
    apply leaves in place (or, sharing a name with the built one, makes the apply invalid), so
    then the ports are set back to exactly the built ones first.
    """
    obj = _stamped(obj)
    meta = obj["metadata"]
    live = await ctx.cache.known(obj["kind"], meta["name"])
    if live is not None and _unchanged(live, obj):
        return live  # as applied, and nobody changed what we set: no write
    try:
        out = await ctx.kube.apply(obj)
    except ApiException as exc:
        if obj["kind"] != "Service" or exc.status != 422:
            raise
        out = await _reset_ports(ctx, obj)
    if obj["kind"] == "Service" and _ports(out) != _ports(obj):
        out = await _reset_ports(ctx, obj)
    written = out.get("metadata") or {}
    if written.get("resourceVersion"):
        ctx.written.record(
            obj["kind"], meta["name"], written["resourceVersion"], written.get("generation")
        )
    ctx.cache.put(out)
    return out


def _stamped(obj: Obj) -> Obj:
    """The object with a digest of itself, so a later reconcile can tell it is unchanged."""
    digest = hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:20]
    meta = obj["metadata"]
    annotations = {**(meta.get("annotations") or {}), APPLIED_ANNOTATION: digest}
    return {**obj, "metadata": {**meta, "annotations": annotations}}


def _unchanged(live: Obj, desired: Obj) -> bool:
    """Whether applying ``desired`` would change nothing: the live object was applied from
    the same desired object (its digest) and still holds every value we set (drift)."""
    have = ((live.get("metadata") or {}).get("annotations") or {}).get(APPLIED_ANNOTATION)
    return have == desired["metadata"]["annotations"][APPLIED_ANNOTATION] and _covers(live, desired)


def _covers(live: object, want: object) -> bool:
    """Every value of ``want`` is in ``live`` (the server may add defaults; empty is absent)."""
    if isinstance(want, dict):
        if not isinstance(live, dict):
            return not want
        return all(_covers(live.get(k), v) for k, v in want.items())
    if isinstance(want, list):
        if not isinstance(live, list):
            return not want
        return len(live) == len(want) and all(map(_covers, live, want))
    return want is None or live == want


async def _reset_ports(ctx: Context, service: Obj) -> Obj:
    meta = service["metadata"]
    ports = {"spec": {"ports": service["spec"]["ports"]}}
    await ctx.kube.merge_patch("v1", "Service", meta["namespace"], meta["name"], ports)
    return await ctx.kube.apply(service)


def _ports(service: Obj) -> list[tuple[object, ...]]:
    ports = (service.get("spec") or {}).get("ports") or []
    return sorted(
        (p.get("name"), p.get("port"), str(p.get("targetPort")), p.get("protocol", "TCP"))
        for p in ports
    )


async def repair_ip(ctx: Context, name: str, tokens: int, emails: int) -> None:
    """Re-apply the children of DedicatedIP ``name`` (drift repair); nothing when it is gone."""
    body = await ctx.cache.ip(name)
    if body is None or body["metadata"].get("deletionTimestamp"):
        return
    await reconcile_ip(ctx, body, tokens, emails)


async def refresh_status(ctx: Context, name: str, tokens: int, emails: int) -> None:
    """Re-read the relay Deployment and update the DedicatedIP's status (no writes to children)."""
    body = await ctx.cache.ip(name)
    if body is None or body["metadata"].get("deletionTimestamp"):
        return
    if name in ctx.waiting_for_namespace:  # it may exist now: then the relay can be made
        await reconcile_ip(ctx, body, tokens, emails)
        return
    if await dkim_outdated(ctx, name, DedicatedIPSpec.model_validate(body["spec"])):
        await reconcile_ip(ctx, body, tokens, emails)  # a user's DKIM key appeared or changed
        return
    async with ctx.locks.hold(f"dedicatedip/{name}"):
        spec = DedicatedIPSpec.model_validate(body["spec"])
        deployment = await ctx.cache.owned("Deployment", c.relay_name(name))
        problem = await _config_problem(ctx, spec, name)
        status = await _write_status(ctx, body, spec, deployment, tokens, emails, problem)
    if start_recorded(body.get("status"), status):  # first Ready: the relay needs the start
        await reconcile_ip(ctx, with_status(body, status), tokens, emails)


async def _namespace_missing(
    ctx: Context, body: Obj, spec: DedicatedIPSpec, tokens: int, emails: int
) -> bool:
    """When the operator's own namespace does not exist, say so in the status (the relay is
    made once it exists: the namespace handler and the recheck timer come back here)."""
    ns, name = ctx.settings.namespace, body["metadata"]["name"]
    if await ctx.cache.namespace_labels(ns) is not None:
        ctx.waiting_for_namespace.discard(name)
        return False
    ctx.waiting_for_namespace.add(name)
    message = (
        f"the operator's namespace {ns} does not exist, so the relay cannot be created there: "
        f"create it (kubectl create namespace {ns}) or set TXMAIL_NAMESPACE (the chart's "
        "release namespace) to the namespace the operator runs in"
    )
    await _write_status(
        ctx, body, spec, None, tokens, emails, None, blocked=("OperatorNamespaceMissing", message)
    )
    return True


async def _config_problem(ctx: Context, spec: DedicatedIPSpec, ip: str) -> str | None:
    """A Secret the DedicatedIP names that does not exist (yet), or None."""
    ns = ctx.settings.namespace
    ref = spec.tls.certificate_secret_ref
    if ref is not None and await ctx.cache.owned("Secret", ref.name) is None:
        return f"certificate Secret {ns}/{ref.name} does not exist"
    return await dkim_problem(ctx, spec, ip) or await _smarthost_problem(ctx, spec)


async def _smarthost_problem(ctx: Context, spec: DedicatedIPSpec) -> str | None:
    ns = ctx.settings.namespace
    sh = spec.delivery.smarthost
    creds = sh.credentials_secret_ref if sh is not None else None
    if creds is not None and await ctx.cache.owned("Secret", creds.name) is None:
        return f"smarthost credentials Secret {ns}/{creds.name} does not exist"
    return None


async def _write_status(
    ctx: Context,
    body: Obj,
    spec: DedicatedIPSpec,
    deployment: Obj | None,
    tokens: int,
    emails: int,
    problem: str | None,
    *,
    blocked: tuple[str, str] | None = None,
    dns: DnsReport | None = None,
) -> Obj:
    meta = body["metadata"]
    name, generation = meta["name"], meta.get("generation", 0)
    previous = (body.get("status") or {}).get("conditions")
    now = ctx.now()
    up, up_reason, up_message = (False, *blocked) if blocked else availability(deployment)
    dns = dns or kept_dns(ctx.dns, name, spec)  # a status refresh: no lookups
    dns_ok, dns_reason, dns_message = dns_verified(dns, previous, ctx.dns.notes.get(name))
    if problem:
        ready = condition(
            previous, "Ready", False, "ConfigurationInvalid", problem, generation, now
        )
    elif not up:
        ready = condition(previous, "Ready", False, up_reason, up_message, generation, now)
    elif spec.dns.require_verified and not dns_ok:
        message = f"the relay runs, but its DNS does not verify ({dns_reason}): {dns_message}"
        ready = condition(previous, "Ready", False, "DNSNotVerified", message, generation, now)
    else:
        ready = condition(
            previous, "Ready", True, "Ready", "the relay accepts and delivers mail", generation, now
        )
    ns = ctx.settings.namespace
    host = builders.smtp_host(name, ns, ctx.settings.cluster_domain)
    status = {
        "conditions": [
            ready,
            condition(previous, "RelayAvailable", up, up_reason, up_message, generation, now),
            condition(previous, "DNSVerified", dns_ok, dns_reason, dns_message, generation, now),
        ],
        **dns_status(dns, body.get("status")),
        "relay": {
            "deploymentName": c.relay_name(name),
            "serviceName": c.relay_name(name),
            "smtpEndpoint": f"{host}:{builders.submission_port(spec)}",
            "podSecurity": builders.pod_security(spec),
        },
        "tokens": tokens,
        "emails": emails,
        "observedGeneration": generation,
    }
    status["warmup"] = await warmup_status(ctx, body, spec, ready["status"] == "True")
    dkim = await dkim_domains_status(ctx, name, spec, body.get("status"))  # beside DNS
    for domain in status.get("domains") or []:
        if domain.get("name") in dkim:
            domain["dkim"] = dkim[domain["name"]]
    patch = builders.status_patch(body.get("status"), status)
    if patch is not None:  # timers tick often: write only what changed
        await ctx.kube.patch_status(*IP_API, None, name, patch)
    if announcement(ctx.dns, name, previous, dns_ok, dns_reason):
        await _announce_dns(ctx, body, dns_ok, dns_reason, dns_message)
    return status


async def _announce_dns(ctx: Context, body: Obj, ok: bool, reason: str, message: str) -> None:
    """An Event when DNSVerified changes (kubectl describe dedicatedip shows it)."""
    try:
        if ok:
            await ctx.kube.event(body, "DNSVerified", message, now=ctx.now())
        else:
            await ctx.kube.event(body, reason, message, warning=True, now=ctx.now())
    except ApiException as exc:  # the status says it all the same
        log.warning("no Event for DedicatedIP %s: %s", body["metadata"]["name"], exc.reason)
