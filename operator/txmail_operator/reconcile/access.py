"""Whether an object in a namespace may use a DedicatedIP."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..api import DedicatedIPSpec
from .context import Context

Obj = dict[str, Any]


@dataclass(frozen=True)
class Attachment:
    ip: Obj | None
    spec: DedicatedIPSpec | None
    reason: str
    message: str

    @property
    def ok(self) -> bool:
        return self.spec is not None and self.reason == "Attached"


async def attach(ctx: Context, ip_name: str, namespace: str) -> Attachment:
    ip = await ctx.cache.ip(ip_name)
    if ip is None or ip["metadata"].get("deletionTimestamp"):
        return Attachment(
            None, None, "DedicatedIPNotFound", f"DedicatedIP {ip_name} does not exist"
        )
    spec = DedicatedIPSpec.model_validate(ip["spec"])
    if spec.allowed_namespaces is not None:
        labels = await ctx.cache.namespace_labels(namespace) or {}
        if not spec.allowed_namespaces.matches(labels):
            return Attachment(
                ip,
                spec,
                "NamespaceNotAllowed",
                f"DedicatedIP {ip_name} does not allow namespace {namespace} "
                "(see its spec.allowedNamespaces)",
            )
    return Attachment(ip, spec, "Attached", f"attached to DedicatedIP {ip_name}")
