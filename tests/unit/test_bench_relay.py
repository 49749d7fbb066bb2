"""The pure parts of bench/relay_vs_postfix.py: figures, parsers, the table, the arguments.

The benchmark itself (Postfix, the relay, wrk) runs with `make bench-relay`, never here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench import relay_vs_postfix as bench

STRACE_SUMMARY = """\
% time     seconds  usecs/call     calls    errors syscall
------ ----------- ----------- --------- --------- ----------------
 91.20    0.412345         412      1000           fdatasync
  8.80    0.039812         199       200         3 fsync
------ ----------- ----------- --------- --------- ----------------
100.00    0.452157         376      1200         3 total
"""


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert bench.percentile(values, 50) == 50
    assert bench.percentile(values, 99) == 99
    assert bench.percentile(values, 100) == 100
    assert bench.percentile([3.0], 99) == 3.0
    assert bench.percentile([], 50) is None


def test_median_ratio_and_pairs_skip_missing_figures() -> None:
    assert bench.median([3.0, None, 1.0, 2.0]) == 2.0
    assert bench.median([None]) is None
    assert bench.ratio(3.0, 2.0) == 1.5
    assert bench.ratio(3.0, 0.0) is None
    assert bench.ratio(None, 2.0) is None
    assert bench.pair_ratios([2.0, None, 9.0], [1.0, 4.0, 3.0]) == [2.0, 3.0]


def test_strace_summary_calls() -> None:
    assert bench.parse_strace_summary(STRACE_SUMMARY) == {"fdatasync": 1000, "fsync": 200}
    assert bench.parse_strace_summary("") == {}


def _rates(relay: list[float], postfix: list[float]) -> dict[str, list[dict[str, float]]]:
    return {
        "relay": [{"accept_rate": v} for v in relay],
        "postfix": [{"accept_rate": v} for v in postfix],
    }


def test_rows_take_medians_ratios_and_goals() -> None:
    rows = bench.rows({"rates": _rates([900.0, 1000.0, 1100.0], [400.0, 500.0, 600.0])})
    accept = next(r for r in rows if r.label.startswith("accept"))
    assert (accept.relay, accept.postfix) == (1000.0, 500.0)
    assert accept.ratios == pytest.approx([2.25, 2.0, 1100 / 600])
    assert accept.met is True  # 2.0x is the goal, met exactly
    slower = bench.rows({"rates": _rates([500.0], [1000.0])})
    assert next(r for r in slower if r.label.startswith("accept")).met is False


def test_table_prints_each_row_with_its_ratio() -> None:
    text = bench.table(
        [bench.Row("accept, msg/s", 1000.0, 500.0, goal=">= 2.0x", met=True, ratios=[2.0])],
        "title",
    )
    lines = text.splitlines()
    assert lines[0] == "title"
    assert "relay" in lines[1] and "postfix" in lines[1]
    assert lines[2].split() == [
        "accept,",
        "msg/s",
        "1,000",
        "500",
        "2.00x",
        "2.00",
        ">=",
        "2.0x",
        "yes",
    ]
    assert bench.table([bench.Row("x", None, 3.0)], "t").splitlines()[2].split() == [
        "x",
        "-",
        "3",
        "-",
    ]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--pairs", "0"], "argument --pairs: 0 is not at least 1"),
        (["--messages", "many"], "argument --messages: 'many' is not a whole number"),
        (["--click-seconds", "0"], "argument --click-seconds: 0 is not at least 1"),
        (["--skip", "nothing"], "argument --skip: invalid choice: 'nothing'"),
        (["--json", "/nonexistent/dir/x.json"], "--json /nonexistent/dir/x.json: /nonexistent/dir"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        bench.parse(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{bench.PROG}: ") and message in err
    assert err.count("\n") == 1


def test_quick_is_a_small_run() -> None:
    args = bench.parse(["--quick"])
    assert args.pairs == 1 and args.messages <= 500 and args.large_messages == 1
    assert bench.parse([]).pairs >= 3 and bench.parse([]).messages == 5000
