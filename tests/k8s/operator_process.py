"""The operator as a real process (`txmail-operator`) against the test control plane.

It runs as the chart's own ServiceAccount: :func:`install_operator_identity` renders the chart's
ServiceAccount and RBAC with the real Helm, applies them, and writes a kubeconfig holding only
a TokenRequest token of that ServiceAccount. The admin credential never reaches the operator.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from chart.helm import NAMESPACE, RELEASE, objects
from cluster.kubeapi import custom_object
from peers import wait_for

__all__ = [
    "OperatorProcess",
    "install_operator_identity",
    "operator_service_account",
    "remove_operator_identity",
    "token_kubeconfig",
    "wait_for",
]

Obj = dict[str, Any]
FIELD_MANAGER = "txmail-tests"
# Long enough for a whole session; the API server caps nothing in the test control plane.
TOKEN_SECONDS = 12 * 3600


def token_kubeconfig(admin: Path, token: str, user: str, namespace: str, path: Path) -> Path:
    """A kubeconfig for the admin's cluster with only ``token`` as credential.

    ``namespace`` is the context's namespace, as a pod's own namespace is in the cluster.
    """
    admin_config = yaml.safe_load(admin.read_text())
    context = next(
        x["context"]
        for x in admin_config["contexts"]
        if x["name"] == admin_config["current-context"]
    )
    cluster = next(
        x["cluster"] for x in admin_config["clusters"] if x["name"] == context["cluster"]
    )
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "cluster", "cluster": cluster}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [
            {"name": user, "context": {"cluster": "cluster", "user": user, "namespace": namespace}}
        ],
        "current-context": user,
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path


def service_account_token(api: client.ApiClient, name: str, namespace: str) -> str:
    """A token of the ServiceAccount from the TokenRequest API (as the kubelet gets one)."""
    request = client.AuthenticationV1TokenRequest(
        spec=client.V1TokenRequestSpec(expiration_seconds=TOKEN_SECONDS)
    )
    core = client.CoreV1Api(api)
    status = core.create_namespaced_service_account_token(name, namespace, request).status
    assert status is not None and status.token, f"no token for ServiceAccount {namespace}/{name}"
    return status.token


def _apply(api: client.ApiClient, obj: Obj) -> None:
    """Server-side apply of one of the chart's objects with the admin client."""
    kind, meta = obj["kind"], obj["metadata"]
    core, rbac = client.CoreV1Api(api), client.RbacAuthorizationV1Api(api)
    opts: dict[str, Any] = {
        "field_manager": FIELD_MANAGER,
        "force": True,
        "_content_type": "application/apply-patch+yaml",
    }
    if kind == "ServiceAccount":
        core.patch_namespaced_service_account(meta["name"], meta["namespace"], obj, **opts)
    elif kind == "ClusterRole":
        rbac.patch_cluster_role(meta["name"], obj, **opts)
    elif kind == "ClusterRoleBinding":
        rbac.patch_cluster_role_binding(meta["name"], obj, **opts)
    elif kind == "Role":
        rbac.patch_namespaced_role(meta["name"], meta["namespace"], obj, **opts)
    elif kind == "RoleBinding":
        rbac.patch_namespaced_role_binding(meta["name"], meta["namespace"], obj, **opts)
    else:
        raise AssertionError(f"not an identity object of the chart: {kind}")


def operator_service_account(
    sets: Sequence[str] = (), release: str = RELEASE, namespace: str = NAMESPACE
) -> list[Obj]:
    """The chart's ServiceAccount and RBAC, rendered by `helm template --show-only`."""
    return objects(
        sets=sets,
        show_only=["templates/serviceaccount.yaml", "templates/rbac.yaml"],
        release=release,
        namespace=namespace,
    )


def install_operator_identity(
    api: client.ApiClient,
    admin: Path,
    path: Path,
    sets: Sequence[str] = (),
    release: str = RELEASE,
    namespace: str = NAMESPACE,
) -> Path:
    """Apply the chart's ServiceAccount and RBAC (by default: release txmail in txmail-system,
    the values the tests run with) and return a kubeconfig with a token of that ServiceAccount."""
    rendered = operator_service_account(sets, release, namespace)
    for obj in rendered:
        _apply(api, obj)
    (account,) = [o for o in rendered if o["kind"] == "ServiceAccount"]
    name = account["metadata"]["name"]
    assert account["metadata"]["namespace"] == namespace
    token = service_account_token(api, name, namespace)
    return token_kubeconfig(admin, token, name, namespace, path)


def remove_operator_identity(
    api: client.ApiClient,
    sets: Sequence[str] = (),
    release: str = RELEASE,
    namespace: str = NAMESPACE,
) -> None:
    """Delete what :func:`install_operator_identity` applied (absent objects are fine)."""
    for obj in operator_service_account(sets, release, namespace):
        try:
            _delete(api, obj["kind"], obj["metadata"]["name"], obj["metadata"].get("namespace"))
        except ApiException as exc:
            if exc.status != 404:
                raise


def _delete(api: client.ApiClient, kind: str, name: str, namespace: str | None) -> None:
    core, rbac = client.CoreV1Api(api), client.RbacAuthorizationV1Api(api)
    if kind == "ServiceAccount":
        assert namespace is not None, f"{kind} {name} without a namespace"
        core.delete_namespaced_service_account(name, namespace)
    elif kind == "ClusterRole":
        rbac.delete_cluster_role(name)
    elif kind == "ClusterRoleBinding":
        rbac.delete_cluster_role_binding(name)
    elif kind == "Role":
        assert namespace is not None, f"{kind} {name} without a namespace"
        rbac.delete_namespaced_role(name, namespace)
    elif kind == "RoleBinding":
        assert namespace is not None, f"{kind} {name} without a namespace"
        rbac.delete_namespaced_role_binding(name, namespace)


class OperatorProcess:
    def __init__(self, kubeconfig: Path, namespace: str, log: Path, **env: str) -> None:
        self.kubeconfig, self.namespace, self.log = kubeconfig, namespace, log
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "TXMAIL_NAMESPACE": self.namespace,
            "TXMAIL_DRIFT_CHECK_INTERVAL": "1",
            "TXMAIL_STATS_INTERVAL": "1",
            "TXMAIL_SEND_CHECK_INTERVAL": "1",
            "TXMAIL_DNS_TIMEOUT": "2",  # the tests' DNS server is local: a lost query is lost
            "TXMAIL_RELAY_IMAGE": "txmail-relay:test",
            # No fixed listeners: several operators (tests, make demo) may run at once.
            "TXMAIL_HEALTH_PORT": "0",
            "TXMAIL_METRICS_PORT": "0",
            **self.env,
        }
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "txmail_operator"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, api: client.ApiClient, timeout: float = 60.0) -> None:
        """The operator is up once it has reconciled a throwaway DedicatedIP."""
        objs = client.CustomObjectsApi(api)
        name = f"ready-{uuid.uuid4().hex[:6]}"
        body = {
            "apiVersion": "txmail.dev/v1alpha1",
            "kind": "DedicatedIP",
            "metadata": {"name": name},
            "spec": {
                "address": "127.0.0.9",
                "hostname": "probe.example.com",
                "domains": ["example.com"],
            },
        }
        objs.create_cluster_custom_object("txmail.dev", "v1alpha1", "dedicatedips", body)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = custom_object(
                objs.get_cluster_custom_object("txmail.dev", "v1alpha1", "dedicatedips", name)
            )
            if (got.get("status") or {}).get("conditions"):
                objs.delete_cluster_custom_object("txmail.dev", "v1alpha1", "dedicatedips", name)
                return
            if self.proc is not None and self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"the operator did not start:\n{self.output()[-5000:]}")
