"""``txmail-relay``: run the relay of one DedicatedIP until SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from txmail_relay import logs
from txmail_relay.app import Relay
from txmail_relay.config import ConfigSource, FileConfigSource
from txmail_relay.settings import Settings, load_settings
from txmail_relay.stats import StatsPublisher


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="txmail-relay", description=__doc__)
    parser.add_argument("--config", type=Path, required=True, help="settings file (YAML)")
    return parser.parse_args(argv)


def _source(settings: Settings, path: Path) -> ConfigSource:
    if settings.kubernetes is None:
        return FileConfigSource(path, settings.config_poll_interval)
    from txmail_relay.kube import KubernetesConfigSource  # noqa: PLC0415 - slow import

    return KubernetesConfigSource(settings.kubernetes)


def _stats(settings: Settings) -> StatsPublisher | None:
    """Kubernetes mode publishes to the stats ConfigMap unless a stats file is set."""
    if settings.kubernetes is None or settings.stats_file is not None:
        return None  # Relay writes settings.statsFile, if any
    from txmail_relay.kube import KubernetesStatsPublisher  # noqa: PLC0415 - slow import

    return KubernetesStatsPublisher(settings.kubernetes)


async def serve(relay: Relay) -> None:
    """Run until SIGTERM or SIGINT, then stop within the grace period."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    starting = loop.create_task(relay.start())
    stopping = loop.create_task(stop.wait())
    await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if starting.done():
        starting.result()
        await stopping
    else:
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await starting
    await relay.stop()


def _run(main: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop  # noqa: PLC0415 - optional
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    try:
        settings = load_settings(args.config)
    except (OSError, ValueError, TypeError, ValidationError) as exc:
        print(f"txmail-relay: {args.config}: {exc}", file=sys.stderr)
        return 2
    logs.configure(json_format=settings.logging.json_format, level=settings.logging.level)
    _run(serve(Relay(settings, _source(settings, args.config), stats_publisher=_stats(settings))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
