"""The image `make image` builds: imports into containerd under its reference, runs read-only
as UID 65532 with only /tmp writable, carries the Containerfile's configuration, and stays
under 150 MB compressed."""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from image.containerfile import final_stage_config
from image.oci import cannot_run_containerd, ctr, import_archive, private_containerd, read_layout

pytestmark = pytest.mark.node

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "requirements.lock"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
REF = f"ghcr.io/txmail/txmail:{VERSION}"
PAUSE_REF = "localhost/txmail/pause:3.10"


def _build(*args: str) -> Path:
    """image/build.sh's archive (cached: built once per lock file and source tree)."""
    done = subprocess.run(
        [str(ROOT / "image" / "build.sh"), *args],
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    assert done.returncode == 0, f"image/build.sh {' '.join(args)} failed:\n{done.stderr}"
    archive = Path(done.stdout.strip().splitlines()[-1])
    assert archive.is_file(), done.stdout
    return archive


@pytest.fixture(scope="module")
def archive() -> Path:
    return _build()


@pytest.fixture(scope="module")
def containerd() -> Iterator[Path]:
    reason = cannot_run_containerd()
    if reason is not None:
        pytest.skip(f"cannot run a private containerd here: {reason}")
    with private_containerd() as socket:
        yield socket


@pytest.fixture(scope="module")
def imported(containerd: Path, archive: Path) -> str:
    return import_archive(containerd, archive)


def _run(containerd: Path, *command: str) -> subprocess.CompletedProcess[str]:
    """``command`` in a container of the image: read-only root, a tmpfs /tmp (as the relay
    Deployment's emptyDir), the image's own user, no network but loopback."""
    name = f"txmail-image-test-{secrets.token_hex(4)}"
    return subprocess.run(
        [
            "ctr",
            "--address",
            str(containerd),
            "--namespace",
            "k8s.io",
            "run",
            "--rm",
            # The client's FIFOs where the shims (in containerd's mount namespace) see them.
            "--fifo-dir",
            str(containerd.parent / "fifo"),
            "--read-only",
            "--cgroup",
            f"/{name}",
            "--mount",
            "type=tmpfs,src=tmpfs,dst=/tmp,options=nosuid:nodev:mode=1777:size=16m",
            REF,
            name,
            *command,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_compressed_layers_stay_under_150_mb(archive: Path) -> None:
    _, manifest, _ = read_layout(archive)
    compressed = sum(layer["size"] for layer in manifest["layers"])
    assert all(layer["mediaType"].endswith("tar+gzip") for layer in manifest["layers"])
    assert compressed < 150_000_000, f"{compressed / 1e6:.0f} MB compressed"


def test_the_image_is_configured_as_the_containerfile_says(archive: Path) -> None:
    _, _, config = read_layout(archive)
    assert (config["os"], config["architecture"]) == ("linux", "amd64")
    image = config["config"]
    expected = final_stage_config(ROOT / "Containerfile")
    assert image["User"] == expected.user == "65532:65532"
    assert image["Cmd"] == expected.cmd == ["txmail-operator"]
    assert "Entrypoint" not in image or not image["Entrypoint"]
    assert image.get("WorkingDir") == expected.workdir
    assert dict(e.split("=", 1) for e in image["Env"]) == expected.env
    assert image["Labels"] == expected.labels
    assert image["Labels"]["org.opencontainers.image.version"] == VERSION


def test_both_archives_import_under_their_references(containerd: Path, imported: str) -> None:
    assert imported == REF
    assert import_archive(containerd, _build("pause")) == PAUSE_REF
    listed = ctr(containerd, "images", "list", "--quiet").split()
    assert REF in listed
    assert PAUSE_REF in listed
    _, _, pause = read_layout(_build("pause"))
    assert pause["config"]["Entrypoint"] == ["/pause"]
    assert pause["config"]["User"] == "65535:65535"


CHECK = """
import errno, importlib.metadata, json, os
import txmail_operator.__main__, txmail_relay.__main__
import dkim, spf
try:
    open("/opt/txmail/probe", "w")
    root = "writable"
except OSError as e:
    root = errno.errorcode[e.errno]
with open("/tmp/probe", "w") as f:
    f.write("ok")
print(json.dumps({"uid": os.getuid(), "gid": os.getgid(), "root": root,
                  "version": importlib.metadata.version("txmail")}))
"""


def test_runs_read_only_as_65532_with_both_programs(containerd: Path, imported: str) -> None:
    done = _run(containerd, "python3", "-c", CHECK)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {
        "uid": 65532,
        "gid": 65532,
        "root": "EROFS",
        "version": VERSION,
    }


DISTRIBUTIONS = """
import importlib.metadata, json
print(json.dumps([[d.metadata["Name"], d.version] for d in importlib.metadata.distributions()]))
"""


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_the_venv_holds_exactly_the_locked_packages(containerd: Path, imported: str) -> None:
    """requirements.lock's pins (wheels, and the pure-Python sdists built into wheels, such as
    dkimpy and pyspf) and txmail; pip and setuptools are gone."""
    pins = re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", LOCK.read_text(), re.MULTILINE)
    done = _run(containerd, "python3", "-c", DISTRIBUTIONS)
    assert done.returncode == 0, done.stderr
    installed = json.loads(done.stdout.strip().splitlines()[-1])
    assert sorted((_normalize(name), version) for name, version in installed) == sorted(
        [(_normalize(name), version) for name, version in pins] + [("txmail", VERSION)]
    )


DKIM_SIGNS = """
import dkim, spf
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
public = key.public_key().public_bytes(serialization.Encoding.DER,
                                       serialization.PublicFormat.SubjectPublicKeyInfo)
import base64
record = b"v=DKIM1; k=rsa; p=" + base64.b64encode(public)
message = b"From: a@example.com\\r\\nTo: b@example.org\\r\\nSubject: hi\\r\\n\\r\\nHello\\r\\n"
signature = dkim.sign(message, b"s1", b"example.com", private, include_headers=[b"from"])
print(dkim.verify(signature + message, dnsfunc=lambda name, timeout=5: record), spf.__name__)
"""


def test_dkimpy_and_pyspf_work_in_the_image(containerd: Path, imported: str) -> None:
    """The two sdist-only dependencies (built into wheels by the image build): dkimpy signs
    and verifies a message (the key served by a lookup function, no network), pyspf imports."""
    done = _run(containerd, "python3", "-c", DKIM_SIGNS)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "spf"]


def test_every_module_is_loaded_from_precompiled_bytecode(containerd: Path, imported: str) -> None:
    """Nothing is compiled at start-up (the root is read-only, so nothing could be cached)."""
    done = _run(
        containerd,
        "python3",
        "-v",
        "-c",
        "import txmail_operator.handlers, txmail_relay.app, dkim, spf",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = [line for line in done.stderr.splitlines() if line.startswith("# code object from")]
    assert len(loaded) > 100
    from_source = [line for line in loaded if not line.endswith(".pyc'")]
    assert not from_source, "\n".join(from_source[:10])


def test_the_relay_entry_point_takes_the_deployments_args(containerd: Path, imported: str) -> None:
    """The relay Deployment runs ``command: [txmail-relay]`` with ``args: [--config, ...]``;
    a settings file that does not exist is a one-line error and exit 2."""
    done = _run(containerd, "txmail-relay", "--help")
    assert done.returncode == 0, done.stderr
    assert "--config" in done.stdout
    missing = _run(containerd, "txmail-relay", "--config", "/etc/txmail/missing.yaml")
    assert missing.returncode == 2, missing.stderr


def test_the_operator_entry_point_is_the_default_command(containerd: Path, imported: str) -> None:
    done = _run(containerd, "txmail-operator", "--version")
    assert done.returncode == 0, done.stderr
    assert VERSION in done.stdout
