"""kopf registration only: each handler parses what kopf hands it and calls a reconcile function.

Handlers are registered into an explicit registry by :func:`register`, with the settings the
operator was started with (the drift-check interval, the operator's namespace). They are
async, as are the reconciles: a reconcile runs on the operator's work pool (reconcile/work.py:
worker tasks on kopf's event loop), URGENT for creations, spec changes and deletions, ROUTINE
for resumes at startup, fan-outs and periodic checks, each counted and timed in the metrics.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
import kopf

from . import reconcile
from .api import GROUP, VERSION
from .kube import Watches
from .reconcile.cache import IP_KEY, slim
from .reconcile.dns import DnsSchedule
from .reconcile.sweep import Sweep
from .reconcile.tokens import TokenIndex
from .reconcile.urgent import UrgentTokens
from .reconcile.work import ROUTINE
from .settings import Settings

Ref = tuple[str, str]
IP, TOKEN, EMAIL = "DedicatedIP", "SmtpToken", "TransactionalEmail"
# kopf's own connections to the API (its watches, one each, and its patches of finalizers
# and progress annotations). kopf's built-in session has no limit: a burst of 1,000 creations
# opened 835. Its per-object workers are not limited (queueing.worker_limit): kopf's workers
# wait for every index to be filled before handling, so with fewer workers than objects a
# restart deadlocks (measured at 1,000 tokens with a limit of 200). Workers are coroutines;
# the connections and the work pool's workers are what is bounded.
KOPF_CONNECTIONS = 24
# How long an idle kopf worker waits for its object's next event before it exits; kopf's
# default is 5 s.
IDLE_TIMEOUT = 1.0
RESUME = kopf.Reason.RESUME
# A DedicatedIP's DNS report is re-checked once older than its spec.dns.checkIntervalSeconds
# (default 300, at least 5): the operator's one schedule (reconcile/dns.py DnsSchedule).
DNS_DEFAULT_INTERVAL = 300


def _size(index: kopf.Index[Any, Any], kind: str) -> int:
    """How many objects an index holds under keys (kind, ...), read from any thread (the
    metrics server's)."""
    for _ in range(3):
        try:
            return sum(len(index[key]) for key in list(index) if key[0] == kind)
        except (RuntimeError, KeyError):  # kopf changed the index while we counted
            continue
    return 0


def _dns_intervals(index: kopf.Index[Any, Any]) -> list[tuple[str, float]]:
    """Each DedicatedIP's name and spec.dns.checkIntervalSeconds, from kopf's index."""
    for _ in range(3):
        out = []
        try:
            for name in list(index.get(("ip",), [])):
                body: dict[str, Any] = next(iter(index.get((IP_KEY, name), [])), None) or {}
                dns = (body.get("spec") or {}).get("dns") or {}
                out.append((name, float(dns.get("checkIntervalSeconds", DNS_DEFAULT_INTERVAL))))
        except RuntimeError:  # kopf changed the index while we read it
            continue
        return out
    return []


def _refs(index: kopf.Index[Any, Ref], key: tuple[str, str]) -> list[Ref]:
    return list(index.get(key, []))


async def _tokens(ctx: reconcile.Context) -> TokenIndex:
    """The token index once the urgent watch has listed every token (counts are whole)."""
    await ctx.tokens.synced.wait()
    return ctx.tokens


def _counts(tokens: TokenIndex, emails: kopf.Index[Any, Ref], ip: str) -> tuple[int, int]:
    """How many SmtpTokens and TransactionalEmails use the DedicatedIP ``ip``."""
    return len(tokens.on_ip(ip)), len(_refs(emails, ("ip", ip)))


def _taken(emails: kopf.Index[Any, Ref], me: Ref | None = None) -> reconcile.IdTaken:
    return lambda email_id: any(ref != me for ref in emails.get(("id", email_id), []))


def _bounded_session(info: kopf.ConnectionInfo) -> kopf.AiohttpSession:
    """kopf's session for these credentials, as kopf builds it, with a connection limit."""
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=KOPF_CONNECTIONS, ssl=info.as_ssl_context()),
        headers=info.as_http_headers(),
        proxy=info.proxy_url,
        trust_env=info.trust_env,
    )
    return kopf.AiohttpSession(
        aiohttp_session=session,
        server=info.server,
        default_namespace=info.default_namespace,
        expiration=info.expiration,
        priority=info.priority,
    )


def _has_send(spec: kopf.Spec, **_: Any) -> bool:
    return "send" in spec


def register(registry: kopf.OperatorRegistry, settings: Settings) -> None:
    r: dict[str, Any] = {"registry": registry}

    @kopf.on.startup(id="configure", **r)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.persistence.finalizer = f"{GROUP}/finalizer"
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix=GROUP, key="last-handled-configuration"
        )
        settings.posting.level = logging.WARNING  # Events are posted explicitly, not from logs
        settings.watching.server_timeout = 300
        settings.queueing.idle_timeout = IDLE_TIMEOUT
        settings.execution.max_workers = 2  # only the login runs there: handlers are async

    @kopf.on.login(id="login", **r)
    async def login(**kwargs: Any) -> kopf.AiohttpSession | None:
        # The client library's in-cluster login reaches the API at KUBERNETES_SERVICE_HOST (an
        # IP), like client-go; kopf's own login_with_service_account names
        # kubernetes.default.svc, which needs cluster DNS. Outside a pod: the kubeconfig.
        info = await asyncio.to_thread(kopf.login_via_client, **kwargs)
        return None if info is None else _bounded_session(info)

    @kopf.index(GROUP, VERSION, "dedicatedips", id="ips", **r)
    async def ips(name: str, body: kopf.Body, meta: kopf.Meta, **_: Any) -> dict[Any, Any]:
        if meta.get("deletionTimestamp"):
            return {}
        return {("ip",): name, (IP_KEY, name): slim(body)}

    @kopf.index(GROUP, VERSION, "transactionalemails", id="emails", **r)
    async def emails(
        namespace: str, name: str, spec: kopf.Spec, status: kopf.Status, meta: kopf.Meta, **_: Any
    ) -> dict[Any, Ref]:
        if meta.get("deletionTimestamp"):
            return {}
        ref = (namespace, name)
        keys: dict[Any, Ref] = {("ip", spec["dedicatedIPRef"]["name"]): ref, ("ns", namespace): ref}
        if status.get("emailId"):
            keys[("id", status["emailId"])] = ref
        return keys

    @kopf.index("", "v1", "namespaces", id="namespace_labels", **r)
    async def namespace_labels(name: str, labels: kopf.Labels, **_: Any) -> dict[Any, Any]:
        return {(name,): dict(labels)}

    @kopf.on.resume(GROUP, VERSION, "dedicatedips", id="dedicated_ip", **r)
    @kopf.on.create(GROUP, VERSION, "dedicatedips", id="dedicated_ip", **r)
    @kopf.on.update(GROUP, VERSION, "dedicatedips", id="dedicated_ip", **r)
    async def dedicated_ip(
        body: kopf.Body,
        name: str,
        reason: kopf.Reason,
        memo: kopf.Memo,
        emails: kopf.Index[Any, Ref],
        **_: Any,
    ) -> None:
        ctx: reconcile.Context = memo.ctx
        tokens = await _tokens(ctx)
        job = ctx.metrics.measured(IP, reconcile.reconcile_ip)
        await ctx.work.call(job, ctx, slim(body), *_counts(tokens, emails, name))
        if reason != RESUME:  # at startup every dependent resumes by itself
            key = ("ip", name)
            reconcile.fan_out(ctx, tokens.on_ip(name), _refs(emails, key), _taken(emails))

    @kopf.timer(
        GROUP,
        VERSION,
        "dedicatedips",
        interval=settings.stats_interval,
        initial_delay=settings.stats_interval,
        id="stats",
        **r,
    )
    async def stats(name: str, memo: kopf.Memo, **_: Any) -> None:
        ctx: reconcile.Context = memo.ctx
        tokens = await _tokens(ctx)
        await ctx.work.call(
            reconcile.publish_stats, ctx, name, tokens.user, tokens.on_ip(name), priority=ROUTINE
        )

    @kopf.timer(
        GROUP,
        VERSION,
        "dedicatedips",
        interval=settings.drift_check_interval,
        initial_delay=settings.drift_check_interval,  # the resume at startup just did it
        id="recheck",
        **r,
    )
    async def recheck(
        name: str,
        memo: kopf.Memo,
        emails: kopf.Index[Any, Ref],
        **_: Any,
    ) -> None:
        """Referenced Secrets (certificate, smarthost credentials) may appear later."""
        ctx: reconcile.Context = memo.ctx
        tokens = await _tokens(ctx)
        job = ctx.metrics.measured(IP, reconcile.refresh_status)
        await ctx.work.call(job, ctx, name, *_counts(tokens, emails, name), priority=ROUTINE)

    @kopf.on.delete(GROUP, VERSION, "dedicatedips", optional=True, id="dedicated_ip_gone", **r)
    async def dedicated_ip_gone(
        name: str,
        memo: kopf.Memo,
        emails: kopf.Index[Any, Ref],
        **_: Any,
    ) -> None:
        memo.ctx.dns.forget(name)
        tokens = await _tokens(memo.ctx)
        key = ("ip", name)
        reconcile.fan_out(memo.ctx, tokens.on_ip(name), _refs(emails, key), _taken(emails))

    _register_namespaces(r)
    _register_mail(r, settings)
    _register_watch(r, settings)


def _register_namespaces(r: dict[str, Any]) -> None:
    """Namespace labels (allowedNamespaces) and the operator's own namespace appearing."""

    @kopf.on.event("", "v1", "namespaces", id="namespace", **r)
    async def namespace(
        event: kopf.RawEvent,
        name: str,
        labels: kopf.Labels,
        memo: kopf.Memo,
        emails: kopf.Index[Any, Ref],
        **_: Any,
    ) -> None:
        ctx: reconcile.Context = memo.ctx
        ctx.indexed.set()  # kopf runs handlers only once every index is filled
        gone = event["type"] == "DELETED"
        if name == ctx.settings.namespace and not gone:
            for ip in sorted(ctx.waiting_for_namespace):  # now their relays can be made
                memo.drift.repairs.request(ip, reconcile.Action.REPAIR)
        if ctx.namespaces.changed(name, None if gone else dict(labels)) and not gone:
            tokens = await _tokens(ctx)
            reconcile.fan_out(
                ctx, tokens.in_namespace(name), _refs(emails, ("ns", name)), _taken(emails)
            )


def _register_watch(r: dict[str, Any], settings: Settings) -> None:
    """At startup: the work pool, the caches, the drift watch and the periodic token check."""

    @kopf.on.startup(id="watch_owned", **r)
    async def watch_owned(
        memo: kopf.Memo,
        ips: kopf.Index[Any, Any],
        emails: kopf.Index[Any, Ref],
        namespace_labels: kopf.Index[Any, Any],
        **_: Any,
    ) -> None:
        """Metrics from the indexes; the watch that keeps the cache and repairs drift."""
        ctx: reconcile.Context = memo.ctx
        ctx.cache.ips, ctx.cache.namespaces = ips, namespace_labels
        ctx.metrics.count_managed(IP, lambda: _size(ips, "ip"))
        ctx.metrics.count_managed(TOKEN, lambda: len(ctx.tokens))
        ctx.metrics.count_managed(EMAIL, lambda: _size(emails, "ns"))
        ctx.work.start()

        async def run(ip: str, action: reconcile.Action) -> None:
            counts = _counts(await _tokens(ctx), emails, ip)
            if action is reconcile.Action.REPAIR:
                await ctx.metrics.measured(IP, reconcile.repair_ip)(ctx, ip, *counts)
            else:
                await ctx.metrics.measured(IP, reconcile.refresh_status)(ctx, ip, *counts)

        memo.watches = Watches.of(ctx.kube)
        memo.drift = reconcile.DriftRepair(ctx, run)
        memo.drift.start(memo.watches)

        interval = settings.drift_check_interval
        job = ctx.metrics.measured(TOKEN, reconcile.reconcile_token)

        def check(ref: Ref) -> None:
            if ctx.checked.since(f"smtptoken/{ref[0]}/{ref[1]}") >= interval / 2:
                ctx.work.submit((TOKEN, *ref), job, ctx, *ref)

        memo.urgent = UrgentTokens(ctx)
        memo.urgent.start(memo.watches)
        # The sweep's tokens come from the urgent watch (no scan of kopf's index each tick),
        # from when the watch has listed them all (a check reads the token from its index).
        memo.sweep = Sweep(interval, memo.urgent.tokens, check, ready=ctx.tokens.synced)
        memo.sweep.start()

        async def dns_check(ip: str) -> None:  # a full reconcile: a rotation waits for DNS
            counts = _counts(await _tokens(ctx), emails, ip)
            await ctx.metrics.measured(IP, reconcile.repair_ip)(ctx, ip, *counts)

        memo.dns_schedule = DnsSchedule(
            ctx.dns,
            lambda: _dns_intervals(ips),
            lambda ip: ctx.work.submit((IP, "dns", ip), dns_check, ip),
        )
        memo.dns_schedule.start()

    @kopf.on.cleanup(id="stop_watching", **r)
    async def stop_watching(memo: kopf.Memo, **_: Any) -> None:
        if memo.get("watches") is not None:
            await memo.watches.stop()
        for part in ("sweep", "dns_schedule", "drift"):
            if memo.get(part) is not None:
                await memo[part].stop()
        await memo.ctx.work.stop()
        await memo.ctx.kube.close()


def _register_mail(r: dict[str, Any], settings: Settings) -> None:
    """SmtpToken and TransactionalEmail handlers."""

    # No resume handler: at startup the periodic check (sweep.py) reconciles every token
    # within one interval, spread; a resume would be 5,000 handler runs in kopf's startup
    # burst. Spec changes and deletions are the urgent watch's first (urgent.py).
    @kopf.on.create(GROUP, VERSION, "smtptokens", id="smtp_token", **r)
    @kopf.on.update(GROUP, VERSION, "smtptokens", id="smtp_token", **r)
    async def smtp_token(
        namespace: str, name: str, body: kopf.Body, memo: kopf.Memo, **_: Any
    ) -> None:
        ctx: reconcile.Context = memo.ctx
        job = ctx.metrics.measured(TOKEN, reconcile.reconcile_token)
        await ctx.work.call(job, ctx, namespace, name, slim(body), changed=True)

    @kopf.on.delete(GROUP, VERSION, "smtptokens", id="smtp_token_gone", **r)
    async def smtp_token_gone(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        ctx: reconcile.Context = memo.ctx
        await ctx.work.call(ctx.metrics.measured(TOKEN, reconcile.revoke_token), ctx, slim(body))

    @kopf.on.create(GROUP, VERSION, "smtptokens", id="count_token", **r)
    @kopf.on.create(GROUP, VERSION, "transactionalemails", id="count_email", **r)
    @kopf.on.delete(GROUP, VERSION, "smtptokens", id="uncount_token", optional=True, **r)
    @kopf.on.delete(GROUP, VERSION, "transactionalemails", id="uncount_email", optional=True, **r)
    async def recount(spec: kopf.Spec, memo: kopf.Memo, **_: Any) -> None:
        """One debounced status refresh of the DedicatedIP, however many arrive at once."""
        memo.drift.repairs.request(spec["dedicatedIPRef"]["name"], reconcile.Action.STATUS)

    @kopf.on.resume(GROUP, VERSION, "transactionalemails", id="transactional_email", **r)
    @kopf.on.create(GROUP, VERSION, "transactionalemails", id="transactional_email", **r)
    @kopf.on.update(GROUP, VERSION, "transactionalemails", id="transactional_email", **r)
    async def transactional_email(
        namespace: str,
        name: str,
        reason: kopf.Reason,
        memo: kopf.Memo,
        emails: kopf.Index[Any, Ref],
        **_: Any,
    ) -> None:
        ctx: reconcile.Context = memo.ctx
        job = ctx.metrics.measured(EMAIL, reconcile.reconcile_email)
        taken = _taken(emails, (namespace, name))
        if reason == RESUME:
            ctx.work.submit((EMAIL, namespace, name), job, ctx, namespace, name, taken)
            return
        await ctx.work.call(job, ctx, namespace, name, taken)

    @kopf.timer(
        GROUP,
        VERSION,
        "transactionalemails",
        interval=settings.send_check_interval,
        id="send",
        when=_has_send,
        **r,
    )
    async def one_off_send(namespace: str, name: str, memo: kopf.Memo, **_: Any) -> None:
        ctx: reconcile.Context = memo.ctx
        job = ctx.metrics.measured(EMAIL, reconcile.reconcile_send)
        await ctx.work.call(job, ctx, namespace, name, priority=ROUTINE)

    @kopf.on.delete(GROUP, VERSION, "transactionalemails", id="transactional_email_gone", **r)
    async def transactional_email_gone(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        ctx: reconcile.Context = memo.ctx
        await ctx.work.call(ctx.metrics.measured(EMAIL, reconcile.withdraw_email), ctx, slim(body))
