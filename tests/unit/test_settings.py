"""Operator settings come from TXMAIL_* variables, read once, with safe defaults."""

from __future__ import annotations

from importlib.metadata import version

import pytest

from txmail_operator.settings import LogFormat, Settings, SettingsError


def test_defaults() -> None:
    settings = Settings.from_env({})
    assert settings.namespace == "txmail-system"
    assert settings.watch_namespaces == ()
    assert settings.log_format is LogFormat.PLAIN
    assert settings.drift_check_interval == 120.0
    assert settings.relay_image == f"ghcr.io/txmail/txmail:{version('txmail')}"
    assert (settings.health_port, settings.metrics_port) == (8080, 9090)


def test_environment_overrides() -> None:
    settings = Settings.from_env(
        {
            "TXMAIL_NAMESPACE": "mail",
            "TXMAIL_WATCH_NAMESPACES": " shop, billing ,,",
            "TXMAIL_RELAY_IMAGE": "registry.example/relay:2",
            "TXMAIL_LOG_FORMAT": "json",
            "TXMAIL_DRIFT_CHECK_INTERVAL": "5",
            "TXMAIL_STATS_INTERVAL": "10",
            "TXMAIL_SEND_CHECK_INTERVAL": "2",
        }
    )
    assert settings.namespace == "mail"
    assert settings.watch_namespaces == ("shop", "billing")
    assert settings.relay_image == "registry.example/relay:2"
    assert settings.log_format is LogFormat.JSON
    assert (
        settings.drift_check_interval,
        settings.stats_interval,
        settings.send_check_interval,
    ) == (
        5.0,
        10.0,
        2.0,
    )


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("TXMAIL_LOG_FORMAT", "xml"),
        ("TXMAIL_DRIFT_CHECK_INTERVAL", "0"),
        ("TXMAIL_STATS_INTERVAL", "soon"),
    ],
)
def test_bad_values_are_refused_at_startup(var: str, value: str) -> None:
    with pytest.raises(SettingsError) as err:
        Settings.from_env({var: value})
    assert err.value.variable == var
    assert str(err.value).startswith(f"{var}={value!r}: ")
