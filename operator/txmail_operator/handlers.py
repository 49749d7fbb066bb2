"""kopf registration only: each handler parses what kopf hands it and calls a reconcile function.

Handlers are registered into an explicit registry by :func:`register`, with the settings the
operator was started with (the drift-check interval, the operator's namespace).
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from txmail_relay import contract as c

from . import reconcile
from .api import GROUP, VERSION
from .settings import Settings

Ref = tuple[str, str]


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
        return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)

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
    def dedicated_ip_gone(
        name: str,
        memo: kopf.Memo,
        tokens: kopf.Index[Any, Ref],
        emails: kopf.Index[Any, Ref],
        **_: Any,
    ) -> None:
        key = ("ip", name)
        reconcile.fan_out(memo.ctx, _refs(tokens, key), _refs(emails, key), _taken(emails))

    @kopf.on.event(
        "apps",
        "v1",
        "deployments",
        labels={c.LABEL_NAME: c.RELAY_APP_NAME, c.LABEL_MANAGED_BY: c.MANAGED_BY},
        id="relay_deployment",
        **r,
    )
    def relay_deployment(
        event: kopf.RawEvent,
        namespace: str,
        labels: kopf.Labels,
        memo: kopf.Memo,
        tokens: kopf.Index[Any, Ref],
        emails: kopf.Index[Any, Ref],
        **_: Any,
    ) -> None:
        if namespace != settings.namespace or c.LABEL_INSTANCE not in labels:
            return
        ip = labels[c.LABEL_INSTANCE]
        counts = _counts(tokens, emails, ip)
        if event["type"] == "DELETED":  # deleted by hand: put the relay back
            body = memo.ctx.kube.get(f"{GROUP}/{VERSION}", "DedicatedIP", None, ip)
            if body is not None and not body["metadata"].get("deletionTimestamp"):
                reconcile.reconcile_ip(memo.ctx, body, *counts)
            return
        reconcile.refresh_status(memo.ctx, ip, *counts)

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


def _register_mail(r: dict[str, Any], settings: Settings) -> None:
    """SmtpToken and TransactionalEmail handlers."""

    @kopf.on.resume(GROUP, VERSION, "smtptokens", id="smtp_token", **r)
    @kopf.on.create(GROUP, VERSION, "smtptokens", id="smtp_token", **r)
    @kopf.on.update(GROUP, VERSION, "smtptokens", id="smtp_token", **r)
    @kopf.timer(
        GROUP, VERSION, "smtptokens", interval=settings.drift_check_interval, id="smtp_token", **r
    )
    def smtp_token(namespace: str, name: str, memo: kopf.Memo, **_: Any) -> None:
        reconcile.reconcile_token(memo.ctx, namespace, name)

    @kopf.on.delete(GROUP, VERSION, "smtptokens", id="smtp_token_gone", **r)
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
    def one_off_send(namespace: str, name: str, memo: kopf.Memo, **_: Any) -> None:
        reconcile.reconcile_send(memo.ctx, namespace, name)

    @kopf.on.delete(GROUP, VERSION, "transactionalemails", id="transactional_email_gone", **r)
    def transactional_email_gone(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        reconcile.withdraw_email(memo.ctx, dict(body))
