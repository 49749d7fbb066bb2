"""The wheels both image builds install, made outside the image's root by the build venv.

    python image/wheels.py LOCK DIR [PIP_DOWNLOAD_OPTION...]

Run by the build venv's python (image/build.sh's on this machine, the Containerfile's /opt/build
in its build stage): its pip and the locked setuptools of image/build-requirements.lock.

1. ``pip download --require-hashes --no-deps -r LOCK`` (options such as ``--platform`` choose the
   image's platform): each pinned package's wheel, or its source distribution when it has no
   wheel for that platform (pip never picks an sdist over a compatible wheel of the same pin).
   ``--no-build-isolation``: pip reads an sdist's metadata with the build venv's setuptools
   instead of installing a build backend of its own.
2. Every downloaded file is checked again against LOCK's hashes (each must be one of its
   package's, and each package must have exactly one file), so a reused download is too.
3. Each sdist (today dkimpy and pyspf, published without wheels) is built into a wheel by the
   build venv's setuptools, offline (``pip wheel --no-index --no-build-isolation --no-deps``,
   SOURCE_DATE_EPOCH fixed so the same sdist gives the same bytes). The wheel must be pure
   Python (``Root-Is-Purelib: true``, tag ``*-none-any``) and of the pinned name and version;
   otherwise the build stops: a compiled package needs its own wheel on the index.
4. DIR holds the wheels and DIR/install.lock: LOCK's packages, each with the single hash of its
   wheel in DIR, for ``install.sh venv DIR/install.lock WHEEL --no-index --find-links DIR``
   (pip install --require-hashes --only-binary=:all:, in the image's root, with no network).

Only the standard library: the build venv has nothing but pip and setuptools.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

SDIST_SUFFIXES = (".tar.gz", ".zip")
# 1980-01-01, the earliest time a zip file can hold: built wheels are byte-for-byte repeatable.
SOURCE_DATE_EPOCH = "315532800"
REQUIREMENT = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")
HASH = re.compile(r"--hash=sha256:([0-9a-f]{64})")
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", "--quiet"]


class WheelsError(Exception):
    """A lock, download or build the image must not be made from."""


@dataclass(frozen=True)
class Pin:
    name: str
    version: str
    hashes: frozenset[str]

    @property
    def key(self) -> str:
        return normalize(self.name)


def normalize(name: str) -> str:
    """A project name as PEP 503 compares it."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path) -> list[Pin]:
    """The pins of a ``uv pip compile --generate-hashes`` file: ``name==version`` and its
    ``--hash=sha256:`` options; anything else (markers, URLs, editables) is refused."""
    entries: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.split(" #", 1)[0].strip() if not raw.lstrip().startswith("#") else ""
        if not line and not pending:
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        entries.append(pending + line)
        pending = ""
    if pending:
        entries.append(pending)
    pins: list[Pin] = []
    for entry in entries:
        words = entry.split()
        if not words:
            continue
        requirement = REQUIREMENT.fullmatch(words[0])
        hashes = [HASH.fullmatch(word) for word in words[1:]]
        if requirement is None or not hashes or not all(hashes):
            raise WheelsError(f"{path}: not a name==version pin with sha256 hashes: {entry!r}")
        pins.append(
            Pin(requirement[1], requirement[2], frozenset(m[1] for m in hashes if m is not None))
        )
    seen: dict[str, Pin] = {}
    for pin in pins:
        if pin.key in seen:
            raise WheelsError(f"{path}: {pin.name} is pinned twice")
        seen[pin.key] = pin
    return pins


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def match_downloads(pins: list[Pin], folder: Path) -> dict[str, Path]:
    """Each pin's downloaded file, found by its hash (a file no pin lists is refused)."""
    by_hash = {digest: pin for pin in pins for digest in pin.hashes}
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        pin = by_hash.get(sha256(path))
        if pin is None:
            raise WheelsError(f"{path.name}: its sha256 is not in the lock")
        if pin.key in found:
            raise WheelsError(f"{pin.name}: two files downloaded ({found[pin.key].name})")
        found[pin.key] = path
    missing = [pin.name for pin in pins if pin.key not in found]
    if missing:
        raise WheelsError(f"nothing downloaded for {', '.join(missing)}")
    return found


def check_pure_wheel(wheel: Path, pin: Pin) -> None:
    """A wheel built from ``pin``'s sdist: the pinned project and version, pure Python."""
    fields = wheel.name.removesuffix(".whl").split("-")
    if len(fields) not in (5, 6):
        raise WheelsError(f"{wheel.name}: not a wheel file name")
    name, version, abi, platform = fields[0], fields[1], fields[-2], fields[-1]
    if normalize(name) != pin.key or version != pin.version:
        raise WheelsError(f"{wheel.name}: built from {pin.name}=={pin.version}'s sdist")
    with zipfile.ZipFile(wheel) as archive:
        metadata = archive.read(f"{name}-{version}.dist-info/WHEEL").decode()
    purelib = re.search(r"^Root-Is-Purelib:\s*true\s*$", metadata, re.MULTILINE | re.IGNORECASE)
    if (abi, platform) != ("none", "any") or purelib is None:
        raise WheelsError(
            f"{pin.name} {pin.version} has no wheel for the image's platform and its sdist "
            f"builds {wheel.name}, which is not pure Python: the image installs only wheels "
            "from the index and pure-Python wheels built from sdists"
        )


def build_wheel(sdist: Path, pin: Pin, out: Path) -> Path:
    """The wheel of a hash-checked sdist, built offline by this venv's setuptools."""
    build = out / f".build-{pin.key}"
    build.mkdir()
    env = {"SOURCE_DATE_EPOCH": SOURCE_DATE_EPOCH, **os.environ}
    done = subprocess.run(  # noqa: S603 (this venv's pip, on a hash-checked file)
        [
            *PIP,
            "wheel",
            *("--no-deps", "--no-index", "--no-build-isolation", "--no-cache-dir"),
            *("-w", str(build), str(sdist)),
        ],
        env=env,
        check=False,
    )
    if done.returncode != 0:
        raise WheelsError(
            f"{sdist.name}: pip wheel exited {done.returncode}; the build venv has only the "
            "setuptools of image/build-requirements.lock to build it with"
        )
    (wheel,) = build.iterdir()
    check_pure_wheel(wheel, pin)
    target = out / wheel.name
    wheel.rename(target)
    build.rmdir()
    return target


def write_install_lock(path: Path, lock: Path, pins: list[Pin], wheels: dict[str, Path]) -> None:
    lines = [
        f"# Written by image/wheels.py from {lock.name}: each package with the sha256 of its",
        "# wheel in this folder (downloaded, or built from its hash-checked sdist).",
    ]
    for pin in pins:
        wheel = wheels[pin.key]
        lines.append(f"{pin.name}=={pin.version} --hash=sha256:{sha256(wheel)}")
    path.write_text("\n".join(lines) + "\n")


def make_wheels(lock: Path, out: Path, download_options: list[str]) -> list[str]:
    """Fill ``out`` (see the module's documentation); the names of the packages built from
    their sdists."""
    pins = read_lock(lock)
    out.mkdir(parents=True, exist_ok=True)
    downloads = out / ".download"
    downloads.mkdir(exist_ok=True)
    done = subprocess.run(  # noqa: S603 (this venv's pip, the build script's options)
        [
            *PIP,
            "download",
            *("--require-hashes", "--no-deps", "--no-build-isolation"),
            *("-d", str(downloads), "-r", str(lock), *download_options),
        ],
        check=False,
    )
    if done.returncode != 0:
        raise WheelsError(f"pip download of {lock} exited {done.returncode}")
    files = match_downloads(pins, downloads)
    wheels: dict[str, Path] = {}
    built: list[str] = []
    for pin in pins:
        path = files[pin.key]
        if path.name.endswith(".whl"):
            wheels[pin.key] = path.rename(out / path.name)
        elif path.name.endswith(SDIST_SUFFIXES):
            wheels[pin.key] = build_wheel(path, pin, out)
            built.append(f"{pin.name}=={pin.version}")
        else:
            raise WheelsError(f"{path.name}: neither a wheel nor an sdist")
    shutil.rmtree(downloads)
    write_install_lock(out / "install.lock", lock, pins, wheels)
    return built


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print("usage: wheels.py LOCK DIR [PIP_DOWNLOAD_OPTION...]", file=sys.stderr)
        return 2
    try:
        built = make_wheels(Path(argv[0]), Path(argv[1]), argv[2:])
    except WheelsError as e:
        print(f"image/wheels.py: {e}", file=sys.stderr)
        return 1
    if built:
        print(f"image/wheels.py: built from sdists: {', '.join(built)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
