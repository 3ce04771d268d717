"""Registry of compression methods: each method is one module that registers a ``Method`` by name.

A method declares its knobs as a dataclass (names, defaults and a one-line help each, used by the CLI and by
``ojakv.methods()``) and builds one cache layer per decoder layer. Adding a method means one new module here that
calls ``register`` and one import line at the bottom of this file.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import OjaKVError
from .knobs import check_value, knob, parse_value  # noqa: F401  (the knob pipeline, used by every method module)


BUDGET_TOLERANCE = 0.02  # a method may hold this much more than a budget (its knobs are discrete)


@dataclass(frozen=True)
class Sizing:
    """What a method's ``for_budget`` finds: its size knobs for a budget, the held ratio they are predicted to
    give, the least this method can hold for the prompt (``floor``), with what sets that floor, and the most its
    size knobs can use (``ceiling``, with what sets it; None where that is the whole cache or near it)."""

    knobs: dict
    predicted: float
    floor: float
    floor_reason: str = "its fixed parts"
    ceiling: float | None = None
    ceiling_reason: str = ""


class BudgetAboveCeiling(UserWarning):
    """A budget above what a method's size knobs can use: the cache holds less than asked."""


def largest_within(settings, ratio: Callable[[Any], float], budget: float):
    """The last of ``settings`` (ordered from least to most held) whose ``ratio`` stays within ``budget``, or the
    first if none does (the caller then reports the floor)."""
    settings = list(settings)
    fitting = [setting for setting in settings if ratio(setting) <= budget]
    return fitting[-1] if fitting else settings[0]


class UnreachableBudget(OjaKVError):
    """A method's knobs cannot bring it down to the budget asked."""


@dataclass(frozen=True)
class Method:
    """A registered compression method.

    ``build(model, config)`` returns ``(layer_factory, track_positions)``: a callable ``(layer_idx, shared) ->
    CacheLayer`` and whether the layers need token positions stored (to re-apply RoPE at reconstruction).
    ``for_budget(knobs, geometry, prompt_tokens, new_tokens, dtype_bytes, budget) -> Sizing``, where a method
    has one, finds the ``size_knobs`` (a rank, a token capacity, a bit width) whose held bytes, once the prompt
    and the new tokens are cached, come closest to ``budget`` × the full cache's.
    """

    name: str
    summary: str
    config_class: type
    build: Callable[[Any, Any], tuple[Callable, bool]]
    reference: str = ""
    for_budget: Callable[..., Sizing] | None = None
    size_knobs: tuple[str, ...] = ()
    # Whether the prompt's own attention runs on full-precision K/V for this config (compression follows the
    # prefill): then its cache can be derived from one shared full-precision prefill (ojakv.prefill).
    full_prefill: Callable[[Any], bool] = lambda config: False

    def knobs(self) -> list[dict]:
        return [
            {"name": f.name, "default": f.default, "help": f.metadata.get("help", "")}
            for f in dataclasses.fields(self.config_class)
        ]

    def make_config(self, **knobs):
        fields = {f.name: f for f in dataclasses.fields(self.config_class)}
        unknown = sorted(set(knobs) - set(fields))
        if unknown:
            raise OjaKVError(
                f"method {self.name!r} has no knob {', '.join(unknown)}; its knobs are: {', '.join(sorted(fields))}"
            )
        for name, value in knobs.items():  # values of the wrong kind, before validate compares them
            check_value(self.name, fields[name], value)
        config = self.config_class(**knobs)
        validate = getattr(config, "validate", None)
        if validate is not None:
            validate()
        return config


def always(config) -> bool:
    return True


def check_budget(name: str, budget: float, knobs: dict) -> Method:
    """The method, if a budget can size it: a number in (0, 1], a method with size knobs, none of them given."""
    import math

    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget) \
            or not 0.0 < budget <= 1.0:
        raise OjaKVError(f"a budget is a fraction of the full cache in (0, 1], got {budget!r}")
    method = get_method(name)
    if method.for_budget is None:
        raise OjaKVError(f"method {name!r} has no size knob a budget could set: leave budget out")
    clash = sorted(set(knobs) & set(method.size_knobs))
    if clash:
        raise OjaKVError(f"a budget sets {name}'s {', '.join(method.size_knobs)}: give the budget or "
                         f"{', '.join(clash)}, not both")
    return method


def knobs_for_budget(name: str, knobs: dict, model, prompt_tokens: int, new_tokens: int, budget: float) -> dict:
    """``knobs`` plus the method's size knobs for a held-bytes budget, once ``prompt_tokens`` and ``new_tokens``
    are cached. Raises ``UnreachableBudget`` (naming the floor) when the method cannot hold as little.

    The budget is of the whole cache. On hybrid models the sliding-window layers, which no method compresses,
    hold their share of it in full, so the method's layers are sized to what that share leaves."""
    import torch

    from ..hf import geometry

    method = check_budget(name, budget, knobs)
    element = torch.empty(0, dtype=next(model.parameters()).dtype).element_size()
    kept = sliding_share(model, prompt_tokens + new_tokens)
    if kept >= budget:
        raise UnreachableBudget(
            f"{name} cannot hold {budget} of the full cache for {prompt_tokens} + {new_tokens} tokens: the model's "
            f"sliding-window layers, never compressed, alone hold {kept:.3f} of it; use a budget above {kept:.2f} "
            f"(or a longer prompt, where their share is smaller)")

    def whole(ratio: float) -> float:  # a ratio of the compressed layers' cache as a ratio of the whole cache
        return kept + (1 - kept) * ratio

    sizing = method.for_budget(dict(knobs), geometry(model), prompt_tokens, new_tokens, element,
                               (budget - kept) / (1 - kept))
    if whole(sizing.predicted) > budget + BUDGET_TOLERANCE:
        reason = sizing.floor_reason + (", and the sliding-window layers kept in full" if kept else "")
        raise UnreachableBudget(
            f"{name} cannot hold {budget} of the full cache for {prompt_tokens} + {new_tokens} tokens: the least it "
            f"holds is {whole(sizing.floor):.3f} ({reason}); use a budget of at least {whole(sizing.floor):.2f}")
    if sizing.ceiling is not None and whole(sizing.ceiling) < budget - BUDGET_TOLERANCE:
        warn_above_ceiling(name, budget, whole(sizing.ceiling), sizing.ceiling_reason,
                           f"{prompt_tokens} + {new_tokens} tokens")
    return {**knobs, **sizing.knobs}


def warn_above_ceiling(name: str, budget: float, ceiling: float, reason: str, tokens: str) -> None:
    """The one warning for a budget a method cannot use (the Python API and the CLI both show it)."""
    import warnings

    warnings.warn(BudgetAboveCeiling(
        f"{name} can use at most {ceiling:.3f} of the full cache for {tokens} ({reason}), so it holds that, not "
        f"the budget {budget}"),
        stacklevel=3)


def sliding_share(model, tokens: int) -> float:
    """The share of a full cache of ``tokens`` tokens that sliding-window layers hold (0 without such layers):
    each keeps its last ``window - 1`` tokens, a global layer all of them (every layer has the same KV heads)."""
    from ..hf import sliding_windows

    windows = sliding_windows(model)
    sliding = sum(min(window - 1, tokens) for window in windows if window is not None)
    total = sliding + tokens * sum(window is None for window in windows)
    return sliding / total if total else 0.0


_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in _REGISTRY:
        raise ValueError(f"method {method.name!r} is registered twice")
    _REGISTRY[method.name] = method
    return method


def get_method(name: str) -> Method:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise OjaKVError(f"unknown method {name!r}: choose one of {', '.join(sorted(_REGISTRY))}") from None


def registered() -> dict[str, Method]:
    return dict(_REGISTRY)


# Registration happens on import; keep this list in the order the README's method table uses.
from . import full, ojakv, static_pca, latent, streaming_llm, h2o, snapkv, pyramidkv, kivi  # noqa: E402,F401
from . import compose  # noqa: E402,F401  (compositions of the methods above)
from . import pod  # noqa: E402,F401  (after kivi in the README table)
from . import turboquant  # noqa: E402,F401
from . import ojakv_tc  # noqa: E402,F401  (transform-coded OjaKV body)
