"""OCI archives of ``image/build.sh`` in a containerd: import them, and a private containerd.

``import_archive`` is what the node tier uses to put the images into its node's containerd;
``private_containerd`` is a throwaway containerd of its own (root, state, socket and
``/run/containerd`` all private) for tests that only need to import and run an image.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

NAMESPACE = "k8s.io"  # the kubelet's (CRI's) containerd namespace
NAME_ANNOTATION = "io.containerd.image.name"  # the full reference containerd imports under
REF_ANNOTATION = "org.opencontainers.image.ref.name"


def read_layout(archive: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The index, the (single) manifest and the image config of an OCI archive."""
    with tarfile.open(archive) as tar:

        def blob(name: str) -> dict[str, Any]:
            member = tar.extractfile(name.removeprefix("./"))
            if member is None:
                raise ValueError(f"{archive}: {name} is not a file")
            value: dict[str, Any] = json.load(member)
            return value

        index = blob("index.json")
        manifests = index.get("manifests", [])
        if len(manifests) != 1:
            raise ValueError(f"{archive}: expected one image, found {len(manifests)}")
        manifest = blob("blobs/" + manifests[0]["digest"].replace(":", "/"))
        config = blob("blobs/" + manifest["config"]["digest"].replace(":", "/"))
    return index, manifest, config


def archive_reference(archive: Path) -> str:
    """The image reference an OCI archive written by image/build.sh carries."""
    index, _, _ = read_layout(archive)
    annotations = index["manifests"][0].get("annotations", {})
    ref = annotations.get(NAME_ANNOTATION)
    if not ref:
        raise ValueError(f"{archive}: the image has no {NAME_ANNOTATION} annotation")
    return str(ref)


def ctr(socket: Path, *args: str, namespace: str = NAMESPACE, timeout: float = 300) -> str:
    """Run ``ctr`` against the containerd at ``socket``; its stdout, or an error with stderr."""
    command = ["ctr", "--address", str(socket), "--namespace", namespace, *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command)} exited {done.returncode}: {done.stderr.strip() or done.stdout}"
        )
    return done.stdout


def import_archive(socket: Path, archive: Path, namespace: str = NAMESPACE) -> str:
    """Import an OCI archive into the containerd at ``socket`` (unpacked for its default
    snapshotter) and return the image reference it is listed under."""
    ref = archive_reference(archive)
    ctr(socket, "images", "import", str(archive), namespace=namespace)
    listed = ctr(socket, "images", "list", "--quiet", namespace=namespace).split()
    if ref not in listed:
        raise RuntimeError(f"importing {archive} did not list {ref} (listed: {listed})")
    return ref


def cannot_run_containerd() -> str | None:
    """Why this machine cannot run a private containerd, or None when it can."""
    if os.geteuid() != 0:
        return "a private containerd needs root"
    for tool in ("containerd", "ctr", "runc", "unshare"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (make debs)"
    probe = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "mount", "-t", "tmpfs", "t", "/run"],
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0:
        return f"cannot make a private mount namespace: {probe.stderr.strip()}"
    return None


CONFIG = """\
version = 2
root = "{work}/root"
state = "{work}/state"
oom_score = 0

[grpc]
  address = "{work}/containerd.sock"

[plugins."io.containerd.internal.v1.opt"]
  path = "{work}/opt"

[plugins."io.containerd.grpc.v1.cri"]
  # Root here may not lower oom_score_adj (pod sandboxes would fail to start).
  restrict_oom_score_adj = true
  sandbox_image = "localhost/txmail/pause:3.10"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "{snapshotter}"
"""


@contextlib.contextmanager
def private_containerd(snapshotter: str = "overlayfs", timeout: float = 60) -> Iterator[Path]:
    """A containerd of its own, in a private mount namespace with a tmpfs over ``/run`` (so
    its shims and runc state stay out of the host's ``/run/containerd``) and its root, state
    and socket in a new temporary folder; yields the socket, then stops it and removes it all.
    """
    # Short: the socket path (and containerd's ".ttrpc" next to it) must fit in sun_path.
    work = Path(tempfile.mkdtemp(prefix="txctrd-", dir="/tmp"))
    config = work / "config.toml"
    config.write_text(CONFIG.format(work=work, snapshotter=snapshotter))
    socket = work / "containerd.sock"
    log = work / "containerd.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                'mount -t tmpfs -o mode=0755 tmpfs /run && exec containerd --config "$0"',
                str(config),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"containerd exited {process.returncode}:\n{log.read_text()}")
            if socket.exists():
                with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                    ctr(socket, "version", timeout=5)
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"containerd not serving after {timeout} s:\n{log.read_text()}")
            time.sleep(0.1)
        yield socket
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        # The snapshots were mounted only in containerd's own mount namespace, gone with it.
        shutil.rmtree(work, ignore_errors=True)
