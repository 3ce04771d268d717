"""``snapkv+ojakv``: token selection composed with low-rank storage, savings multiplied.

At prefill the prompt is attended to in full (as SnapKV does); then SnapKV's selector picks each KV head's
tokens, and only the survivors enter OjaKV's hybrid store (anchors, low-rank body, window) with bases fitted to
them. Decoded tokens are appended to the OjaKV store and never evicted. The two pieces are the existing methods'
own: ``SnapKVLayer.select`` and ``OjaKVLayer``; this module only wires them together.

Each head keeps different tokens, so pre-RoPE keys need their own positions per head: the layer stores them
(int32, [b, h, n], counted in its memory) instead of reading the cache-wide position store.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..cache import SharedState, StepInputs
from ..rope import Rotation
from ..storage import GrowableTensor
from . import Method, Sizing, always, knob, largest_within, register
from .ojakv import OjaKVConfig, OjaKVLayer, budget_to_rank, build_low_rank, held_bytes_per_head
from .snapkv import SnapKVConfig, SnapKVLayer


@dataclass
class SnapKVOjaKVConfig(OjaKVConfig, SnapKVConfig):
    prefill_attention: str = knob("full", "the prompt attends in full; selection and projection follow it")

    def validate(self) -> None:
        OjaKVConfig.validate(self)
        SnapKVConfig.validate(self)


class SelectedLowRankLayer(OjaKVLayer):
    """OjaKV storage of the tokens a selector keeps per KV head."""

    uses_shared_positions = False

    def __init__(self, layer_idx: int, shared: SharedState, config, ranks, init_bases=None, init_variances=None):
        super().__init__(layer_idx, shared, config, ranks, init_bases, init_variances)
        self.selector = SnapKVLayer(layer_idx, shared, config)  # used for its select() only; holds nothing
        self.held_positions = GrowableTensor()  # [b, h, n] int32, in cache order

    def held_tokens(self) -> int:
        return 0 if self.k_sink is None else self.k_sink.shape[2] + self.k_coef.length + self.k_win.shape[2]

    def returned_length(self) -> int:
        return self.held_tokens()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        held = self.held_tokens()
        return held + query_length, self.seen - held

    def update(self, key_states, value_states, *args, **kwargs):
        b, h, q, _ = key_states.shape
        if self.seen:
            positions = self.step_inputs().positions
            self.held_positions.append(positions.unsqueeze(1).expand(b, h, q).to(torch.int32))
            return super().update(key_states, value_states, *args, **kwargs)
        attention, step = self.begin_update(key_states, value_states)
        keep = self.selector.select(key_states, value_states, step, attention)  # [b, h, k], ascending
        positions = step.positions.unsqueeze(1).expand(b, h, q).gather(2, keep)
        self.held_positions.append(positions.to(torch.int32))
        # Selection never keeps padding unless it keeps everything, so the first head's validity is every head's.
        kept = StepInputs(positions=positions, valid=step.valid.gather(1, keep[:, 0]))
        rows = keep.unsqueeze(-1).expand(-1, -1, -1, key_states.shape[-1])
        self._prefill(key_states.gather(2, rows), value_states.gather(2, rows), kept, attention)
        self.seen += q
        return key_states, value_states

    def _body_angles(self, start: int, count: int) -> Rotation:
        positions = self.held_positions.view[:, :, start : start + count]
        return Rotation(*self.shared.rope_angles(positions))  # per head: nothing to share across layers

    def segments(self) -> dict[str, int]:
        return {**super().segments(), "positions": self.held_positions.nbytes}


def _build(model, config: SnapKVOjaKVConfig):
    factory, _ = build_low_rank(model, config, SelectedLowRankLayer)
    return factory, False


def _for_budget(knobs, geometry, prompt_tokens, new_tokens, dtype_bytes, budget) -> Sizing:
    """Keep every token and lower the rank while the budget allows it (selection only costs accuracy); below
    what the rank given (0.5 by default) holds for all tokens, keep that rank and select fewer tokens."""
    config = SnapKVOjaKVConfig(**knobs)
    rank = round((config.rank_ratio or 0.5) * geometry.head_dim) if config.rank is None else config.rank
    n_tokens = prompt_tokens + new_tokens
    full = 2 * n_tokens * geometry.head_dim * dtype_bytes

    def ratio(kept: int) -> float:
        return held_bytes_per_head(config, geometry, kept, new_tokens, rank, dtype_bytes, 4) / full

    fewest = max(1, config.window)
    floor_reason = f"{fewest} tokens at rank {rank}, plus anchors, bases and Oja statistics"
    if ratio(prompt_tokens) <= budget:
        low_rank = budget_to_rank(SnapKVOjaKVConfig)(knobs, geometry, prompt_tokens, new_tokens, dtype_bytes, budget)
        return Sizing({**low_rank.knobs, "capacity": prompt_tokens}, low_rank.predicted, ratio(fewest), floor_reason)
    capacity = largest_within(range(fewest, prompt_tokens + 1), ratio, budget)
    return Sizing({"rank": rank, "rank_ratio": None, "energy": None, "capacity": capacity,
                   "window": min(config.window, capacity)}, ratio(capacity), ratio(fewest), floor_reason)

register(Method(name="snapkv+ojakv", summary="SnapKV picks each head's prompt tokens, OjaKV stores them low-rank",
                config_class=SnapKVOjaKVConfig, build=_build, for_budget=_for_budget,
                size_knobs=("capacity", "rank", "rank_ratio", "energy"), full_prefill=always,
                reference="Li et al. arXiv 2404.14469 + Zhu et al. arXiv 2509.21623 (composition)"))
