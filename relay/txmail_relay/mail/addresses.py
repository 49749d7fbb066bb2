"""Address helpers shared by the submission parser and the sender policy (pure)."""

from __future__ import annotations

from collections.abc import Iterable
from email.utils import getaddresses


def domain_of(address: str) -> str:
    """The lowercased domain of an addr-spec (everything after the last ``@``)."""
    return address.rpartition("@")[2].lower()


def addr_specs(values: Iterable[str]) -> tuple[str, ...]:
    """The non-empty addr-specs of header values (``Name <a@b>, c@d``), in order."""
    return tuple(addr for _, addr in getaddresses(list(values)) if addr)
