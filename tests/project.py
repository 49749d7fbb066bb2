"""Paths of the project, for tests and the demo."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CRDS = ROOT / "crds"
