"""What the node tier's tests do, the way a platform team and an app would do it.

``Cluster`` wraps a running node: the real Helm CLI against it, the Kubernetes API through
the host's portal, an smtp-sink on the node's network, and app pods made from the txmail image.
"""

from __future__ import annotations

import base64
import email
import email.message
import email.policy
import os
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from cluster.kubeapi import close_api_client, custom_object, meta_of, name_of, new_api_client
from cluster.node import NODE_IP, Node
from peers import SMTP_SINK, Sink, wait_for

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "txmail"
IMAGE = "ghcr.io/txmail/txmail:0.1.0"
GROUP, VERSION = "txmail.dev", "v1alpha1"
SINK_PORT = 2525
RELEASE, NAMESPACE = "txmail", "txmail-system"
TRACK_HOST = "track.example.test"

# What an app pod runs: read the Secret's settings from the environment, trust its ca.crt, send
# one mail over STARTTLS+AUTH with a link (SUBJECT and LINK are filled in by send_script).
_SEND = r"""
import os, smtplib, ssl
from email.message import EmailMessage
ctx = ssl.create_default_context(cafile="/etc/smtp/ca.crt")
m = EmailMessage()
m["From"], m["To"], m["Subject"] = "orders@example.com", "buyer@example.net", SUBJECT
m.set_content('<p>Your order shipped. <a href="LINK">Track it</a></p>', subtype="html")
# The last part ends with the line that tells smtp-sink's dump is complete (tests/peers.py).
m.add_alternative("Your order shipped.\nEND-OF-MESSAGE 1\n")
with smtplib.SMTP(os.environ["SMTP_host"], int(os.environ["SMTP_port"]), timeout=60) as s:
    s.starttls(context=ctx)
    s.login(os.environ["SMTP_username"], os.environ["SMTP_password"])
    s.send_message(m)
print("250: accepted", SUBJECT, "by", os.environ["SMTP_host"])
"""


def send_script(subject: str, link: str) -> str:
    return _SEND.replace("SUBJECT", repr(subject)).replace("LINK", link)


def spec_of(pod: client.V1Pod) -> client.V1PodSpec:
    """The spec of a pod the API server returned (it always has one)."""
    assert pod.spec is not None, f"pod {name_of(pod)} without a spec"
    return pod.spec


def status_of(pod: client.V1Pod) -> client.V1PodStatus:
    """The status of a pod the API server returned (it always has one)."""
    assert pod.status is not None, f"pod {name_of(pod)} without a status"
    return pod.status


def dedicated_ip(name: str, sink: Sink, spool: dict[str, Any] | None = None) -> dict[str, Any]:
    """A DedicatedIP relaying to ``sink``, with tracking on, admitting labelled namespaces."""
    spec: dict[str, Any] = {
        "address": "192.0.2.10",
        "hostname": "mta1.example.com",
        "domains": ["example.com"],
        "allowedNamespaces": {"matchLabels": {"txmail.dev/sending": "allowed"}},
        "delivery": {
            "mode": "Smarthost",
            "smarthost": {"host": sink.host, "port": sink.port, "tls": "None"},
        },
        # example.com's DNS is not the tier's to publish: DNSVerified is reported, not required.
        "dns": {"requireVerified": False},
        "tracking": {"baseURL": f"http://{TRACK_HOST}"},
    }
    if spool is not None:
        # A short first backoff: the tier waits for mail the relay deferred (its schedule
        # survives a pod's replacement, so the new pod waits for it too).
        spec["relay"] = {"spool": spool, "retry": {"minBackoffSeconds": 15}}
    return {
        "apiVersion": "txmail.dev/v1alpha1",
        "kind": "DedicatedIP",
        "metadata": {"name": name},
        "spec": spec,
    }


class NodeSink(Sink):
    """smtp-sink listening on the node's bridge address, where pods can reach it."""

    def __init__(self, node: Node, port: int = SINK_PORT) -> None:
        self.node = node
        self.directory = Path(tempfile.mkdtemp(prefix="txmail-node-sink-"))
        self.directory.chmod(0o777)
        self.host, self.port = NODE_IP, port
        self._log = (self.directory / "stderr.log").open("wb")
        self._process = subprocess.Popen(
            node.in_netns(
                SMTP_SINK,
                "-u",
                "nobody",
                "-d",
                f"{self.directory}/dump/%Y%m%d%H%M%S.",
                f"{NODE_IP}:{port}",
                "64",
            ),
            stdout=subprocess.DEVNULL,
            stderr=self._log,
        )
        wait_for(self._listening, 10, "smtp-sink on the node to listen")

    def _listening(self) -> bool:
        if self._process.poll() is not None:
            raise AssertionError("smtp-sink exited")
        out = subprocess.run(
            self.node.in_netns("ss", "-Htln", f"sport = :{self.port}"),
            check=False,
            capture_output=True,
            text=True,
        ).stdout
        return bool(out.strip())


@dataclass
class Cluster:
    node: Node
    helm_bin: Path
    api: client.ApiClient = field(init=False)

    def __post_init__(self) -> None:
        self.api = new_api_client(self.node.kubeconfig)

    def close(self) -> None:
        close_api_client(self.api)

    @property
    def core(self) -> client.CoreV1Api:
        return client.CoreV1Api(self.api)

    @property
    def apps(self) -> client.AppsV1Api:
        return client.AppsV1Api(self.api)

    @property
    def objs(self) -> client.CustomObjectsApi:
        return client.CustomObjectsApi(self.api)

    def helm(self, *args: str, timeout: float = 300) -> str:
        env = {
            **os.environ,
            "KUBECONFIG": str(self.node.kubeconfig),
            "HELM_CACHE_HOME": str(self.node.workdir / "helm-cache"),
            "HELM_CONFIG_HOME": str(self.node.workdir / "helm-config"),
            "HELM_DATA_HOME": str(self.node.workdir / "helm-data"),
        }
        out = subprocess.run(
            [str(self.helm_bin), *args],
            check=False,
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
        )
        if out.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed:\n{out.stderr}\n{out.stdout}")
        return out.stdout

    def install_chart(self, *args: str) -> str:
        """``helm install`` as the README says, into a Pod Security restricted namespace."""
        self.namespace(NAMESPACE, {"pod-security.kubernetes.io/enforce": "restricted"})
        return self.helm(
            "install",
            RELEASE,
            str(CHART),
            "-n",
            NAMESPACE,
            "--create-namespace",
            *args,
            "--wait",
            "--timeout",
            "3m",
        )

    # -- objects ---------------------------------------------------------------------------

    def namespace(self, name: str, labels: dict[str, str]) -> str:
        body = {"metadata": {"name": name, "labels": labels}}
        try:
            # The API methods validate a dict body into their model (pydantic validate_call);
            # model_validate does the same here, so the call is typed and sends the same body.
            self.core.create_namespace(client.V1Namespace.model_validate(body))
        except ApiException as exc:
            if exc.status != 409:
                raise
            self.core.patch_namespace(name, body)
        return name

    def apply_cluster(self, plural: str, body: dict[str, Any]) -> None:
        self.objs.create_cluster_custom_object(GROUP, VERSION, plural, body)

    def apply_namespaced(self, namespace: str, plural: str, body: dict[str, Any]) -> None:
        self.objs.create_namespaced_custom_object(GROUP, VERSION, namespace, plural, body)

    def smtp_token(self, namespace: str, name: str, ip: str, **spec: Any) -> None:
        body = {
            "apiVersion": "txmail.dev/v1alpha1",
            "kind": "SmtpToken",
            "metadata": {"name": name},
            "spec": {"dedicatedIPRef": {"name": ip}, **spec},
        }
        self.apply_namespaced(namespace, "smtptokens", body)

    def secret(self, namespace: str, name: str) -> dict[str, str] | None:
        """A Secret's decoded data, or None while it does not exist."""
        try:
            got = self.core.read_namespaced_secret(name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return {k: base64.b64decode(v).decode() for k, v in (got.data or {}).items()}

    def get_cluster(self, plural: str, name: str) -> dict[str, Any]:
        return custom_object(self.objs.get_cluster_custom_object(GROUP, VERSION, plural, name))

    def get_namespaced(self, namespace: str, plural: str, name: str) -> dict[str, Any]:
        return custom_object(
            self.objs.get_namespaced_custom_object(GROUP, VERSION, namespace, plural, name)
        )

    def condition(self, obj: dict[str, Any], kind: str) -> dict[str, Any] | None:
        for cond in (obj.get("status") or {}).get("conditions") or []:
            if cond.get("type") == kind:
                return dict(cond)
        return None

    def pods(self, namespace: str, selector: str) -> list[client.V1Pod]:
        return list(self.core.list_namespaced_pod(namespace, label_selector=selector).items)

    def ready_pod(self, namespace: str, selector: str) -> client.V1Pod | None:
        for pod in self.pods(namespace, selector):
            if meta_of(pod).deletion_timestamp:
                continue
            conds = status_of(pod).conditions or []
            if any(c.type == "Ready" and c.status == "True" for c in conds):
                return pod
        return None

    def wait_ready_pod(
        self, namespace: str, selector: str, timeout: float = 120, what: str = ""
    ) -> client.V1Pod:
        try:
            return wait_for(
                lambda: self.ready_pod(namespace, selector), timeout, what or selector, every=0.5
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.describe(namespace, selector)}") from None

    def describe(self, namespace: str, selector: str) -> str:
        """What a person would look at: pod phases, container states, recent Events."""
        out = []
        for pod in self.pods(namespace, selector):
            states = [
                f"{s.name}: {s.state.to_dict() if s.state else None}"
                for s in status_of(pod).container_statuses or []
            ]
            out.append(f"pod {name_of(pod)} {status_of(pod).phase} {states}")
            with_logs = status_of(pod).container_statuses or []
            for s in with_logs:
                try:
                    log = self.core.read_namespaced_pod_log(
                        name_of(pod), namespace, container=s.name, tail_lines=30
                    )
                except ApiException as exc:
                    log = f"(no logs: {exc.reason})"
                out.append(f"--- logs of {name_of(pod)}/{s.name}:\n{log}")
        events = self.core.list_namespaced_event(namespace).items[-15:]
        out += [f"event {e.involved_object.name}: {e.reason} {e.message}" for e in events]
        return "\n".join(out)

    # -- an app ----------------------------------------------------------------------------

    def run_app(
        self,
        namespace: str,
        name: str,
        secret: str,
        script: str,
        host_aliases: list[dict[str, Any]] | None = None,
        timeout: float = 120,
    ) -> str:
        """Run ``script`` in a pod of the txmail image that reads ``secret`` as an app does
        (envFrom for the settings, a volume for ca.crt); its log once it succeeded."""
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {
                "restartPolicy": "Never",
                "hostAliases": host_aliases or [],
                "securityContext": {
                    "runAsNonRoot": True,
                    "runAsUser": 65532,
                    "seccompProfile": {"type": "RuntimeDefault"},
                },
                "containers": [
                    {
                        "name": "app",
                        "image": IMAGE,
                        "imagePullPolicy": "Never",
                        "command": ["python", "-c", script],
                        "envFrom": [{"prefix": "SMTP_", "secretRef": {"name": secret}}],
                        "volumeMounts": [
                            {"name": "smtp", "mountPath": "/etc/smtp", "readOnly": True}
                        ],
                        "securityContext": {
                            "allowPrivilegeEscalation": False,
                            "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]},
                        },
                    }
                ],
                "volumes": [{"name": "smtp", "secret": {"secretName": secret}}],
            },
        }
        # A manifest as an app team writes it, validated into the model the API call takes.
        self.core.create_namespaced_pod(namespace, client.V1Pod.model_validate(pod))

        def done() -> str | None:
            phase = status_of(self.core.read_namespaced_pod(name, namespace)).phase
            if phase in ("Succeeded", "Failed"):
                return str(phase)
            return None

        phase = wait_for(done, timeout, f"app pod {name} to finish", every=0.5)
        log = str(self.core.read_namespaced_pod_log(name, namespace))
        assert phase == "Succeeded", f"app pod {name} {phase}:\n{log}"
        return log

    def service_ip(self, namespace: str, name: str) -> str:
        spec = self.core.read_namespaced_service(name, namespace).spec
        assert spec is not None, f"Service {namespace}/{name} without a spec"
        return str(spec.cluster_ip)

    def http_get(self, ip: str, port: int, path: str, host: str) -> tuple[int, dict[str, str]]:
        """One GET through a portal to ``ip:port`` inside the node (no redirect followed)."""
        local = self.node.portal(ip, port)
        with socket.create_connection(("127.0.0.1", local), timeout=10) as s:
            # A browser's user agent: a click without one is a machine's (not counted).
            agent = "User-Agent: Mozilla/5.0 (X11; Linux x86_64) txmail-tests\r\n"
            s.sendall(
                f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{agent}Connection: close\r\n\r\n".encode()
            )
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
        status = int(head[0].split()[1])
        headers = {}
        for line in head[1:]:
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
        return status, headers


def html_of(content: str) -> str:
    """The decoded text/html part of a captured message (links are in it as written)."""
    # Captured.content starts after smtp-sink's own header and "Received: from ".
    message = email.message_from_string("Received: from " + content, policy=email.policy.default)
    assert isinstance(message, email.message.EmailMessage)
    part = message.get_body(preferencelist=("html",))
    assert part is not None, "no HTML part"
    return str(part.get_content())
