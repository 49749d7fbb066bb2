"""Operator settings: read once from ``TXMAIL_*`` variables at startup, then passed down."""

from __future__ import annotations

import os
from collections.abc import Mapping
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field


class LogFormat(StrEnum):
    PLAIN = "plain"
    JSON = "json"


class Settings(BaseModel):
    model_config = ConfigDict(frozen=True)

    namespace: str = Field(
        default="txmail-system",
        description="The operator's own namespace: relays and their configuration live here.",
    )
    watch_namespaces: tuple[str, ...] = Field(
        default=(),
        description="Namespaces whose SmtpTokens and TransactionalEmails are served; empty "
        "means every namespace.",
    )
    relay_image: str = Field(default="ghcr.io/txmail/txmail-relay:0.1.0")
    log_format: LogFormat = LogFormat.PLAIN
    cluster_domain: str = "cluster.local"
    drift_check_interval: float = Field(
        default=120.0,
        gt=0,
        description="Seconds between checks that each app Secret is still as written.",
    )

    stats_interval: float = Field(
        default=30.0,
        gt=0,
        description="Seconds between copies of each relay's stats into SmtpToken status.",
    )

    send_check_interval: float = Field(
        default=5.0,
        gt=0,
        description="Seconds between checks of TransactionalEmail spec.send (due, suspended).",
    )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        values: dict[str, object] = {}
        simple = {
            "TXMAIL_NAMESPACE": "namespace",
            "TXMAIL_RELAY_IMAGE": "relay_image",
            "TXMAIL_LOG_FORMAT": "log_format",
            "TXMAIL_CLUSTER_DOMAIN": "cluster_domain",
            "TXMAIL_DRIFT_CHECK_INTERVAL": "drift_check_interval",
            "TXMAIL_STATS_INTERVAL": "stats_interval",
            "TXMAIL_SEND_CHECK_INTERVAL": "send_check_interval",
        }
        for var, field in simple.items():
            if env.get(var):
                values[field] = env[var]
        if env.get("TXMAIL_WATCH_NAMESPACES"):
            values["watch_namespaces"] = tuple(
                ns.strip() for ns in env["TXMAIL_WATCH_NAMESPACES"].split(",") if ns.strip()
            )
        return cls.model_validate(values)
