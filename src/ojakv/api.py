"""The Python entry points: build a compressed cache for a model, list the methods."""

from __future__ import annotations

import dataclasses

from .cache import CompressedCache
from .methods import get_method, registered


def make_cache(model, method: str = "ojakv", **knobs) -> CompressedCache:
    """A cache to pass as ``past_key_values=`` to ``model.generate`` or to a hand-written forward loop.

    ``knobs`` are the method's own settings (see ``ojakv.methods()``), e.g. ``rank_ratio=0.5``. A cache serves
    one generation: make a new one for each prompt or batch.
    """
    spec = get_method(method)
    config = spec.make_config(**knobs)
    factory, track_positions = spec.build(model, config)
    return CompressedCache(
        model, factory, method=method, config=dataclasses.asdict(config), track_positions=track_positions
    )


def methods() -> dict[str, dict]:
    """Registered methods: name -> summary, reference and knobs (name, default, help)."""
    return {
        name: {"summary": spec.summary, "reference": spec.reference, "knobs": spec.knobs()}
        for name, spec in registered().items()
    }
