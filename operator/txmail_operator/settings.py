"""Operator settings: read once from ``TXMAIL_*`` variables at startup, then passed down."""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from enum import StrEnum
from importlib.metadata import version

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

VERSION = version("txmail")
IMAGE_REPOSITORY = "ghcr.io/txmail/txmail"
DEFAULT_IMAGE = f"{IMAGE_REPOSITORY}:{VERSION}"  # one image runs the operator and the relays

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


class LogFormat(StrEnum):
    PLAIN = "plain"
    JSON = "json"


class SettingsError(ValueError):
    """A ``TXMAIL_*`` variable with a value the operator cannot use."""

    def __init__(self, variable: str, value: str | None, problem: str) -> None:
        self.variable, self.value, self.problem = variable, value, problem
        shown = variable if value is None else f"{variable}={value!r}"
        super().__init__(f"{shown}: {problem}")


def parse_nameservers(text: str) -> tuple[tuple[str, int], ...]:
    """``host[:port]`` items (comma or space separated; IPv6 as ``[::1]:53`` or bare) as
    (address, port); ValueError for anything else (a nameserver is asked by address)."""
    out: list[tuple[str, int]] = []
    for item in text.replace(",", " ").split():
        host, port = item, 53
        if item.startswith("["):
            host, _, rest = item[1:].partition("]")
            if rest:
                port = int(rest.removeprefix(":"))
        elif item.count(":") == 1:
            host, _, number = item.partition(":")
            port = int(number)
        host = str(ipaddress.ip_address(host))
        if not 0 < port < 65536:
            raise ValueError(f"port {port} of nameserver {item!r} is out of range")
        out.append((host, port))
    return tuple(out)


class Settings(BaseModel):
    model_config = ConfigDict(frozen=True)

    namespace: str = Field(
        default="txmail-system",
        description="The operator's own namespace: relays and their configuration live here.",
    )
    watch_namespaces: tuple[str, ...] = Field(
        default=(),
        description="Namespaces whose SmtpTokens and TransactionalEmails are served (comma "
        "list); empty means every namespace.",
    )
    relay_image: str = Field(
        default=DEFAULT_IMAGE, min_length=1, description="The image each relay Deployment runs."
    )
    log_format: LogFormat = Field(default=LogFormat.PLAIN, description="plain or json.")
    cluster_domain: str = Field(
        default="cluster.local", description="The cluster's DNS domain, for relay host names."
    )
    drift_check_interval: float = Field(
        default=120.0,
        gt=0,
        allow_inf_nan=False,
        description="Seconds between checks that each app Secret is still as written.",
    )
    stats_interval: float = Field(
        default=30.0,
        gt=0,
        allow_inf_nan=False,
        description="Seconds between copies of each relay's stats into SmtpToken status.",
    )
    send_check_interval: float = Field(
        default=5.0,
        gt=0,
        allow_inf_nan=False,
        description="Seconds between checks of TransactionalEmail spec.send (due, suspended).",
    )
    dns_nameservers: tuple[str, ...] = Field(
        default=(),
        description="Nameservers the DNS readiness check asks, host[:port] (comma list; IPv6 "
        "as [::1]:53); empty: the system's resolv.conf.",
    )
    dns_timeout: float = Field(
        default=5.0,
        gt=0,
        le=60,
        allow_inf_nan=False,
        description="Seconds one DNS lookup of the readiness check may take.",
    )
    health_port: int = Field(
        default=8080,
        ge=0,
        le=65535,
        description="Port of the liveness endpoint /healthz (0: none).",
    )
    metrics_port: int = Field(
        default=9090,
        ge=0,
        le=65535,
        description="Port of the Prometheus endpoint /metrics (0: none).",
    )

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, value: str) -> str:
        if not _DNS_LABEL.match(value):
            raise ValueError(f"{value!r} is not a namespace name (a DNS label)")
        return value

    @field_validator("watch_namespaces")
    @classmethod
    def _watch_namespaces(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for ns in value:
            if not _DNS_LABEL.match(ns):
                raise ValueError(f"{ns!r} is not a namespace name (a DNS label)")
        return value

    @field_validator("dns_nameservers")
    @classmethod
    def _dns_nameservers(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for item in value:
            try:
                parse_nameservers(item)
            except ValueError:
                raise ValueError(f"{item!r} is not a nameserver address[:port]") from None
        return value

    @field_validator("metrics_port")
    @classmethod
    def _distinct_ports(cls, value: int, info: ValidationInfo) -> int:
        if value and value == info.data.get("health_port"):
            raise ValueError(f"port {value} is TXMAIL_HEALTH_PORT's already")
        return value

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """The settings from ``TXMAIL_*`` variables; :class:`SettingsError` names a bad one."""
        env = os.environ if env is None else env
        values: dict[str, object] = {}
        for var, field in ENV.items():
            if not env.get(var):
                continue
            if field in ("watch_namespaces", "dns_nameservers"):
                values[field] = tuple(ns.strip() for ns in env[var].split(",") if ns.strip())
            else:
                values[field] = env[var]
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            error = exc.errors()[0]
            field = str(error["loc"][0]) if error["loc"] else ""
            var = next((v for v, f in ENV.items() if f == field), "TXMAIL_*")
            problem = str(error["msg"]).removeprefix("Value error, ")
            raise SettingsError(var, env.get(var), problem) from None


# Each setting's variable, in the order `txmail-operator --help` lists them.
ENV: dict[str, str] = {
    "TXMAIL_NAMESPACE": "namespace",
    "TXMAIL_WATCH_NAMESPACES": "watch_namespaces",
    "TXMAIL_RELAY_IMAGE": "relay_image",
    "TXMAIL_LOG_FORMAT": "log_format",
    "TXMAIL_CLUSTER_DOMAIN": "cluster_domain",
    "TXMAIL_DRIFT_CHECK_INTERVAL": "drift_check_interval",
    "TXMAIL_STATS_INTERVAL": "stats_interval",
    "TXMAIL_SEND_CHECK_INTERVAL": "send_check_interval",
    "TXMAIL_DNS_NAMESERVERS": "dns_nameservers",
    "TXMAIL_DNS_TIMEOUT": "dns_timeout",
    "TXMAIL_HEALTH_PORT": "health_port",
    "TXMAIL_METRICS_PORT": "metrics_port",
}
