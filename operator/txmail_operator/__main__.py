"""``txmail-operator``: build the settings and the context once, then run kopf."""

from __future__ import annotations

import asyncio
import logging

import kopf

from . import handlers
from .kube import Kube
from .reconcile import Context
from .settings import LogFormat, Settings


def main() -> None:
    settings = Settings.from_env()
    kopf.configure(
        verbose=False,
        log_format=kopf.LogFormat.JSON
        if settings.log_format is LogFormat.JSON
        else kopf.LogFormat.PLAIN,
    )
    logging.getLogger("kubernetes").setLevel(logging.WARNING)
    registry = kopf.OperatorRegistry()
    handlers.register(registry, settings)
    memo = kopf.Memo(ctx=Context(kube=Kube.from_environment(), settings=settings))
    # One replica with strategy Recreate: kopf peering only pauses other operators, it is not
    # leader election (see docs/architecture.md).
    asyncio.run(
        kopf.operator(
            registry=registry,
            memo=memo,
            standalone=True,
            clusterwide=not settings.watch_namespaces,
            namespaces=list(settings.watch_namespaces),
        )
    )


if __name__ == "__main__":
    main()
