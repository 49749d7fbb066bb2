"""``txmail-relay``: run the relay of one DedicatedIP until SIGTERM.

Exit status 2, with one line on stderr naming the file and the problem, for bad arguments or
a settings file that cannot be used (missing, not YAML, an unknown key, a wrong type).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, NoReturn

from txmail_relay import logs
from txmail_relay.app import Relay
from txmail_relay.config.file import FileConfigSource, load_dynamic
from txmail_relay.config.live import ConfigSource
from txmail_relay.records.schema import SchemaError
from txmail_relay.records.stats import StatsPublisher
from txmail_relay.settings import Settings, SettingsError, load_settings

PROG = "txmail-relay"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One line, not the usage block: ``txmail-relay: <problem> (see --help)``."""
        self.exit(2, f"{PROG}: {message} (see --help)\n")


def version() -> str:
    try:
        return importlib.metadata.version("txmail")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = _Parser(
        prog=PROG,
        description="Run the SMTP relay of one txmail DedicatedIP until SIGTERM: submission "
        "(STARTTLS and implicit TLS), a durable spool, delivery, and three HTTP listeners "
        "(tracking, api, metrics). Settings reference: docs/relay.md.",
    )
    parser.add_argument(
        "--config",
        type=Path,
        required=True,
        metavar="FILE",
        help="settings file (YAML); in file mode its configuration is reloaded when it changes",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {version()}")
    return parser.parse_args(argv)


def _sources(
    settings: Settings, path: Path
) -> tuple[ConfigSource, StatsPublisher | None, Callable[[], Awaitable[None]] | None]:
    """The config source, the stats publisher (None: the Relay writes ``statsFile``, if any)
    and what closes their connection after the relay stopped.

    Kubernetes mode watches its objects and publishes to the stats ConfigMap unless a stats
    file is set, both through one API client.
    """
    if settings.kubernetes is None:
        return FileConfigSource(path, settings.config_poll_interval), None, None
    from txmail_relay.config.kube import (  # noqa: PLC0415 - slow import
        KubeApi,
        KubernetesConfigSource,
        KubernetesStatsPublisher,
    )

    kube = settings.kubernetes
    api = KubeApi(kube)
    stats = None if settings.stats_file is not None else KubernetesStatsPublisher(kube, api)
    return KubernetesConfigSource(kube, api), stats, api.close


class StartupError(Exception):
    """The relay could not start (a port in use, a TLS file missing): reported in one line."""


async def serve(relay: Relay, close: Callable[[], Awaitable[None]] | None = None) -> None:
    """Run until SIGTERM or SIGINT, then stop within the grace period (then ``close``)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    starting = loop.create_task(relay.start())
    stopping = loop.create_task(stop.wait())
    await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if starting.done():
        try:
            starting.result()
        except (OSError, SchemaError) as exc:  # bind failures, unreadable certificate files,
            raise StartupError(str(exc)) from exc  # records written by a newer relay
        await stopping
    else:
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await starting
    try:
        await relay.stop()
    finally:
        if close is not None:
            await close()


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
        if settings.kubernetes is None:
            load_dynamic(settings)  # file mode: the documents it names must load at start
    except SettingsError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    logs.configure(json_format=settings.logging.json_format, level=settings.logging.level)
    source, stats, close = _sources(settings, args.config)
    relay = Relay(settings, source, stats_publisher=stats)
    try:
        _run(serve(relay, close))
    except StartupError as exc:
        logs.flush()  # the relay's lines before it, so this one stays the last
        print(f"{PROG}: cannot start: {exc}", file=sys.stderr)
        return 1
    finally:
        logs.flush()  # log lines are written in batches: the last ones now, not at exit
    return 0


if __name__ == "__main__":
    sys.exit(main())
