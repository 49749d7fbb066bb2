"""A real one-node Kubernetes cluster for the ``node`` tier, inside namespaces of its own.

Everything of the node runs inside a network namespace and a private mount namespace this
module creates and removes: etcd, kube-apiserver, kube-controller-manager, kube-scheduler,
containerd (Debian's, with runc), the kubelet and kube-proxy, the pod bridge ``cni0`` at
``NODE_IP`` and the Service range. The host's iptables, sysctls, routes and ``/var/lib`` are
never touched: the kubelet's fixed paths and the sysctls it insists on are bind mounts seen
only inside the private mount namespace (see ../shared/reference/real-node.md for why each
setting is needed on these machines).

The host reaches the node through *portals* (see portal.py): a loopback port on the host that
leads to an address inside the namespace. ``kubeconfig`` is an admin kubeconfig for the API
server through such a portal.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from cluster.controlplane import (
    CONTROLLERS,
    ControlPlaneError,
    binaries,
    etcd_argv,
    make_pki,
    write_kubeconfig,
    write_pki,
)

HERE = Path(__file__).resolve().parent
NODE_IP = "10.244.77.1"
POD_SUBNET = "10.244.77.0/24"
SERVICE_CIDR = "10.96.0.0/24"
API_SERVICE_IP = "10.96.0.1"
NODE_NAME = "txmail-node"
API_PORT = 6443
PAUSE_IMAGE = "localhost/txmail/pause:3.10"
START_TIMEOUT = 120.0
NODE_CONTROLLERS = ",".join(
    [
        *CONTROLLERS.split(","),
        "node-lifecycle-controller",
        "root-ca-certificate-publisher-controller",
        "endpointslice-controller",
        "persistentvolume-binder-controller",
        "pod-garbage-collector-controller",
    ]
)
# The kubelet refuses to start (protectKernelDefaults) unless these read as it wants; bind
# mounts inside the private mount namespace show it these values instead of changing the host.
KERNEL_DEFAULTS = {"vm/overcommit_memory": "1", "kernel/panic": "10", "kernel/panic_on_oops": "1"}


class NodeUnavailableError(RuntimeError):
    """This machine cannot create the namespaces a node needs (the tier is skipped)."""


def can_run_node() -> str | None:
    """None when a node can run here, else the reason it cannot (shown as the skip reason)."""
    if sys.platform != "linux":
        return "the node tier needs Linux namespaces"
    if os.geteuid() != 0:
        return "the node tier needs root to create network and mount namespaces"
    if shutil.which("ip") is None:
        return None  # a missing package is no reason to skip: node_cluster fails and names it
    probe = f"txm-probe-{uuid.uuid4().hex[:6]}"
    made = subprocess.run(
        ["ip", "netns", "add", probe], check=False, capture_output=True, text=True
    )
    if made.returncode != 0:
        return f"cannot create a network namespace here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "delete", probe], check=False, capture_output=True)
    return None


# Programs the node runs, from the Debian packages `make debs` installs.
NODE_TOOLS = (
    "ip",
    "ss",
    "nsenter",
    "unshare",
    "sysctl",
    "pgrep",
    "containerd",
    "runc",
    "ctr",
    "iptables",
    "conntrack",
)


def _check_tools() -> None:
    missing = [tool for tool in NODE_TOOLS if shutil.which(tool) is None]
    if missing:
        raise ControlPlaneError(
            f"not installed: {', '.join(missing)} (make debs installs the node's packages)"
        )


def _run(*argv: str, timeout: float = 60.0) -> str:
    out = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise ControlPlaneError(f"{' '.join(argv)}: {out.stderr.strip() or out.stdout.strip()}")
    return out.stdout


@dataclass
class Node:
    """A running node. Commands run inside it with :meth:`inside`."""

    name: str
    workdir: Path
    kubeconfig: Path = field(init=False)
    holder: subprocess.Popen[bytes] | None = None
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    portals: list[subprocess.Popen[bytes]] = field(default_factory=list)
    cgroup_root: str = ""

    def __post_init__(self) -> None:
        self.kubeconfig = self.workdir / "kubeconfig"
        self.cgroup_root = f"/{self.name}"

    @property
    def netns(self) -> str:
        return f"/run/netns/{self.name}"

    def inside(self, *argv: str) -> list[str]:
        """``argv`` run in the node's network and mount namespaces."""
        assert self.holder is not None
        return ["nsenter", "-t", str(self.holder.pid), "-m", "-n", "--", *argv]

    def in_netns(self, *argv: str) -> list[str]:
        """``argv`` run in the node's network namespace (the host's files)."""
        return ["nsenter", f"--net={self.netns}", "--", *argv]

    def spawn(self, name: str, argv: list[str], *, mount: bool = True) -> None:
        log = (self.workdir / f"{name}.log").open("ab")
        cmd = self.inside(*argv) if mount else self.in_netns(*argv)
        self.processes[name] = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        log.close()

    def portal(self, host: str, port: int) -> int:
        """A host loopback port that leads to ``host:port`` inside the node."""
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        proc = subprocess.Popen(
            self.in_netns(
                sys.executable, str(HERE / "portal.py"), str(listener.fileno()), host, str(port)
            ),
            pass_fds=(listener.fileno(),),
            stdin=subprocess.DEVNULL,
        )
        local = int(listener.getsockname()[1])
        listener.close()
        self.portals.append(proc)
        return local

    def ctr(self, *args: str, timeout: float = 300.0) -> str:
        sock = "/run/containerd/containerd.sock"
        return _run(*self.inside("ctr", "-a", sock, "-n", "k8s.io", *args), timeout=timeout)

    def import_image(self, archive: Path) -> None:
        self.ctr("images", "import", "--no-unpack", str(archive))

    def logs(self, tail: int = 40) -> str:
        out = []
        for path in sorted(self.workdir.glob("*.log")):
            lines = path.read_text(errors="replace").splitlines()[-tail:]
            out.append(f"----- {path.stem} (last {len(lines)} lines) -----\n" + "\n".join(lines))
        return "\n".join(out)

    def stop(self) -> None:
        # The kubelet first, so it does not restart containers that containerd is stopping.
        order = ["kube-proxy", "kubelet", "kube-scheduler", "kube-controller-manager"]
        for name in order:
            self._stop(name)
        if self.holder is not None and "containerd" in self.processes:
            # Stop every pod's containers while containerd still runs.
            with contextlib.suppress(ControlPlaneError, subprocess.TimeoutExpired):
                for task in self.ctr("tasks", "ls", "-q", timeout=30).split():
                    with contextlib.suppress(ControlPlaneError):
                        self.ctr("tasks", "kill", "-s", "SIGKILL", task, timeout=30)
        for name in list(self.processes):
            self._stop(name)
        for proc in self.portals:
            proc.kill()
            proc.wait()
        self._kill_leftovers()
        if self.holder is not None:
            self.holder.kill()
            self.holder.wait()
        subprocess.run(["ip", "netns", "delete", self.name], check=False, capture_output=True)
        self._remove_cgroups()

    def _stop(self, name: str) -> None:
        proc = self.processes.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            # Test data only: the API server's graceful stop (about 25 s) buys nothing here.
            proc.wait(timeout=3 if name in ("kube-apiserver", "etcd") else 20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def _kill_leftovers(self) -> None:
        """Shims and container processes still in the node's network namespace."""
        with contextlib.suppress(subprocess.SubprocessError):
            pids = subprocess.run(
                ["ip", "netns", "pids", self.name],
                check=False,
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.split()
            holder = str(self.holder.pid) if self.holder else ""
            for pid in pids:
                if pid != holder:
                    with contextlib.suppress(ProcessLookupError, ValueError):
                        os.kill(int(pid), 9)
        # Shims live in the host's network namespace: find them by their containerd address.
        sock = f"{self.workdir}/"
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                if "containerd-shim" in cmd and sock in cmd:
                    os.kill(int(proc.name), 9)

    def _remove_cgroups(self) -> None:
        base = Path("/sys/fs/cgroup")
        for hierarchy in base.iterdir() if base.exists() else ():
            root = hierarchy / self.cgroup_root.lstrip("/")
            if not root.is_dir():
                continue
            # Deepest first: a cgroup can only be removed once it has no children.
            for _ in range(50):
                dirs = sorted(
                    (p for p in root.rglob("*") if p.is_dir()),
                    key=lambda p: len(p.parts),
                    reverse=True,
                )
                for d in [*dirs, root]:
                    with contextlib.suppress(OSError):
                        d.rmdir()
                if not root.exists():
                    break
                time.sleep(0.1)


def _write(path: Path, text: str, mode: int = 0o644) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)
    return path


def _network(node: Node) -> None:
    ns = node.name
    _run("ip", "netns", "add", ns)
    _run("ip", "-n", ns, "link", "set", "lo", "up")
    _run("ip", "-n", ns, "link", "add", "cni0", "type", "bridge")
    _run("ip", "-n", ns, "addr", "add", f"{NODE_IP}/24", "dev", "cni0")
    _run("ip", "-n", ns, "link", "set", "cni0", "up")
    # A veth pair, both ends inside, carries the default route and the Service range (the
    # bridge has no carrier until the first pod; this kernel has no dummy links): kube-proxy's
    # DNAT rewrites Service addresses before a packet would leave.
    _run("ip", "-n", ns, "link", "add", "svc0", "type", "veth", "peer", "name", "svc1")
    _run("ip", "-n", ns, "link", "set", "svc1", "up")
    _run("ip", "-n", ns, "link", "set", "svc0", "up")
    _run("ip", "-n", ns, "route", "add", SERVICE_CIDR, "dev", "svc0")
    _run("ip", "-n", ns, "route", "add", "default", "dev", "svc0")
    _run("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")


def _mounts(node: Node) -> None:
    """The private mount namespace: kubelet/containerd fixed paths and kernel defaults."""
    w = node.workdir
    node.holder = subprocess.Popen(
        node.in_netns("unshare", "--mount", "--propagation", "private", "--fork", "sleep", "inf"),
        stdin=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,  # unshare complains when it is killed at the end
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # unshare has forked once its namespace exists
        if subprocess.run(
            ["pgrep", "-P", str(node.holder.pid)], check=False, capture_output=True
        ).stdout:
            break
        time.sleep(0.05)
    binds = {
        w / "var-lib": "/var/lib",
        w / "var-log": "/var/log",
    }
    script = ["set -e"]
    for src, dst in binds.items():
        src.mkdir(parents=True, exist_ok=True)
        script.append(f"mount --bind {src} {dst}")
    script.append("mount -t tmpfs -o mode=755 tmpfs /run")
    script.append("mkdir -p /run/containerd /run/netns")
    for key, value in KERNEL_DEFAULTS.items():
        f = _write(w / "sysctl" / key.replace("/", "-"), value + "\n")
        script.append(f"mount --bind {f} /proc/sys/{key}")
    _run(*node.inside("sh", "-c", "\n".join(script)))


def _containerd_config(node: Node) -> Path:
    w = node.workdir
    cni = w / "cni"
    _write(
        cni / "10-txmail.conflist",
        json.dumps(
            {
                "cniVersion": "0.4.0",
                "name": "txmail",
                "plugins": [
                    {
                        "type": "bridge",
                        "bridge": "cni0",
                        "isGateway": True,
                        "ipMasq": False,
                        "hairpinMode": True,
                        "ipam": {
                            "type": "host-local",
                            "ranges": [[{"subnet": POD_SUBNET, "gateway": NODE_IP}]],
                            "routes": [{"dst": "0.0.0.0/0"}],
                            "dataDir": str(w / "cni-ipam"),
                        },
                    },
                    {"type": "portmap", "capabilities": {"portMappings": True}},
                ],
            },
            indent=2,
        ),
    )
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    config = f"""version = 2
root = "{w}/containerd"
state = "/run/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "/run/containerd/containerd.sock"
[{cri}]
  sandbox_image = "{PAUSE_IMAGE}"
  # root here lacks CAP_SYS_RESOURCE: runc cannot lower oom_score_adj for pod sandboxes.
  restrict_oom_score_adj = true
  disable_apparmor = true
[{cri}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"
[{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
[{cri}.containerd.runtimes.runc.options]
  SystemdCgroup = false
[{cri}.cni]
  bin_dir = "/usr/lib/cni"
  conf_dir = "{cni}"
"""
    return _write(w / "containerd.toml", config)


def _make_cgroups(node: Node) -> None:
    """The kubelet's cgroupRoot must exist in every v1 hierarchy before it starts."""
    base = Path("/sys/fs/cgroup")
    for hierarchy in base.iterdir():
        if not (hierarchy / "cgroup.procs").exists() or hierarchy.name == "unified":
            continue
        root = hierarchy / node.cgroup_root.lstrip("/")
        root.mkdir(exist_ok=True)
        if hierarchy.name == "cpuset":  # a v1 cpuset starts empty: inherit the parent's
            for key in ("cpuset.cpus", "cpuset.mems"):
                (root / key).write_text((hierarchy / key).read_text())


def _kubelet_config(node: Node, ca: Path) -> Path:
    w = node.workdir
    config = {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "failCgroupV1": False,  # this kernel's cgroup2 carries only hugetlb
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": node.cgroup_root,  # a kubelet deletes pod cgroups it does not know
        "protectKernelDefaults": True,
        "oomScoreAdj": 0,
        "address": NODE_IP,
        "port": 10250,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": 10248,
        "containerRuntimeEndpoint": "unix:///run/containerd/containerd.sock",
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(ca)},
        },
        "authorization": {"mode": "Webhook"},
        "volumePluginDir": str(w / "volume-plugins"),
        "resolvConf": str(_write(w / "resolv.conf", f"nameserver {NODE_IP}\n")),
        "clusterDomain": "cluster.local",
        "failSwapOn": False,
        "serializeImagePulls": False,
        "rotateCertificates": False,
        "registerNode": True,
        "evictionHard": {
            "memory.available": "100Mi",
            "nodefs.available": "1%",
            "imagefs.available": "1%",
        },
        "imageGCHighThresholdPercent": 100,
        "syncFrequency": "5s",
        "fileCheckFrequency": "5s",
        "nodeStatusReportFrequency": "10s",
        "shutdownGracePeriod": "0s",
        "logging": {"verbosity": 0},
    }
    return _write(w / "kubelet.yaml", yaml.safe_dump(config))


def _proxy_config(node: Node, kubeconfig: Path) -> Path:
    config = {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "mode": "iptables",
        "clientConnection": {"kubeconfig": str(kubeconfig)},
        "hostnameOverride": NODE_NAME,
        "clusterCIDR": POD_SUBNET,
        "bindAddress": NODE_IP,
        "healthzBindAddress": "127.0.0.1:10256",
        "metricsBindAddress": "127.0.0.1:10249",
        # No writes to host-wide conntrack sysctls.
        "conntrack": {
            "maxPerCore": 0,
            "min": 0,
            "tcpEstablishedTimeout": "0s",
            "tcpCloseWaitTimeout": "0s",
        },
        # Replies from a pod to a pod on the same bridge come back through the node, so
        # kube-proxy's DNAT is undone without br_netfilter.
        "iptables": {"masqueradeAll": True, "localhostNodePorts": False},
    }
    return _write(node.workdir / "kube-proxy.yaml", yaml.safe_dump(config))


def _https_ok(url: str, ctx: ssl.SSLContext) -> bool:
    with (
        contextlib.suppress(OSError, ssl.SSLError, ValueError),
        urllib.request.urlopen(url, context=ctx, timeout=2) as resp,
    ):
        return bool(resp.status == 200)
    return False


def _wait(node: Node, what: str, probe: object, deadline: float) -> None:
    assert callable(probe)
    while time.monotonic() < deadline:
        for name, proc in node.processes.items():
            if proc.poll() is not None:
                raise ControlPlaneError(f"{name} exited with {proc.returncode}")
        if probe():
            return
        time.sleep(0.2)
    raise ControlPlaneError(f"{what} was not ready within {START_TIMEOUT:.0f} s")


def _start(node: Node, bins: Path, images: list[Path]) -> None:
    w = node.workdir
    deadline = time.monotonic() + START_TIMEOUT
    _network(node)
    _mounts(node)
    pki = make_pki(
        dns=[
            "localhost",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
        ],
        ips=["127.0.0.1", NODE_IP, API_SERVICE_IP],
    )
    write_pki(w, pki)
    inner = w / "inner.kubeconfig"  # for the node's own parts, inside the namespace
    write_kubeconfig(inner, f"https://127.0.0.1:{API_PORT}", pki)
    node.spawn("containerd", ["containerd", "--config", str(_containerd_config(node))])
    node.spawn("etcd", etcd_argv(bins, w / "etcd", 2379, 2380))
    node.spawn(
        "kube-apiserver",
        [
            str(bins / "kube-apiserver"),
            "--etcd-servers=http://127.0.0.1:2379",
            "--bind-address=0.0.0.0",
            f"--advertise-address={NODE_IP}",
            f"--secure-port={API_PORT}",
            f"--tls-cert-file={w / 'apiserver.crt'}",
            f"--tls-private-key-file={w / 'apiserver.key'}",
            f"--client-ca-file={w / 'ca.crt'}",
            "--authorization-mode=Node,RBAC",
            f"--service-account-key-file={w / 'sa.pub'}",
            f"--service-account-signing-key-file={w / 'sa.key'}",
            "--service-account-issuer=https://kubernetes.default.svc",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--endpoint-reconciler-type=lease",
            "--allow-privileged=true",
            "--kubelet-preferred-address-types=InternalIP",
            f"--kubelet-client-certificate={w / 'admin.crt'}",
            f"--kubelet-client-key={w / 'admin.key'}",
            f"--cert-dir={w / 'certs'}",
            "--v=0",
        ],
    )
    api = node.portal("127.0.0.1", API_PORT)
    write_kubeconfig(node.kubeconfig, f"https://127.0.0.1:{api}", pki)
    ctx = ssl.create_default_context(cadata=pki.ca_cert.decode())
    ctx.load_cert_chain(str(w / "admin.crt"), str(w / "admin.key"))
    _wait(
        node, "the API server", lambda: _https_ok(f"https://127.0.0.1:{api}/readyz", ctx), deadline
    )
    node.spawn(
        "kube-controller-manager",
        [
            str(bins / "kube-controller-manager"),
            f"--kubeconfig={inner}",
            f"--authentication-kubeconfig={inner}",
            f"--authorization-kubeconfig={inner}",
            f"--controllers={NODE_CONTROLLERS}",
            "--leader-elect=false",
            "--bind-address=127.0.0.1",
            "--secure-port=10257",
            f"--cert-dir={w / 'cm-certs'}",
            f"--root-ca-file={w / 'ca.crt'}",
            f"--service-account-private-key-file={w / 'sa.key'}",
            "--use-service-account-credentials=false",
            "--node-monitor-grace-period=20s",
            "--v=0",
        ],
    )
    node.spawn(
        "kube-scheduler",
        [
            str(bins / "kube-scheduler"),
            f"--kubeconfig={inner}",
            f"--authentication-kubeconfig={inner}",
            f"--authorization-kubeconfig={inner}",
            "--leader-elect=false",
            "--bind-address=127.0.0.1",
            "--secure-port=10259",
            "--v=0",
        ],
    )

    # The sandbox image must be there before the first pod; the others can follow.
    def sock_ready() -> bool:
        ping = node.inside("ctr", "-a", "/run/containerd/containerd.sock", "version")
        return subprocess.run(ping, check=False, capture_output=True).returncode == 0

    _wait(node, "containerd", sock_ready, deadline)
    for archive in images:
        node.import_image(archive)
    _make_cgroups(node)
    node.spawn(
        "kubelet",
        [
            str(bins / "kubelet"),
            f"--config={_kubelet_config(node, w / 'ca.crt')}",
            f"--kubeconfig={inner}",
            f"--hostname-override={NODE_NAME}",
            f"--node-ip={NODE_IP}",
            "--root-dir=/var/lib/kubelet",
            f"--cert-dir={w / 'kubelet-pki'}",
            "--v=0",
        ],
    )
    node.spawn("kube-proxy", [str(bins / "kube-proxy"), f"--config={_proxy_config(node, inner)}"])

    _wait(node, "the node", lambda: _node_ready(node.kubeconfig), deadline)


def _node_ready(kubeconfig: Path) -> bool:
    from kubernetes import client  # noqa: PLC0415

    from cluster.kubeapi import close_api_client, new_api_client  # noqa: PLC0415

    with contextlib.suppress(Exception):
        api = new_api_client(kubeconfig)
        try:
            got = client.CoreV1Api(api).read_node(NODE_NAME)
            if got.status is None or got.spec is None:
                return False
            return any(
                c.type == "Ready" and c.status == "True" for c in got.status.conditions or []
            ) and not any(t.key == "node.kubernetes.io/not-ready" for t in got.spec.taints or [])
        finally:
            close_api_client(api)
    return False


@contextlib.contextmanager
def node_cluster(images: list[Path]) -> Iterator[Node]:
    """Start a node with ``images`` (OCI archives) imported; remove everything after."""
    _check_tools()
    bins = binaries()
    base = Path(os.environ.get("TXMAIL_TEST_TMP", tempfile.gettempdir()))
    name = f"txm-{uuid.uuid4().hex[:8]}"
    node = Node(name=name, workdir=Path(tempfile.mkdtemp(prefix=f"{name}-", dir=base)))
    try:
        _start(node, bins, images)
    except BaseException as exc:
        logs = node.logs()
        node.stop()
        shutil.rmtree(node.workdir, ignore_errors=True)
        if isinstance(exc, ControlPlaneError):
            raise ControlPlaneError(f"the node did not start: {exc}\n{logs}") from exc
        raise
    try:
        yield node
    finally:
        node.stop()
        shutil.rmtree(node.workdir, ignore_errors=True)
