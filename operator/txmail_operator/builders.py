"""Pure builders: every object the operator writes, from models and explicit arguments.

No API calls, no clock, no randomness: passwords, key material and times are arguments, so
the same inputs always give the same objects (pinned by golden files in tests/unit/golden).
"""

from __future__ import annotations

import base64
import hashlib
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import quote

from txmail_relay import contract as c

from .api import GROUP, VERSION, DedicatedIPSpec, SmtpTokenSpec, TransactionalEmailSpec
from .api.dedicatedip import DeliveryMode, EgressMode, RelayPorts

API_VERSION = f"{GROUP}/{VERSION}"
PASSWORD_GENERATION_ANNOTATION = f"{GROUP}/password-generation"
TOKEN_LABEL = f"{GROUP}/smtptoken"
DEDICATED_IP_LABEL = f"{GROUP}/dedicatedip"
SPOOL_PATH = "/var/spool/txmail"
TLS_PATH = "/etc/txmail/tls"
SMARTHOST_PATH = "/etc/txmail/smarthost"
TRACKING_PATH = "/etc/txmail/tracking"
RELAY_UID = 65532
RELAY_COMMAND = "txmail-relay"
SECRET_TYPE = f"{GROUP}/smtp-credentials"

Obj = dict[str, Any]


def owner_reference(kind: str, name: str, uid: str) -> Obj:
    return {
        "apiVersion": API_VERSION,
        "kind": kind,
        "name": name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def relay_labels(ip: str) -> dict[str, str]:
    return {
        c.LABEL_NAME: c.RELAY_APP_NAME,
        c.LABEL_INSTANCE: ip,
        c.LABEL_MANAGED_BY: c.MANAGED_BY,
        DEDICATED_IP_LABEL: ip,
    }


def _meta(name: str, namespace: str, ip: str, ip_uid: str, component: str) -> Obj:
    return {
        "name": name,
        "namespace": namespace,
        "labels": {**relay_labels(ip), c.LABEL_COMPONENT: component},
        "ownerReferences": [owner_reference("DedicatedIP", ip, ip_uid)],
    }


def smtp_host(ip: str, namespace: str, cluster_domain: str) -> str:
    """The relay Service's in-cluster DNS name, as written into app Secrets."""
    return f"{c.relay_name(ip)}.{namespace}.svc.{cluster_domain}"


def service_dns_names(ip: str, namespace: str, cluster_domain: str) -> list[str]:
    svc = c.relay_name(ip)
    return [
        svc,
        f"{svc}.{namespace}",
        f"{svc}.{namespace}.svc",
        smtp_host(ip, namespace, cluster_domain),
    ]


# --- DedicatedIP -> relay -----------------------------------------------------------------


def relay_config(ip: str, spec: DedicatedIPSpec) -> c.RelayConfig:
    smarthost = None
    if spec.delivery.mode is DeliveryMode.SMARTHOST and spec.delivery.smarthost is not None:
        sh = spec.delivery.smarthost
        smarthost = c.SmarthostConfig(
            host=sh.host,
            port=sh.port,
            tls=c.SmarthostTLS(sh.tls.value),
            credentials_dir=SMARTHOST_PATH if sh.credentials_secret_ref else None,
        )
    return c.RelayConfig(
        dedicated_ip=ip,
        address=spec.address,
        hostname=spec.hostname,
        domains=list(spec.domains),
        delivery=c.DeliveryConfig(
            mode=c.DeliveryMode(spec.delivery.mode.value),
            smarthost=smarthost,
            bind_address=spec.address if spec.egress.mode is EgressMode.HOST_NETWORK else None,
        ),
        tracking=c.TrackingConfig(base_url=spec.tracking.base_url),
        feedback=c.FeedbackConfig(complaints_address=spec.feedback.complaints_address),
        suppression=c.SuppressionConfig(
            complaints=spec.suppression.complaints, bounces=spec.suppression.bounces
        ),
    )


SETTINGS_KEY = "settings.yaml"
SETTINGS_PATH = "/etc/txmail/settings"


def relay_settings(ip: str, namespace: str, *, tracking_keys: bool = False) -> str:
    """The relay's static settings file: where it listens and reads its configuration from.

    With ``tracking_keys``, the tracking Secret is mounted and the relay signs and verifies
    with the keys in it (re-read when the kubelet updates the mounted file).
    """
    lines = [
        "# txmail-relay --config: static settings. The RelayConfig, credentials and",
        "# templates are watched live from the objects named below.",
        f"kubernetes: {{namespace: {namespace}, dedicatedIP: {ip}}}",
        # The container ports relay_deployment declares, by the same constants.
        f"listen: {{submission: {c.SUBMISSION_PORT}, submissions: {c.SUBMISSIONS_PORT}, "
        f"tracking: {c.TRACKING_PORT}, api: {c.API_PORT}, metrics: {c.METRICS_PORT}}}",
        f"tls: {{certFile: {TLS_PATH}/tls.crt, keyFile: {TLS_PATH}/tls.key}}",
        f"spool: {{directory: {SPOOL_PATH}}}",
        "logging: {json: true}",
    ]
    if tracking_keys:
        lines.append(f"trackingKeysFile: {TRACKING_PATH}/{c.TRACKING_KEYS_KEY}")
    return "\n".join([*lines, ""])


def relay_config_map(
    ip: str, ip_uid: str, namespace: str, config: c.RelayConfig, *, tracking_keys: bool = False
) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(c.relay_name(ip), namespace, ip, ip_uid, "config"),
        "data": {
            c.RELAY_CONFIG_KEY: config.to_json(),
            SETTINGS_KEY: relay_settings(ip, namespace, tracking_keys=tracking_keys),
        },
    }


def tracking_keys_line(kid: int, key: bytes) -> str:
    """One line of the tracking keys file (see ``txmail_relay.engagement.load_keys``)."""
    return f"{kid}:{key.hex()}\n"


def relay_tracking_secret(ip: str, ip_uid: str, namespace: str, key: bytes, kid: int = 1) -> Obj:
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
        "metadata": _meta(c.tracking_secret_name(ip), namespace, ip, ip_uid, "tracking"),
        "data": {c.TRACKING_KEYS_KEY: _b64(text.encode())},
    }


def credential_shard(ip: str, ip_uid: str, namespace: str, shard: int) -> Obj:
    """A credentials shard as the operator applies it: metadata only, entries are patched in."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": _meta(
            c.credentials_secret_name(ip, shard), namespace, ip, ip_uid, "credentials"
        ),
    }


def template_shard(ip: str, ip_uid: str, namespace: str, shard: int) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(
            c.templates_config_map_name(ip, shard), namespace, ip, ip_uid, "templates"
        ),
    }


def stats_config_map(ip: str, ip_uid: str, namespace: str) -> Obj:
    """Where the relay reports per-token stats (it patches only ``stats.json``)."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(c.stats_config_map_name(ip), namespace, ip, ip_uid, "stats"),
    }


def relay_service_account(ip: str, ip_uid: str, namespace: str) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _meta(c.relay_name(ip), namespace, ip, ip_uid, "relay"),
    }


def relay_role(ip: str, ip_uid: str, namespace: str) -> Obj:
    """The relay may read its own configuration objects, by name, and nothing else."""
    config_maps = [c.relay_name(ip)] + [
        c.templates_config_map_name(ip, k) for k in range(c.TEMPLATE_SHARDS)
    ]
    secrets = [c.credentials_secret_name(ip, k) for k in range(c.CREDENTIAL_SHARDS)]
    verbs = ["get", "list", "watch"]  # list/watch only with a metadata.name field selector
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": _meta(c.relay_name(ip), namespace, ip, ip_uid, "relay"),
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


def relay_role_binding(ip: str, ip_uid: str, namespace: str) -> Obj:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _meta(c.relay_name(ip), namespace, ip, ip_uid, "relay"),
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": c.relay_name(ip),
        },
        "subjects": [{"kind": "ServiceAccount", "name": c.relay_name(ip), "namespace": namespace}],
    }


def spool_claim_name(ip: str) -> str:
    return f"{c.relay_name(ip)}-spool"


def relay_spool_claim(ip: str, ip_uid: str, namespace: str, spec: DedicatedIPSpec) -> Obj | None:
    pvc = spec.relay.spool.persistent_volume_claim if spec.relay.spool else None
    if pvc is None:
        return None
    claim: Obj = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _meta(spool_claim_name(ip), namespace, ip, ip_uid, "spool"),
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
    ip: str,
    ip_uid: str,
    namespace: str,
    spec: DedicatedIPSpec,
    image: str,
    tls_secret: str,
    tracking_secret: str | None = None,
) -> Obj:
    """One relay pod per DedicatedIP: one replica, Recreate, Pod Security 'restricted'.

    ``tracking_secret`` (the tracking keys Secret, when there is one) is mounted as a folder,
    not with ``subPath``, so the kubelet updates the file in place after a rotation.
    """
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
                "name": c.relay_name(ip),
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
    ports = [
        {"name": "submission", "containerPort": c.SUBMISSION_PORT, "protocol": "TCP"},
        {"name": "submissions", "containerPort": c.SUBMISSIONS_PORT, "protocol": "TCP"},
        {"name": "tracking", "containerPort": c.TRACKING_PORT, "protocol": "TCP"},
        {"name": "api", "containerPort": c.API_PORT, "protocol": "TCP"},
        {"name": "metrics", "containerPort": c.METRICS_PORT, "protocol": "TCP"},
    ]
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
        "metadata": _meta(name, namespace, ip, ip_uid, "relay"),
        "spec": {
            "replicas": 1,
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": {c.LABEL_NAME: c.RELAY_APP_NAME, c.LABEL_INSTANCE: ip}},
            "template": {
                "metadata": {"labels": {**labels, c.LABEL_COMPONENT: "relay"}},
                "spec": pod_spec,
            },
        },
    }


def relay_service(ip: str, ip_uid: str, namespace: str, spec: DedicatedIPSpec) -> Obj:
    """Each Service port has the name of the container port it reaches: ``tracking`` is the
    public one (an Ingress targets it by name), ``api`` and ``metrics`` stay in the cluster."""
    ports = spec.relay.ports or RelayPorts()
    named = [
        ("submission", ports.submission),
        ("submissions", ports.submissions),
        ("tracking", ports.tracking),
        ("api", ports.api),
        ("metrics", ports.metrics),
    ]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(c.relay_name(ip), namespace, ip, ip_uid, "relay"),
        "spec": {
            "type": "ClusterIP",
            "selector": {c.LABEL_NAME: c.RELAY_APP_NAME, c.LABEL_INSTANCE: ip},
            "ports": [
                {"name": name, "port": port, "targetPort": name, "protocol": "TCP"}
                for name, port in named
            ],
        },
    }


def submission_port(spec: DedicatedIPSpec) -> int:
    return spec.relay.ports.submission if spec.relay.ports else c.SERVICE_SUBMISSION_PORT


def relay_tls_secret(
    ip: str, ip_uid: str, namespace: str, ca_pem: bytes, cert_pem: bytes, key_pem: bytes
) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "kubernetes.io/tls",
        "metadata": _meta(c.tls_secret_name(ip), namespace, ip, ip_uid, "tls"),
        "data": {
            "ca.crt": _b64(ca_pem),
            "tls.crt": _b64(cert_pem + ca_pem),
            "tls.key": _b64(key_pem),
        },
    }


# --- SmtpToken -> app Secret + credential entry ------------------------------------------------


def username_for(token_uid: str) -> str:
    """Stable, unique in the cluster (object uids are), derived from no secret."""
    return "txm-" + token_uid.replace("-", "")


def stable_id(seed: str, attempt: int = 0) -> int:
    """A positive integer below 2**53 derived from a uid (probing with ``attempt`` on clash)."""
    digest = hashlib.sha256(f"{seed}/{attempt}".encode()).digest()
    return int.from_bytes(digest[:7], "big") % (2**53 - 1) + 1


def app_secret_name(token: str, spec: SmtpTokenSpec) -> str:
    return spec.secret_name or f"{token}-smtp"


def app_secret(
    token: str,
    token_uid: str,
    namespace: str,
    spec: SmtpTokenSpec,
    username: str,
    password: str,
    host: str,
    port: int,
    ca_pem: bytes | None,
) -> Obj:
    """The Secret an app reads (envFrom or a volume): everything it needs to send mail."""
    template = spec.secret_template
    labels = {
        **(template.labels if template and template.labels else {}),
        c.LABEL_MANAGED_BY: c.MANAGED_BY,
        TOKEN_LABEL: token,
    }
    annotations = {
        **(template.annotations if template and template.annotations else {}),
        PASSWORD_GENERATION_ANNOTATION: str(spec.password_generation),
    }
    url = f"smtp://{quote(username, safe='')}:{quote(password, safe='')}@{host}:{port}"
    string_data = {
        "host": host,
        "port": str(port),
        "username": username,
        "password": password,
        "tls": "starttls",
        "url": url,
    }
    if ca_pem is not None:
        string_data["ca.crt"] = ca_pem.decode()
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": SECRET_TYPE,
        "metadata": {
            "name": app_secret_name(token, spec),
            "namespace": namespace,
            "labels": labels,
            "annotations": annotations,
            "ownerReferences": [owner_reference("SmtpToken", token, token_uid)],
        },
        "data": {k: _b64(v.encode()) for k, v in string_data.items()},
    }


def credential_entry(
    token: str,
    namespace: str,
    spec: SmtpTokenSpec,
    ip_domains: list[str],
    username: str,
    digests: list[c.PasswordDigest],
    campaign_id: int,
) -> c.CredentialEntry:
    allowed = [d for d in (spec.allowed_from_domains or ip_domains) if d in ip_domains]
    return c.CredentialEntry(
        username=username,
        namespace=namespace,
        token=token,
        digests=digests,
        allowed_from_domains=allowed,
        create_contacts=spec.create_contacts,
        email_campaign_id=campaign_id,
        expires_at=spec.expires_at,
    )


def rotated_digests(
    previous: list[c.PasswordDigest], new: c.PasswordDigest, now: datetime, grace: timedelta
) -> list[c.PasswordDigest]:
    """The digests valid after a reset: the new one, plus the old ones during the grace period."""
    kept = [new]
    if grace > timedelta(0):
        for old in previous:
            if old.generation < new.generation and old.valid_at(now):
                end = old.not_after or now + grace
                kept.append(old.model_copy(update={"not_after": min(end, now + grace)}))
    return kept


def parse_duration(text: str) -> timedelta:
    """A Go-style duration (0s, 90s, 10m, 1h30m, 1.5h, 250ms), as the CRD pattern allows."""
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    total, number = 0.0, ""
    i = 0
    while i < len(text):
        ch = text[i]
        if ch.isdigit() or ch == ".":
            number += ch
            i += 1
            continue
        unit = "ms" if text.startswith("ms", i) else ch
        total += float(number) * units[unit]
        number = ""
        i += len(unit)
    if number and float(number) != 0:
        raise ValueError(f"duration {text!r} has a number without a unit")
    return timedelta(seconds=total)


# --- TransactionalEmail -> template entry ------------------------------------------------------


def template_entry(
    name: str, namespace: str, generation: int, spec: TransactionalEmailSpec, email_id: int
) -> c.TemplateEntry:
    return c.TemplateEntry(
        email_id=email_id,
        namespace=namespace,
        name=name,
        generation=generation,
        sender=c.Sender(name=spec.sender.name, address=spec.sender.address),
        reply_to=list(spec.reply_to or []),
        subject=spec.subject,
        html=spec.html,
        text=spec.text,
        subscription_type=spec.subscription_type.value,
        track_opens=spec.tracking.opens,
        track_clicks=spec.tracking.clicks,
    )


def shard_patch(key: str, value: str | None, *, secret: bool) -> Obj:
    """A merge patch that sets (or, with None, removes) one entry of a shard."""
    if value is None:
        return {"data": {key: None}}
    return {"data": {key: _b64(value.encode()) if secret else value}}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def scheduler_secret(ip: str, ip_uid: str, namespace: str, password: str) -> Obj:
    """The operator's own credential for a relay (TransactionalEmail spec.send)."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": _meta(c.scheduler_secret_name(ip), namespace, ip, ip_uid, "scheduler"),
        "data": {"password": _b64(password.encode())},
    }


def relay_api_url(ip: str, namespace: str, cluster_domain: str, spec: DedicatedIPSpec) -> str:
    if spec.relay.api_url:
        return spec.relay.api_url
    port = spec.relay.ports.api if spec.relay.ports else c.SERVICE_API_PORT
    return f"http://{smtp_host(ip, namespace, cluster_domain)}:{port}"


def send_id(email_uid: str, generation: int, address: str) -> str:
    """Idempotency key of one recipient of one send: the same after any operator restart."""
    return hashlib.sha256(f"{email_uid}/{generation}/{address.lower()}".encode()).hexdigest()[:40]
