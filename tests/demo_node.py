"""`make demo` on a real node: the chart, the operator pod, a relay pod, an app pod's mail.

What a platform team does after reading the README, on one machine: build the image, start a
one-node cluster (tests/cluster/node.py), ``helm install`` the chart, apply a DedicatedIP, an
SmtpToken and a TransactionalEmail, and let an app pod send a tracked mail with the generated
Secret. smtp-sink on the node's network stands in for the upstream relay.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

from cluster.controlplane import binaries
from cluster.kubeapi import name_of
from cluster.node import node_cluster
from node.kit import (
    NAMESPACE,
    ROOT,
    TRACK_HOST,
    Cluster,
    NodeSink,
    dedicated_ip,
    html_of,
    send_script,
    status_of,
)
from peers import wait_for
from txmail_relay import contract as c

IP, APP_NS, TOKEN = "demo", "shop", "shop"


def step(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def info(text: str) -> None:
    print(f"    {text}", flush=True)


def _image(*args: str) -> Path:
    out = subprocess.run(
        [str(ROOT / "image" / "build.sh"), *args],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
        timeout=1800,
    )
    return Path(out.stdout.strip().splitlines()[-1])


def run() -> None:
    started = time.monotonic()
    step("Building the image (cached after the first run): image/build.sh")
    images = [_image("pause"), _image()]
    info(f"{images[1]} ({images[1].stat().st_size / 1e6:.0f} MB)")
    step("Starting a one-node cluster in namespaces of its own (tests/cluster/node.py)")
    with node_cluster(images) as node:
        cluster = Cluster(node, binaries() / "helm")
        sink = NodeSink(node)
        try:
            _demo(cluster, sink)
        finally:
            sink.stop()
            cluster.close()
            step("Stopping the node")
    info(f"done in {time.monotonic() - started:.0f} s")


def _demo(cluster: Cluster, sink: NodeSink) -> None:
    info(f"node Ready; kubeconfig for this run: {cluster.node.kubeconfig}")
    step(f"helm install txmail charts/txmail -n {NAMESPACE} --create-namespace")
    out = cluster.install_chart(
        "--set", "image.pullPolicy=Never", "--set", "operator.statsInterval=2"
    )
    info(out.strip().splitlines()[0])
    step(f"kubectl apply: DedicatedIP {IP} (smarthost: smtp-sink at {sink.host}:{sink.port})")
    cluster.apply_cluster("dedicatedips", dedicated_ip(IP, sink))
    selector = f"{c.LABEL_NAME}={c.RELAY_APP_NAME},{c.LABEL_INSTANCE}={IP}"
    pod = cluster.wait_ready_pod(NAMESPACE, selector, what="the relay pod")
    info(f"relay pod {name_of(pod)} Ready on {status_of(pod).pod_ip}")
    step(f"kubectl apply: namespace {APP_NS} (txmail.dev/sending=allowed), SmtpToken {TOKEN}")
    cluster.namespace(APP_NS, {"txmail.dev/sending": "allowed"})
    cluster.smtp_token(APP_NS, TOKEN, IP)
    secret = wait_for(
        lambda: cluster.secret(APP_NS, f"{TOKEN}-smtp"), 60, "the app Secret", every=0.5
    )
    info(f"Secret {APP_NS}/{TOKEN}-smtp: {', '.join(sorted(secret))}")
    step("An app pod reads the Secret (envFrom, ca.crt as a volume) and sends over STARTTLS")
    relay_ip = cluster.service_ip(NAMESPACE, c.relay_name(IP))
    host = f"{c.relay_name(IP)}.{NAMESPACE}.svc.cluster.local"
    log = cluster.run_app(
        APP_NS,
        "shop-app",
        f"{TOKEN}-smtp",
        send_script("Order 1001", "https://example.com/orders/1001"),
        host_aliases=[{"ip": relay_ip, "hostnames": [host]}],
    )
    info(log.strip())
    mail = wait_for(sink.messages, 60, "the mail at smtp-sink", every=0.5)[0]
    info(f"smtp-sink got a mail from {mail.client_addr} for {', '.join(mail.rcpts)}")
    link = re.search(rf"http://{re.escape(TRACK_HOST)}(/c/[^\"'\s<>]+)", html_of(mail.content))
    if link:
        step("A click on the tracked link, through the relay's tracking Service")
        status, headers = cluster.http_get(relay_ip, 80, link.group(1), TRACK_HOST)
        info(f"{status} -> {headers.get('location')}")

        def stats() -> dict[str, object] | None:
            got = cluster.get_namespaced(APP_NS, "smtptokens", TOKEN).get("status") or {}
            s = got.get("stats") or {}
            return s if s.get("clicks") else None

        figures = wait_for(stats, 120, "the click in SmtpToken status", every=1)
        info(
            f"SmtpToken {APP_NS}/{TOKEN} status.stats: sent={figures.get('sent')} "
            f"delivered={figures.get('delivered')} clicks={figures.get('clicks')}"
        )
