"""What a relay reads: its RelayConfig and settings file, the shards, stats and tracking keys."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import yaml

from txmail_relay import contract as c

from ..api import DedicatedIPSpec
from ..api.dedicatedip import EgressMode, RelayLimits, RelayRetry
from .naming import (
    SETTINGS_KEY,
    SMARTHOST_PATH,
    SPOOL_PATH,
    TLS_PATH,
    TRACKING_PATH,
    Obj,
    RelayOwner,
    b64,
    owned_meta,
)
from .shaping import shaping_config
from .warmup import warmup_config


def relay_config(
    ip: str,
    spec: DedicatedIPSpec,
    *,
    dkim: c.DkimConfig | None = None,
    warmup_started: datetime | None = None,
    return_path_verified: bool = False,
) -> c.RelayConfig:
    """The RelayConfig; ``dkim`` the active signing keys (reconcile/dkim.py), none if omitted;
    ``warmup_started`` the warm-up start recorded in the status (builders/warmup.py);
    ``return_path_verified`` whether the return-path domain's MX verified (reconcile/dns.py
    ``return_path_verified``)."""
    smarthost = None
    if spec.delivery.mode is c.DeliveryMode.SMARTHOST and spec.delivery.smarthost is not None:
        sh = spec.delivery.smarthost
        smarthost = c.SmarthostConfig(
            host=sh.host,
            port=sh.port,
            tls=sh.tls,
            credentials_dir=SMARTHOST_PATH if sh.credentials_secret_ref else None,
        )
    return c.RelayConfig(
        dedicated_ip=ip,
        address=spec.address,
        hostname=spec.hostname,
        domains=list(spec.domains),
        delivery=c.DeliveryConfig(
            mode=spec.delivery.mode,
            smarthost=smarthost,
            bind_address=spec.address if spec.egress.mode is EgressMode.HOST_NETWORK else None,
        ),
        tracking=c.TrackingConfig(base_url=spec.tracking.base_url),
        feedback=c.FeedbackConfig(complaints_address=spec.feedback.complaints_address),
        # VERP return path on the IP's return-path domain; off without one (builders/dns_records
        # lists its MX, which sends the DSNs to the relay's inbound listener), and off until
        # that MX verifies (as DKIM signs with a key once its record verifies): before, the
        # DSNs would go nowhere and receivers may refuse a sender domain without an MX.
        # spec.dns.requireVerified false: at once (that DNS is not ours to check).
        return_path=c.ReturnPathConfig(
            domain=spec.dns.return_path_domain
            if return_path_verified or not spec.dns.require_verified
            else None
        ),
        dsn=c.DsnConfig(notify=spec.bounces.notify_sender),
        suppression=c.SuppressionConfig(
            complaints=spec.suppression.complaints, bounces=spec.suppression.bounces
        ),
        **({"dkim": dkim} if dkim is not None else {}),
        warmup=warmup_config(spec.warmup, warmup_started),
        shaping=shaping_config(spec.shaping),
    )


SETTINGS_HEADER = (
    "# txmail-relay --config: static settings. The RelayConfig, credentials and\n"
    "# templates are watched live from the objects named under kubernetes.\n"
)


def relay_settings_model(
    owner: RelayOwner,
    *,
    tracking_keys: bool = False,
    limits: RelayLimits | None = None,
    inbound: bool = False,
    retry: RelayRetry | None = None,
) -> c.RelaySettings:
    """The relay's static settings: where it listens and reads its configuration from.

    Filled in the relay's own model, so a file the relay would refuse cannot be built. With
    ``tracking_keys``, the tracking Secret is mounted and the relay signs and verifies with
    the keys in it (re-read when the kubelet updates the mounted file). ``limits`` (the
    DedicatedIP's ``spec.relay.limits``) sets the connection caps that are set there, ``retry``
    (``spec.relay.retry``) the retry schedule's fields that are set there. With
    ``inbound`` (``api.dedicatedip.uses_inbound``) the inbound listener runs.
    """
    caps = limits.model_dump(exclude_none=True) if limits is not None else {}
    schedule = {
        name: float(value)
        for name, value in (
            ("min_backoff", retry.min_backoff_seconds if retry else None),
            ("max_backoff", retry.max_backoff_seconds if retry else None),
            ("max_lifetime", retry.max_lifetime_seconds if retry else None),
        )
        if value is not None
    }
    return c.RelaySettings(
        **({"limits": c.LimitSettings(**caps)} if caps else {}),
        **({"retry": c.RetrySettings(**schedule)} if schedule else {}),
        kubernetes=c.KubernetesSettings(namespace=owner.namespace, dedicated_ip=owner.name),
        # The container ports relay_deployment declares, by the same constants.
        listen=c.ListenSettings(
            submission=c.SUBMISSION_PORT,
            submissions=c.SUBMISSIONS_PORT,
            tracking=c.TRACKING_PORT,
            api=c.API_PORT,
            metrics=c.METRICS_PORT,
            # Only for what it takes (DSNs to the return path, ARF to the complaints address):
            # a HostNetwork relay would otherwise hold the node's port for nothing. Switching
            # it changes the pod's ports too, so the relay restarts and reads it (read once).
            **({"inbound": c.INBOUND_PORT} if inbound else {}),
        ),
        tls=c.TLSSettings(cert_file=Path(TLS_PATH, "tls.crt"), key_file=Path(TLS_PATH, "tls.key")),
        spool=c.SpoolSettings(directory=Path(SPOOL_PATH)),
        logging=c.LogSettings(json_format=True),
        **(
            {"tracking_keys_file": Path(TRACKING_PATH, c.TRACKING_KEYS_KEY)}
            if tracking_keys
            else {}
        ),
    )


def relay_settings(
    owner: RelayOwner,
    *,
    tracking_keys: bool = False,
    limits: RelayLimits | None = None,
    inbound: bool = False,
    retry: RelayRetry | None = None,
) -> str:
    """:func:`relay_settings_model` as the file the relay pod mounts (YAML, what was set)."""
    model = relay_settings_model(
        owner, tracking_keys=tracking_keys, limits=limits, inbound=inbound, retry=retry
    )
    return SETTINGS_HEADER + yaml.safe_dump(model.to_document(), sort_keys=False)


def relay_config_map(
    owner: RelayOwner,
    config: c.RelayConfig,
    *,
    tracking_keys: bool = False,
    limits: RelayLimits | None = None,
    inbound: bool = False,
    retry: RelayRetry | None = None,
) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": owned_meta(owner, c.relay_name(owner.name), "config"),
        "data": {
            c.RELAY_CONFIG_KEY: config.to_json(),
            SETTINGS_KEY: relay_settings(
                owner, tracking_keys=tracking_keys, limits=limits, inbound=inbound, retry=retry
            ),
        },
    }


def tracking_keys_line(kid: int, key: bytes) -> str:
    """One line of the tracking keys file (``kid:hexkey``, see docs/relay.md)."""
    return f"{kid}:{key.hex()}\n"


def relay_tracking_secret(owner: RelayOwner, key: bytes, kid: int = 1) -> Obj:
    """The tracking keys Secret with its first key (``key`` is drawn by the caller)."""
    text = (
        "# kid:hexkey, one key per line: the last line signs, every line verifies.\n"
        "# Rotate by adding a line with a higher kid; keep old lines while their mail is read.\n"
        + tracking_keys_line(kid, key)
    )
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": owned_meta(owner, c.tracking_secret_name(owner.name), "tracking"),
        "data": {c.TRACKING_KEYS_KEY: b64(text.encode())},
    }


def credential_shard(owner: RelayOwner, shard: int) -> Obj:
    """A credentials shard as the operator applies it: metadata only, entries are patched in."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": owned_meta(owner, c.credentials_secret_name(owner.name, shard), "credentials"),
    }


def template_shard(owner: RelayOwner, shard: int) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": owned_meta(owner, c.templates_config_map_name(owner.name, shard), "templates"),
    }


def shard_patch(key: str, value: str | None, *, secret: bool) -> Obj:
    """A merge patch that sets (or, with None, removes) one entry of a shard."""
    if value is None:
        return {"data": {key: None}}
    return {"data": {key: b64(value.encode()) if secret else value}}


def stats_config_map(owner: RelayOwner) -> Obj:
    """Where the relay reports per-token stats (it patches only ``stats.json``)."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": owned_meta(owner, c.stats_config_map_name(owner.name), "stats"),
    }
