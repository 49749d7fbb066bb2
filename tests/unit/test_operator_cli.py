"""`txmail-operator` as a user runs it: --help, --version, and bad settings (one line, exit 2)."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

BIN = Path(sys.executable).with_name("txmail-operator")


def run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TXMAIL_")}
    # No cluster anywhere: whatever the CLI does, it must not get as far as connecting.
    clean.update({"KUBECONFIG": os.devnull, "KUBERNETES_SERVICE_HOST": "", **env})
    return subprocess.run(
        [str(BIN), *args], env=clean, capture_output=True, text=True, timeout=60, check=False
    )


def test_help_lists_every_setting_and_exits_0() -> None:
    out = run("--help")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: txmail-operator")
    for var in (
        "TXMAIL_NAMESPACE",
        "TXMAIL_WATCH_NAMESPACES",
        "TXMAIL_RELAY_IMAGE",
        "TXMAIL_LOG_FORMAT",
        "TXMAIL_DRIFT_CHECK_INTERVAL",
        "TXMAIL_HEALTH_PORT",
        "TXMAIL_METRICS_PORT",
    ):
        assert var in out.stdout
    assert f"ghcr.io/txmail/txmail:{version('txmail')}" in out.stdout
    assert out.stderr == ""


def test_version_prints_the_package_version() -> None:
    out = run("--version")
    assert (out.returncode, out.stdout, out.stderr) == (
        0,
        f"txmail-operator {version('txmail')}\n",
        "",
    )


def test_help_wins_over_bad_settings() -> None:
    assert run("--help", TXMAIL_LOG_FORMAT="xml").returncode == 0


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"TXMAIL_DRIFT_CHECK_INTERVAL": "abc"}, ["TXMAIL_DRIFT_CHECK_INTERVAL", "number"]),
        ({"TXMAIL_DRIFT_CHECK_INTERVAL": "0"}, ["TXMAIL_DRIFT_CHECK_INTERVAL", "greater than 0"]),
        ({"TXMAIL_LOG_FORMAT": "xml"}, ["TXMAIL_LOG_FORMAT", "'plain' or 'json'"]),
        ({"TXMAIL_STATS_INTERVAL": "inf"}, ["TXMAIL_STATS_INTERVAL", "finite"]),
        ({"TXMAIL_METRICS_PORT": "http"}, ["TXMAIL_METRICS_PORT", "integer"]),
        ({"TXMAIL_HEALTH_PORT": "70000"}, ["TXMAIL_HEALTH_PORT", "65535"]),
        (
            {"TXMAIL_HEALTH_PORT": "9000", "TXMAIL_METRICS_PORT": "9000"},
            ["TXMAIL_METRICS_PORT", "TXMAIL_HEALTH_PORT"],
        ),
        ({"TXMAIL_NAMESPACE": "Txmail_System"}, ["TXMAIL_NAMESPACE", "namespace name"]),
        ({"TXMAIL_WATCH_NAMESPACES": "shop,Bad!"}, ["TXMAIL_WATCH_NAMESPACES", "'Bad!'"]),
    ],
)
def test_a_bad_setting_is_one_line_naming_it_and_exit_2(
    env: dict[str, str], words: list[str]
) -> None:
    out = run(**env)
    assert out.returncode == 2, out.stderr
    assert out.stdout == ""
    lines = out.stderr.splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("txmail-operator: error: ")
    for word in words:
        assert word in lines[0]


def test_an_unknown_option_is_one_line_and_exit_2() -> None:
    out = run("--bogus")
    assert out.returncode == 2
    assert out.stderr.splitlines() == ["txmail-operator: error: unrecognized arguments: --bogus"]


def test_no_kubernetes_configuration_is_one_line_and_exit_2(tmp_path: Path) -> None:
    out = run(KUBECONFIG=str(tmp_path / "missing"), HOME=str(tmp_path))
    assert out.returncode == 2, out.stderr
    lines = out.stderr.splitlines()
    assert len(lines) == 1, out.stderr
    assert "no Kubernetes configuration" in lines[0]
