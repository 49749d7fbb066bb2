"""Reconcile functions: read what is, write what should be, record status. Called by handlers."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from ..builders import username_for
from .context import Context, Locks
from .dedicatedip import reconcile_ip, refresh_status, repair_ip
from .drift import Action, DriftRepair
from .email import IdTaken, reconcile_email, withdraw_email
from .metrics import Metrics
from .sends import reconcile_send
from .smtptoken import reconcile_token, revoke_token
from .stats import publish_stats

Ref = tuple[str, str]
log = logging.getLogger(__name__)


def fan_out(ctx: Context, tokens: Iterable[Ref], emails: Iterable[Ref], taken: IdTaken) -> None:
    """Queue a reconcile of the tokens and emails that depend on something that just changed.

    ROUTINE work, one job per dependent (one already queued is not queued again): a failure of
    one dependent is retried on its own, so one bad object never holds up the others.
    """
    for namespace, name in sorted(set(tokens)):
        ctx.work.submit(
            ("SmtpToken", namespace, name),
            ctx.metrics.measured("SmtpToken", reconcile_token),
            ctx,
            namespace,
            name,
        )
    for namespace, name in sorted(set(emails)):
        ctx.work.submit(
            ("TransactionalEmail", namespace, name),
            ctx.metrics.measured("TransactionalEmail", reconcile_email),
            ctx,
            namespace,
            name,
            taken,
        )


__all__ = [
    "Action",
    "Context",
    "DriftRepair",
    "IdTaken",
    "Locks",
    "Metrics",
    "fan_out",
    "publish_stats",
    "reconcile_email",
    "reconcile_ip",
    "reconcile_send",
    "reconcile_token",
    "refresh_status",
    "repair_ip",
    "revoke_token",
    "username_for",
    "withdraw_email",
]
