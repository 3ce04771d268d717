"""``ojakv-tc``: OjaKV with a transform-coded body (bits allocated by variance in the prompt's KL basis).

The hybrid layout of ``ojakv`` (full-precision anchors and window, everything else in per-head subspaces), with
the prompt attended in full and the body coded as ``transform_coding`` describes: per layer, ``body_bits`` × d
bits per token go to the principal coefficients by greedy reverse water-filling on the prompt's spectrum, and the
coefficients left with no bits are dropped (the rank follows from the budget instead of being set). Each row is
stored as a float16 gain and per-coefficient Lloyd–Max codes of its whitened shape.

Basis updates while decoding are off by default (``eta_decode=0``): each update would decode, re-express and
code again every stored row (one more rounding each time), and without updates no Oja statistics are held.
With ``eta_decode > 0`` the rows are re-coded in the new basis with the prompt's scales.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import OjaKVError
from ..subspace import covariance, eigh_descending
from ..transform_coding import MAX_BITS, TransformCodedRows, ordered_allocation
from . import Method, Sizing, knob, largest_within, register
from .ojakv import OjaKVConfig, OjaKVLayer, build_low_rank, held_bytes_per_head, prefill_attends_in_full

BITS_STEP = 1 / 64  # budgets map to whole bits per token on a 64-dim head, finer on wider ones


@dataclass
class OjaKVTCConfig(OjaKVConfig):
    body_bits: float = knob(2.0, "average bits per body coordinate (over head_dim), allocated to the KL "
                                 "coefficients by variance; 0 = coefficients in the model's dtype (rank knobs)")
    prefill_attention: str = knob("full", "the prompt attends in full; the body is coded after it")
    eta_decode: float = knob(0.0, "Oja step every update_interval decoded tokens (0 = the prompt's basis is kept)")

    def __post_init__(self) -> None:
        if not self.body_bits:  # the coder off: the rank knobs apply, as in ojakv
            super().__post_init__()

    def validate(self) -> None:
        super().validate()
        given = [name for name in ("rank_ratio", "rank", "energy") if getattr(self, name) is not None]
        if self.body_bits and given:
            raise OjaKVError(f"body_bits decides the rank (coefficients given no bits are dropped): drop "
                             f"{' and '.join(given)}, or set body_bits=0 to use them")
        if not 0.0 <= self.body_bits <= MAX_BITS:
            raise OjaKVError(f"body_bits must be in [0, {MAX_BITS}] bits per coordinate, got {self.body_bits}: "
                             "e.g. --body-bits 2")
        if self.body_bits and self.init != "prompt":
            raise OjaKVError("body_bits allocates bits from the prompt's spectrum: use init='prompt'")
        if self.body_bits and self.coef_bits:
            raise OjaKVError("give body_bits (transform coding) or coef_bits (uniform codes), not both")

    def total_bits(self, head_dim: int) -> int:
        return round(self.body_bits * head_dim)

    def coefficient_bytes(self, rank: int, dtype_bytes: int, head_dim: int) -> float:
        if not self.body_bits:
            return super().coefficient_bytes(rank, dtype_bytes, head_dim)
        return self.total_bits(head_dim) / 8 + 2.5  # codes, ≤ 4 partly filled bytes (≈ 0.5 on average), the gain


class TransformCodedLayer(OjaKVLayer):
    """OjaKV storage whose body rows are transform coded; everything else is ``OjaKVLayer``'s."""

    def _initial_basis(self, features, weight, rank, which: int) -> torch.Tensor:
        if not self.config.body_bits:
            return super()._initial_basis(features, weight, rank, which)
        cov, count = covariance(features, weight)
        values, vectors = eigh_descending(cov)
        bits = ordered_allocation(values, self.config.total_bits(values.shape[-1]))
        columns = [j for j, b in enumerate(bits) if b] or [0]
        index = torch.tensor(columns, device=values.device)
        per_token = values.index_select(-1, index) / count.clamp_min(1.0).unsqueeze(-1)
        store = TransformCodedRows([max(bits[j], 1) for j in columns], per_token.sqrt())
        if which == 0:
            self.k_coef = store
        else:
            self.v_coef = store
        return vectors.index_select(-1, index).contiguous()


def _build(model, config: OjaKVTCConfig):
    return build_low_rank(model, config, TransformCodedLayer)


def _for_budget(knobs, geometry, prompt_tokens, new_tokens, dtype_bytes, budget) -> Sizing:
    """The most body bits whose predicted held bytes stay within the budget. The basis is counted at the rank
    those bits could reach at most (every coefficient given at least one bit), so the prediction is a cap."""
    d = geometry.head_dim
    full = 2 * (prompt_tokens + new_tokens) * d * dtype_bytes
    shared_positions = 4 / (geometry.num_layers * geometry.num_kv_heads)

    def ratio(bits_per_coordinate: float) -> float:
        sized = OjaKVTCConfig(**{**knobs, "body_bits": bits_per_coordinate, "rank": None, "rank_ratio": None,
                                 "energy": None})
        rank = min(d, sized.total_bits(d))
        return held_bytes_per_head(sized, geometry, prompt_tokens, new_tokens, rank, dtype_bytes,
                                   shared_positions) / full

    steps = [round(k * BITS_STEP * 64 / d, 6) for k in range(1, math.floor(MAX_BITS / BITS_STEP * d / 64) + 1)]
    best = largest_within(steps, ratio, budget)
    return Sizing({"body_bits": best}, ratio(best), ratio(steps[0]),
                  "1 bit per token, plus the full-precision anchors and window and the bases")


register(Method(name="ojakv-tc", summary="OjaKV with a transform-coded body: bits allocated by variance in the KL basis",
                config_class=OjaKVTCConfig, build=_build, for_budget=_for_budget, size_knobs=("body_bits",),
                full_prefill=prefill_attends_in_full,
                reference="Zhu et al., OjaKV, arXiv 2509.21623; transform coding: Huang & Schultheiss 1963"))
