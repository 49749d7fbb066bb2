"""kopf registration only: each handler parses what kopf hands it and calls a reconcile function.

Handlers are registered into an explicit registry by :func:`register`, with the settings the
operator was started with (the drift-check interval, the operator's namespace). Every handler
that reconciles is wrapped by :func:`_measured`, which counts and times it in the metrics.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import kopf

from . import reconcile
from .api import GROUP, VERSION
from .settings import Settings

Ref = tuple[str, str]
F = TypeVar("F", bound=Callable[..., Any])
IP, TOKEN, EMAIL = "DedicatedIP", "SmtpToken", "TransactionalEmail"


def _measured(kind: str) -> Callable[[F], F]:
    """Count and time the handler as one reconcile of ``kind`` (by result)."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            with kwargs["memo"].ctx.metrics.reconcile(kind):
                return fn(*args, **kwargs)

        return run  # type: ignore[return-value]

    return wrap


def _size(index: kopf.Index[Any, Ref], kind: str) -> int:
    """How many objects an index holds under keys (kind, ...), read from any thread."""
    for _ in range(3):
        try:
            return sum(len(index[key]) for key in list(index) if key[0] == kind)
        except (RuntimeError, KeyError):  # kopf changed the index while we counted
            continue
    return 0


def _refs(index: kopf.Index[Any, Ref], key: tuple[str, str]) -> list[Ref]:
    return list(index.get(key, []))


def _counts(tokens: kopf.Index[Any, Ref], emails: kopf.Index[Any, Ref], ip: str) -> tuple[int, int]:
    """How many SmtpTokens and TransactionalEmails use the DedicatedIP ``ip``."""
    return len(_refs(tokens, ("ip", ip))), len(_refs(emails, ("ip", ip)))


def _taken(emails: kopf.Index[Any, Ref], me: Ref | None = None) -> reconcile.IdTaken:
    return lambda email_id: any(ref != me for ref in emails.get(("id", email_id), []))


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
        settings.execution.max_workers = 8

    @kopf.on.login(id="login", **r)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        # The client library's in-cluster login reaches the API at KUBERNETES_SERVICE_HOST (an
        # IP), like client-go; kopf's own login_with_service_account names
        # kubernetes.default.svc, which needs cluster DNS. Outside a pod: the kubeconfig.
        return kopf.login_via_client(**kwargs)

    @kopf.index(GROUP, VERSION, "dedicatedips", id="ips", **r)
    def ips(name: str, meta: kopf.Meta, **_: Any) -> dict[Any, str]:
        return {} if meta.get("deletionTimestamp") else {("ip",): name}

    @kopf.index(GROUP, VERSION, "smtptokens", id="tokens", **r)
    def tokens(
        namespace: str, name: str, uid: str, spec: kopf.Spec, meta: kopf.Meta, **_: Any
    ) -> dict[Any, Ref]:
        if meta.get("deletionTimestamp"):  # on its way out: no longer counted or fanned out to
            return {}
        return {
            ("user", reconcile.username_for(uid)): (namespace, name),
            ("ip", spec["dedicatedIPRef"]["name"]): (namespace, name),
            ("ns", namespace): (namespace, name),
        }

    @kopf.index(GROUP, VERSION, "transactionalemails", id="emails", **r)
    def emails(
        namespace: str, name: str, spec: kopf.Spec, status: kopf.Status, meta: kopf.Meta, **_: Any
    ) -> dict[Any, Ref]:
        if meta.get("deletionTimestamp"):
            return {}
        ref = (namespace, name)
        keys: dict[Any, Ref] = {("ip", spec["dedicatedIPRef"]["name"]): ref, ("ns", namespace): ref}
        if status.get("emailId"):
            keys[("id", status["emailId"])] = ref
        return keys

    @kopf.on.resume(GROUP, VERSION, "dedicatedips", id="dedicated_ip", **r)
    @kopf.on.create(GROUP, VERSION, "dedicatedips", id="dedicated_ip", **r)
    @kopf.on.update(GROUP, VERSION, "dedicatedips", id="dedicated_ip", **r)
    @_measured(IP)
    def dedicated_ip(
        body: kopf.Body,
        name: str,
        memo: kopf.Memo,
        tokens: kopf.Index[Any, Ref],
        emails: kopf.Index[Any, Ref],
        **_: Any,
    ) -> None:
        key = ("ip", name)
        reconcile.reconcile_ip(memo.ctx, dict(body), *_counts(tokens, emails, name))
        reconcile.fan_out(memo.ctx, _refs(tokens, key), _refs(emails, key), _taken(emails))

    @kopf.timer(GROUP, VERSION, "dedicatedips", interval=settings.stats_interval, id="stats", **r)
    def stats(name: str, memo: kopf.Memo, tokens: kopf.Index[Any, Ref], **_: Any) -> None:
        reconcile.publish_stats(
            memo.ctx, name, lambda user: next(iter(tokens.get(("user", user), [])), None)
        )

    @kopf.timer(
        GROUP, VERSION, "dedicatedips", interval=settings.drift_check_interval, id="recheck", **r
    )
    @_measured(IP)
    def recheck(
        name: str,
        memo: kopf.Memo,
        tokens: kopf.Index[Any, Ref],
        emails: kopf.Index[Any, Ref],
        **_: Any,
    ) -> None:
        """Referenced Secrets (certificate, smarthost credentials) may appear later."""
        reconcile.refresh_status(memo.ctx, name, *_counts(tokens, emails, name))

    @kopf.on.delete(GROUP, VERSION, "dedicatedips", optional=True, id="dedicated_ip_gone", **r)
    @_measured(IP)
    def dedicated_ip_gone(
        name: str,
        memo: kopf.Memo,
        tokens: kopf.Index[Any, Ref],
        emails: kopf.Index[Any, Ref],
        **_: Any,
    ) -> None:
        key = ("ip", name)
        reconcile.fan_out(memo.ctx, _refs(tokens, key), _refs(emails, key), _taken(emails))

    @kopf.on.event("", "v1", "namespaces", id="namespace", **r)
    def namespace(
        event: kopf.RawEvent,
        name: str,
        labels: kopf.Labels,
        memo: kopf.Memo,
        tokens: kopf.Index[Any, Ref],
        emails: kopf.Index[Any, Ref],
        **_: Any,
    ) -> None:
        gone = event["type"] == "DELETED"
        if memo.ctx.namespaces.changed(name, None if gone else dict(labels)) and not gone:
            reconcile.fan_out(
                memo.ctx, _refs(tokens, ("ns", name)), _refs(emails, ("ns", name)), _taken(emails)
            )

    _register_mail(r, settings)
    _register_watch(r)


def _register_watch(r: dict[str, Any]) -> None:
    """At startup: metrics from the indexes, and the watch that repairs the relays' drift."""

    @kopf.on.startup(id="watch_owned", **r)
    def watch_owned(
        memo: kopf.Memo,
        ips: kopf.Index[Any, str],
        tokens: kopf.Index[Any, Ref],
        emails: kopf.Index[Any, Ref],
        **_: Any,
    ) -> None:
        """Metrics from the indexes; the watch that repairs drift of the relays' objects."""
        ctx: reconcile.Context = memo.ctx
        ctx.metrics.count_managed(IP, lambda: _size(ips, "ip"))
        ctx.metrics.count_managed(TOKEN, lambda: _size(tokens, "user"))
        ctx.metrics.count_managed(EMAIL, lambda: _size(emails, "ns"))

        @_measured(IP)
        def run(ip: str, action: reconcile.Action, memo: kopf.Memo) -> None:
            counts = _counts(tokens, emails, ip)
            if action is reconcile.Action.REPAIR:
                reconcile.repair_ip(memo.ctx, ip, *counts)
            else:
                reconcile.refresh_status(memo.ctx, ip, *counts)

        memo.drift = reconcile.DriftRepair(ctx, lambda ip, action: run(ip, action, memo=memo))
        memo.drift.start()

    @kopf.on.cleanup(id="stop_watching", **r)
    def stop_watching(memo: kopf.Memo, **_: Any) -> None:
        if memo.get("drift") is not None:
            memo.drift.stop()


def _register_mail(r: dict[str, Any], settings: Settings) -> None:
    """SmtpToken and TransactionalEmail handlers."""

    @kopf.on.resume(GROUP, VERSION, "smtptokens", id="smtp_token", **r)
    @kopf.on.create(GROUP, VERSION, "smtptokens", id="smtp_token", **r)
    @kopf.on.update(GROUP, VERSION, "smtptokens", id="smtp_token", **r)
    @kopf.timer(
        GROUP, VERSION, "smtptokens", interval=settings.drift_check_interval, id="smtp_token", **r
    )
    @_measured(TOKEN)
    def smtp_token(namespace: str, name: str, memo: kopf.Memo, **_: Any) -> None:
        reconcile.reconcile_token(memo.ctx, namespace, name)

    @kopf.on.delete(GROUP, VERSION, "smtptokens", id="smtp_token_gone", **r)
    @_measured(TOKEN)
    def smtp_token_gone(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        reconcile.revoke_token(memo.ctx, dict(body))

    @kopf.on.create(GROUP, VERSION, "smtptokens", id="count_token", **r)
    @kopf.on.create(GROUP, VERSION, "transactionalemails", id="count_email", **r)
    @kopf.on.delete(GROUP, VERSION, "smtptokens", id="uncount_token", optional=True, **r)
    @kopf.on.delete(GROUP, VERSION, "transactionalemails", id="uncount_email", optional=True, **r)
    def recount(
        spec: kopf.Spec,
        memo: kopf.Memo,
        tokens: kopf.Index[Any, Ref],
        emails: kopf.Index[Any, Ref],
        **_: Any,
    ) -> None:
        ip = spec["dedicatedIPRef"]["name"]
        reconcile.refresh_status(memo.ctx, ip, *_counts(tokens, emails, ip))

    @kopf.on.resume(GROUP, VERSION, "transactionalemails", id="transactional_email", **r)
    @kopf.on.create(GROUP, VERSION, "transactionalemails", id="transactional_email", **r)
    @kopf.on.update(GROUP, VERSION, "transactionalemails", id="transactional_email", **r)
    @_measured(EMAIL)
    def transactional_email(
        namespace: str, name: str, memo: kopf.Memo, emails: kopf.Index[Any, Ref], **_: Any
    ) -> None:
        reconcile.reconcile_email(memo.ctx, namespace, name, _taken(emails, (namespace, name)))

    @kopf.timer(
        GROUP,
        VERSION,
        "transactionalemails",
        interval=settings.send_check_interval,
        id="send",
        when=_has_send,
        **r,
    )
    @_measured(EMAIL)
    def one_off_send(namespace: str, name: str, memo: kopf.Memo, **_: Any) -> None:
        reconcile.reconcile_send(memo.ctx, namespace, name)

    @kopf.on.delete(GROUP, VERSION, "transactionalemails", id="transactional_email_gone", **r)
    @_measured(EMAIL)
    def transactional_email_gone(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        reconcile.withdraw_email(memo.ctx, dict(body))
