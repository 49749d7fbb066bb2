"""What the sandbox would refuse, found in a parsed template before anything renders.

Rendering enforces the rules (:mod:`.policy`); this analysis reads the same rules
(:mod:`.rules`) over the template's syntax tree so that an author learns at apply time that
``{{ contact.__class__ }}`` or ``{{ custom.xs.append(1) }}`` can never render, instead of at
the first send. It reports what the template states literally (attribute names, constant
format strings); what only a value at send time reveals is still refused then.

The walk is iterative: a deeply nested tree cannot exhaust the stack here.
"""

from __future__ import annotations

import string
from collections.abc import Iterator
from dataclasses import dataclass

from jinja2 import nodes

from .rules import PERCENT_SPEC, REFUSED_METHODS, TYPE_GLOBALS, UNSAFE_NAMES, is_private

_DATA = frozenset({"contact", "custom"})  # dicts keyed by the sender's property names
_PRIVATE = "templates cannot use attributes that start with '_'"


@dataclass(frozen=True)
class Refusal:
    """One use the sandbox refuses: its 1-based line and what is refused, by name."""

    line: int
    message: str


def refusals(ast: nodes.Template) -> list[Refusal]:
    """Every refused use in ``ast``, innermost first (``__class__`` before ``__mro__``)."""
    found: list[Refusal] = []
    for node in _post_order(ast):
        found.extend(Refusal(node.lineno, m) for m in _check(node))
    return found


def _post_order(root: nodes.Node) -> Iterator[nodes.Node]:
    stack: list[tuple[nodes.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if children_done:
            yield node
            continue
        stack.append((node, True))
        stack.extend((child, False) for child in reversed(list(node.iter_child_nodes())))


def _const_str(node: nodes.Node | None) -> str | None:
    if isinstance(node, nodes.Const) and isinstance(node.value, str):
        return node.value
    return None


def _accessed(node: nodes.Node) -> tuple[nodes.Node, str] | None:
    """``obj.name`` and ``obj|attr('name')`` as (obj, name)."""
    if isinstance(node, nodes.Getattr):
        return node.node, node.attr
    if isinstance(node, nodes.Filter) and node.name == "attr" and node.node is not None:
        name = _const_str(node.args[0]) if len(node.args) == 1 else None
        if name is not None:
            return node.node, name
    return None


def _root(node: nodes.Node) -> str | None:
    """The variable an access chain starts from (``contact`` for ``contact.a['b']``)."""
    while True:
        if isinstance(node, nodes.Name):
            return node.name
        inner = getattr(node, "node", None)  # Getattr, Getitem, Call, Filter
        if not isinstance(node, nodes.Getattr | nodes.Getitem | nodes.Call | nodes.Filter):
            return None
        if inner is None:
            return None
        node = inner


def _check(node: nodes.Node) -> Iterator[str]:
    access = _accessed(node)
    if access is not None:
        obj, name = access
        yield from _check_attribute(obj, name)
        fmt = _const_str(obj)
        if fmt is not None and name in {"format", "format_map"}:
            yield from _check_format_fields(fmt)
    if isinstance(node, nodes.Getitem):
        key = _const_str(node.arg)
        # contact['_x'] is a property named _x; on anything else a key falls back to the
        # attribute of that name, which the sandbox refuses.
        if key is not None and is_private(key) and _root(node.node) not in _DATA:
            yield f"['{key}'] is not allowed: {_PRIVATE}"
    if isinstance(node, nodes.Call):
        called = _accessed(node.node)
        if called is not None and called[1] in REFUSED_METHODS and _root(called[0]) != "self":
            yield (
                f"calling {called[1]}() is not allowed: templates may call only the safe "
                "methods of strings, numbers, lists and dicts"
            )
    if isinstance(node, nodes.Filter) and node.name == "format":
        fmt = _const_str(node.node)
        if fmt is not None:
            yield from _check_percent(fmt)
    if isinstance(node, nodes.Mod):
        fmt = _const_str(node.left)
        if fmt is not None:
            yield from _check_percent(fmt)


def _check_attribute(obj: nodes.Node, name: str) -> Iterator[str]:
    if is_private(name):
        yield f"'{name}' is not allowed: {_PRIVATE}"
    elif name in UNSAFE_NAMES:
        yield f"'{name}' is not allowed: it reaches the internals of a generator"
    elif name == "mro" and isinstance(obj, nodes.Name) and obj.name in TYPE_GLOBALS:
        yield f"'{obj.name}.mro' is not allowed: it reaches Python's classes"


def _check_format_fields(fmt: str) -> Iterator[str]:
    """``'{0.__class__}'.format(x)``: the sandbox's formatter refuses what ``.`` would."""
    try:
        fields = [(field, spec) for _, field, spec, _ in string.Formatter().parse(fmt)]
    except ValueError:
        return  # not a format string: it fails when called, not as an escape
    for field, spec in fields:
        if spec and "{" in spec:
            yield "nested fields are not allowed in format specs"
        for part in (field or "").replace("[", ".").replace("]", "").split(".")[1:]:
            if is_private(part) or part in UNSAFE_NAMES:
                yield f"format field '{{{field}}}' uses '{part}', which is not allowed: {_PRIVATE}"
                break


def _check_percent(fmt: str) -> Iterator[str]:
    for match in PERCENT_SPEC.finditer(fmt):
        if "*" in match.groups():
            yield "'*' widths are not allowed in format strings"
            return
