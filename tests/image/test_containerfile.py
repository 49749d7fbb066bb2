"""The Containerfile and image/build.sh build the same image: the parts that need no build."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from image.containerfile import final_stage_config

ROOT = Path(__file__).resolve().parents[2]


def test_the_containerfile_labels_the_package_version() -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    labels = final_stage_config(ROOT / "Containerfile").labels
    assert labels["org.opencontainers.image.version"] == version


def test_build_sh_packs_the_containerfiles_configuration() -> None:
    """Every ENV, LABEL, USER, WORKDIR and CMD of the Containerfile's image appears in the
    ``umoci config`` of image/build.sh (the node tier compares the built image itself)."""
    expected = final_stage_config(ROOT / "Containerfile")
    script = (ROOT / "image" / "build.sh").read_text()
    options = re.findall(
        r"--config\.(\w+) (\"[^\"]*\"|\S+)", script.split('umoci_pack "$tmp/oci" "$version"')[1]
    )
    packed: dict[str, list[str]] = {}
    for option, value in options:
        packed.setdefault(option, []).append(value.strip('"'))
    assert packed["user"] == [expected.user]
    assert packed["workingdir"] == [expected.workdir]
    assert packed["cmd"] == expected.cmd
    assert sorted(packed["env"]) == sorted(f"{k}={v}" for k, v in expected.env.items())
    source_url = re.search(r"^source_url=(\S+)$", script, re.MULTILINE)
    assert source_url is not None
    labels = dict(
        label.replace("$source_url", source_url[1]).split("=", 1) for label in packed["label"]
    )
    assert labels.pop("org.opencontainers.image.version") == "$version"
    expected.labels.pop("org.opencontainers.image.version")
    assert labels == expected.labels


def test_both_builds_install_the_wheels_of_image_wheels_py_offline() -> None:
    """Each build runs image/wheels.py on requirements.lock with its build venv's python (the
    locked setuptools builds the pure-Python sdists), then image/install.sh installs the
    install.lock it wrote from its folder alone: hash-checked, binary only, no index."""
    containerfile = " ".join((ROOT / "Containerfile").read_text().replace("\\\n", " ").split())
    script = " ".join((ROOT / "image" / "build.sh").read_text().replace("\\\n", " ").split())

    assert "/opt/build/bin/python /mnt/image/wheels.py /src/requirements.lock /wheels" in (
        containerfile
    )
    assert (
        "sh /mnt/image/install.sh venv /wheels/install.lock /dist/txmail-*.whl"
        " --no-index --find-links /wheels"
    ) in containerfile
    assert '"$tmp/venv/bin/python" image/wheels.py requirements.lock "$wheels"' in script
    assert 'cp "$wheels"/*.whl "$stage/wheels/"' in script
    assert 'cp "$wheels/install.lock"' in script
    assert (
        "sh $in/install.sh venv $in/install.lock $in/$wheel --no-index --find-links $in/wheels"
    ) in script
    # The build venvs both hold image/build-requirements.lock, binary and hash-checked.
    build_venv = "--require-hashes --no-deps --only-binary=:all:"
    assert f"{build_venv} -r /src/image/build-requirements.lock" in containerfile
    assert f"{build_venv} -r image/build-requirements.lock" in script
    # install.sh keeps pip to hash-checked wheels, whatever the options it is passed.
    install = (ROOT / "image" / "install.sh").read_text()
    assert '$pip install --require-hashes --no-deps --only-binary=:all: "$@" -r "$lock"' in install
