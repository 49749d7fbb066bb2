"""Names, labels and metadata shared by every builder, and the owner of a relay's objects."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from txmail_relay import contract as c

from ..api import GROUP, VERSION

Obj = dict[str, Any]

API_VERSION = f"{GROUP}/{VERSION}"
DEDICATED_IP_LABEL = f"{GROUP}/dedicatedip"

# Where the relay pod mounts what it reads; its settings file names the same paths.
SPOOL_PATH = "/var/spool/txmail"
TLS_PATH = "/etc/txmail/tls"
SMARTHOST_PATH = "/etc/txmail/smarthost"
TRACKING_PATH = "/etc/txmail/tracking"
SETTINGS_PATH = "/etc/txmail/settings"
SETTINGS_KEY = "settings.yaml"


@dataclass(frozen=True)
class RelayOwner:
    """The DedicatedIP that owns a relay's objects, and the namespace they live in.

    ``name`` is the DedicatedIP's name (the relay's objects are named after it), ``uid`` goes
    into their owner reference (so they are garbage-collected with it), ``namespace`` is the
    operator's namespace.
    """

    name: str
    uid: str
    namespace: str

    @classmethod
    def of(cls, body: Mapping[str, Any], namespace: str) -> RelayOwner:
        """The owner for a DedicatedIP object as the API returns it."""
        meta = body["metadata"]
        return cls(name=meta["name"], uid=meta["uid"], namespace=namespace)


def owner_reference(kind: str, name: str, uid: str) -> Obj:
    return {
        "apiVersion": API_VERSION,
        "kind": kind,
        "name": name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def relay_labels(ip: str) -> dict[str, str]:
    return {
        c.LABEL_NAME: c.RELAY_APP_NAME,
        c.LABEL_INSTANCE: ip,
        c.LABEL_MANAGED_BY: c.MANAGED_BY,
        DEDICATED_IP_LABEL: ip,
    }


def owned_meta(owner: RelayOwner, name: str, component: str) -> Obj:
    """Metadata of one of the relay's objects: its labels, owned by the DedicatedIP."""
    return {
        "name": name,
        "namespace": owner.namespace,
        "labels": {**relay_labels(owner.name), c.LABEL_COMPONENT: component},
        "ownerReferences": [owner_reference("DedicatedIP", owner.name, owner.uid)],
    }


def smtp_host(ip: str, namespace: str, cluster_domain: str) -> str:
    """The relay Service's in-cluster DNS name, as written into app Secrets."""
    return f"{c.relay_name(ip)}.{namespace}.svc.{cluster_domain}"


def service_dns_names(ip: str, namespace: str, cluster_domain: str) -> list[str]:
    svc = c.relay_name(ip)
    return [
        svc,
        f"{svc}.{namespace}",
        f"{svc}.{namespace}.svc",
        smtp_host(ip, namespace, cluster_domain),
    ]


def spool_claim_name(ip: str) -> str:
    return f"{c.relay_name(ip)}-spool"


def stable_id(seed: str, attempt: int = 0) -> int:
    """A positive integer below 2**53 derived from a uid (probing with ``attempt`` on clash)."""
    digest = hashlib.sha256(f"{seed}/{attempt}".encode()).digest()
    return int.from_bytes(digest[:7], "big") % (2**53 - 1) + 1


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
