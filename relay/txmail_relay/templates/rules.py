"""The sandbox's rules, in one place: what rendering refuses (:mod:`.policy`, at send time)
and what the analysis of a parsed template reports (:mod:`.analysis`, at apply time)."""

from __future__ import annotations

import re
import types
from typing import Any

from jinja2.runtime import LoopContext
from jinja2.sandbox import (
    UNSAFE_ASYNC_GENERATOR_ATTRIBUTES,
    UNSAFE_COROUTINE_ATTRIBUTES,
    UNSAFE_GENERATOR_ATTRIBUTES,
)
from jinja2.utils import Cycler, Joiner, Namespace
from markupsafe import Markup

#: printf-style conversion specs (``|format`` and ``%``): group 1 the width, group 2 the
#: precision; ``*`` (taken from the arguments) is refused.
PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?")

#: The classes templates see under these names (besides ``range``, a capped function).
TYPE_GLOBALS: dict[str, type] = {
    "dict": dict,
    "namespace": Namespace,
    "cycler": Cycler,
    "joiner": Joiner,
}

_ALLOWED_STR_METHODS = frozenset(
    {
        *("capitalize", "casefold", "center", "count", "endswith", "find", "format"),
        *("format_map", "index", "isalnum", "isalpha", "isascii", "isdecimal", "isdigit"),
        *("isidentifier", "islower", "isnumeric", "isprintable", "isspace", "istitle"),
        *("isupper", "join", "ljust", "lower", "lstrip", "partition", "removeprefix"),
        *("removesuffix", "replace", "rfind", "rindex", "rjust", "rpartition", "rsplit"),
        *("rstrip", "split", "splitlines", "startswith", "strip", "swapcase", "title"),
        *("upper", "zfill", "escape", "unescape", "striptags"),
    }
)
#: The only methods of these types a template may call (bound to an instance).
ALLOWED_METHODS: tuple[tuple[type, frozenset[str]], ...] = (
    (str, _ALLOWED_STR_METHODS),
    (int, frozenset({"bit_length", "bit_count", "conjugate", "as_integer_ratio"})),
    (float, frozenset({"is_integer", "conjugate", "as_integer_ratio", "hex"})),
    (dict, frozenset({"get", "items", "keys", "values"})),
    (list, frozenset({"count", "index"})),
    (tuple, frozenset({"count", "index"})),
)

#: Attributes Jinja's sandbox refuses by name on the objects that have them (the frames and
#: code of generators, coroutines and async generators, which ``map`` and friends return).
UNSAFE_NAMES: frozenset[str] = frozenset(
    UNSAFE_GENERATOR_ATTRIBUTES | UNSAFE_COROUTINE_ATTRIBUTES | UNSAFE_ASYNC_GENERATOR_ATTRIBUTES
)


def _instance_methods(value: Any) -> set[str]:
    names = set()
    for name in dir(value):
        method = getattr(value, name, None)
        bound = isinstance(method, types.BuiltinMethodType | types.MethodType)
        if not name.startswith("_") and bound and getattr(method, "__self__", None) is value:
            names.add(name)
    return names


def _public(cls: type) -> set[str]:
    return {name for name in dir(cls) if not name.startswith("_")}


#: Methods that rendering refuses wherever a template can reach them: every instance method
#: of the allow-listed types outside the allow-list (``encode``, ``translate``, ``append``,
#: ``update``...). A call to one of these names can never succeed: property values are
#: never callable, and the helpers templates get (``loop``, ``cycler``...) have none of them.
_SAMPLES: tuple[Any, ...] = ("", Markup(""), 0, 0.0, {}, [], ())
REFUSED_METHODS: frozenset[str] = frozenset(
    set().union(*(_instance_methods(v) for v in _SAMPLES))
    - set().union(*(allowed for _, allowed in ALLOWED_METHODS))
    - set().union(*(_public(cls) for cls in (LoopContext, Cycler, Joiner, Namespace)))
)


def is_private(name: str) -> bool:
    """Jinja's first rule: an attribute whose name starts with ``_`` is never safe."""
    return name.startswith("_")
