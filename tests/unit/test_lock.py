"""The committed lock files pin what pyproject.toml asks for (`make lock` regenerates them).

The images install only from the locks (`pip install --require-hashes --no-deps`), so a
dependency added to pyproject.toml but not locked would be missing from the image, and a lower
bound raised in pyproject.toml but not in the lock would ship the old release.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import NormalizedName, canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
# The images run Debian bookworm's CPython 3.11 on linux x86_64 (see image/ and Containerfile).
TARGET = {
    "python_version": "3.11",
    "python_full_version": "3.11.2",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "extra": "",
}
PIN = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>\S+)\s*\\?$")
HASH = re.compile(r"^\s+--hash=sha256:[0-9a-f]{64}\s*\\?$")


def _pins(lock: Path) -> dict[NormalizedName, tuple[Version, int]]:
    """Name -> (pinned version, number of hashes) of a `--generate-hashes` lock file."""
    pins: dict[NormalizedName, tuple[Version, int]] = {}
    current: NormalizedName | None = None
    for number, line in enumerate(lock.read_text().splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if match := PIN.match(line):
            current = canonicalize_name(match["name"])
            assert current not in pins, f"{lock.name}:{number}: {current} is pinned twice"
            pins[current] = (Version(match["version"]), 0)
        elif HASH.match(line) and current is not None:
            version, hashes = pins[current]
            pins[current] = (version, hashes + 1)
        else:
            pytest.fail(f"{lock.name}:{number}: not a pin or a sha256 hash: {line!r}")
    return pins


def _unpinned(requirements: list[str], lock: Path) -> list[str]:
    pins = _pins(lock)
    problems = []
    for text in requirements:
        requirement = Requirement(text)
        if requirement.marker is not None and not requirement.marker.evaluate(TARGET):
            continue  # not installed on the image's platform
        name = canonicalize_name(requirement.name)
        if name not in pins:
            problems.append(f"{requirement.name} is not in {lock.name}")
            continue
        version, hashes = pins[name]
        if not requirement.specifier.contains(version, prereleases=True):
            problems.append(f"{name}=={version} in {lock.name} does not satisfy {text!r}")
        if hashes == 0:
            problems.append(f"{name}=={version} in {lock.name} has no hash")
    return problems


def test_every_runtime_dependency_is_pinned_with_hashes() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    problems = _unpinned(project["project"]["dependencies"], ROOT / "requirements.lock")
    assert not problems, "run `make lock`:\n" + "\n".join(problems)


def test_every_pin_has_a_hash() -> None:
    for lock in (ROOT / "requirements.lock", ROOT / "image" / "build-requirements.lock"):
        unhashed = [f"{n}=={v}" for n, (v, hashes) in _pins(lock).items() if hashes == 0]
        assert not unhashed, f"{lock.name}: pins without a hash (run `make lock`): {unhashed}"


def test_the_build_backend_is_pinned() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    problems = _unpinned(
        project["build-system"]["requires"], ROOT / "image" / "build-requirements.lock"
    )
    assert not problems, "run `make lock`:\n" + "\n".join(problems)


def test_a_missing_or_stale_pin_is_reported(tmp_path: Path) -> None:
    lock = tmp_path / "requirements.lock"
    lock.write_text(
        "jinja2==3.1.5 \\\n    --hash=sha256:" + "0" * 64 + "\n    # via -r pyproject.toml\n"
    )
    assert _unpinned(["Jinja2>=3.1.6", "pyyaml>=6.0", "uvloop; sys_platform == 'win32'"], lock) == [
        "jinja2==3.1.5 in requirements.lock does not satisfy 'Jinja2>=3.1.6'",
        "pyyaml is not in requirements.lock",
    ]
