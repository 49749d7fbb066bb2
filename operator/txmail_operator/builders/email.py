"""TransactionalEmail -> the template entry a relay renders, and what its sends need."""

from __future__ import annotations

import hashlib

from txmail_relay import contract as c

from ..api import TransactionalEmailSpec
from .naming import Obj, RelayOwner, b64, owned_meta


def template_entry(
    name: str, namespace: str, generation: int, spec: TransactionalEmailSpec, email_id: int
) -> c.TemplateEntry:
    return c.TemplateEntry(
        email_id=email_id,
        namespace=namespace,
        name=name,
        generation=generation,
        sender=c.Sender(name=spec.sender.name, address=spec.sender.address),
        reply_to=list(spec.reply_to or []),
        subject=spec.subject,
        html=spec.html,
        text=spec.text,
        subscription_type=spec.subscription_type,
        track_opens=spec.tracking.opens,
        track_clicks=spec.tracking.clicks,
    )


def send_id(email_uid: str, generation: int, address: str) -> str:
    """Idempotency key of one recipient of one send: the same after any operator restart."""
    return hashlib.sha256(f"{email_uid}/{generation}/{address.lower()}".encode()).hexdigest()[:40]


def scheduler_secret(owner: RelayOwner, password: str) -> Obj:
    """The operator's own credential for a relay (TransactionalEmail spec.send)."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": owned_meta(owner, c.scheduler_secret_name(owner.name), "scheduler"),
        "data": {"password": b64(password.encode())},
    }
