"""The Python entry points: build a compressed cache for a model, list the methods."""

from __future__ import annotations

import dataclasses
import math
import numbers
from contextlib import contextmanager

from .cache import CompressedCache
from .errors import OjaKVError
from .methods import get_method, registered


def make_cache(model, method: str = "ojakv", **knobs) -> CompressedCache:
    """A cache to pass as ``past_key_values=`` to ``model.generate`` or to a hand-written forward loop.

    ``knobs`` are the method's own settings (see ``ojakv.methods()``), e.g. ``rank_ratio=0.5``. A cache serves
    one generation: make a new one for each prompt or batch.
    """
    _check_model(model)
    spec, config = _config(method, knobs)
    factory, track_positions = spec.build(model, config)
    return CompressedCache(
        model, factory, method=method, config=dataclasses.asdict(config), track_positions=track_positions
    )


def _check_model(model) -> None:
    """A transformers model of a supported family, or one line saying what to pass instead."""
    import torch

    from .models import check_supported

    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise OjaKVError(f"expected a Hugging Face causal language model (e.g. from ojakv.load_model(...)), "
                         f"got {type(model).__name__}")
    check_supported(model.config)


def _config(method: str, knobs: dict):
    """The method and its validated config; knob values of the wrong type are refused before ``validate``
    compares them (which would raise a TypeError, or accept a float where an index is needed)."""
    spec = get_method(method)
    fields = {f.name: f for f in dataclasses.fields(spec.config_class)}
    for name, value in knobs.items():
        if name in fields:
            _check_knob_type(spec.name, fields[name], value)
    return spec, spec.make_config(**knobs)


def _check_knob_type(method: str, field: dataclasses.Field, value) -> None:
    annotation = str(field.type)
    if value is None:
        if "None" not in annotation:
            raise OjaKVError(f"{method} knob {field.name} cannot be None: leave it out for its default "
                             f"({field.default!r})")
        return
    number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if "bool" in annotation:
        expected, ok = "True or False", isinstance(value, bool)
    elif "float" in annotation:
        expected, ok = "a finite number", number and math.isfinite(value)
    elif "int" in annotation:
        expected, ok = "a whole number", number and isinstance(value, numbers.Integral)
    elif "str" in annotation:
        expected, ok = "a string", isinstance(value, str)
    else:
        return
    if not ok:
        example = f" (default {field.default!r})" if field.default is not None else ""
        raise OjaKVError(f"{method} knob {field.name} takes {expected}, got {value!r}{example}")


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
    _check_model(model)
    _config(method, knobs)  # a bad knob fails here, not inside generate
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
