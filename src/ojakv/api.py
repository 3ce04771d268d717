"""The Python entry points: build a compressed cache for a model, list the methods."""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager

from .cache import CompressedCache, LayerPlan
from .errors import OjaKVError
from .hf import attach, cache_argument, cache_keyword, check_supported, is_model
from .methods import check_budget, get_method, knobs_for_budget, registered


def make_cache(model, method: str = "ojakv", *, budget: float | None = None, new_tokens: int = 0,
               **knobs) -> CompressedCache:
    """A cache to pass to ``model.generate`` (``cache=`` from transformers 5.24, ``past_key_values=`` before)
    or to a hand-written forward loop.

    ``knobs`` are the method's own settings (see ``ojakv.methods()``), e.g. ``rank_ratio=0.5``. ``budget`` (held
    bytes / the full cache's) instead sets the method's size knobs when the cache sees the prompt, for the
    prompt plus ``new_tokens`` generated ones; a budget the method cannot reach raises then, naming its floor.
    A cache serves one generation; it keeps ojakv's hooks on the model until ``close()`` (or the end of a
    ``with`` block, or its garbage collection).
    """
    _check_model(model)
    if budget is None:
        spec, config = _config(method, knobs)
        return CompressedCache(model, _plan(spec, model, config), method=method)
    check_budget(method, budget, knobs)
    _config(method, knobs)  # a bad knob fails now, not at the prompt
    if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens < 0:
        raise OjaKVError(f"new_tokens is a count of tokens to be generated (>= 0), got {new_tokens!r}")

    def plan_for_prompt(prompt_tokens: int) -> LayerPlan:
        spec, config = _config(method, knobs_for_budget(method, knobs, model, prompt_tokens, new_tokens, budget))
        return _plan(spec, model, config)

    return CompressedCache(model, method=method, plan_for_prompt=plan_for_prompt)


def _plan(spec, model, config) -> LayerPlan:
    factory, track_positions = spec.build(model, config)
    return LayerPlan(factory, track_positions, dataclasses.asdict(config))


def _check_model(model) -> None:
    """A transformers model of a supported family, or one line saying what to pass instead."""
    if not is_model(model):
        raise OjaKVError(f"expected a Hugging Face causal language model (e.g. from ojakv.load_model(...)), "
                         f"got {type(model).__name__}")
    check_supported(model.config)


def _config(method: str, knobs: dict):
    """The method and its validated config (knobs of the wrong kind refused first, ``methods.knobs``)."""
    spec = get_method(method)
    return spec, spec.make_config(**knobs)


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
    """Within the block, every ``model.generate`` call without its own cache (pipelines included) gets a fresh
    compressed cache of ``method`` with ``knobs`` (``budget=`` too). At the end of the block the model is as it
    was: its ``generate``, hooks and attention implementation restored, the caches made closed (their
    ``memory()`` still readable).

    >>> with ojakv.compress(model, "ojakv", rank_ratio=0.5) as run:
    ...     model.generate(**inputs, max_new_tokens=32)
    ...     print(run.last_cache.memory().table())
    """
    _check_model(model)
    make_cache(model, method, **knobs).close()  # a bad knob or budget fails here, not inside generate
    run = Compression(method, knobs)
    had_own = "generate" in vars(model)
    original = model.generate
    keyword = cache_keyword(type(model))

    def generate(*args, **kwargs):
        if cache_argument(kwargs) is None:
            kwargs.pop("past_key_values", None)
            kwargs[keyword] = make_cache(model, method, **knobs)
            run.caches.append(kwargs[keyword])
        return original(*args, **kwargs)

    model.generate = generate
    release = attach(model)  # the hooks stay for the block; each cache adds latent attention for its lifetime
    try:
        yield run
    finally:
        release()
        if had_own:
            model.generate = original
        else:
            del model.generate
        for cache in run.caches:
            cache.close()
