"""The real Helm CLI (built by tests/cluster/build.sh) against charts/txmail."""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from cluster.controlplane import binaries
from project import ROOT

CHART = ROOT / "charts" / "txmail"
VALUES = Path(__file__).resolve().parent / "values"
RELEASE = "txmail"
NAMESPACE = "txmail-system"

Obj = dict[str, Any]


@functools.cache
def helm() -> Path:
    return binaries() / "helm"


@functools.cache
def _home() -> str:
    """Helm's cache, config and data folders: private to this process, never ~/.cache/helm,
    and removed when it exits."""
    home = tempfile.mkdtemp(prefix="txmail-helm-")
    atexit.register(shutil.rmtree, home, ignore_errors=True)
    return home


def run(*args: str) -> subprocess.CompletedProcess[str]:
    home = _home()
    env = {
        **os.environ,
        "HELM_CACHE_HOME": f"{home}/cache",
        "HELM_CONFIG_HOME": f"{home}/config",
        "HELM_DATA_HOME": f"{home}/data",
    }
    env.pop("KUBECONFIG", None)  # rendering never talks to a cluster
    return subprocess.run(
        [str(helm()), *args], capture_output=True, text=True, timeout=120, env=env, check=False
    )


def template_args(
    values: Sequence[Path | str] = (),
    sets: Sequence[str] = (),
    show_only: Sequence[str] = (),
    release: str = RELEASE,
    namespace: str = NAMESPACE,
) -> list[str]:
    args = ["template", release, str(CHART), "--namespace", namespace]
    args += [f"--values={VALUES / v if isinstance(v, str) else v}" for v in values]
    args += [f"--set={s}" for s in sets]
    args += [f"--show-only={s}" for s in show_only]
    return args


def render(
    values: Sequence[Path | str] = (),
    sets: Sequence[str] = (),
    show_only: Sequence[str] = (),
    release: str = RELEASE,
    namespace: str = NAMESPACE,
) -> str:
    """`helm template` output; AssertionError with Helm's message when it fails."""
    out = run(*template_args(values, sets, show_only, release, namespace))
    if out.returncode != 0:
        raise AssertionError(f"helm template failed: {out.stderr.strip()}")
    return out.stdout


def objects(
    values: Sequence[Path | str] = (),
    sets: Sequence[str] = (),
    show_only: Sequence[str] = (),
    release: str = RELEASE,
    namespace: str = NAMESPACE,
) -> list[Obj]:
    docs = yaml.safe_load_all(render(values, sets, show_only, release, namespace))
    return [d for d in docs if d]


def kinds(objs: list[Obj], kind: str) -> list[Obj]:
    return [o for o in objs if o["kind"] == kind]
