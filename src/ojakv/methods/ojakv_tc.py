"""``ojakv-tc``, and how ``ojakv`` sizes itself for a budget: OjaKV with a transform-coded body.

The hybrid layout of ``ojakv`` (full-precision anchors and window, everything else in per-head subspaces), with
the prompt attended in full and the body coded as ``ojakv.transform_coding`` describes: per layer, ``body_bits`` ×
d bits per token go to the principal coefficients by greedy reverse water-filling on the prompt's spectrum, and
the coefficients left with no bits are dropped (the rank follows from the bits instead of being set). Each row is
stored as a float16 gain and per-coefficient Lloyd–Max codes of its whitened shape.

Basis updates while decoding are off by default (``eta_decode=0``): each update would decode, re-express and
code again every stored row (one more rounding each time), and without updates no Oja statistics are held and
the bases are kept in int8 (``Int8Basis``). With ``eta_decode > 0`` the rows are re-coded in the new basis with the prompt's
scales, which loses retrieval (docs/RESULTS.md, context shift): that setting is there to measure, not to use.

Given a budget, ``ojakv`` (unless told ``coef_bits``) and ``ojakv-tc`` choose ``body_bits`` with ``fit_bases``:
the budget's bytes per body token pay for the codes and for the bases, spread over every body row the cache will
hold (the prompt's and the ``new_tokens`` to come), and each layer keeps the most bits (and so the rank) its own
spectrum lets it afford. ``ojakv`` also lowers its anchors (sinks and recent window) when they would leave the
body too few bits (``ANCHOR_LADDER``). Knobs the user gives stay as given.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..transform_coding import MAX_BITS
from . import Method, Sizing, knob, largest_within, register
from .ojakv import (CODED_SIZE, OjaKVConfig, budget_to_rank, build_low_rank, held_bytes_per_head,
                    prefill_attends_in_full)

BITS_STEP = 1 / 64  # budgets map to whole bits per token on a 64-dim head, finer on wider ones
# What ``ojakv`` given only a budget runs, besides the body's bits: the prompt attended in full (a compressed
# prefill loses the needle tasks, docs/RESULTS.md) and bases kept from the prompt (each re-coding adds rounding).
BUDGET_DEFAULTS = {"prefill_attention": "full", "eta_decode": 0.0}


@dataclass
class OjaKVTCConfig(OjaKVConfig):
    body_bits: float = knob(2.0, "average bits per body coordinate (over head_dim), allocated to the KL "
                                 "coefficients by variance; 0 = coefficients in the model's dtype (rank knobs)")
    prefill_attention: str = knob("full", "the prompt attends in full; the body is coded after it")
    eta_decode: float = knob(0.0, "Oja step every update_interval decoded tokens (0 = the prompt's basis is kept)")


def transform_coded_budget(config_class: type, defaults: dict):
    """A ``for_budget`` choosing the most body bits (with ``fit_bases``) whose predicted held bytes stay within
    the budget; ``defaults`` fill the knobs the user left out."""

    def for_budget(knobs, geometry, prompt_tokens, new_tokens, dtype_bytes, budget) -> Sizing:
        d = geometry.head_dim
        full = 2 * (prompt_tokens + new_tokens) * d * dtype_bytes
        shared_positions = 4 / (geometry.num_layers * geometry.num_kv_heads)
        chosen = {**{k: v for k, v in defaults.items() if k not in knobs}, "fit_bases": True,
                  "fit_new_tokens": new_tokens, "rank": None, "rank_ratio": None, "energy": None}

        def ratio(bits_per_coordinate: float) -> float:
            sized = config_class(**{**knobs, **chosen, "body_bits": bits_per_coordinate})
            return held_bytes_per_head(sized, geometry, prompt_tokens, new_tokens, d, dtype_bytes,
                                       shared_positions) / full

        steps = [round(k * BITS_STEP * 64 / d, 6) for k in range(1, math.floor(MAX_BITS / BITS_STEP * d / 64) + 1)]
        best = largest_within(steps, ratio, budget)
        return Sizing({**chosen, "body_bits": best}, ratio(best), ratio(steps[0]),
                      "1 bit per token, plus the full-precision anchors and window",
                      ratio(steps[-1]), f"a body of {MAX_BITS} bits per coordinate")

    return for_budget


_RANK_AT_UNIFORM_CODES = budget_to_rank(OjaKVConfig)
_CODED_BODY = transform_coded_budget(OjaKVConfig, BUDGET_DEFAULTS)
# Sinks and recent window (each this many tokens) ``ojakv`` tries for a budget: its defaults, then the fewest
# measured, and the body bits per coordinate it keeps the defaults for. Below about 1.8 bits the coded body loses
# the pass key (docs/RESULTS.md, "Fewer anchors at 0.15"; 4 + 4 there found every pass key, and no fewer essay
# needles than 8 + 8 or 16 + 16), so at small budgets on short prompts the anchors give their bytes back to the body; where
# the budget leaves the body enough, the defaults stay.
ANCHOR_LADDER = (32, 4)
MIN_BODY_BITS = 1.9


def anchored_coded_budget(knobs, *args) -> Sizing:
    """The coded body's sizing with the first anchors of ``ANCHOR_LADDER`` that leave it ``MIN_BODY_BITS`` (the
    last if none does); anchors the user gives stay as given."""
    if "n_sink" in knobs or "n_recent" in knobs:
        return _CODED_BODY(knobs, *args)
    for n in ANCHOR_LADDER:
        anchors = {"n_sink": n, "n_recent": n}
        sizing = _CODED_BODY({**knobs, **anchors}, *args)
        if sizing.knobs["body_bits"] >= MIN_BODY_BITS:
            break
    return dataclasses.replace(sizing, knobs={**sizing.knobs, **anchors},
                               floor_reason=f"1 bit per token, plus {n} + {n} full-precision anchors and window")


def ojakv_budget(knobs, *args) -> Sizing:
    """``ojakv`` for a budget: a transform-coded body, or the rank at uniform codes when ``coef_bits`` is given."""
    return (_RANK_AT_UNIFORM_CODES if knobs.get("coef_bits") else anchored_coded_budget)(knobs, *args)


register(Method(name="ojakv-tc", summary="OjaKV with a transform-coded body: bits allocated by variance in the KL basis",
                config_class=OjaKVTCConfig, build=build_low_rank,
                for_budget=transform_coded_budget(OjaKVTCConfig, {}), size_knobs=CODED_SIZE,
                full_prefill=prefill_attends_in_full,
                reference="Zhu et al., OjaKV, arXiv 2509.21623; transform coding: Huang & Schultheiss 1963"))
