"""Hypothesis profiles for the fuzz targets, and the relay fixtures the SMTP target uses.

``quick`` (the default, what ``make test`` runs): few examples per target, so every target
together stays under a minute. ``fuzz`` (``make fuzz``, ``HYPOTHESIS_PROFILE=fuzz``):
thousands. Failing examples are kept in ``.hypothesis/examples`` at the repository root and
replayed first on the next run.
"""

from __future__ import annotations

import os
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis.database import DirectoryBasedExampleDatabase

from relay.relaykit import env, sink, sink_factory, tls_files

__all__ = ["env", "sink", "sink_factory", "tls_files"]

DATABASE = DirectoryBasedExampleDatabase(Path(__file__).parents[2] / ".hypothesis" / "examples")
_COMMON = {
    "database": DATABASE,
    "deadline": None,  # timing is bench/'s business; a slow example is not a failure
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
}
settings.register_profile("quick", max_examples=60, **_COMMON)  # type: ignore[arg-type]
settings.register_profile("fuzz", max_examples=5_000, **_COMMON)  # type: ignore[arg-type]
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "quick"))


def examples(quick: int) -> int:
    """Examples for a slow target: ``quick`` in the quick profile, a fifth of the fuzz
    profile's otherwise (each SMTP example is a real transaction)."""
    if os.environ.get("HYPOTHESIS_PROFILE", "quick") == "quick":
        return quick
    return max(quick, int(settings.get_profile("fuzz").max_examples) // 5)
