"""Server TLS context for submission, reloaded in place when the certificate files change."""

from __future__ import annotations

import asyncio
import logging
import ssl
from pathlib import Path

log = logging.getLogger(__name__)


def server_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """Raises OSError naming both files when they cannot be read or do not match."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as exc:  # OpenSSL names neither file
        if isinstance(exc, ssl.SSLError):
            reason = f"not a matching PEM certificate and key ({exc.reason or exc})"
        else:
            reason = exc.strerror or str(exc)
        raise OSError(f"TLS certificate {cert_file} / key {key_file}: {reason}") from exc
    return context


def _stamp(paths: tuple[Path, Path]) -> tuple[int, ...]:
    return tuple(p.stat().st_mtime_ns for p in paths)


async def watch_certificate(
    context: ssl.SSLContext, cert_file: Path, key_file: Path, interval: float = 5.0
) -> None:
    """Load a renewed certificate into ``context``: new handshakes use it, open ones go on."""
    paths = (cert_file, key_file)
    seen = _stamp(paths)
    while True:
        await asyncio.sleep(interval)
        try:
            stamp = _stamp(paths)
            if stamp != seen:
                context.load_cert_chain(cert_file, key_file)
                seen = stamp
                log.info("TLS certificate reloaded", extra={"file": str(cert_file)})
        except (OSError, ssl.SSLError) as exc:
            log.error("TLS certificate not reloaded: %s", exc)  # noqa: TRY400
