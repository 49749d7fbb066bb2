"""DedicatedIP deliverability in a real API server: tracking keys, feedback, suppression."""

from __future__ import annotations

import base64
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from k8s.kit import GROUP, VERSION, Kit
from k8s.operator_process import OperatorProcess, wait_for
from txmail_relay import contract as c

pytestmark = pytest.mark.k8s
IPS = "dedicatedips"
KEYS_PATH = "/etc/txmail/tracking"


def _keys(kit: Kit, ip: str) -> str | None:
    data = kit.secret(kit.operator_namespace, c.tracking_secret_name(ip)) or {}
    return data.get(c.TRACKING_KEYS_KEY)


def _key_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def _pod(kit: Kit, ip: str) -> Any:
    apps = client.AppsV1Api(kit.api)
    try:
        deployment = apps.read_namespaced_deployment(c.relay_name(ip), kit.operator_namespace)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise
    return deployment.spec.template.spec


def _tracking_mounted(kit: Kit, ip: str) -> bool:
    pod = _pod(kit, ip)
    if pod is None:
        return False
    volumes = {v.name: v for v in pod.volumes or []}
    mounts = {m.name: m for m in pod.containers[0].volume_mounts or []}
    volume, mount = volumes.get("tracking"), mounts.get("tracking")
    return bool(
        volume is not None
        and volume.secret.secret_name == c.tracking_secret_name(ip)
        and mount is not None
        and mount.mount_path == KEYS_PATH
        and not mount.sub_path  # a subPath mount would never see a rotation
    )


def _relay_data(kit: Kit, ip: str) -> dict[str, str]:
    """The data of the relay's ConfigMap (the operator always writes some)."""
    cm = kit.core.read_namespaced_config_map(c.relay_name(ip), kit.operator_namespace)
    assert cm.data is not None, f"ConfigMap {c.relay_name(ip)} without data"
    return cm.data


def _settings(kit: Kit, ip: str) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(_relay_data(kit, ip)["settings.yaml"])
    return doc


def _relay_config(kit: Kit, ip: str) -> c.RelayConfig:
    return c.RelayConfig.model_validate_json(_relay_data(kit, ip)[c.RELAY_CONFIG_KEY])


def test_tracking_keys_secret_is_created_once_mounted_and_kept(
    kit: Kit, operator: OperatorProcess
) -> None:
    ip = kit.dedicated_ip()
    try:
        wait_for(lambda: _pod(kit, ip), 10, "the relay Deployment")
        assert _keys(kit, ip) is None and not _tracking_mounted(kit, ip)
        assert "trackingKeysFile" not in _settings(kit, ip)

        kit.objs.patch_cluster_custom_object(
            GROUP, VERSION, IPS, ip, {"spec": {"tracking": {"baseURL": "https://t.example.com"}}}
        )
        first = wait_for(lambda: _keys(kit, ip), 10, "the tracking keys Secret")
        [line] = _key_lines(first)
        kid, _, key = line.partition(":")
        assert kid == "1" and len(bytes.fromhex(key)) == 32
        raw = kit.raw_secret(kit.operator_namespace, c.tracking_secret_name(ip))
        assert [o.kind for o in raw.metadata.owner_references] == ["DedicatedIP"]
        wait_for(lambda: _tracking_mounted(kit, ip), 10, "the keys mounted in the relay")
        assert _settings(kit, ip)["trackingKeysFile"] == f"{KEYS_PATH}/{c.TRACKING_KEYS_KEY}"

        # A person rotates (docs/relay.md): the operator never rewrites the Secret, through
        # reconciles of the DedicatedIP and an operator restart.
        rotated = first + f"2:{'ab' * 32}\n"
        kit.core.patch_namespaced_secret(
            c.tracking_secret_name(ip),
            kit.operator_namespace,
            {"data": {c.TRACKING_KEYS_KEY: base64.b64encode(rotated.encode()).decode()}},
        )
        kit.objs.patch_cluster_custom_object(
            GROUP,
            VERSION,
            IPS,
            ip,
            {
                "spec": {
                    "hostname": "mta9.example.com",
                    "feedback": {"complaintsAddress": "fbl@example.com"},
                    "suppression": {"bounces": True},
                }
            },
        )

        def reconciled() -> c.RelayConfig | None:
            cfg = _relay_config(kit, ip)
            return cfg if cfg.hostname == "mta9.example.com" else None

        config = wait_for(reconciled, 10, "the reconciled relay configuration")
        assert config.feedback.complaints_address == "fbl@example.com"
        assert config.suppression.bounces and not config.suppression.complaints
        operator.restart()
        kit.objs.patch_cluster_custom_object(
            GROUP, VERSION, IPS, ip, {"spec": {"hostname": "mta8.example.com"}}
        )
        wait_for(
            lambda: _relay_config(kit, ip).hostname == "mta8.example.com",
            30,
            "a reconcile after the restart",
        )
        assert _keys(kit, ip) == rotated

        # Tracking off: the keys stay mounted so links in delivered mail keep working.
        kit.objs.patch_cluster_custom_object(
            GROUP, VERSION, IPS, ip, {"spec": {"tracking": {"baseURL": None}}}
        )
        wait_for(
            lambda: _relay_config(kit, ip).tracking.base_url is None, 10, "tracking turned off"
        )
        assert _tracking_mounted(kit, ip)
        assert _keys(kit, ip) == rotated
    finally:
        kit.objs.delete_cluster_custom_object(GROUP, VERSION, IPS, ip)
