"""The operator's Prometheus metrics: one registry, built at startup and kept in the Context."""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar

import kopf
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

P = ParamSpec("P")
R = TypeVar("R")
KINDS = ("DedicatedIP", "SmtpToken", "TransactionalEmail")
RESULTS = ("ok", "temporary_error", "permanent_error", "error")


def _result(exc: BaseException | None) -> str:
    if exc is None:
        return "ok"
    if isinstance(exc, kopf.TemporaryError):
        return "temporary_error"
    if isinstance(exc, kopf.PermanentError):
        return "permanent_error"
    return "error"


@dataclass
class Metrics:
    registry: CollectorRegistry = field(
        default_factory=lambda: CollectorRegistry(auto_describe=True)
    )

    def __post_init__(self) -> None:
        r = self.registry
        self.reconciles = Counter(
            "txmail_operator_reconciles",
            "Reconciles by kind and result (ok, temporary_error, permanent_error, error).",
            ["kind", "result"],
            registry=r,
        )
        self.duration = Histogram(
            "txmail_operator_reconcile_duration_seconds",
            "Time spent in one reconcile, by kind.",
            ["kind"],
            registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.managed = Gauge(
            "txmail_operator_managed_objects",
            "Objects of each kind the operator currently serves.",
            ["kind"],
            registry=r,
        )
        self.api_errors = Counter(
            "txmail_operator_api_errors",
            "Kubernetes API requests that failed, by verb.",
            ["verb"],
            registry=r,
        )
        for kind in KINDS:  # every series exists from the start, so rate() and alerts work
            self.duration.labels(kind)
            for result in RESULTS:
                self.reconciles.labels(kind, result)

    @contextmanager
    def reconcile(self, kind: str) -> Iterator[None]:
        """Count and time one reconcile of ``kind``; the result is the exception's class."""
        start = time.monotonic()
        error: BaseException | None = None
        try:
            yield
        except BaseException as exc:
            error = exc
            raise
        finally:
            self.duration.labels(kind).observe(time.monotonic() - start)
            self.reconciles.labels(kind, _result(error)).inc()

    def measured(
        self, kind: str, fn: Callable[P, Awaitable[R]]
    ) -> Callable[P, Coroutine[Any, Any, R]]:
        """``fn``, counted and timed as one reconcile of ``kind`` each time it runs."""

        @functools.wraps(fn)
        async def run(*args: P.args, **kwargs: P.kwargs) -> R:
            with self.reconcile(kind):
                return await fn(*args, **kwargs)

        return run

    def api_error(self, verb: str) -> None:
        self.api_errors.labels(verb).inc()

    def count_managed(self, kind: str, count: Callable[[], int]) -> None:
        """Report ``count()`` at each scrape (read from kopf's indexes, never stored here)."""
        self.managed.labels(kind).set_function(lambda: float(count()))
