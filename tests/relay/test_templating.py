"""The template policy: rendering, missing properties, escaping, sandbox escapes and caps."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Any

import pytest
from jinja2.exceptions import SecurityError

from txmail_relay.contract import TemplateEntry
from txmail_relay.templates.policy import (
    MAX_NESTING,
    Limits,
    MissingProperties,
    Rendered,
    RenderError,
    RenderLimitError,
    TemplateError,
    Templates,
    TemplateSecurityError,
    header_safe,
    validate,
)


@dataclass(frozen=True)
class Source:
    subject: str = "Hello"
    html: str | None = None
    text: str | None = None


@pytest.fixture
def templates() -> Templates:
    return Templates()


def render_text(templates: Templates, text: str, **custom: Any) -> str:
    out = templates.render(Source(text=text), {}, custom).text
    assert out is not None
    return out


def entry(**spec: Any) -> TemplateEntry:
    doc = {"emailId": 1, "namespace": "ns", "name": "welcome", "generation": 1}
    doc["from"] = {"address": "shop@example.com"}
    return TemplateEntry.model_validate({**doc, **spec})


# --- rendering -------------------------------------------------------------------------------


def test_renders_a_template_entry_with_contact_and_custom_properties(
    templates: Templates,
) -> None:
    source = entry(
        subject="Order {{ custom.order_id }} for {{ contact.firstname }}",
        html="<p>Hi {{ contact.firstname }}</p><ul>"
        "{% for item in custom['items'] %}<li>{{ item.name }} x{{ item.qty }}</li>{% endfor %}"
        "</ul>",
        text="Hi {{ contact.firstname }}\n{% for k, v in custom.totals|dictsort %}{{ k }}={{ v }};"
        "{% endfor %}",
    )
    custom = {
        "order_id": 42,
        "items": [{"name": "Tea", "qty": 2}, {"name": "Cake", "qty": 1}],
        "totals": {"net": 10, "gross": 12},
    }
    out = templates.render(source, {"firstname": "Jürgen"}, custom)
    assert out == Rendered(
        subject="Order 42 for Jürgen",
        html="<p>Hi Jürgen</p><ul><li>Tea x2</li><li>Cake x1</li></ul>",
        text="Hi Jürgen\ngross=12;net=10;",
    )


def test_loop_helpers_and_dict_iteration_work(templates: Templates) -> None:
    text = (
        "{% for x in custom.xs %}{{ loop.index }}/{{ loop.length }}"
        "{% if not loop.last %},{% endif %}{% else %}none{% endfor %}|"
        "{% for k, v in custom.d.items() %}{{ k }}:{{ v }}{% endfor %}|"
        "{% for x in custom.empty %}x{% else %}empty{% endfor %}|"
        "{{ custom.xs|join('-') }}|{{ custom.xs|sum }}|{{ range(3)|list|length }}"
    )
    assert (
        render_text(templates, text, xs=[1, 2, 3], d={"a": 1}, empty=[])
        == "1/3,2/3,3/3|a:1|empty|1-2-3|6|3"
    )


def test_properties_win_over_dict_methods(templates: Templates) -> None:
    text = "{% for i in custom.items %}{{ i }}{% endfor %} {{ custom.keys }} "
    text += "{{ custom.d.keys()|list }}"
    assert render_text(templates, text, items=[1, 2], keys="k", d={"a": 1}) == "12 k ['a']"


def test_none_renders_as_empty_and_parts_may_be_absent(templates: Templates) -> None:
    out = templates.render(Source(html="<b>{{ custom.x }}</b>"), None, {"x": None})
    assert out == Rendered(subject="Hello", html="<b></b>", text=None)


def test_safe_str_methods_and_formatting_are_allowed(templates: Templates) -> None:
    text = (
        "{{ contact.name.upper() }} {{ '{:,}'.format(1234567) }} {{ '%05.1f'|format(3.14159) }} "
        "{{ 'a-b'.split('-')|join('+') }} {{ contact.name|center(9) }}|{{ 'x' ~ 1 ~ 'y' }}"
    )
    assert (
        templates.render(Source(text=text), {"name": "ann"}, {}).text
        == "ANN 1,234,567 003.1 a+b    ann   |x1y"
    )


def test_guarded_filters_still_consume_iterators_once(templates: Templates) -> None:
    text = (
        "{{ custom.xs|map('string')|join(',') }} {{ ','.join(custom.xs|map('string')) }} "
        "{{ custom.xs|slice(2)|list }} {{ custom.xs|batch(2)|list }} {{ 'a b'|replace(' ', '_') }}"
    )
    assert (
        render_text(templates, text, xs=[1, 2, 3]) == "1,2,3 1,2,3 [[1, 2], [3]] [[1, 2], [3]] a_b"
    )


def test_html_is_autoescaped_but_text_is_not(templates: Templates) -> None:
    evil = '<script>alert("x")</script>&'
    out = templates.render(
        Source(html="<p>{{ contact.name }}</p>", text="{{ contact.name }}"), {"name": evil}, {}
    )
    assert out.html == "<p>&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;&amp;</p>"
    assert out.text == evil


def test_concatenation_in_html_keeps_escaping(templates: Templates) -> None:
    out = templates.render(Source(html="{{ '<b>' ~ contact.name }}"), {"name": "<i>"}, {})
    assert out.html == "&lt;b&gt;&lt;i&gt;"


@pytest.mark.parametrize(
    "value",
    [
        "x\r\nBcc: evil@example.com",
        "x\nBcc: e@x",
        "x\rBcc: e@x",
        "x\u2028Bcc: e@x",
        "x\x85Bcc: e@x",
    ],
)
def test_subject_cannot_contain_line_breaks(templates: Templates, value: str) -> None:
    out = templates.render(Source(subject="Re: {{ contact.v }}", text="t"), {"v": value}, {})
    assert out.subject == "Re: x Bcc: " + value.split("Bcc: ")[1]
    assert not any(c in out.subject for c in "\r\n\x85\u2028")


def test_subject_is_not_html_escaped(templates: Templates) -> None:
    out = templates.render(Source(subject="{{ contact.v }}", text="t"), {"v": "A & <B>"}, {})
    assert out.subject == "A & <B>"


def test_header_safe_drops_controls() -> None:
    assert header_safe(" a\x00b\tc\r\n\r\nd\x0be ") == "ab\tc d e"


# --- missing properties -----------------------------------------------------------------------


def test_missing_properties_are_named(templates: Templates) -> None:
    source = Source(
        html="{{ contact.firstname }} {{ custom.order.id }} {{ custom.present }}",
        text="{{ custom.other }}",
    )
    with pytest.raises(MissingProperties) as caught:
        templates.render(source, {}, {"order": {}, "present": 1})
    err = caught.value
    assert err.names == ("contact.firstname", "custom.order.id")
    assert err.send_result == "MISSING_TEMPLATE_PROPERTIES"
    assert err.part == "html"
    assert "contact.firstname" in str(err)


def test_missing_property_inside_a_loop_is_named(templates: Templates) -> None:
    with pytest.raises(MissingProperties) as caught:
        render_text(templates, "{% for i in custom.items_ %}{{ i.sku }}{% endfor %}", items_=[{}])
    assert caught.value.names == ("custom.items_[].sku",)


def test_missing_top_level_variable_is_named(templates: Templates) -> None:
    with pytest.raises(MissingProperties) as caught:
        render_text(templates, "{{ firstname }}")
    assert caught.value.names == ("firstname",)


def test_guarded_properties_are_not_missing(templates: Templates) -> None:
    text = (
        "{% if contact.nick is defined %}{{ contact.nick }}{% else %}friend{% endif %} "
        "{{ custom.greeting|default('Hello') }} {{ custom.x|d('y') }}"
    )
    assert render_text(templates, text) == "friend Hello y"


def test_missing_properties_is_a_render_error_with_its_own_code() -> None:
    assert issubclass(MissingProperties, RenderError)
    assert RenderError.send_result == "TEMPLATE_RENDER_EXCEPTION"


# --- sandbox (CVE regression cases) ---------------------------------------------------------

SANDBOX_ESCAPES = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ ''.__class__ }}",
    "{{ ''|attr('__class__') }}",
    "{{ (''|attr('__class__')).__mro__ }}",
    "{{ ''.format.__globals__ }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ namespace.__init__.__globals__.os }}",
    "{{ self._TemplateReference__context }}",
    "{{ range.__self__ }}",
    "{{ custom.__class__.__base__.__subclasses__() }}",
    # str.format reaching attributes (CVE-2016-10745 family)
    "{{ '{0.__class__.__mro__}'.format('') }}",
    "{{ '{x.__class__}'.format_map({'x': 1}) }}",
    # CVE-2024-56326: an indirect reference to str.format, called later
    "{% set f = '{0.__class__.__init__.__globals__}'.format %}{{ f(1) }}",
    "{% set f = '{x.__init__.__globals__}'.format_map %}{{ f({'x': cycler}) }}",
    # CVE-2025-27516: |attr reaching str.format
    "{{ '{0.__class__.__init__.__globals__}'|attr('format')(1) }}",
    "{{ ('{0.__class__}'|attr('format'))(cycler) }}",
    # str.format handed a function to walk into (templates have no file names, so the
    # compiler half of CVE-2024-56201 does not apply)
    "{{ '{0.__globals__[__builtins__]}'.format(cycler.__init__) }}",
    # mutation of known mutable types (ImmutableSandboxedEnvironment)
    "{{ custom.xs.append(1) }}",
    "{{ custom.d.update({'a': 1}) }}",
    # methods outside the allow-list
    "{{ (1).to_bytes(100000000) }}",
    "{{ 'x'.expandtabs(100000000) }}",
    "{{ 'abc'.translate({97: 'zz'}) }}",
    "{{ '%*d'|format(100000000, 1) }}",
    "{{ '{:{w}}'.format(1, w=10) }}",
]


@pytest.mark.parametrize("payload", SANDBOX_ESCAPES)
@pytest.mark.parametrize("part", ["subject", "html", "text"])
def test_sandbox_escapes_raise_security_error(
    templates: Templates, payload: str, part: str
) -> None:
    source = Source(**{part: payload, **({} if part == "subject" else {"subject": "s"})})
    with pytest.raises(SecurityError) as caught:
        templates.render(source, {}, {"xs": [1], "d": {}})
    assert isinstance(caught.value, TemplateSecurityError)
    assert isinstance(caught.value, RenderError)
    assert caught.value.send_result == "TEMPLATE_RENDER_EXCEPTION"
    assert caught.value.part == part


@pytest.mark.parametrize(
    "source", ["{% include 'x.html' %}", "{% extends 'base' %}", "{% import 'm' as m %}"]
)
def test_loading_other_templates_is_refused(templates: Templates, source: str) -> None:
    assert validate("s", source, None)[0].message.endswith("is not supported")
    with pytest.raises(RenderError):
        templates.render(Source(html=source), {}, {})


# --- caps ---------------------------------------------------------------------------------------


def test_range_is_capped(templates: Templates) -> None:
    assert render_text(templates, "{{ range(10000)|list|length }}") == "10000"
    with pytest.raises(RenderLimitError, match="range"):
        render_text(templates, "{{ range(10001)|list|length }}")
    with pytest.raises(RenderLimitError):
        render_text(templates, "{% for i in range(0, 100000000, 2) %}{% endfor %}")


def test_output_size_is_capped_per_part() -> None:
    templates = Templates(Limits(max_part_bytes=10_000))
    text = "{% for i in range(custom.n) %}{{ custom.chunk }}{% endfor %}"
    assert len(render_text(templates, text, n=99, chunk="é" * 50)) == 99 * 50
    with pytest.raises(RenderLimitError) as caught:
        render_text(templates, text, n=101, chunk="é" * 50)  # 10,100 bytes of UTF-8
    assert caught.value.part == "text"


GROWTH_TRICKS = [
    "{{ 'x' * 2000000 }}",
    "{{ ['x'] * 2000000 }}",
    "{{ 'x'|center(2000000) }}",
    "{{ 'x'.ljust(2000000) }}",
    "{{ 'x'|indent(2000000) }}",
    "{{ ('a\n' * 100000)|indent('x' * 100) }}",
    "{{ '%2000000s' % 'x' }}",
    "{{ '%2000000s'|format('x') }}",
    "{{ '{:>2000000}'.format(1) }}",
    "{{ 2 ** 100000 }}",
    "{{ [1]|batch(2000000000, 'x')|list }}",
    "{{ [1]|slice(2000000000)|list }}",
    "{{ 'x'|tojson(indent=100000000) }}",
    "{% set a = range(10000)|join %}{{ a|replace('', a) }}",
    "{% set a = range(10000)|join %}{{ a.replace('', a) }}",
    "{% set a = range(10000)|join %}{{ range(1000)|join(a) }}",
    "{% set a = range(10000)|join %}{{ a.join(range(1000)|map('string')) }}",
    "{% set a = range(10000)|join %}{{ a|wordwrap(1, wrapstring=a) }}",
    # concatenation chains and accumulation across iterations
    "{% set a = range(10000)|join %}{{ a ~ a ~ a ~ a ~ a ~ a ~ a ~ a ~ a ~ a ~ a ~ a ~ a ~ a ~ a ~"
    " a ~ a ~ a ~ a ~ a ~ a ~ a ~ a ~ a ~ a ~ a ~ a ~ a ~ a ~ a ~ a ~ a ~ a }}",
    "{% set ns = namespace(s='xxxxxxxx') %}{% for i in range(100) %}"
    "{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "{% set ns = namespace(s='xxxxxxxx') %}{% for i in range(100) %}"
    "{% set ns.s = ns.s + ns.s %}{% endfor %}",
    # output captured in buffers (set blocks, filter blocks, macros) never reaches the stream
    "{% set ns = namespace(s='xxxxxxxx') %}{% for i in range(100) %}"
    "{% set ns.s %}{{ ns.s }}{{ ns.s }}{% endset %}{% endfor %}",
    "{% set a = range(10000)|join %}{% filter upper %}"
    "{% for i in range(1000) %}{{ a }}{% endfor %}{% endfilter %}",
    "{% set a = range(10000)|join %}{% macro m() %}{% for i in range(1000) %}{{ a }}"
    "{% endfor %}{% endmacro %}{% set x = m() %}",
]


@pytest.mark.parametrize("source", GROWTH_TRICKS)
def test_values_cannot_grow_past_the_size_cap(templates: Templates, source: str) -> None:
    started = time.monotonic()
    with pytest.raises(RenderError) as caught:
        render_text(templates, source)
    assert isinstance(caught.value, RenderLimitError | TemplateSecurityError)
    assert "time" not in str(caught.value)  # stopped by a size check, not by the clock
    assert time.monotonic() - started < 1.0


@pytest.mark.parametrize(
    "source",
    [
        "{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}",
        "{% set l = range(10000)|list %}{% for a in l %}{% for b in l %}{% endfor %}{% endfor %}",
        "{% macro f(n) %}{% for i in range(10000) %}{% endfor %}{{ f(n) if n else '' }}"
        "{% endmacro %}{% for i in range(10000) %}{{ f(0) }}{% endfor %}",
    ],
)
def test_render_time_is_capped(source: str) -> None:
    templates = Templates(Limits(render_seconds=0.05))
    started = time.monotonic()
    with pytest.raises(RenderLimitError, match="time"):
        render_text(templates, source)
    assert time.monotonic() - started < 1.0


def test_time_cap_uses_the_injected_clock() -> None:
    ticks = itertools.count()
    templates = Templates(Limits(render_seconds=100), clock=lambda: float(next(ticks)))
    assert render_text(templates, "{% for i in range(10) %}{{ i }}{% endfor %}") == "0123456789"
    with pytest.raises(RenderLimitError, match="time"):
        render_text(templates, "{% for i in range(200) %}{% endfor %}")


def test_errors_carry_the_template_line(templates: Templates) -> None:
    with pytest.raises(RenderError) as caught:
        render_text(templates, "line one\nline two\n{{ 1 // 0 }}")
    assert caught.value.line == 3
    assert "ZeroDivisionError" in str(caught.value)


# --- validate -------------------------------------------------------------------------------


def test_validate_accepts_good_templates() -> None:
    assert validate("Hi {{ contact.firstname }}", "<p>{{ custom.x }}</p>", None) == []


def test_validate_reports_part_and_line() -> None:
    errors = validate(
        "Hi {{ contact.firstname",
        "<p>\n\n{% for x in custom.xs %}\n{{ x }}",
        "ok\n{{ x|no_such_filter }}",
    )
    assert [(e.part, e.line) for e in errors] == [("subject", 1), ("html", 4), ("text", 2)]
    assert all(isinstance(e, TemplateError) and e.message for e in errors)
    assert "no_such_filter" in errors[2].message
    assert str(errors[2]).startswith("text, line 2: ")


def test_validate_does_not_render() -> None:
    # Only parsing: missing variables and runtime errors are not template errors.
    assert validate("{{ nope }}", "{{ 1 // 0 }}", "{{ range(10**9) }}") == []


@pytest.mark.parametrize("payload", SANDBOX_ESCAPES)
@pytest.mark.parametrize("part", ["subject", "html", "text"])
def test_validate_reports_every_sandbox_escape_before_any_send(payload: str, part: str) -> None:
    """What rendering refuses (the test above), the apply-time analysis already reports."""
    source = "ok\n" + payload
    errors = validate(
        source if part == "subject" else "s",
        source if part == "html" else None,
        source if part == "text" else None,
    )
    assert [(e.part, e.line) for e in errors] == [(part, 2)]
    assert "not allowed" in errors[0].message


@pytest.mark.parametrize(
    ("source", "named"),
    [
        ("{{ contact.__class__ }}", "'__class__'"),
        ("{{ ''.__class__.__mro__ }}", "'__class__'"),
        ("{{ custom.x.__globals__ }}", "'__globals__'"),
        ("{{ custom.order._secret }}", "'_secret'"),
        ("{{ (custom.xs|map('upper')).gi_frame }}", "'gi_frame'"),
        ("{{ dict.mro() }}", "'dict.mro'"),
        ("{{ self['_TemplateReference__context'] }}", "['_TemplateReference__context']"),
        ("{{ contact.name.encode() }}", "encode()"),
        ("{{ '%*s' % (5, 'x') }}", "'*' widths"),
    ],
)
def test_validate_names_what_the_sandbox_refuses(source: str, named: str) -> None:
    [error] = validate("s", None, source)
    assert named in error.message, error.message
    with pytest.raises(RenderError):  # and rendering refuses it too
        Templates().render(Source(text=source), {"name": "x"}, {"x": {}, "xs": ["a"]})


ALLOWED = [
    "{% for k, v in custom.d.items() %}{{ loop.index }}{{ loop.cycle('a', 'b') }}{% endfor %}",
    "{% for x in custom.xs %}{% if loop.changed(x) %}{{ x }}{% endif %}{% endfor %}",
    "{{ contact.name.upper() }} {{ contact.name.split(' ')|join('-') }}",
    "{{ '%5d'|format(3) }} {{ '%s' % contact.name }} {{ '{0}-{x}'.format(1, x=2) }}",
    "{{ custom['_x'] }} {{ contact['_y'] }} {{ custom.items }}",
    "{{ dict(a=1).get('a') }} {{ custom.d.keys()|list }} {{ custom.xs.index('a') }}",
    "{% set ns = namespace(n=0) %}{% set ns.n = 1 %}{{ ns.n }}",
    "{% set c = cycler('a', 'b') %}{{ c.next() }}{{ c.current }}{% set j = joiner(',') %}{{ j() }}",
    "{{ (1.5).is_integer() }} {{ (7).bit_length() }} {{ self }}",
]


@pytest.mark.parametrize("source", ALLOWED)
def test_validate_accepts_what_renders(templates: Templates, source: str) -> None:
    """No false alarms: what the analysis accepts here renders without a security error."""
    assert validate("s", source, source) == []
    data = {"d": {"k": 1}, "xs": ["a", "a", "b"], "_x": 1, "items": "i"}
    templates.render(Source(html=source, text=source), {"name": "a b", "_y": 2}, data)


@pytest.mark.parametrize(
    "subject",
    [
        "{{ " + "(" * 3000 + "1" + ")" * 3000 + " }}",
        "{{ " + "[" * 3000 + "]" * 3000 + " }}",
        "{{ " + "-" * 3000 + "1 }}",
        "{{ " + "not " * 3000 + "1 }}",
        "{{ x" + ".a" * 3000 + " }}",
        "{% if 1 %}" * 3000 + "{% endif %}" * 3000,
        "{% for x in y %}" * 60 + "{% endfor %}" * 60,
    ],
)
def test_deep_nesting_is_a_clear_validation_error(subject: str) -> None:
    """3,000 parentheses in a subject: a template error, not a RecursionError in the operator."""
    [error] = validate(subject, None, None)
    assert error.part == "subject"
    assert "nest" in error.message, error.message
    with pytest.raises(RenderError, match="nest"):
        Templates().render(Source(subject=subject), {}, {})


def test_brackets_nested_too_deeply_name_their_line() -> None:
    deep = "{{ " + "(" * (MAX_NESTING + 1) + "1" + ")" * (MAX_NESTING + 1) + " }}"
    [error] = validate("s", "ok\n\n" + deep, None)
    assert (error.line, error.message) == (3, f"brackets nest more than {MAX_NESTING} levels deep")
    fine = "{{ " + "(" * MAX_NESTING + "1" + ")" * MAX_NESTING + " }}"
    assert validate(fine, None, None) == []


def test_validate_rejects_oversized_sources() -> None:
    errors = Templates(Limits(max_source_bytes=100)).validate("s", "x" * 101, None)
    assert [(e.part, e.message) for e in errors] == [("html", "template is too large")]


# --- cache --------------------------------------------------------------------------------------


def test_compiled_templates_are_cached_by_content_in_a_bounded_lru() -> None:
    templates = Templates(cache_size=2)
    for _ in range(3):
        render_text(templates, "a {{ custom.v }}", v=1)
    assert templates.cached() == 2  # subject + text
    render_text(templates, "b")
    render_text(templates, "c")
    assert templates.cached() == 2
    assert render_text(templates, "a {{ custom.v }}", v=2) == "a 2"
