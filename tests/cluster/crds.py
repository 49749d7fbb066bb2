"""Install txmail's CRDs into a cluster and wait until the API server serves them."""

from __future__ import annotations

import time

import yaml
from kubernetes import client

from project import CRDS


def install_crds(api_client: client.ApiClient, timeout: float = 30.0) -> list[str]:
    """Apply every CRD in crds/ (server-side) and wait until each is Established."""
    ext = client.ApiextensionsV1Api(api_client)
    names = []
    for path in sorted(CRDS.glob("*.yaml")):
        body = yaml.safe_load(path.read_text())
        name = body["metadata"]["name"]
        names.append(name)
        ext.patch_custom_resource_definition(
            name,
            body,
            field_manager="txmail-tests",
            force=True,
            _content_type="application/apply-patch+yaml",
        )
    deadline = time.monotonic() + timeout
    pending = set(names)
    while pending and time.monotonic() < deadline:
        for name in list(pending):
            status = ext.read_custom_resource_definition(name).status
            conds = (status.conditions if status else None) or []
            if any(c.type == "Established" and c.status == "True" for c in conds):
                pending.discard(name)
        if pending:
            time.sleep(0.1)
    if pending:
        raise AssertionError(f"CRDs not Established within {timeout} s: {sorted(pending)}")
    return names
