"""Fuzz target for the machine-engagement classifier (tracking/machine.py): total on any header
value, method, clock reading and click history, and conservative: a person's GET is only ever
a machine's for the documented reasons. Profiles: tests/fuzz/conftest.py.
"""

from __future__ import annotations

from hypothesis import example, given
from hypothesis import strategies as st

from txmail_relay.tracking.machine import (
    MPP_USER_AGENT,
    RULES,
    Hit,
    HitKind,
    Policy,
    classify,
    scanner,
)

# What aiohttp hands over as a header value: text decoded from any octets (latin-1 covers
# every byte), or arbitrary text, or nothing.
agents = st.one_of(
    st.none(),
    st.binary(max_size=300).map(lambda b: b.decode("latin-1")),
    st.text(max_size=300),
    st.sampled_from(["BingPreview/1.0b", MPP_USER_AGENT, "", " ", "\x00", "Mozilla/5.0 "]),
)
methods = st.one_of(st.sampled_from(["GET", "HEAD", "head", "POST", ""]), st.text(max_size=10))
times = st.floats(allow_nan=True, allow_infinity=True)
links = st.integers(min_value=-(2**16), max_value=2**16)
histories = st.lists(st.tuples(times, links), max_size=20)
policies = st.builds(
    Policy,
    click_window=st.floats(min_value=0, max_value=1e6, allow_nan=False),
    burst_window=st.floats(min_value=0, max_value=1e6, allow_nan=False),
    burst_links=st.integers(min_value=0, max_value=10),
)


@given(
    st.sampled_from(HitKind),
    methods,
    agents,
    times,
    st.one_of(st.none(), times),
    links,
    histories,
    policies,
)
@example(
    HitKind.CLICK, "GET", "\udcff", float("nan"), float("inf"), -1, [(float("nan"), 0)], Policy()
)
def test_classify_never_raises_and_always_gives_a_reason(
    kind: HitKind,
    method: str,
    agent: str | None,
    at: float,
    delivered: float | None,
    link: int,
    nearby: list[tuple[float, int]],
    policy: Policy,
) -> None:
    verdict = classify(Hit(kind, method, agent, at, delivered, link, nearby), policy)
    assert isinstance(verdict.machine, bool)
    assert (verdict.reason is not None) == verdict.machine
    assert (verdict.rule in RULES) == verdict.machine
    if method.upper() == "HEAD":
        assert verdict.machine


@given(agents, times, st.one_of(st.none(), times))
def test_an_open_is_a_machines_only_for_a_scanner_or_mpp(
    agent: str | None, at: float, delivered: float | None
) -> None:
    verdict = classify(Hit(HitKind.OPEN, "GET", agent, at, delivered))
    stripped = (agent or "").strip()
    expected = bool(stripped) and (scanner(stripped) is not None or stripped == MPP_USER_AGENT)
    assert verdict.machine == expected


@given(st.text(min_size=1, max_size=200), times, links, histories)
def test_a_burst_needs_as_many_distinct_links_as_the_policy_says(
    agent: str, at: float, link: int, nearby: list[tuple[float, int]]
) -> None:
    policy = Policy(click_window=0, burst_window=1.0, burst_links=3)
    verdict = classify(Hit(HitKind.CLICK, "GET", agent, at, None, link, nearby), policy)
    if verdict.reason == "several links clicked at once":
        assert len({link, *(other for _, other in nearby)}) >= 3
