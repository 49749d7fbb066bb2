"""crds/ and the chart's CRD templates are generated from the models (`make crds`): committed
files must match, and stay structural."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from project import CRDS, ROOT
from txmail_operator.api import KINDS
from txmail_operator.api.crd import chart_file_name, file_name, render, render_chart

CHART_TEMPLATES = ROOT / "charts" / "txmail" / "templates"


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.KIND)
def test_committed_crd_matches_the_models(kind: Any) -> None:
    committed = (CRDS / file_name(kind)).read_text()
    assert committed == render(kind), "crds/ is stale: run `make crds` and commit the result"


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.KIND)
def test_committed_chart_crd_matches_the_models(kind: Any) -> None:
    committed = (CHART_TEMPLATES / chart_file_name(kind)).read_text()
    assert committed == render_chart(kind), (
        "charts/txmail/templates/crd-*.yaml is stale: run `make crds` and commit the result"
    )


def test_the_chart_has_no_other_crd_templates() -> None:
    expected = {chart_file_name(kind) for kind in KINDS}
    assert {p.name for p in CHART_TEMPLATES.glob("crd-*.yaml")} == expected


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
