"""DKIM signing at delivery time, with the keys of the RelayConfig in force and their files.

Why at delivery and not at acceptance (right after the tracking rewrite): the spooled copy
stays as accepted (tracked, unsigned) and each attempt is signed with the keys configured
*then*. So a rotation that switches the selector, a key added for a domain, or a key file
repaired applies to mail already queued, and a retry hours later carries a fresh ``t=``.
The cost is one signature per attempt instead of per message (about 9 ms for RSA-2048 with
dkimpy, under 1 ms for Ed25519), run in a worker thread so the event loop never waits on it.
The tracking rewrite happens at acceptance (sending/composer.py), so what is signed is the
rewritten message: its links stay valid.

:class:`DkimSigner` never loses or holds mail: a key file that is missing or unreadable, or
a signature that fails, sends the message unsigned (the other key of a dual-signed domain
still signs), logs the reason once per state of the file (never key material), and counts
it in ``txmail_relay_dkim_signatures_total{domain,result}``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from txmail_relay.config.live import LiveConfig
from txmail_relay.contract import DkimAlgorithm, DkimConfig, DkimKey
from txmail_relay.mail.dkim import (
    DkimKeyError,
    SigningKey,
    crlf,
    from_domain,
    include_headers,
    load_private_key,
    signature,
    signed_for,
)
from txmail_relay.metrics import RelayMetrics

log = logging.getLogger(__name__)

# Values of the metric's ``result`` label.
SIGNED = "signed"  # one signature added
ALREADY_SIGNED = "already_signed"  # the app signed it for this domain: left alone
KEY_UNAVAILABLE = "key_unavailable"  # the key file is missing or does not load
FAILED = "failed"  # dkimpy could not sign with a loaded key

_Fingerprint = tuple[int, int, int] | None


def _fingerprint(path: Path) -> _Fingerprint:
    try:
        st = path.stat()  # follows the symlinks of a mounted Secret to the current file
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


@dataclass(frozen=True)
class _Loaded:
    seen: _Fingerprint
    private: bytes | None  # None: see error
    error: str | None


class KeyStore:
    """Private keys read from their files, re-read when a file changes (checked with one
    ``stat`` per use, so a Secret update, a rotation, or a repaired file applies to the next
    message). Thread-safe: signing runs in worker threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._keys: dict[tuple[Path, DkimAlgorithm], _Loaded] = {}

    def get(self, path: Path, algorithm: DkimAlgorithm) -> bytes | str:
        """The key in dkimpy's form, or why there is none (logged once per file state)."""
        seen = _fingerprint(path)
        with self._lock:
            loaded = self._keys.get((path, algorithm))
            if loaded is None or loaded.seen != seen:
                loaded = self._keys[(path, algorithm)] = self._load(path, algorithm, seen)
        return loaded.private if loaded.private is not None else str(loaded.error)

    @staticmethod
    def _load(path: Path, algorithm: DkimAlgorithm, seen: _Fingerprint) -> _Loaded:
        try:
            private = load_private_key(path.read_bytes(), algorithm)
        except (OSError, DkimKeyError) as e:
            # The reason only (an OSError's errno name, our own message): never file contents.
            reason = type(e).__name__ if isinstance(e, OSError) else str(e)
            log.error(  # noqa: TRY400 - no traceback: the reason is all there is to say
                "DKIM key not usable, its mail goes out without this signature: %s",
                reason,
                extra={"key_file": str(path), "algorithm": algorithm.value},
            )
            return _Loaded(seen, None, reason)
        log.info("DKIM key loaded", extra={"key_file": str(path), "algorithm": algorithm.value})
        return _Loaded(seen, private, None)


class DkimSigner:
    """Signs each outgoing message for its header From domain (see the module docstring)."""

    def __init__(self, store: LiveConfig, metrics: RelayMetrics) -> None:
        self._store = store
        self._metrics = metrics
        self.keys = KeyStore()
        self._reported: set[tuple[str, str, str]] = set()  # signing failures already logged
        # Threads of its own: a burst of big messages to sign never queues ahead of the
        # spool's group commits in the default executor (signing holds the GIL anyway, so
        # more threads would not sign faster).
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="dkim")

    def close(self) -> None:
        """Let the signing threads end (signatures in progress finish on their own)."""
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def sign(self, message: bytes) -> bytes:
        """``message`` signed with the keys in force, or as it is; never raises."""
        config = self._store.current
        if config is None or not config.relay.dkim.domains:
            return message
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.sign_now, config.relay.dkim, message)

    def sign_now(self, config: DkimConfig, message: bytes) -> bytes:
        """The synchronous signing (run in a worker thread by :meth:`sign`)."""
        try:
            domain = from_domain(message)
            keys = config.keys_for(domain) if domain is not None else []
            if domain is None or not keys:
                return message
            if signed_for(message, domain):
                self._count(domain, ALREADY_SIGNED)
                return message
            usable = self._usable(config, domain, keys)
            if not usable:
                return message
            signed = self._sign(message, domain, usable)
        except Exception as e:  # a bug must not hold mail: send it as it is
            log.error("DKIM signing failed, sending unsigned: %s", type(e).__name__)  # noqa: TRY400
            return message
        return signed

    def _usable(self, config: DkimConfig, domain: str, keys: list[DkimKey]) -> list[SigningKey]:
        usable = []
        for key in keys:
            found = self.keys.get(Path(config.keys_dir, key.key_file), key.algorithm)
            if isinstance(found, str):
                self._count(domain, KEY_UNAVAILABLE)
            else:
                usable.append(SigningKey(key.selector, key.algorithm, found))
        return usable

    def _sign(self, message: bytes, domain: str, keys: list[SigningKey]) -> bytes:
        """Each key on its own, so one that cannot sign (or Ed25519 without PyNaCl) costs
        only its own signature."""
        canonical = crlf(message)
        headers = include_headers(canonical)
        fields = []
        for key in keys:
            try:
                fields.append(signature(canonical, domain, key, headers))
            except Exception as e:  # dkimpy's errors hold no key material; logged by name
                self._count(domain, FAILED)
                reason = type(e).__name__
                if (domain, key.selector, reason) not in self._reported:
                    self._reported.add((domain, key.selector, reason))
                    log.error(  # noqa: TRY400 - the name only: no traceback, no key material
                        "DKIM signature failed, its mail goes out without it: %s",
                        reason,
                        extra={"domain": domain, "selector": key.selector},
                    )
            else:
                self._count(domain, SIGNED)
        return b"".join(fields) + canonical if fields else message

    def _count(self, domain: str, result: str) -> None:
        self._metrics.dkim_signatures.labels(domain, result).inc()
