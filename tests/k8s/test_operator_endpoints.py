"""The operator's own endpoints, scraped over HTTP: kopf's /healthz and Prometheus /metrics.

The session's operator is paused for these tests, so exactly one operator reconciles; a
second one runs with free ports, as a Deployment would with TXMAIL_HEALTH_PORT and
TXMAIL_METRICS_PORT.
"""

from __future__ import annotations

import pytest

from k8s.conftest import Endpoints
from k8s.kit import GROUP, VERSION, Kit, refused_token_status
from k8s.operator_process import wait_for

pytestmark = pytest.mark.k8s


def test_healthz_answers_once_the_operator_runs(endpoints: Endpoints) -> None:
    status, _body = endpoints.get(endpoints.health, "/healthz")
    assert status == 200


def test_metrics_count_reconciles_and_managed_objects(
    endpoints: Endpoints, kit: Kit, namespace: str
) -> None:
    ip = kit.dedicated_ip()
    try:
        kit.token(namespace, ip, "shop")
        kit.email(namespace, ip, "welcome")
        wait_for(lambda: kit.is_ready("smtptokens", namespace, "shop"), 10, "the token Ready")
        wait_for(lambda: kit.is_ready("transactionalemails", namespace, "welcome"), 10, "Ready")
        ok = "txmail_operator_reconciles_total"
        for kind in ("DedicatedIP", "SmtpToken", "TransactionalEmail"):
            wait_for(
                lambda kind=kind: endpoints.value(ok, kind=kind, result="ok") >= 1,  # type: ignore[misc]
                10,
                f"a successful {kind} reconcile counted",
            )
            count = "txmail_operator_reconcile_duration_seconds_count"
            assert endpoints.value(count, kind=kind) >= 1
        managed = "txmail_operator_managed_objects"
        assert endpoints.value(managed, kind="DedicatedIP") >= 1
        assert endpoints.value(managed, kind="SmtpToken") >= 1
        assert endpoints.value(managed, kind="TransactionalEmail") >= 1
        samples = endpoints.samples()
        for result in ("temporary_error", "permanent_error", "error"):  # series exist from start
            assert (ok, (("kind", "SmtpToken"), ("result", result))) in samples
    finally:
        kit.objs.delete_cluster_custom_object(GROUP, VERSION, "dedicatedips", ip)


def test_a_refused_api_request_is_counted_by_verb(
    endpoints: Endpoints, kit: Kit, namespace: str
) -> None:
    """An admission policy refuses the operator's status writes in one namespace."""
    errors = "txmail_operator_api_errors_total"
    with refused_token_status(kit, namespace, "refused by the test"):
        before = endpoints.value(errors, verb="patch")
        failed = endpoints.value(
            "txmail_operator_reconciles_total", kind="SmtpToken", result="error"
        )
        kit.token(namespace, "no-such-ip", "shop")  # its status write is refused
        wait_for(
            lambda: endpoints.value(errors, verb="patch") > before, 20, "a patch error counted"
        )
        wait_for(
            lambda: (
                endpoints.value(
                    "txmail_operator_reconciles_total", kind="SmtpToken", result="error"
                )
                > failed
            ),
            10,
            "the failed reconcile counted",
        )
