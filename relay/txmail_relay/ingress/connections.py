"""Connection caps per client address and overall, and the open-file budget they share.

Every listener asks its :class:`ConnectionGate` when a TCP connection is accepted, before TLS
and before any greeting: the answer is a :class:`Ticket`, given back once when the
connection ends, or the :class:`Refusal` the listener turns into its own reply (SMTP 421,
HTTP 429/503). The caps are sized at start so that the connections they allow, plus a reserve
(probes, the API, outbound delivery, the spool and records), fit in the open-file limit, which
the relay first raises to its hard maximum.
"""

from __future__ import annotations

import enum
import ipaddress
import logging
import math
import resource
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger(__name__)


def client_key(ip: str) -> str:
    """What a per-address cap counts: an IPv4 address, or the /64 an IPv6 address is in (one
    host usually holds a whole /64). An IPv4-mapped IPv6 address counts as its IPv4 address."""
    try:
        address = ipaddress.ip_address(ip.partition("%")[0])
    except ValueError:
        return ip
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def peer_ip(peername: object) -> str:
    """The address part of ``transport.get_extra_info("peername")``."""
    if isinstance(peername, tuple) and peername:
        return str(peername[0])
    return "unknown"


class Refusal(enum.Enum):
    ADDRESS = "address"  # this client address has its share
    FULL = "full"  # the listener has every connection it may have


class Ticket:
    """One admitted connection; :meth:`release` gives its place back (once)."""

    __slots__ = ("_gate", "key")

    def __init__(self, gate: ConnectionGate, key: str) -> None:
        self._gate: ConnectionGate | None = gate
        self.key = key

    def release(self) -> None:
        gate, self._gate = self._gate, None
        if gate is not None:
            gate._release(self.key)


class ConnectionGate:
    """Counts open connections, overall and per client address (see :func:`client_key`)."""

    def __init__(self, limit: int, per_address: int | None = None) -> None:
        self.limit = limit
        self.per_address = per_address
        self.open = 0
        self.refusing = 0  # refused connections still being answered (a TLS handshake first)
        self._by_key: Counter[str] = Counter()

    def admit(self, peername: object) -> Ticket | Refusal:
        key = client_key(peer_ip(peername))
        if self.per_address is not None and self._by_key[key] >= self.per_address:
            return Refusal.ADDRESS
        if self.open >= self.limit:
            return Refusal.FULL
        self.open += 1
        self._by_key[key] += 1
        return Ticket(self, key)

    def _release(self, key: str) -> None:
        self.open -= 1
        self._by_key[key] -= 1
        if self._by_key[key] <= 0:
            del self._by_key[key]


# The open-file limit asked for when the hard limit is "unlimited" (Linux's default nr_open).
_UNLIMITED_ASK = 1_048_576


def raise_open_file_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard one; returns the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = _UNLIMITED_ASK if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (OSError, ValueError) as exc:
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, wanted, exc)
        else:
            log.info("open-file limit raised", extra={"from": soft, "to": wanted})
            soft = wanted
    return _UNLIMITED_ASK if soft == resource.RLIM_INFINITY else soft


def open_files() -> int:
    """Descriptors this process has open now (0 where /proc is not available)."""
    try:
        return sum(1 for _ in Path("/proc/self/fd").iterdir())
    except OSError:
        return 0


def share_descriptors(
    caps: Mapping[str, int], *, file_limit: int, reserved: int, in_use: int
) -> dict[str, int]:
    """The caps that fit: if the connections they allow plus ``reserved`` and the descriptors
    ``in_use`` exceed ``file_limit``, each cap shrinks in proportion (never below 1)."""
    room = file_limit - reserved - in_use
    wanted = sum(caps.values())
    if wanted <= room:
        return dict(caps)
    scale = max(room, 0) / wanted if wanted else 0.0
    fitted = {name: max(1, math.floor(cap * scale)) for name, cap in caps.items()}
    log.warning(
        "the open-file limit leaves room for fewer connections than configured",
        extra={
            "file_limit": file_limit,
            "reserved": reserved,
            "in_use": in_use,
            "configured": dict(caps),
            "caps": fitted,
        },
    )
    return fitted
