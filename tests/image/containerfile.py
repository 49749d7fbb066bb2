"""The run-time configuration the Containerfile's final stage declares (ENV, USER, WORKDIR, CMD,
LABEL), to compare with the image ``image/build.sh`` packs."""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class StageConfig:
    env: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    user: str | None = None
    workdir: str | None = None
    cmd: list[str] | None = None


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    result: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        pending += line
        keyword, _, rest = pending.partition(" ")
        result.append((keyword.upper(), rest.strip()))
        pending = ""
    return result


def _pairs(arguments: str) -> dict[str, str]:
    return dict(word.split("=", 1) for word in shlex.split(arguments))


def final_stage_config(containerfile: Path) -> StageConfig:
    """The configuration of the last stage: the image's."""
    config = StageConfig()
    for keyword, arguments in _instructions(containerfile.read_text()):
        if keyword == "FROM":
            config = StageConfig()
        elif keyword == "ENV":
            config.env.update(_pairs(arguments))
        elif keyword == "LABEL":
            config.labels.update(_pairs(arguments))
        elif keyword == "USER":
            config.user = arguments
        elif keyword == "WORKDIR":
            config.workdir = arguments
        elif keyword == "CMD":
            config.cmd = json.loads(arguments)
    return config
