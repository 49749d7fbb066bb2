"""`make demo`: txmail end to end on this machine, with real parts only.

Where the machine can run a real node, the demo installs the chart on one (tests/demo_node.py).
Otherwise, the fallback below:

A local control plane (etcd, kube-apiserver, kube-controller-manager built from Go modules),
the CRDs, the operator as a process, the shipped samples, and a relay. No kubelet runs here,
so the relay runs as a local process with its Kubernetes config source pointed at the local
API server, exactly as it would read it in a pod. Mail goes to Postfix's smtp-sink.
"""

from __future__ import annotations

import datetime as dt
import re
import smtplib
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client

import demo_node
from cluster.controlplane import control_plane
from cluster.crds import install_crds
from cluster.kubeapi import custom_object, name_of, new_api_client
from cluster.node import can_run_node
from dns_server import DnsServer, txt
from k8s.kit import GROUP, VERSION, Kit
from k8s.operator_process import OperatorProcess
from peers import RelayProcess, Sink, auth_accepted, free_port, submit, wait_for
from project import CRDS
from txmail_relay import contract as c

ADDRESS = "127.0.0.2"  # the sample DedicatedIP's address: the relay listens and sends from it
APP_NAMESPACE = "shop"
OPERATOR_NAMESPACE = "txmail-system"


def step(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def info(text: str) -> None:
    print(f"    {text}", flush=True)


def sample(name: str) -> dict[str, Any]:
    body: dict[str, Any] = yaml.safe_load((CRDS / "samples" / f"{name}.yaml").read_text())
    return body


def table(api: client.ApiClient) -> None:
    """`kubectl get dip,smtpt,temail -A`, from the CRDs' own printer columns."""
    for path in sorted(CRDS.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        plural, kind = crd["spec"]["names"]["plural"], crd["spec"]["names"]["kind"]
        columns = [
            col
            for col in crd["spec"]["versions"][0]["additionalPrinterColumns"]
            if not col.get("priority")
        ]
        objs = custom_object(
            client.CustomObjectsApi(api).list_cluster_custom_object(GROUP, VERSION, plural)
        )["items"]
        namespaced = crd["spec"]["scope"] == "Namespaced"
        head = (
            (["NAMESPACE"] if namespaced else [])
            + ["NAME"]
            + [col["name"].upper() for col in columns]
        )
        rows = [head]
        for obj in objs:
            meta = obj["metadata"]
            row = ([meta["namespace"]] if namespaced else []) + [meta["name"]]
            rows.append(row + [_cell(obj, col) for col in columns])
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        print(f"    {kind}")
        for r in rows:
            print("    " + "   ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))


_FILTER = re.compile(r"^(\w+)\[\?\(@\.type=='(\w+)'\)\]$")


def _cell(obj: dict[str, Any], column: dict[str, Any]) -> str:
    """The few JSONPath forms the printer columns use: .a.b and .a[?(@.type=='X')].b."""
    node: Any = obj
    for part in re.split(r"\.(?![^\[]*\])", column["jsonPath"].lstrip(".")):
        items = _FILTER.match(part)
        if items:
            found = (node or {}).get(items[1]) or []
            node = next((x for x in found if x.get("type") == items[2]), None)
        else:
            node = node.get(part) if isinstance(node, dict) else None
    if node is None:
        return "<none>"
    if column["type"] == "date":
        age = dt.datetime.now(dt.UTC) - dt.datetime.fromisoformat(str(node).replace("Z", "+00:00"))
        return f"{int(age.total_seconds())}s"
    return str(node)


def mark_relay_pod_ready(api: client.ApiClient, ip: str) -> None:
    """Stand in for the kubelet, which would report the relay pod running and ready."""
    core = client.CoreV1Api(api)
    selector = f"{c.LABEL_INSTANCE}={ip},{c.LABEL_NAME}={c.RELAY_APP_NAME}"
    pod = wait_for(
        lambda: next(
            iter(core.list_namespaced_pod(OPERATOR_NAMESPACE, label_selector=selector).items), None
        ),
        20,
        "the relay pod",
    )
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    ready = [
        {"type": t, "status": "True", "lastTransitionTime": now}
        for t in ("Ready", "ContainersReady")
    ]
    core.patch_namespaced_pod_status(
        name_of(pod), OPERATOR_NAMESPACE, {"status": {"phase": "Running", "conditions": ready}}
    )


def publish_dns(kit: Kit, dns: DnsServer, ip: str) -> None:
    """Publish what the DedicatedIP's status.dnsRecords lists in the demo's DNS server, as a
    person would in the example names' zones, and wait for DNSVerified."""
    body = kit.get("dedicatedips", None, ip) or {}
    for record in (body.get("status") or {}).get("dnsRecords") or []:
        value = "".join(record["value"])
        data = txt(value) if record["type"] == "TXT" else value
        dns.set(record["name"], record["type"], data + ("." if record["type"] == "PTR" else ""))
        info(f"{record['name']} {record['type']} {value[:60]}{'...' if len(value) > 60 else ''}")

    def verified() -> dict[str, Any] | None:
        cond = kit.condition("dedicatedips", None, ip, "DNSVerified")
        return cond if cond and cond["status"] == "True" else None

    info(f"DNSVerified: {wait_for(verified, 30, 'DNSVerified', every=0.2)['message']}")


def order_mail(n: int) -> bytes:
    return (
        f"From: Example Shop <orders@example.com>\r\nTo: Ann <ann@example.net>\r\n"
        f"Subject: Your order {n}\r\nMessage-ID: <order-{n}@example.com>\r\n\r\n"
        f"Thank you for order {n}.\r\nEND-OF-MESSAGE {n}\r\n"
    ).encode()


def run(workdir: Path) -> None:
    step("Starting a local Kubernetes control plane (built from Go modules on first use)")
    with control_plane() as cp:
        info(f"API server {cp.server}, kubeconfig {cp.kubeconfig}")
        api = new_api_client(cp.kubeconfig)
        kit = Kit(api, OPERATOR_NAMESPACE)

        step("Installing the CRDs from crds/")
        for name in install_crds(api):
            info(f"{name} Established")

        core = client.CoreV1Api(api)
        core.create_namespace(
            client.V1Namespace(metadata=client.V1ObjectMeta(name=OPERATOR_NAMESPACE))
        )
        app_meta = client.V1ObjectMeta(name=APP_NAMESPACE, labels={"txmail.dev/sending": "allowed"})
        core.create_namespace(client.V1Namespace(metadata=app_meta))

        step("Starting the operator (txmail-operator), asking a local DNS server (Knot)")
        dns = DnsServer()  # the example names' zones, on loopback: the readiness check asks it
        operator = OperatorProcess(
            cp.kubeconfig,
            OPERATOR_NAMESPACE,
            workdir / "operator.log",
            TXMAIL_DRIFT_CHECK_INTERVAL="5",
            TXMAIL_DNS_NAMESERVERS=dns.address,
        )
        sink = Sink()
        relay: RelayProcess | None = None
        operator.start()
        try:
            operator.wait_ready(api)
            info("operator running")

            step(
                f"Applying crds/samples/dedicatedip.yaml: address {ADDRESS}, "
                f"relaying to smtp-sink on 127.0.0.1:{sink.port}"
            )
            ip = sample("dedicatedip")
            ip["spec"]["delivery"]["smarthost"]["port"] = sink.port
            # HostNetwork: the relay binds every outbound connection to the dedicated address.
            ip["spec"]["egress"] = {"mode": "HostNetwork"}
            ip["spec"]["dns"]["checkIntervalSeconds"] = 5  # the demo publishes, then waits
            client.CustomObjectsApi(api).create_cluster_custom_object(
                GROUP, VERSION, "dedicatedips", ip
            )
            ip_name = ip["metadata"]["name"]
            tls = wait_for(
                lambda: kit.secret(OPERATOR_NAMESPACE, c.tls_secret_name(ip_name)),
                20,
                "the relay's certificate",
            )
            info(
                "the operator created the relay Deployment, Service, Role, configuration "
                f"and a CA for {ip_name}"
            )

            step("Starting the relay (txmail-relay), reading its configuration from the API server")
            (workdir / "tls.crt").write_text(tls["tls.crt"])
            (workdir / "tls.key").write_text(tls["tls.key"])
            port = free_port(ADDRESS)
            relay = RelayProcess(
                {
                    "kubernetes": {
                        "namespace": OPERATOR_NAMESPACE,
                        "dedicatedIP": ip_name,
                        "kubeconfig": str(cp.kubeconfig),
                    },
                    "listen": {
                        "host": ADDRESS,
                        "submission": port,
                        "submissions": None,
                        "tracking": None,
                        "api": None,
                        "metrics": None,
                    },
                    "tls": {
                        "certFile": str(workdir / "tls.crt"),
                        "keyFile": str(workdir / "tls.key"),
                    },
                    "spool": {"directory": str(workdir / "spool")},
                },
                workdir,
            )
            relay.start(wait_port=(ADDRESS, port))
            info(
                f"relay listening on {ADDRESS}:{port} (STARTTLS); egress HostNetwork: "
                f"outbound mail leaves from {ADDRESS}"
            )
            mark_relay_pod_ready(api, ip_name)

            step(f"Applying the SmtpToken and TransactionalEmail samples in {APP_NAMESPACE}")
            for kind, plural in (
                ("smtptoken", "smtptokens"),
                ("transactionalemail", "transactionalemails"),
            ):
                client.CustomObjectsApi(api).create_namespaced_custom_object(
                    GROUP, VERSION, APP_NAMESPACE, plural, sample(kind)
                )
            wait_for(
                lambda: kit.is_ready("smtptokens", APP_NAMESPACE, "shop"), 20, "the SmtpToken Ready"
            )
            wait_for(
                lambda: kit.is_ready("transactionalemails", APP_NAMESPACE, "order-confirmation"),
                20,
                "the email Ready",
            )
            secret = wait_for(lambda: kit.secret(APP_NAMESPACE, "shop-smtp"), 10, "the app Secret")
            info(f"Secret {APP_NAMESPACE}/shop-smtp, as an app reads it:")
            for key in ("host", "port", "username", "password", "tls", "url", "ca.crt"):
                hidden = key in ("password", "url", "ca.crt")
                shown = f"<hidden: {len(secret[key])} characters>" if hidden else secret[key]
                info(f"  {key}: {shown}")

            step("Sending a mail with those credentials: STARTTLS (verifying ca.crt), AUTH")
            wait_for(
                lambda: auth_accepted((ADDRESS, port), secret),
                10,
                "the relay to accept the new token",
                every=0.2,
            )
            submit(
                (ADDRESS, port), secret, order_mail(1), "orders@example.com", ["ann@example.net"]
            )
            got = sink.wait(1, timeout=30)[0]
            info(
                f"smtp-sink received it from {got.client_addr}: MAIL FROM {got.mail_from}, "
                f"RCPT {', '.join(got.rcpts)}"
            )
            if got.client_addr != ADDRESS:
                raise SystemExit(
                    f"expected the mail to leave from {ADDRESS}, not {got.client_addr}"
                )
            for line in got.content.splitlines()[:12]:
                if line.split(":")[0] in (
                    "From",
                    "To",
                    "Subject",
                    "Message-ID",
                    "Received",
                ) or line.startswith("\t"):
                    info(f"  | {line}")

            step("Publishing the DNS records status.dnsRecords lists (SPF, DKIM, DMARC, PTR, A)")
            publish_dns(kit, dns, ip_name)

            step("kubectl get dip,smtpt,temail -A")
            wait_for(
                lambda: kit.is_ready("dedicatedips", None, ip_name), 20, "the DedicatedIP Ready"
            )
            table(api)

            step("Resetting the password: spec.passwordGeneration 2, no grace period")
            client.CustomObjectsApi(api).patch_namespaced_custom_object(
                GROUP,
                VERSION,
                APP_NAMESPACE,
                "smtptokens",
                "shop",
                {"spec": {"passwordGeneration": 2, "rotationGracePeriod": "0s"}},
            )
            new = kit.new_password(APP_NAMESPACE, "shop-smtp", secret["password"], 20)
            wait_for(
                lambda: auth_accepted((ADDRESS, port), new),
                10,
                "the new password at the relay",
                every=0.2,
            )
            info("new password: accepted (235)")
            wait_for(
                lambda: not auth_accepted((ADDRESS, port), new, secret["password"]),
                10,
                "the old password refused",
                every=0.2,
            )
            try:
                submit(
                    (ADDRESS, port),
                    new,
                    order_mail(2),
                    "orders@example.com",
                    ["ann@example.net"],
                    secret["password"],
                )
            except smtplib.SMTPAuthenticationError as exc:
                error = exc.smtp_error
                text = error.decode() if isinstance(error, bytes) else error
                info(f"old password: refused ({exc.smtp_code} {text})")
        finally:
            step("Cleaning up")
            if relay is not None:
                relay.stop()
            operator.stop()
            sink.stop()
            dns.stop()


def main() -> int:
    start = time.monotonic()
    reason = can_run_node()
    if reason is None:
        demo_node.run()
    else:
        print(
            f"This machine cannot run a real node ({reason}), so the demo runs the operator and "
            "the relay as local processes against a local control plane instead of installing "
            "the chart.",
            flush=True,
        )
        with tempfile.TemporaryDirectory(prefix="txmail-demo-") as tmp:
            run(Path(tmp))
    print(f"\nDemo complete in {time.monotonic() - start:.0f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
