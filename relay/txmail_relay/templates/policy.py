"""The one template policy shared by the relay (rendering) and the operator (validation).

Templates come from TransactionalEmail resources, so their authors are tenants: they are
rendered in Jinja2's :class:`~jinja2.sandbox.ImmutableSandboxedEnvironment` and never with a
plain ``Environment`` (checklist J1, J4). Three environments share one policy:

* ``html``: autoescape on, so a property value can never inject markup (J2);
* ``text``: no autoescape;
* ``subject``: no autoescape, and line breaks in the output become one space, so a property
  value cannot start a new header (J2, S8).

Variables are ``contact.*`` (contact properties) and ``custom.*`` (custom properties, which may
be lists and dicts usable in loops). Undefined variables are errors (``StrictUndefined``):
:class:`MissingProperties` lists them (HubSpot ``MISSING_TEMPLATE_PROPERTIES``); any other
failure is a :class:`RenderError` (``TEMPLATE_RENDER_EXCEPTION``). Escapes such as
``''.__class__.__mro__`` or ``|attr('format')`` raise :class:`TemplateSecurityError`, which derives
from :class:`jinja2.exceptions.SecurityError`. :func:`validate` reports such uses before any
send, from the parsed template (:mod:`.analysis`, with the rules of :mod:`.rules`).

Resource caps (J3) are cooperative, no threads and no signals:

* render time: checked at every call, every loop iteration and every output chunk;
* size: each part's output, and every intermediate value (string concatenation ``~`` and
  ``+``, ``*``, ``**``, ``%``, buffered blocks, macro results, method and filter results), is
  capped; filters and ``str`` methods that grow their input (``center``, ``indent``,
  ``replace``, ``join``, ``wordwrap``, ``batch``, format widths...) are checked *before* they
  allocate;
* ``range`` is capped (10,000 by default instead of Jinja's 100,000), ``lipsum`` is gone,
  and only an allow-list of methods of ``str``/numbers/``list``/``dict`` may be called.

Loops and ``~`` get their checks from a rewrite of the parsed template (the loop iterable and
the concatenation are routed through the environment), so nothing here patches Jinja.
Compiled templates are cached by content hash in a bounded LRU owned by :class:`Templates`.
Rendering is CPU-bound (up to the time cap): async callers should use a worker thread.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import re
import string
import threading
import time
import types
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol, cast

from jinja2 import Template, nodes
from jinja2.exceptions import (
    SecurityError,
    TemplateSyntaxError,
    UndefinedError,
)
from jinja2.runtime import Context, StrictUndefined, Undefined, markup_join, str_join
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import missing, pass_context, pass_eval_context
from jinja2.visitor import NodeTransformer
from markupsafe import soft_str

from txmail_relay.contract import SendResult

from .analysis import Refusal, refusals
from .rules import ALLOWED_METHODS, PERCENT_SPEC, TYPE_GLOBALS

Part = Literal["subject", "html", "text"]
PARTS: tuple[Part, ...] = ("subject", "html", "text")

#: Line breaks in the sense of ``str.splitlines`` (the ``email`` package folds on all of them).
_HEADER_BREAKS = re.compile("[\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]+")
_CONTROLS = re.compile("[\x00-\x08\x0e-\x1f\x7f]")
_BUDGET_KEY = "txmail:budget"  # not an identifier: templates cannot name it
_DIGITS = re.compile(r"\d+")
_MAX_DEPTH = 32
#: Brackets nested deeper than this are refused before parsing: Jinja's parser recurses about
#: 15 frames per level and Python stops at 1,000 (real templates nest a handful).
MAX_NESTING = 32
_OPENING, _CLOSING = frozenset("([{"), frozenset(")]}")


def header_safe(value: str) -> str:
    """A header value that cannot start a new header: breaks become one space, controls go."""
    return _CONTROLS.sub("", _HEADER_BREAKS.sub(" ", value)).strip()


# --- results and errors ------------------------------------------------------------------


@dataclass(frozen=True)
class TemplateError:
    """A problem found by :func:`validate`; ``line`` is 1-based within ``part``."""

    part: Part
    line: int | None
    message: str

    def __str__(self) -> str:
        where = f"{self.part}, line {self.line}" if self.line is not None else self.part
        return f"{where}: {self.message}"


@dataclass(frozen=True)
class Rendered:
    subject: str
    html: str | None
    text: str | None


class TemplateSource(Protocol):
    """What :meth:`Templates.render` needs; :class:`~txmail_relay.contract.TemplateEntry` fits."""

    @property
    def subject(self) -> str: ...
    @property
    def html(self) -> str | None: ...
    @property
    def text(self) -> str | None: ...


class RenderError(Exception):
    """A template could not be rendered; ``send_result`` is the HubSpot ``sendResult``."""

    send_result: ClassVar[str] = SendResult.TEMPLATE_RENDER_EXCEPTION

    def __init__(self, message: str, *, part: Part | None = None, line: int | None = None):
        super().__init__(message)
        self.part = part
        self.line = line


class MissingProperties(RenderError):  # noqa: N818 (HubSpot's name)
    """The template uses properties that were not given (``names`` like ``custom.order``)."""

    send_result: ClassVar[str] = SendResult.MISSING_TEMPLATE_PROPERTIES

    def __init__(self, names: Iterable[str], *, part: Part | None = None, line: int | None = None):
        self.names: tuple[str, ...] = tuple(sorted(set(names)))
        super().__init__(
            "missing template properties: " + ", ".join(self.names), part=part, line=line
        )


class RenderLimitError(RenderError):
    """A time, size or range cap was hit (``TEMPLATE_RENDER_EXCEPTION``)."""


class TemplateSecurityError(RenderError, SecurityError):
    """The template tried to leave the sandbox; also a :class:`jinja2.sandbox.SecurityError`."""


class _LimitError(Exception):
    """Raised inside Jinja by the caps; turned into :class:`RenderLimitError`."""


class _MissingVariableError(UndefinedError):
    """Raised by :class:`_Undefined`; the message is the dotted name that was missing."""


# --- data given to templates ---------------------------------------------------------------


class _Props(dict[str, Any]):
    """A property dict that knows its dotted path, to name missing properties precisely."""

    __slots__ = ("_txmail_path",)

    def __init__(self, items: Iterable[tuple[str, Any]], path: str):
        super().__init__(items)
        self._txmail_path = path


def _wrap(value: Any, path: str, depth: int = 0) -> Any:
    if depth >= _MAX_DEPTH:
        return value
    if isinstance(value, Mapping):
        return _Props(
            ((str(k), _wrap(v, f"{path}.{k}", depth + 1)) for k, v in value.items()), path
        )
    if isinstance(value, list | tuple):
        return [_wrap(v, f"{path}[]", depth + 1) for v in value]
    return value


class _Undefined(StrictUndefined):
    """StrictUndefined whose failure for a missing name carries the dotted name."""

    __slots__ = ()

    def __init__(
        self,
        hint: str | None = None,
        obj: Any = missing,
        name: str | None = None,
        exc: type[Exception] = UndefinedError,
    ) -> None:
        if exc is UndefinedError and hint is None:
            exc = _MissingVariableError
        super().__init__(hint, obj, name, exc)  # type: ignore[arg-type]

    @property
    def _undefined_message(self) -> str:
        if self._undefined_exception is not _MissingVariableError:
            return super()._undefined_message
        name = str(self._undefined_name)
        if isinstance(self._undefined_obj, _Props):
            return f"{self._undefined_obj._txmail_path}.{name}"
        return name


class _Budget:
    __slots__ = ("clock", "deadline")

    def __init__(self, clock: Callable[[], float], seconds: float) -> None:
        self.clock = clock
        self.deadline = clock() + seconds

    def check(self) -> None:
        if self.clock() > self.deadline:
            raise _LimitError("render time limit exceeded")


# --- limits and the sandbox -----------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    render_seconds: float = 1.0
    max_part_bytes: int = 1 << 20  # rendered size of each part, UTF-8
    max_source_bytes: int = 1 << 20  # each template's source
    max_range: int = 10_000
    max_int_bits: int = 4096
    max_format_width: int = 1000


def _size(value: Any) -> int:
    if isinstance(value, str | list | tuple | dict | bytes):
        return len(value)
    return 0


def _int_bits(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return max(value.bit_length(), 1)
    return None


class _Sandbox(ImmutableSandboxedEnvironment):
    """The sandbox plus the caps; one per part kind, owned by a :class:`Templates`."""

    intercepted_binops = frozenset({"+", "*", "**", "%"})

    def __init__(self, limits: Limits, *, autoescape: bool) -> None:
        super().__init__(
            autoescape=autoescape,
            undefined=_Undefined,
            finalize=_finalize,
            keep_trailing_newline=True,
            auto_reload=False,
            cache_size=0,
        )
        self.limits = limits
        self.globals.clear()
        self.globals.update(range=self._range, **TYPE_GLOBALS)
        prechecks: dict[str, Callable[[dict[str, Any]], None]] = {
            "center": lambda a: self._check_width(a["width"]),
            "indent": self._precheck_indent,
            "format": lambda a: self._check_percent(a["value"]),
            "replace": lambda a: self._check_replace(a["s"], a["old"], a["new"], a["count"]),
            "join": self._precheck_join,
            "wordwrap": self._precheck_wordwrap,
            "batch": lambda a: self._check_count(a["linecount"]),
            "slice": lambda a: self._check_count(a["slices"]),
            "tojson": lambda a: self._check_count(a["indent"] or 0, cap=16),
        }
        for name, func in list(self.filters.items()):
            self.filters[name] = self._guard_filter(func, prechecks.get(name))

    # -- size checks

    def _fail(self, what: str) -> _LimitError:
        return _LimitError(f"{what} exceeds the template size limit")

    def _check_size(self, value: Any) -> None:
        if _size(value) > self.limits.max_part_bytes:
            raise self._fail("value")

    def _check_width(self, width: Any) -> None:
        if isinstance(width, int) and width > self.limits.max_format_width:
            raise _LimitError(f"width {width} exceeds {self.limits.max_format_width}")

    def _check_count(self, count: Any, cap: int | None = None) -> None:
        cap = self.limits.max_range if cap is None else cap
        if isinstance(count, int) and count > cap:
            raise _LimitError(f"count {count} exceeds {cap}")

    def _check_projected(self, length: int) -> None:
        if length > self.limits.max_part_bytes:
            raise self._fail("result")

    def _check_percent(self, fmt: Any) -> None:
        for match in PERCENT_SPEC.finditer(soft_str(fmt)):
            for group in match.groups():
                if group == "*":
                    raise SecurityError("'*' widths are not allowed in format strings")
                if group is not None:
                    self._check_width(int(group))

    def _check_str_format(self, fmt: str) -> None:
        for _, _, spec, _ in string.Formatter().parse(fmt):
            if not spec:
                continue
            if "{" in spec:
                raise SecurityError("nested fields are not allowed in format specs")
            for digits in _DIGITS.findall(spec):
                self._check_width(int(digits))

    def _check_replace(self, s: Any, old: Any, new: Any, count: Any) -> None:
        s, old, new = soft_str(s), soft_str(old), soft_str(new)
        hits = len(s) + 1 if not old else s.count(old)
        if isinstance(count, int) and count >= 0:
            hits = min(hits, count)
        self._check_projected(len(s) + hits * max(len(new) - len(old), 0))

    def _check_join(self, items: list[Any], sep: Any, attribute: Any) -> None:
        total = len(items) * len(soft_str(sep))
        if attribute is None:
            total += sum(len(soft_str(x)) for x in items)
        self._check_projected(total)

    def _precheck_join(self, a: dict[str, Any]) -> None:
        a["value"] = items = list(a["value"])  # materialised once, passed on
        self._check_join(items, a["d"], a["attribute"])

    def _precheck_indent(self, a: dict[str, Any]) -> None:
        s, width = soft_str(a["s"]), a["width"]
        if isinstance(width, int):
            self._check_width(width)
        pad = width if isinstance(width, int) else len(soft_str(width))
        self._check_projected(len(s) + (s.count("\n") + 1) * pad)

    def _precheck_wordwrap(self, a: dict[str, Any]) -> None:
        s, width = soft_str(a["s"]), a["width"]
        wrap = a["wrapstring"] if a["wrapstring"] is not None else "\n"
        lines = 2 * len(s) // max(width if isinstance(width, int) else 1, 1) + 1
        self._check_projected(len(s) + lines * len(soft_str(wrap)))

    def _guard_filter(
        self, func: Callable[..., Any], precheck: Callable[[dict[str, Any]], None] | None
    ) -> Callable[..., Any]:
        inner = inspect.unwrap(func)
        signature = inspect.signature(inner)
        # Jinja's async variants add a pass_eval_context argument the inner function lacks.
        extra = int(hasattr(func, "jinja_pass_arg") and not hasattr(inner, "jinja_pass_arg"))

        @functools.wraps(func)  # keeps jinja_pass_arg (pass_eval_context...)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            if precheck is not None:
                bound = signature.bind(*args[extra:], **kwargs)
                bound.apply_defaults()
                precheck(bound.arguments)  # may replace an iterator by a list
                args, kwargs = (*args[:extra], *bound.args), bound.kwargs
            result = func(*args, **kwargs)
            self._check_size(result)
            return result

        return guarded

    def _check_method(self, obj: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
        """Refuse methods outside the allow-list and pre-check growing ``str`` methods;
        returns ``args`` (an iterator given to ``join`` comes back as a list)."""
        target = getattr(obj, "__wrapped__", obj)  # str.format comes wrapped by the sandbox
        if not isinstance(
            target, types.BuiltinMethodType | types.MethodType | types.MethodWrapperType
        ):
            return args
        owner, name = target.__self__, target.__name__
        for base, allowed in ALLOWED_METHODS:
            if isinstance(owner, base):
                if name not in allowed:
                    raise SecurityError(f"calling {type(owner).__name__}.{name} is not allowed")
                break
        if not isinstance(owner, str):
            return args
        if name in {"center", "ljust", "rjust", "zfill"} and args:
            self._check_width(args[0])
        elif name == "replace" and len(args) >= 2:
            self._check_replace(owner, args[0], args[1], args[2] if len(args) > 2 else -1)
        elif name == "join" and len(args) == 1:
            items = list(args[0])
            self._check_join(items, owner, None)
            return (items,)
        elif name in {"format", "format_map"}:
            self._check_str_format(owner)
        return args

    # -- sandbox hooks

    def call(self, context: Context, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        budget = context.get(_BUDGET_KEY)
        if isinstance(budget, _Budget):
            budget.check()
        args = self._check_method(obj, args)
        for arg in (*args, *kwargs.values()):
            self._check_size(arg)
        result = super().call(context, obj, *args, **kwargs)
        self._check_size(result)
        return result

    def getattr(self, obj: Any, attribute: str) -> Any:
        # A property wins over a dict method of the same name: ``custom.items`` is the
        # "items" property when there is one (HubSpot's ``{{ custom.NAME }}``).
        if isinstance(obj, _Props) and attribute in obj:
            return obj[attribute]
        return super().getattr(obj, attribute)

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        limits = self.limits
        if operator == "+":
            self._check_projected(_size(left) + _size(right))
        elif operator == "*":
            for seq, n in ((left, right), (right, left)):
                if _size(seq) and isinstance(n, int):
                    self._check_projected(_size(seq) * n)
            lbits, rbits = _int_bits(left), _int_bits(right)
            if lbits is not None and rbits is not None and lbits + rbits > limits.max_int_bits:
                raise _LimitError("integer result too large")
        elif operator == "**":
            lbits, rbits = _int_bits(left), _int_bits(right)
            big = lbits is not None and rbits is not None and right > 0 and abs(left) > 1
            if big and (rbits > 16 or lbits * right > limits.max_int_bits):  # type: ignore[operator]
                raise _LimitError("integer result too large")
        elif operator == "%" and isinstance(left, str):
            self._check_percent(left)
        result = super().call_binop(context, operator, left, right)
        self._check_size(result)
        return result

    def concat(self, parts: Iterable[str]) -> str:
        """Joins captured output (macros, set/filter/call blocks) after checking the size."""
        items = parts if isinstance(parts, list) else list(parts)
        self._check_projected(sum(map(len, items)))
        return "".join(items)

    @pass_context
    def txmail_iter(self, context: Context, iterable: Any) -> Any:
        """Every ``{% for %}`` iterates through this: one time check per item."""
        budget = context.get(_BUDGET_KEY)
        if not isinstance(budget, _Budget) or isinstance(iterable, Undefined):
            return iterable
        return _checked(iterable, budget)

    @pass_eval_context
    def txmail_concat(self, eval_ctx: Any, values: list[Any]) -> str:
        """Every ``a ~ b`` goes through this: the size is checked before joining."""
        parts = [soft_str(v) for v in values]
        self._check_projected(sum(map(len, parts)))
        joined: str = markup_join(parts) if eval_ctx.autoescape else str_join(parts)
        self._check_size(joined)
        return joined

    def _range(self, *args: int) -> range:
        rng = range(*args)
        if len(rng) > self.limits.max_range:
            raise _LimitError(f"range() is limited to {self.limits.max_range} items")
        return rng


def _finalize(value: Any) -> Any:
    return "" if value is None else value


def _checked(iterable: Iterable[Any], budget: _Budget) -> Iterator[Any]:
    for item in iterable:
        budget.check()
        yield item


class _Guard(NodeTransformer):
    """Routes loop iterables and ``~`` through the environment's checked helpers."""

    def visit_For(self, node: nodes.For, *args: Any, **kwargs: Any) -> nodes.Node:  # noqa: N802
        self.generic_visit(node, *args, **kwargs)
        node.iter = _env_call("txmail_iter", node.iter, node.lineno)
        return node

    def visit_Concat(self, node: nodes.Concat, *args: Any, **kwargs: Any) -> nodes.Node:  # noqa: N802
        self.generic_visit(node, *args, **kwargs)
        values = nodes.List(list(node.nodes), lineno=node.lineno)
        return _env_call("txmail_concat", values, node.lineno)


def _env_call(name: str, arg: nodes.Node, lineno: int) -> nodes.Call:
    func = nodes.EnvironmentAttribute(name, lineno=lineno)
    return nodes.Call(func, [cast(nodes.Expr, arg)], [], None, None, lineno=lineno)


_UNSUPPORTED = (nodes.Extends, nodes.Include, nodes.Import, nodes.FromImport)
_GUARDS = {("test", "defined"), ("test", "undefined"), ("filter", "default"), ("filter", "d")}


def _referenced(ast: nodes.Template) -> frozenset[tuple[str, ...]]:
    """``contact.x.y``/``custom['x']`` chains used without an ``is defined``/``default`` guard."""
    guarded: set[int] = set()
    for check in ast.find_all((nodes.Test, nodes.Filter)):
        kind = "test" if isinstance(check, nodes.Test) else "filter"
        if (kind, check.name) in _GUARDS and check.node is not None:
            guarded.update(id(n) for n in check.node.find_all(nodes.Node))
            guarded.add(id(check.node))
    paths: set[tuple[str, ...]] = set()
    for node in ast.find_all((nodes.Getattr, nodes.Getitem)):
        if id(node) in guarded:
            continue
        path: list[str] = []
        cur: nodes.Node = node
        while isinstance(cur, nodes.Getattr | nodes.Getitem):
            if isinstance(cur, nodes.Getattr):
                path.append(cur.attr)
            elif isinstance(cur.arg, nodes.Const) and isinstance(cur.arg.value, str):
                path.append(cur.arg.value)
            else:
                break
            cur = cur.node
        else:
            if isinstance(cur, nodes.Name) and cur.name in {"contact", "custom"}:
                paths.add((cur.name, *reversed(path)))
    return frozenset(paths)


def _missing_names(paths: frozenset[tuple[str, ...]], data: Mapping[str, Any]) -> set[str]:
    missing_names: set[str] = set()
    for path in paths:
        value: Any = data
        for i, key in enumerate(path):
            if not isinstance(value, Mapping):
                break
            if key in value:
                value = value[key]
            elif i > 0 and hasattr(value, key):  # dict methods such as custom.items
                break
            else:
                missing_names.add(".".join(path[: i + 1]))
                break
    return missing_names


def _template_line(exc: BaseException) -> int | None:
    line = None
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


@dataclass(frozen=True)
class _Compiled:
    template: Template
    referenced: frozenset[tuple[str, ...]]
    refused: tuple[Refusal, ...]  # what rendering would refuse (see .analysis)


def _check_nesting(env: _Sandbox, source: str) -> None:
    """Refuse brackets nested past :data:`MAX_NESTING`, with the line, before parsing."""
    depth = 0
    for lineno, kind, value in env.lex(source):
        if kind == "operator" and value in _OPENING:
            depth += 1
            if depth > MAX_NESTING:
                raise TemplateSyntaxError(
                    f"brackets nest more than {MAX_NESTING} levels deep", lineno
                )
        elif kind == "operator" and value in _CLOSING:
            depth -= 1


class Templates:
    """Validates and renders template parts; owns the environments and the compiled cache."""

    def __init__(
        self,
        limits: Limits | None = None,
        *,
        cache_size: int = 512,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limits = limits or Limits()
        self._clock = clock
        self._envs: dict[Part, _Sandbox] = {
            "subject": _Sandbox(self.limits, autoescape=False),
            "html": _Sandbox(self.limits, autoescape=True),
            "text": _Sandbox(self.limits, autoescape=False),
        }
        self._cache: OrderedDict[tuple[Part, bytes], _Compiled] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def cached(self) -> int:
        """How many compiled templates the cache holds."""
        with self._lock:
            return len(self._cache)

    def _compile(self, part: Part, source: str) -> _Compiled:
        """Parse, check and compile; raises TemplateSyntaxError (with ``lineno``)."""
        key = (part, hashlib.sha256(source.encode("utf-8", "surrogatepass")).digest())
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        if len(source.encode("utf-8", "surrogatepass")) > self.limits.max_source_bytes:
            raise TemplateSyntaxError("template is too large", 1)
        env = self._envs[part]
        _check_nesting(env, source)
        try:
            ast = env.parse(source)
            for node in ast.find_all(_UNSUPPORTED):
                tag = type(node).__name__.lower().replace("fromimport", "from")
                raise TemplateSyntaxError(f"'{tag}' is not supported", node.lineno)
            referenced = _referenced(ast)
            refused = tuple(refusals(ast))
            _Guard().visit(ast)
            compiled = _Compiled(env.from_string(ast), referenced, refused)
        except RecursionError:
            # Operators, filters or blocks inside one another, without brackets (- - - 1).
            raise TemplateSyntaxError(
                "the template nests too deeply: expressions or blocks inside one another", 1
            ) from None
        except SyntaxError as e:  # Python's limits on the compiled code: nested blocks
            raise TemplateSyntaxError(f"the template nests too deeply ({e.msg})", 1) from None
        with self._lock:
            self._cache[key] = compiled
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return compiled

    def validate(self, subject: str, html: str | None, text: str | None) -> list[TemplateError]:
        """The first problem of each part, with its line (renders nothing): a syntax error,
        or a use the sandbox refuses (``{{ contact.__class__ }}``, see :mod:`.analysis`)."""
        errors = []
        for part, source in zip(PARTS, (subject, html, text), strict=True):
            if source is None:
                continue
            try:
                compiled = self._compile(part, source)
            except TemplateSyntaxError as e:
                errors.append(TemplateError(part, e.lineno, e.message or str(e)))
                continue
            except Exception as e:  # never a crash of the caller (the operator's reconcile)
                errors.append(TemplateError(part, None, f"cannot be parsed ({type(e).__name__})"))
                continue
            if compiled.refused:
                first = compiled.refused[0]
                errors.append(TemplateError(part, first.line, first.message))
        return errors

    def render(
        self,
        source: TemplateSource,
        contact: Mapping[str, Any] | None = None,
        custom: Mapping[str, Any] | None = None,
    ) -> Rendered:
        """Render every part of ``source``; raises a :class:`RenderError`."""
        data = {"contact": dict(contact or {}), "custom": dict(custom or {})}
        variables = {name: _wrap(value, name) for name, value in data.items()}
        subject = header_safe(self._render_part("subject", source.subject, variables, data))
        html = (
            None if source.html is None else self._render_part("html", source.html, variables, data)
        )
        text = (
            None if source.text is None else self._render_part("text", source.text, variables, data)
        )
        return Rendered(subject, html, text)

    def _render_part(
        self, part: Part, source: str, variables: dict[str, Any], data: Mapping[str, Any]
    ) -> str:
        try:
            compiled = self._compile(part, source)
        except TemplateSyntaxError as e:
            raise RenderError(e.message or str(e), part=part, line=e.lineno) from e
        except Exception as e:  # as validate(): a template error, never the caller's crash
            raise RenderError(f"cannot be parsed ({type(e).__name__})", part=part) from e
        budget = _Budget(self._clock, self.limits.render_seconds)
        chunks = compiled.template.generate({**variables, _BUDGET_KEY: budget})
        try:
            return _collect(chunks, self.limits.max_part_bytes, budget)
        except _MissingVariableError as e:
            names = _missing_names(compiled.referenced, data) | {str(e)}
            raise MissingProperties(names, part=part, line=_template_line(e)) from e
        except _LimitError as e:
            raise RenderLimitError(str(e), part=part, line=_template_line(e)) from e
        except SecurityError as e:
            raise TemplateSecurityError(str(e), part=part, line=_template_line(e)) from e
        except Exception as e:
            raise RenderError(f"{type(e).__name__}: {e}", part=part, line=_template_line(e)) from e


def _collect(chunks: Iterable[str], max_bytes: int, budget: _Budget) -> str:
    out: list[str] = []
    size = 0
    for chunk in chunks:
        size += len(chunk.encode("utf-8", "surrogatepass"))
        if size > max_bytes:
            raise _LimitError(f"output exceeds {max_bytes} bytes")
        budget.check()
        out.append(chunk)
    return "".join(out)


def validate(subject: str, html: str | None, text: str | None) -> list[TemplateError]:
    """Syntax problems of a TransactionalEmail's parts (what the operator reports)."""
    return Templates(cache_size=3).validate(subject, html, text)
