"""DKIM signing at delivery time, with the keys of the RelayConfig in force and their files.

Why at delivery and not at acceptance (right after the tracking rewrite): the spooled copy
stays as accepted (tracked, unsigned) and each attempt is signed with the keys configured
*then*. So a rotation that switches the selector, a key added for a domain, or a key file
repaired applies to mail already queued, and a retry hours later carries a fresh ``t=``.
The cost is one signature per attempt instead of per message (about 9 ms for RSA-2048 with
dkimpy, under 1 ms for Ed25519 on a small message). dkimpy's canonicalisation holds the GIL,
so a thread alone would not keep the event loop free for a big body (a 10 MB one stalls it
for over 100 ms): messages up to :data:`PROCESS_SIGNING_BYTES` are signed in a worker thread,
bigger ones in a small process pool (created on first use, closed at stop).
The tracking rewrite happens at acceptance (sending/composer.py), so what is signed is the
rewritten message: its links stay valid.

:class:`DkimSigner` never loses or holds mail: a key file that is missing or unreadable, or
a signature that fails, sends the message unsigned (the other key of a dual-signed domain
still signs), logs the reason once per state of the file (never key material), and counts
it in ``txmail_relay_dkim_signatures_total{domain,result}``. One exception: when the
configuration names a new key for a domain (a rotation, a key brought by the user) whose file
is not there yet (the kubelet syncs a Secret volume up to a minute after the ConfigMap), the
domain is signed with the last key that loaded for it (``previous_key``, logged once), whose
record stays published while it retires, for at most :data:`PREVIOUS_KEY_GRACE` seconds.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from txmail_relay.config.live import LiveConfig
from txmail_relay.contract import DkimAlgorithm, DkimConfig, DkimKey
from txmail_relay.mail.dkim import (
    DkimKeyError,
    SigningKey,
    canonical,
    dkimpy_from_fields,
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
PREVIOUS_KEY = (
    "previous_key"  # signed with the domain's last loaded key: the new one's file is missing
)
UNSIGNABLE = "unsignable"  # dkimpy would not see exactly one From: sent unsigned (per message)

#: Bodies past this are signed in a worker process (dkimpy holds the GIL while it works).
PROCESS_SIGNING_BYTES = 1024 * 1024
#: How long a domain is signed with its previous key while a newly named key file is missing:
#: the kubelet needs about a minute; the previous record stays published retireAfterDays.
PREVIOUS_KEY_GRACE = 3600.0

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
    private: bytes | None = field(repr=False)  # None: see error
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


@dataclass(frozen=True)
class _Previous:
    """The last key that loaded for a domain and algorithm, and since when a newer one of the
    configuration has been missing (None: it is not)."""

    key: SigningKey
    missing_since: float | None = None


def sign_message(
    message: bytes, domain: str, keys: list[SigningKey]
) -> tuple[bytes, list[tuple[SigningKey, bytes | str]]] | None:
    """The canonical message and each key's DKIM-Signature field or the name of the error that
    stopped it; None when dkimpy would not see exactly one From (a signature covering none, or
    two, would be worthless). Pure and module-level: it runs in a worker process for big
    messages. dkimpy's errors hold no key material; only their names come back."""
    message = canonical(message)
    if dkimpy_from_fields(message) != 1:
        return None
    headers = include_headers(message)
    results: list[tuple[SigningKey, bytes | str]] = []
    for key in keys:
        try:
            results.append((key, signature(message, domain, key, headers)))
        except Exception as e:  # each key on its own; reported by name
            results.append((key, type(e).__name__))
    return message, results


class DkimSigner:
    """Signs each outgoing message for its header From domain (see the module docstring)."""

    def __init__(
        self,
        store: LiveConfig,
        metrics: RelayMetrics,
        *,
        clock: Callable[[], float] = time.monotonic,
        process_bytes: int = PROCESS_SIGNING_BYTES,
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._clock = clock
        self._process_bytes = process_bytes
        self.keys = KeyStore()
        self._lock = threading.Lock()
        self._reported: set[tuple[str, str, str]] = set()  # signing failures already logged
        self._previous: dict[tuple[str, DkimAlgorithm], _Previous] = {}
        # Threads of its own: a burst of messages to sign never queues ahead of the spool's
        # group commits in the default executor.
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="dkim")
        self._processes: ProcessPoolExecutor | None = None  # for big bodies, made on first use

    def close(self) -> None:
        """Let the signing threads and processes end (signatures in progress finish)."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self._processes is not None:
            self._processes.shutdown(wait=False, cancel_futures=True)
            self._processes = None

    def _process_pool(self) -> ProcessPoolExecutor:
        if self._processes is None:
            # forkserver: workers are forked from a clean single-threaded server, never from
            # this process with its threads (and their locks) mid-flight.
            self._processes = ProcessPoolExecutor(
                max_workers=2, mp_context=multiprocessing.get_context("forkserver")
            )
        return self._processes

    async def sign(self, message: bytes) -> bytes:
        """``message`` signed with the keys in force, or as it is; never raises."""
        config = self._store.current
        if config is None or not config.relay.dkim.domains:
            return message
        loop = asyncio.get_running_loop()
        if len(message) <= self._process_bytes:
            return await loop.run_in_executor(
                self._executor, self.sign_now, config.relay.dkim, message
            )
        try:
            prepared = await loop.run_in_executor(
                self._executor, self._prepare, config.relay.dkim, message
            )
            if prepared is None:
                return message
            domain, keys = prepared
            try:
                done = await loop.run_in_executor(
                    self._process_pool(), sign_message, message, domain, keys
                )
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a broken pool (a worker killed): sign here this time
                log.warning("DKIM worker process failed, signing in a thread: %s", type(e).__name__)
                if self._processes is not None:
                    self._processes.shutdown(wait=False, cancel_futures=True)
                    self._processes = None
                done = await loop.run_in_executor(
                    self._executor, sign_message, message, domain, keys
                )
            return self._result(message, domain, done)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug must not hold mail: send it as it is
            log.error("DKIM signing failed, sending unsigned: %s", type(e).__name__)  # noqa: TRY400
            return message

    def sign_now(self, config: DkimConfig, message: bytes) -> bytes:
        """The synchronous signing (run in a worker thread by :meth:`sign`)."""
        try:
            prepared = self._prepare(config, message)
            if prepared is None:
                return message
            domain, keys = prepared
            return self._result(message, domain, sign_message(message, domain, keys))
        except Exception as e:  # a bug must not hold mail: send it as it is
            log.error("DKIM signing failed, sending unsigned: %s", type(e).__name__)  # noqa: TRY400
            return message

    def _prepare(self, config: DkimConfig, message: bytes) -> tuple[str, list[SigningKey]] | None:
        """The From domain and the keys to sign with, or None: nothing to sign."""
        domain = from_domain(message)
        keys = config.keys_for(domain) if domain is not None else []
        if domain is None or not keys:
            return None
        if signed_for(message, domain):
            self._count(domain, ALREADY_SIGNED)
            return None
        usable = self._usable(config, domain, keys)
        return (domain, usable) if usable else None

    def _usable(self, config: DkimConfig, domain: str, keys: list[DkimKey]) -> list[SigningKey]:
        usable = []
        for key in keys:
            found = self.keys.get(Path(config.keys_dir, key.key_file), key.algorithm)
            if isinstance(found, str):
                previous = self._fallback(domain, key)
                if previous is None:
                    self._count(domain, KEY_UNAVAILABLE)
                else:
                    self._count(domain, PREVIOUS_KEY)
                    usable.append(previous)
            else:
                signing = SigningKey(key.selector, key.algorithm, found)
                with self._lock:
                    self._previous[(domain, key.algorithm)] = _Previous(signing)
                usable.append(signing)
        return usable

    def _fallback(self, domain: str, key: DkimKey) -> SigningKey | None:
        """The domain's last loaded key of this algorithm, if it is another selector's and the
        new one has been missing less than :data:`PREVIOUS_KEY_GRACE`."""
        now = self._clock()
        with self._lock:
            previous = self._previous.get((domain, key.algorithm))
            if previous is None or previous.key.selector == key.selector:
                return None
            if previous.missing_since is None:
                previous = self._previous[(domain, key.algorithm)] = _Previous(previous.key, now)
                log.warning(
                    "DKIM key file not there yet, signing with the previous key meanwhile",
                    extra={
                        "domain": domain,
                        "selector": key.selector,
                        "previous_selector": previous.key.selector,
                    },
                )
            if now - (previous.missing_since or now) > PREVIOUS_KEY_GRACE:
                return None
            return previous.key

    def _result(
        self,
        message: bytes,
        domain: str,
        done: tuple[bytes, list[tuple[SigningKey, bytes | str]]] | None,
    ) -> bytes:
        """The signed message from :func:`sign_message`'s answer, counted and logged."""
        if done is None:
            self._count(domain, UNSIGNABLE)
            if (domain, "", UNSIGNABLE) not in self._reported:
                self._reported.add((domain, "", UNSIGNABLE))
                log.warning(
                    "DKIM: the From field is not one dkimpy reads, sending unsigned",
                    extra={"domain": domain},
                )
            return message
        signed, results = done
        fields = []
        for key, result in results:
            if isinstance(result, bytes):
                self._count(domain, SIGNED)
                fields.append(result)
                continue
            self._count(domain, FAILED)
            if (domain, key.selector, result) not in self._reported:
                self._reported.add((domain, key.selector, result))
                log.error(
                    "DKIM signature failed, its mail goes out without it: %s",
                    result,
                    extra={"domain": domain, "selector": key.selector},
                )
        return b"".join(fields) + signed if fields else message

    def _count(self, domain: str, result: str) -> None:
        self._metrics.dkim_signatures.labels(domain, result).inc()
