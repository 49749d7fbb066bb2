"""Generate CustomResourceDefinitions from the pydantic models (``make crds``).

Pydantic writes JSON Schema 2020-12; a CRD needs a *structural* OpenAPI v3 schema. The
conversion inlines ``$defs``, turns ``anyOf: [X, null]`` into ``X`` with ``nullable: true``,
drops ``title``, null defaults and ``additionalProperties: false`` (which the API server
refuses beside ``properties``; pruning already drops unknown fields), and keeps the
description written where a field is used over the one on the referenced model.

One run writes both copies: ``crds/*.yaml`` (plain manifests for ``kubectl apply``) and, with
``--chart``, the Helm chart's ``templates/crd-*.yaml``: the same objects wrapped in the chart's
``crds.enabled`` / ``crds.keep`` conditionals and labels, with ``{{`` escaped for Go templates.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from .common import GROUP, VERSION, Model, cel

CATEGORY = "txmail"
_DROP = {"title", "$defs", "discriminator"}
_FIRST = ("type", "description", "nullable", "default")


def _resolve(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_resolve(n, defs) for n in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    if "$ref" in node:
        target = _resolve(defs[node.pop("$ref").split("/")[-1]], defs)
        node = _merge(target, {k: _resolve(v, defs) for k, v in node.items()})
    if "anyOf" in node:
        options = [o for o in node.pop("anyOf") if o.get("type") != "null"]
        if len(options) != 1:
            raise ValueError(f"cannot express anyOf {options} in a structural schema")
        node = _merge(_resolve(options[0], defs), node)
        node["nullable"] = True
        if node.get("default", "absent") is None:
            del node["default"]
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP or (key == "additionalProperties" and value is False):
            continue
        if key == "properties":
            out[key] = {name: _resolve(prop, defs) for name, prop in value.items()}
        else:
            out[key] = _resolve(value, defs)
    return _ordered(out)


def _ordered(node: dict[str, Any]) -> dict[str, Any]:
    """Put type and description first so the files read like hand-written schemas."""
    head = {k: node[k] for k in _FIRST if k in node}
    return {**head, **{k: v for k, v in node.items() if k not in _FIRST}}


def _merge(base: dict[str, Any], site: dict[str, Any]) -> dict[str, Any]:
    """A referenced schema overlaid with what the use site says (description, CEL rules)."""
    merged = {**base, **site}
    rules = base.get("x-kubernetes-validations", []) + site.get("x-kubernetes-validations", [])
    if rules:
        merged["x-kubernetes-validations"] = rules
    return merged


def open_api_schema(kind: type[Model]) -> dict[str, Any]:
    raw = kind.model_json_schema(by_alias=True, mode="validation")
    resolved = _resolve(raw, raw.get("$defs", {}))
    name_max: int = getattr(kind, "NAME_MAX")  # noqa: B009 - ClassVar on every kind
    return {
        "type": "object",
        "description": (kind.__doc__ or "").strip(),
        "required": ["spec"],
        "properties": {
            "apiVersion": {
                "type": "string",
                "description": "The versioned schema of this object: txmail.dev/v1alpha1.",
            },
            "kind": {"type": "string", "description": f"Always {getattr(kind, 'KIND')}."},  # noqa: B009
            "metadata": {"type": "object"},
            "spec": resolved["properties"]["spec"],
            "status": resolved["properties"]["status"],
        },
        "x-kubernetes-validations": [
            cel(
                f"self.metadata.name.size() <= {name_max}",
                f"metadata.name must be at most {name_max} characters",
                reason="FieldValueInvalid",
            )
        ],
    }


def crd(kind: type[Model]) -> dict[str, Any]:
    k: Any = kind
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{k.PLURAL}.{GROUP}",
            "labels": {"app.kubernetes.io/part-of": "txmail"},
        },
        "spec": {
            "group": GROUP,
            "scope": k.SCOPE,
            "names": {
                "kind": k.KIND,
                "listKind": f"{k.KIND}List",
                "plural": k.PLURAL,
                "singular": k.KIND.lower(),
                "shortNames": list(k.SHORT_NAMES),
                "categories": [CATEGORY],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": list(k.PRINTER_COLUMNS),
                    "schema": {"openAPIV3Schema": open_api_schema(kind)},
                }
            ],
        },
    }


def file_name(kind: type[Model]) -> str:
    return f"{GROUP}_{getattr(kind, 'PLURAL')}.yaml"  # noqa: B009


HEADER = "# Generated from operator/txmail_operator/api by `make crds`. Do not edit.\n"


def _dump(node: dict[str, Any]) -> str:
    return yaml.safe_dump(node, sort_keys=False, width=100, allow_unicode=True)


def render(kind: type[Model]) -> str:
    return HEADER + _dump(crd(kind))


def chart_file_name(kind: type[Model]) -> str:
    return f"crd-{file_name(kind)}"


def _escape_template(text: str) -> str:
    """Literal ``{{`` (Jinja2 examples in descriptions) as a Go template action printing it."""
    return text.replace("{{", '{{ "{{" }}')


def render_chart(kind: type[Model]) -> str:
    """The CRD as a Helm template: installed unless ``crds.enabled`` is false, and kept on
    ``helm uninstall`` (``helm.sh/resource-policy: keep``) unless ``crds.keep`` is false."""
    obj = crd(kind)
    head = _dump({"apiVersion": obj["apiVersion"], "kind": obj["kind"]})
    meta = (
        "metadata:\n"
        f"  name: {obj['metadata']['name']}\n"
        "  {{- if .Values.crds.keep }}\n"
        "  annotations:\n"
        "    helm.sh/resource-policy: keep\n"
        "  {{- end }}\n"
        "  labels:\n"
        '    {{- include "txmail.crdLabels" . | nindent 4 }}\n'
    )
    spec = _escape_template(_dump({"spec": obj["spec"]}))
    return "{{- if .Values.crds.enabled }}\n" + HEADER + head + meta + spec + "{{- end }}\n"


def main(argv: list[str] | None = None) -> int:
    from . import KINDS  # noqa: PLC0415 - the package imports this module

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("out", type=Path, help="folder to write the CRD files into")
    parser.add_argument(
        "--chart", type=Path, help="a Helm chart folder: also write templates/crd-*.yaml into it"
    )
    args = parser.parse_args(argv)
    if args.chart is not None and not (args.chart / "Chart.yaml").is_file():
        parser.error(f"{args.chart} is not a Helm chart (no Chart.yaml)")
    args.out.mkdir(parents=True, exist_ok=True)
    for kind in KINDS:
        _write(args.out / file_name(kind), render(kind))
        if args.chart is not None:
            _write(args.chart / "templates" / chart_file_name(kind), render_chart(kind))
    return 0


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    sys.stdout.write(f"wrote {path}\n")


if __name__ == "__main__":
    raise SystemExit(main())
