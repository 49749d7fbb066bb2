"""A real Kubernetes control plane for tests: etcd, kube-apiserver, kube-controller-manager.

Built from Go modules by ``build.sh`` (envtest-style) and started on free loopback ports with
fresh keys. There is no kubelet: pods stay Pending, but everything the API server, admission,
CEL validation, RBAC and the garbage collector do is real.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
import shutil
import ssl
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from peers import free_port

HERE = Path(__file__).resolve().parent
START_TIMEOUT = 60.0
CONTROLLERS = ",".join(
    [
        "garbage-collector-controller",
        "namespace-controller",
        "deployment-controller",
        "replicaset-controller",
        "serviceaccount-controller",
    ]
)


class ControlPlaneError(RuntimeError):
    pass


def binaries() -> Path:
    """Folder with the three binaries: KUBEBUILDER_ASSETS, or the cache ``build.sh`` fills."""
    out = subprocess.run(
        [str(HERE / "build.sh")], check=True, capture_output=True, text=True, timeout=3600
    )
    return Path(out.stdout.strip().splitlines()[-1])


@dataclass
class _Pki:
    ca_cert: bytes
    serving_cert: bytes
    serving_key: bytes
    admin_cert: bytes
    admin_key: bytes
    sa_public: bytes
    sa_private: bytes


def _pem_key(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_pki(dns: list[str] | None = None, ips: list[str] | None = None) -> _Pki:
    """A CA, the API server's serving certificate (for ``dns`` and ``ips``), an admin client
    certificate and the service-account key pair."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "txmail-test-ca")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(
        subject: x509.Name, san: x509.SubjectAlternativeName | None, usage: x509.ObjectIdentifier
    ) -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if san is not None:
            builder = builder.add_extension(san, critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)

    serving = leaf(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]),
        x509.SubjectAlternativeName(
            [x509.DNSName(d) for d in dns or ["localhost", "kubernetes.default.svc"]]
            + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips or ["127.0.0.1"]]
        ),
        x509.oid.ExtendedKeyUsageOID.SERVER_AUTH,
    )
    admin = leaf(
        x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "system:masters"),
                x509.NameAttribute(NameOID.COMMON_NAME, "txmail-test-admin"),
            ]
        ),
        None,
        x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH,
    )
    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return _Pki(
        ca_cert=ca.public_bytes(serialization.Encoding.PEM),
        serving_cert=serving[0],
        serving_key=serving[1],
        admin_cert=admin[0],
        admin_key=admin[1],
        sa_public=sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        sa_private=_pem_key(sa_key),
    )


@dataclass
class ControlPlane:
    """A running control plane. ``kubeconfig`` is an admin kubeconfig for it."""

    workdir: Path
    kubeconfig: Path
    server: str
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def logs(self, tail: int = 60) -> str:
        out = []
        for name in ("etcd", "kube-apiserver", "kube-controller-manager"):
            path = self.workdir / f"{name}.log"
            if path.exists():
                lines = path.read_text(errors="replace").splitlines()[-tail:]
                out.append(f"----- {name} (last {len(lines)} lines) -----\n" + "\n".join(lines))
        return "\n".join(out)

    def stop(self) -> None:
        for proc in reversed(list(self.processes.values())):
            if proc.poll() is None:
                proc.terminate()
        for proc in self.processes.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def write_kubeconfig(path: Path, server: str, pki: _Pki) -> None:
    import base64  # noqa: PLC0415

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "txmail-test",
                "cluster": {"server": server, "certificate-authority-data": b64(pki.ca_cert)},
            }
        ],
        "users": [
            {
                "name": "admin",
                "user": {
                    "client-certificate-data": b64(pki.admin_cert),
                    "client-key-data": b64(pki.admin_key),
                },
            }
        ],
        "contexts": [
            {"name": "txmail-test", "context": {"cluster": "txmail-test", "user": "admin"}}
        ],
        "current-context": "txmail-test",
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)


def _spawn(cp: ControlPlane, name: str, argv: list[str]) -> None:
    log = (cp.workdir / f"{name}.log").open("ab")
    cp.processes[name] = subprocess.Popen(
        argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
    )
    log.close()


def _wait(cp: ControlPlane, name: str, probe: object, deadline: float) -> None:
    assert callable(probe)
    while time.monotonic() < deadline:
        proc = cp.processes[name]
        if proc.poll() is not None:
            raise ControlPlaneError(f"{name} exited with {proc.returncode}")
        with contextlib.suppress(OSError, ssl.SSLError, ValueError):
            if probe():
                return
        time.sleep(0.1)
    raise ControlPlaneError(f"{name} was not ready within {START_TIMEOUT:.0f} s")


def write_pki(workdir: Path, pki: _Pki) -> None:
    """The CA, the API server's pair, the service-account pair and the admin pair, as files."""
    files = {
        "ca.crt": pki.ca_cert,
        "apiserver.crt": pki.serving_cert,
        "apiserver.key": pki.serving_key,
        "sa.pub": pki.sa_public,
        "sa.key": pki.sa_private,
        "admin.crt": pki.admin_cert,
        "admin.key": pki.admin_key,
    }
    for fname, data in files.items():
        (workdir / fname).write_bytes(data)
        (workdir / fname).chmod(0o600)


def etcd_argv(bins: Path, data_dir: Path, client: int, peer: int) -> list[str]:
    """A one-member etcd on loopback, without fsync (test data only: fast on slow disks)."""
    return [
        str(bins / "etcd"),
        f"--data-dir={data_dir}",
        f"--listen-client-urls=http://127.0.0.1:{client}",
        f"--advertise-client-urls=http://127.0.0.1:{client}",
        f"--listen-peer-urls=http://127.0.0.1:{peer}",
        f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
        f"--initial-cluster=default=http://127.0.0.1:{peer}",
        "--unsafe-no-fsync",
        "--log-level=warn",
    ]


def _https_ok(url: str, ctx: ssl.SSLContext) -> bool:
    with urllib.request.urlopen(url, context=ctx, timeout=2) as resp:
        return bool(resp.status == 200)


def _start_once(
    bins: Path, workdir: Path, pki: _Pki, apiserver_args: Sequence[str] = ()
) -> ControlPlane:
    etcd_client, etcd_peer, api_port = free_port(), free_port(), free_port()
    server = f"https://127.0.0.1:{api_port}"
    cp = ControlPlane(workdir=workdir, kubeconfig=workdir / "kubeconfig", server=server)
    write_pki(workdir, pki)
    write_kubeconfig(cp.kubeconfig, server, pki)
    deadline = time.monotonic() + START_TIMEOUT
    try:
        _spawn(cp, "etcd", etcd_argv(bins, workdir / "etcd", etcd_client, etcd_peer))

        def etcd_ok() -> bool:
            url = f"http://127.0.0.1:{etcd_client}/health"
            with urllib.request.urlopen(url, timeout=2) as resp:
                return b'"true"' in resp.read()

        _wait(cp, "etcd", etcd_ok, deadline)
        _spawn(
            cp,
            "kube-apiserver",
            [
                str(bins / "kube-apiserver"),
                f"--etcd-servers=http://127.0.0.1:{etcd_client}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={api_port}",
                f"--tls-cert-file={workdir / 'apiserver.crt'}",
                f"--tls-private-key-file={workdir / 'apiserver.key'}",
                f"--client-ca-file={workdir / 'ca.crt'}",
                "--authorization-mode=RBAC",
                f"--service-account-key-file={workdir / 'sa.pub'}",
                f"--service-account-signing-key-file={workdir / 'sa.key'}",
                "--service-account-issuer=https://kubernetes.default.svc",
                "--service-cluster-ip-range=10.0.0.0/24",
                "--endpoint-reconciler-type=none",
                "--allow-privileged=true",
                f"--cert-dir={workdir / 'certs'}",
                "--v=0",
                *apiserver_args,
            ],
        )
        ctx = ssl.create_default_context(cadata=pki.ca_cert.decode())
        ctx.load_cert_chain(str(workdir / "admin.crt"), str(workdir / "admin.key"))
        _wait(cp, "kube-apiserver", lambda: _https_ok(f"{server}/readyz", ctx), deadline)
        cm_port = free_port()
        _spawn(
            cp,
            "kube-controller-manager",
            [
                str(bins / "kube-controller-manager"),
                f"--kubeconfig={cp.kubeconfig}",
                f"--authentication-kubeconfig={cp.kubeconfig}",
                f"--authorization-kubeconfig={cp.kubeconfig}",
                f"--controllers={CONTROLLERS}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={cm_port}",
                f"--cert-dir={workdir / 'cm-certs'}",
                f"--root-ca-file={workdir / 'ca.crt'}",
                f"--service-account-private-key-file={workdir / 'sa.key'}",
                "--concurrent-gc-syncs=5",
                "--v=0",
            ],
        )
        insecure = ssl.create_default_context()
        insecure.check_hostname = False
        insecure.verify_mode = ssl.CERT_NONE  # the controller manager's self-signed serving cert
        _wait(
            cp,
            "kube-controller-manager",
            lambda: _https_ok(f"https://127.0.0.1:{cm_port}/healthz", insecure),
            deadline,
        )
    except BaseException:
        cp.stop()
        raise
    return cp


@contextlib.contextmanager
def control_plane(attempts: int = 3, apiserver_args: Sequence[str] = ()) -> Iterator[ControlPlane]:
    """Start a control plane (retrying on port clashes); stop it and delete its files after.

    ``apiserver_args`` are added to kube-apiserver's command line (bench/operator_scale.py
    passes an audit policy and log this way).
    """
    bins = binaries()
    pki = make_pki()
    last: Exception | None = None
    base = Path(os.environ.get("TXMAIL_TEST_TMP", tempfile.gettempdir()))
    for attempt in range(attempts):
        workdir = Path(tempfile.mkdtemp(prefix="txmail-cp-", dir=base))
        try:
            cp = _start_once(bins, workdir, pki, apiserver_args)
        except ControlPlaneError as exc:
            logs = ControlPlane(workdir, workdir / "kubeconfig", "").logs()
            last = ControlPlaneError(f"attempt {attempt + 1}: {exc}\n{logs}")
            shutil.rmtree(workdir, ignore_errors=True)
            continue
        try:
            yield cp
        finally:
            cp.stop()
            shutil.rmtree(workdir, ignore_errors=True)
        return
    raise ControlPlaneError(f"the control plane did not start: {last}")
