"""crds/ is generated from the models: committed files must match, and stay structural."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from project import CRDS
from txmail_operator.api import KINDS
from txmail_operator.api.crd import file_name, render


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.KIND)
def test_committed_crd_matches_the_models(kind: Any) -> None:
    committed = (CRDS / file_name(kind)).read_text()
    assert committed == render(kind), "crds/ is stale: run `make crds` and commit the result"


def _walk(node: Any, path: str = "") -> list[str]:
    problems = []
    if isinstance(node, dict):
        for bad in ("$ref", "$defs", "anyOf", "allOf", "oneOf", "title"):
            if bad in node:
                problems.append(f"{path}: {bad}")
        if node.get("additionalProperties") is False:
            problems.append(f"{path}: additionalProperties false")
        if "properties" in node and "additionalProperties" in node:
            problems.append(f"{path}: properties beside additionalProperties")
        if "properties" in node and node.get("type") != "object":
            problems.append(f"{path}: properties without type object")
        for key, value in node.items():
            problems += _walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            problems += _walk(value, f"{path}[{i}]")
    return problems


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.KIND)
def test_schema_is_structural(kind: Any) -> None:
    crd = yaml.safe_load(render(kind))
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert _walk(schema) == []
