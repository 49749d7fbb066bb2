"""Process settings of one relay: the YAML file given to ``txmail-relay --config``.

Static settings (listen ports, spool, TLS files, limits, retry parameters) take effect at
start. The dynamic documents of :mod:`txmail_relay.contract` (the RelayConfig, credentials
and templates) come either from this same file (inline or as paths to JSON files, reloaded
when they change) or, when ``kubernetes`` is set, from the objects the operator writes.

A file that cannot be used raises :class:`SettingsError`: one line naming the file and the
problem, never the file's content (a credential entry's digest stays out of logs).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

from txmail_relay.contract import (
    API_PORT,
    METRICS_PORT,
    SUBMISSION_PORT,
    SUBMISSIONS_PORT,
    TRACKING_PORT,
    CredentialEntry,
    RelayConfig,
    TemplateEntry,
)

MIB = 1024 * 1024


class _Settings(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


class ListenSettings(_Settings):
    host: str = "0.0.0.0"  # noqa: S104 - the container listens on its pod address
    submission: int | None = Field(default=SUBMISSION_PORT, description="STARTTLS port")
    submissions: int | None = Field(default=SUBMISSIONS_PORT, description="Implicit TLS port")
    tracking: int | None = Field(
        default=TRACKING_PORT, description="Public: open pixels and click redirects only"
    )
    api: int | None = Field(
        default=API_PORT, description="The single-send API, send statuses, contacts (auth)"
    )
    metrics: int | None = Field(default=METRICS_PORT, description="/metrics, /healthz, /readyz")


class TLSSettings(_Settings):
    cert_file: Path = Path("/etc/txmail/tls/tls.crt")
    key_file: Path = Path("/etc/txmail/tls/tls.key")


class LimitSettings(_Settings):
    max_message_size: int = Field(default=10_240_000, description="SIZE; Postfix's default")
    max_recipients: int = Field(default=100, ge=100, description="RFC 5321 4.5.3.1.8")
    idle_timeout: float = 300.0
    max_auth_failures: int = Field(default=5, ge=3, description="Per connection (RFC 4954)")
    ip_auth_failures: int = Field(default=20, description="Per client IP within the window")
    ip_auth_window: float = 60.0
    data_timeout: float = Field(default=120.0, description="Spooling longer than this: 451")
    spool_min_free_bytes: int = Field(default=64 * MIB, description="452 below this")


class RetrySettings(_Settings):
    """RFC 5321 4.5.4.1 / Postfix defaults; tests shrink them to seconds."""

    min_backoff: float = 300.0
    max_backoff: float = 4000.0
    max_lifetime: float = 5 * 86400.0
    connect_timeout: float = 30.0
    command_timeout: float = 300.0
    final_dot_timeout: float = Field(default=600.0, description="RFC 5321 4.5.3.2.6")


class OutboundSettings(_Settings):
    concurrency: int = Field(default=32, ge=1, description="Messages delivered in parallel")
    pool_idle_timeout: float = 30.0
    messages_per_connection: int = 100
    ca_file: Path | None = Field(default=None, description="Extra CA to verify smarthosts")


class SpoolSettings(_Settings):
    directory: Path = Path("/var/spool/txmail")
    segment_bytes: int = 64 * MIB


class LogSettings(_Settings):
    json_format: bool = Field(default=False, alias="json")
    level: str = "INFO"

    @field_validator("level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        level = value.upper()
        if level not in logging.getLevelNamesMapping():
            raise ValueError(f"unknown log level {value!r} (DEBUG, INFO, WARNING, ERROR)")
        return level


class KubernetesSettings(_Settings):
    namespace: str
    dedicated_ip: str = Field(alias="dedicatedIP")
    kubeconfig: Path | None = None


class Settings(_Settings):
    relay: RelayConfig | None = None
    relay_file: Path | None = None
    credentials: list[CredentialEntry] = Field(default_factory=list)
    credential_files: list[Path] = Field(default_factory=list)
    templates: list[TemplateEntry] = Field(default_factory=list)
    template_files: list[Path] = Field(default_factory=list)
    kubernetes: KubernetesSettings | None = None

    listen: ListenSettings = Field(default_factory=ListenSettings)
    tls: TLSSettings = Field(default_factory=TLSSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    retry: RetrySettings = Field(default_factory=RetrySettings)
    outbound: OutboundSettings = Field(default_factory=OutboundSettings)
    spool: SpoolSettings = Field(default_factory=SpoolSettings)
    logging: LogSettings = Field(default_factory=LogSettings)
    shutdown_grace: float = 20.0
    config_poll_interval: float = 1.0
    stats_interval: float = Field(default=30.0, gt=0, description="Stats publishing period")
    stats_file: Path | None = Field(
        default=None, description="Write stats JSON here (standalone) instead of a ConfigMap"
    )
    tracking_keys_file: Path | None = Field(
        default=None,
        description="'kid:hexkey' lines (e.g. a mounted Secret); last signs; re-read on change",
    )
    complaints_address: str | None = Field(
        default=None,
        description="Recipient that takes ARF reports; RelayConfig feedback.complaintsAddress "
        "wins when set",
    )

    @model_validator(mode="after")
    def _one_source(self) -> Settings:
        inline = self.relay is not None or self.relay_file is not None
        if self.kubernetes is not None and inline:
            raise ValueError("set either kubernetes or relay/relayFile, not both")
        if self.kubernetes is None and not inline:
            raise ValueError("one of relay, relayFile or kubernetes is required")
        if self.relay is not None and self.relay_file is not None:
            raise ValueError("set either relay or relayFile, not both")
        return self


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
