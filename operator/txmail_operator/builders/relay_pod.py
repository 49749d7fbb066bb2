"""What runs a relay: its Deployment, Service, spool claim, TLS Secret, identity and rights."""

from __future__ import annotations

import hashlib
import json

from txmail_relay import contract as c

from ..api import DedicatedIPSpec
from ..api.dedicatedip import EgressMode, RelayPorts, uses_inbound
from .naming import (
    SETTINGS_KEY,
    SETTINGS_PATH,
    SMARTHOST_PATH,
    SPOOL_PATH,
    TLS_PATH,
    TRACKING_PATH,
    Obj,
    RelayOwner,
    b64,
    owned_meta,
    relay_labels,
    smtp_host,
    spool_claim_name,
)

RELAY_UID = 65532
INBOUND_PORT_NAME = "smtp-in"  # the inbound listener's container and Service port
RELAY_COMMAND = "txmail-relay"


def relay_service_account(owner: RelayOwner) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": owned_meta(owner, c.relay_name(owner.name), "relay"),
    }


def relay_role(owner: RelayOwner) -> Obj:
    """The relay may read its own configuration objects, by name, and nothing else."""
    ip = owner.name
    config_maps = [c.relay_name(ip)] + [
        c.templates_config_map_name(ip, k) for k in range(c.TEMPLATE_SHARDS)
    ]
    secrets = [c.credentials_secret_name(ip, k) for k in range(c.CREDENTIAL_SHARDS)]
    verbs = ["get", "list", "watch"]  # list/watch only with a metadata.name field selector
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": owned_meta(owner, c.relay_name(ip), "relay"),
        "rules": [
            {
                "apiGroups": [""],
                "resources": ["configmaps"],
                "resourceNames": config_maps,
                "verbs": verbs,
            },
            {"apiGroups": [""], "resources": ["secrets"], "resourceNames": secrets, "verbs": verbs},
            {
                "apiGroups": [""],
                "resources": ["configmaps"],
                "resourceNames": [c.stats_config_map_name(ip)],
                "verbs": ["get", "patch"],
            },
        ],
    }


def relay_role_binding(owner: RelayOwner) -> Obj:
    name = c.relay_name(owner.name)
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": owned_meta(owner, name, "relay"),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": owner.namespace}],
    }


def relay_spool_claim(owner: RelayOwner, spec: DedicatedIPSpec) -> Obj | None:
    pvc = spec.relay.spool.persistent_volume_claim if spec.relay.spool else None
    if pvc is None:
        return None
    claim: Obj = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": owned_meta(owner, spool_claim_name(owner.name), "spool"),
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": pvc.size}},
        },
    }
    if pvc.storage_class_name:
        claim["spec"]["storageClassName"] = pvc.storage_class_name
    return claim


def uses_host_network(spec: DedicatedIPSpec) -> bool:
    return spec.egress.mode is EgressMode.HOST_NETWORK


def pod_security(spec: DedicatedIPSpec) -> str:
    if uses_host_network(spec):
        return (
            "privileged: egress mode HostNetwork runs the relay on the node's network so that "
            "outbound connections leave from spec.address"
        )
    return "restricted"


def relay_deployment(
    owner: RelayOwner,
    spec: DedicatedIPSpec,
    image: str,
    tls_secret: str,
    tracking_secret: str | None = None,
    dkim_secret: str | None = None,
) -> Obj:
    """One relay pod per DedicatedIP: one replica, Recreate, Pod Security 'restricted'.

    ``tracking_secret`` (the tracking keys Secret, when there is one) is mounted as a folder,
    not with ``subPath``, so the kubelet updates the file in place after a rotation. So is
    ``dkim_secret`` (the DKIM key Secret), whole, so new key files appear in the pod. The
    kubelet syncs it and the relay's ConfigMap separately, so nothing guarantees the file of
    a key signing switched to is there first: the relay signs with the previous key until it
    is, and the operator keeps that key (file and record) a while (builders/dkim.MIN_RETIRE).
    """
    ip = owner.name
    name = c.relay_name(ip)
    labels = relay_labels(ip)
    spool = spec.relay.spool
    spool_volume: Obj
    if spool is not None and spool.persistent_volume_claim is not None:
        spool_volume = {
            "name": "spool",
            "persistentVolumeClaim": {"claimName": spool_claim_name(ip)},
        }
    else:
        size = spool.empty_dir.size_limit if spool and spool.empty_dir else "1Gi"
        spool_volume = {"name": "spool", "emptyDir": {"sizeLimit": size}}
    volumes: list[Obj] = [
        spool_volume,
        {"name": "tls", "secret": {"secretName": tls_secret, "defaultMode": 0o440}},
        {"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}},
        {
            "name": "settings",
            "configMap": {
                "name": name,
                "items": [{"key": SETTINGS_KEY, "path": SETTINGS_KEY}],
            },
        },
    ]
    mounts: list[Obj] = [
        {"name": "spool", "mountPath": SPOOL_PATH},
        {"name": "tls", "mountPath": TLS_PATH, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},  # noqa: S108 - a private emptyDir
        {"name": "settings", "mountPath": SETTINGS_PATH, "readOnly": True},
    ]
    smarthost = spec.delivery.smarthost
    if smarthost is not None and smarthost.credentials_secret_ref is not None:
        volumes.append(
            {
                "name": "smarthost",
                "secret": {
                    "secretName": smarthost.credentials_secret_ref.name,
                    "defaultMode": 0o440,
                },
            }
        )
        mounts.append({"name": "smarthost", "mountPath": SMARTHOST_PATH, "readOnly": True})
    if tracking_secret is not None:
        volumes.append(
            {
                "name": "tracking",
                "secret": {
                    "secretName": tracking_secret,
                    "defaultMode": 0o440,
                    "items": [{"key": c.TRACKING_KEYS_KEY, "path": c.TRACKING_KEYS_KEY}],
                },
            }
        )
        mounts.append({"name": "tracking", "mountPath": TRACKING_PATH, "readOnly": True})
    if dkim_secret is not None:
        volumes.append(
            {"name": "dkim", "secret": {"secretName": dkim_secret, "defaultMode": 0o440}}
        )
        mounts.append({"name": "dkim", "mountPath": c.DKIM_KEYS_PATH, "readOnly": True})
    ports = [
        {"name": "submission", "containerPort": c.SUBMISSION_PORT, "protocol": "TCP"},
        {"name": "submissions", "containerPort": c.SUBMISSIONS_PORT, "protocol": "TCP"},
        {"name": "tracking", "containerPort": c.TRACKING_PORT, "protocol": "TCP"},
        {"name": "api", "containerPort": c.API_PORT, "protocol": "TCP"},
        {"name": "metrics", "containerPort": c.METRICS_PORT, "protocol": "TCP"},
    ]
    if uses_inbound(spec):  # the listener runs only then (relay_settings_model)
        ports.append(
            {"name": INBOUND_PORT_NAME, "containerPort": c.INBOUND_PORT, "protocol": "TCP"}
        )
    container: Obj = {
        "name": "relay",
        "image": image,
        # One image holds both programs and names no entrypoint: say which one runs here.
        "command": [RELAY_COMMAND],
        "args": ["--config", f"{SETTINGS_PATH}/{SETTINGS_KEY}"],
        "ports": ports,
        "volumeMounts": mounts,
        "readinessProbe": {
            "httpGet": {"path": "/readyz", "port": "metrics"},
            "periodSeconds": 5,
        },
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": "metrics"},
            "periodSeconds": 10,
            "failureThreshold": 6,
        },
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "runAsUser": RELAY_UID,
            "runAsGroup": RELAY_UID,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    if spec.relay.resources is not None:
        container["resources"] = spec.relay.resources.wire()
    pod_spec: Obj = {
        "serviceAccountName": name,
        "automountServiceAccountToken": True,  # the relay watches its configuration by name
        "terminationGracePeriodSeconds": 60,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RELAY_UID,
            "runAsGroup": RELAY_UID,
            "fsGroup": RELAY_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
    }
    if uses_host_network(spec):
        pod_spec["hostNetwork"] = True
        pod_spec["dnsPolicy"] = "ClusterFirstWithHostNet"
    if spec.egress.node_selector:
        pod_spec["nodeSelector"] = dict(spec.egress.node_selector)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": owned_meta(owner, name, "relay"),
        "spec": {
            "replicas": 1,
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": {c.LABEL_NAME: c.RELAY_APP_NAME, c.LABEL_INSTANCE: ip}},
            "template": {
                "metadata": {
                    "labels": {**labels, c.LABEL_COMPONENT: "relay"},
                    **_restart_annotations(spec),
                },
                "spec": pod_spec,
            },
        },
    }


LIMITS_ANNOTATION = "txmail.dev/relay-limits"


RETRY_ANNOTATION = "txmail.dev/relay-retry"


def _restart_annotations(spec: DedicatedIPSpec) -> Obj:
    """Digests of ``spec.relay.limits`` and ``spec.relay.retry`` on the pod template, each
    when any of its fields is set: the relay reads its settings file at start only, so a
    change rolls the pod. Without them there is no annotation, so relays that set none are
    not restarted by this."""
    annotations = {}
    for name, part in (
        (LIMITS_ANNOTATION, spec.relay.limits),
        (RETRY_ANNOTATION, spec.relay.retry),
    ):
        wire = part.wire() if part is not None else {}
        if wire:
            digest = hashlib.sha256(json.dumps(wire, sort_keys=True).encode()).hexdigest()[:16]
            annotations[name] = digest
    return {"annotations": annotations} if annotations else {}


def relay_service(owner: RelayOwner, spec: DedicatedIPSpec) -> Obj:
    """Each Service port has the name of the container port it reaches: ``tracking`` is the
    public one (an Ingress targets it by name), ``api`` and ``metrics`` stay in the cluster;
    ``smtp-in`` (port 25) takes DSNs and ARF reports from the outside world, the return-path
    domain's MX (a LoadBalancer or a forward of the address's port 25 reaches it); it exists
    only with a return-path domain or a complaints address (``uses_inbound``)."""
    ports = spec.relay.ports or RelayPorts()
    named = [
        ("submission", ports.submission),
        ("submissions", ports.submissions),
        ("tracking", ports.tracking),
        ("api", ports.api),
        ("metrics", ports.metrics),
        *([(INBOUND_PORT_NAME, ports.inbound)] if uses_inbound(spec) else []),
    ]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": owned_meta(owner, c.relay_name(owner.name), "relay"),
        "spec": {
            "type": "ClusterIP",
            "selector": {c.LABEL_NAME: c.RELAY_APP_NAME, c.LABEL_INSTANCE: owner.name},
            "ports": [
                {"name": name, "port": port, "targetPort": name, "protocol": "TCP"}
                for name, port in named
            ],
        },
    }


def submission_port(spec: DedicatedIPSpec) -> int:
    return spec.relay.ports.submission if spec.relay.ports else c.SERVICE_SUBMISSION_PORT


def relay_api_url(ip: str, namespace: str, cluster_domain: str, spec: DedicatedIPSpec) -> str:
    """Where the operator reaches the relay's single-send API."""
    if spec.relay.api_url:
        return spec.relay.api_url
    port = spec.relay.ports.api if spec.relay.ports else c.SERVICE_API_PORT
    return f"http://{smtp_host(ip, namespace, cluster_domain)}:{port}"


def relay_tls_secret(owner: RelayOwner, ca_pem: bytes, cert_pem: bytes, key_pem: bytes) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "kubernetes.io/tls",
        "metadata": owned_meta(owner, c.tls_secret_name(owner.name), "tls"),
        "data": {
            "ca.crt": b64(ca_pem),
            "tls.crt": b64(cert_pem + ca_pem),
            "tls.key": b64(key_pem),
        },
    }
