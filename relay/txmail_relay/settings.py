"""Process settings of one relay: the YAML file given to ``txmail-relay --config``.

Static settings (listen ports, spool, TLS files, limits, retry parameters) take effect at
start. The dynamic documents of :mod:`txmail_relay.contract` (the RelayConfig, credentials
and templates) come either from this same file (inline or as paths to JSON files, reloaded
when they change) or, when ``kubernetes`` is set, from the objects the operator writes.

The model (:class:`~txmail_relay.contract.RelaySettings`, here ``Settings``) is defined in
the contract, because the operator fills the same model to write a relay's settings file;
this module reads and checks a file. A file that cannot be used raises
:class:`SettingsError`: one line naming the file and the problem, never the file's content
(a credential entry's digest stays out of logs).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

# The model is the contract's (the operator writes the same document); this module loads it.
from txmail_relay.contract import (
    MIB,
    KubernetesSettings,
    LimitSettings,
    ListenSettings,
    LogSettings,
    OutboundSettings,
    RetrySettings,
    SpoolSettings,
    TLSSettings,
    WebhookSettings,
)
from txmail_relay.contract import RelaySettings as Settings

__all__ = [
    "MIB",
    "KubernetesSettings",
    "LimitSettings",
    "ListenSettings",
    "LogSettings",
    "OutboundSettings",
    "RetrySettings",
    "Settings",
    "SettingsError",
    "SpoolSettings",
    "TLSSettings",
    "WebhookSettings",
    "describe_json",
    "describe_os",
    "describe_validation",
    "describe_yaml",
    "load_settings",
    "read_text",
]


def _resolve_paths(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    """Make the file paths of a settings document relative to the file that names them."""

    def rel(value: Any) -> Any:
        return str(base / value) if isinstance(value, str) else value

    for key in (
        "relayFile",
        "relay_file",
        "statsFile",
        "stats_file",
        "trackingKeysFile",
        "tracking_keys_file",
    ):
        if key in raw:
            raw[key] = rel(raw[key])
    for key in ("credentialFiles", "credential_files", "templateFiles", "template_files"):
        if isinstance(raw.get(key), list):
            raw[key] = [rel(v) for v in raw[key]]
    for section, keys in (
        ("tls", ("certFile", "keyFile", "cert_file", "key_file")),
        ("spool", ("directory",)),
        ("outbound", ("caFile", "ca_file")),
        ("kubernetes", ("kubeconfig",)),
    ):
        sub = raw.get(section)
        if isinstance(sub, dict):
            for key in keys:
                if key in sub:
                    sub[key] = rel(sub[key])
    return raw


class SettingsError(ValueError):
    """A settings or configuration file that cannot be used: ``<file>: <problem>``."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


_MAX_ERRORS = 3


def describe_validation(exc: ValidationError) -> str:
    """A pydantic error as one line: ``where: what`` per problem, never the input values."""
    parts = []
    errors = exc.errors(include_url=False, include_input=False, include_context=False)
    for error in errors[:_MAX_ERRORS]:
        where = ".".join(str(part) for part in error["loc"])
        what = str(error["msg"]).removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            what = "unknown key"
        elif error["type"] == "missing":
            what = "required key missing"
        parts.append(f"{where}: {what}" if where else what)
    if len(errors) > _MAX_ERRORS:
        parts.append(f"and {len(errors) - _MAX_ERRORS} more")
    return "; ".join(parts)


def describe_yaml(exc: yaml.YAMLError) -> str:
    """A YAML error as ``line N: problem``, without the snippet of the file PyYAML quotes."""
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "not valid YAML"
        return f"line {mark.line + 1}: {problem}" if mark is not None else problem
    return str(exc).splitlines()[0] if str(exc) else "not valid YAML"


def describe_json(exc: json.JSONDecodeError) -> str:
    return f"line {exc.lineno}: {exc.msg}"


def describe_os(exc: OSError) -> str:
    return f"cannot read: {exc.strerror or exc}"


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SettingsError(path, "not UTF-8 text") from None
    except OSError as exc:
        raise SettingsError(path, describe_os(exc)) from None


def load_settings(path: Path) -> Settings:
    """Parse a settings file; relative paths in it are relative to its folder.

    Raises :class:`SettingsError` for a file that is missing, not YAML or not valid settings.
    """
    text = read_text(path)
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise SettingsError(path, describe_yaml(exc)) from None
    if not isinstance(raw, dict):
        raise SettingsError(path, "expected a mapping of settings at the top level")
    try:
        return Settings.model_validate(_resolve_paths(raw, path.parent.resolve()))
    except ValidationError as exc:
        raise SettingsError(path, describe_validation(exc)) from None
