"""The Python entry points: build a compressed cache for a model, list the methods."""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager

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


class Compression:
    """What ``compress`` hands back: the caches it made, newest last, so their memory can be inspected."""

    def __init__(self, method: str, knobs: dict):
        self.method, self.knobs = method, knobs
        self.caches: list[CompressedCache] = []

    @property
    def last_cache(self) -> CompressedCache | None:
        return self.caches[-1] if self.caches else None


@contextmanager
def compress(model, method: str = "ojakv", **knobs):
    """Within the block, every ``model.generate`` call without its own ``past_key_values`` (pipelines included)
    gets a fresh compressed cache of ``method`` with ``knobs``.

    >>> with ojakv.compress(model, "ojakv", rank_ratio=0.5) as run:
    ...     model.generate(**inputs, max_new_tokens=32)
    ...     print(run.last_cache.memory().table())
    """
    get_method(method).make_config(**knobs)  # a bad knob fails here, not inside generate
    run = Compression(method, knobs)
    had_own = "generate" in vars(model)
    original = model.generate

    def generate(*args, **kwargs):
        if kwargs.get("past_key_values") is None:
            kwargs["past_key_values"] = make_cache(model, method, **knobs)
            run.caches.append(kwargs["past_key_values"])
        return original(*args, **kwargs)

    model.generate = generate
    try:
        yield run
    finally:
        if had_own:
            model.generate = original
        else:
            del model.generate
