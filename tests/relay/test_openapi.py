"""docs/openapi.yaml describes every route the relay serves, and the publishers' seams."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from relay.relaykit import RelayEnv

OPENAPI = Path(__file__).resolve().parents[2] / "docs" / "openapi.yaml"


def test_every_served_route_is_documented_on_its_listener(env: RelayEnv) -> None:
    doc = yaml.safe_load(OPENAPI.read_text())
    assert doc["openapi"].startswith("3.")
    relay = env.start()
    assert relay.relay is not None
    assert set(relay.relay.http) == {"tracking", "api", "metrics"}
    served = set()
    for listener, runner in relay.relay.http.items():
        for route in runner.app.router.routes():
            if route.method == "HEAD":
                continue
            info = route.resource.get_info() if route.resource is not None else {}
            path = info.get("path") or info.get("formatter")
            path = re.sub(r"\{(\w+)[^}]*\}", r"{\1}", str(path))
            served.add((listener, route.method.lower(), path))
    methods = {"get", "post", "put", "patch", "delete"}
    documented = {
        (item["x-txmail-listener"], m, p)
        for p, item in doc["paths"].items()
        for m in item
        if m in methods
    }
    assert served == documented, (served - documented, documented - served)
    assert ("api", "post", "/marketing/v3/transactional/single-email/send") in served
