"""The operator as a real process (`txmail-operator`) against the test control plane."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from kubernetes import client

from peers import wait_for

__all__ = ["OperatorProcess", "wait_for"]


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
            "TXMAIL_RELAY_IMAGE": "txmail-relay:test",
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
            got = objs.get_cluster_custom_object("txmail.dev", "v1alpha1", "dedicatedips", name)
            if (got.get("status") or {}).get("conditions"):
                objs.delete_cluster_custom_object("txmail.dev", "v1alpha1", "dedicatedips", name)
                return
            if self.proc is not None and self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"the operator did not start:\n{self.output()[-5000:]}")
