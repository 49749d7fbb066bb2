"""``txmail-operator``: build the settings and the context once, then run kopf.

All settings are ``TXMAIL_*`` environment variables (``--help`` lists them). A bad value, an
unknown option or a missing Kubernetes configuration is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import NoReturn

import kopf
from kubernetes_asyncio.config import ConfigException
from prometheus_client import start_http_server

from . import handlers
from .kube import Kube
from .reconcile import Context, Metrics
from .settings import ENV, VERSION, LogFormat, Settings, SettingsError

PROG = "txmail-operator"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        fail(message)


def fail(message: str, status: int = 2) -> NoReturn:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    sys.exit(status)


def _epilog() -> str:
    fields = Settings.model_fields
    lines = ["settings (environment variables):"]
    for var, name in ENV.items():
        info = fields[name]
        default = info.default
        if isinstance(default, tuple):
            default = ",".join(default)
        about = info.description or ""
        lines.append(f"  {var:<30} {about} [default: {default or 'none'}]")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = _Parser(
        prog=PROG,
        description="txmail's Kubernetes operator: turns DedicatedIPs into SMTP relays, "
        "SmtpTokens into app Secrets, and TransactionalEmails into templates.",
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {VERSION}")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    parse_args(argv)
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        fail(str(exc))
    kopf.configure(
        verbose=False,
        log_format=kopf.LogFormat.JSON
        if settings.log_format is LogFormat.JSON
        else kopf.LogFormat.PLAIN,
    )
    logging.getLogger("kubernetes_asyncio").setLevel(logging.WARNING)
    metrics = Metrics()
    try:
        # read here, so a missing configuration is one line and status 2; the client is
        # made on kopf's event loop at first use
        configuration = asyncio.run(Kube.load_configuration())
        kube = Kube(configuration, on_error=metrics.api_error)
    except ConfigException as exc:
        fail(f"no Kubernetes configuration (not in a pod, and no kubeconfig): {exc}")
    server = None
    if settings.metrics_port:
        try:
            server, _thread = start_http_server(settings.metrics_port, registry=metrics.registry)
        except OSError as exc:
            fail(f"TXMAIL_METRICS_PORT={settings.metrics_port}: {exc.strerror}", 1)
    registry = kopf.OperatorRegistry()
    handlers.register(registry, settings)
    memo = kopf.Memo(ctx=Context(kube=kube, settings=settings, metrics=metrics))
    liveness = f"http://0.0.0.0:{settings.health_port}/healthz" if settings.health_port else None
    # One replica with strategy Recreate: kopf peering only pauses other operators, it is not
    # leader election (see docs/architecture.md).
    try:
        asyncio.run(
            kopf.operator(
                registry=registry,
                memo=memo,
                standalone=True,
                clusterwide=not settings.watch_namespaces,
                namespaces=list(settings.watch_namespaces),
                liveness_endpoint=liveness,
            )
        )
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()


if __name__ == "__main__":
    main()
