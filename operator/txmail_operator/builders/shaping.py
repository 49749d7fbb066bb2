"""spec.shaping -> RelayConfig.shaping: the user's overrides, as the relay reads them (it
holds the built-in defaults and merges; docs/deliverability.md "Per-destination shaping")."""

from __future__ import annotations

from txmail_relay import contract as c

from ..api.shaping import Shaping, ShapingLimits


def _limits(limits: ShapingLimits | None) -> dict[str, object]:
    if limits is None:
        return {}
    return limits.model_dump(exclude_none=True, include=set(c.ShapingLimits.model_fields))


def shaping_config(spec: Shaping | None) -> c.ShapingConfig:
    """What is set in ``spec`` (None: the relay's defaults, shaping on)."""
    if spec is None:
        return c.ShapingConfig()
    pause = spec.pause.model_dump(exclude_none=True) if spec.pause is not None else {}
    return c.ShapingConfig(
        enabled=spec.enabled,
        default=c.ShapingLimits(**_limits(spec.default)),
        sites=[
            c.ShapingSite(name=site.name, mx=list(site.mx or []), **_limits(site))
            for site in spec.sites or []
        ],
        pause=c.ShapingPause(**pause),
    )
