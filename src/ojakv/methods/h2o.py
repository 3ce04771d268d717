"""H2O heavy hitters, both variants under distinct names (Zhang et al., arXiv 2306.14048).

- ``h2o``: the original, decode-time method. Every token accumulates the attention it receives (the prompt's
  queries at prefill, then each decoded query); when the cache exceeds ``heavy + recent`` tokens, the token with
  the least accumulated attention outside the recent window is evicted, per KV head.
- ``h2o-prefill``: the one-shot variant later papers use as a baseline (SnapKV, PyramidKV): score each prompt
  token once by the attention all prompt queries pay it, keep the top ``capacity - recent`` plus the last
  ``recent`` (8, as KVCache-Factory), append decoded tokens without eviction.

Attention is recomputed from the layer's queries for scoring (SDPA does not expose its probabilities), with the
query heads of each GQA group averaged, so storage and scores stay per KV head. Accumulated scores favour early
tokens, which more queries see: that is the original method's behaviour, kept as is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import OjaKVError
from ..memory import nbytes
from . import Method, Sizing, always, knob, largest_within, register
from .selection import SelectionLayer, attention_votes, current_attention, held_tokens, top_tokens_with_window
from .snapkv import capacity_for_budget, kept_fraction


@dataclass
class H2OConfig:
    heavy: int = knob(512, "heavy-hitter tokens kept by accumulated attention")
    recent: int = knob(512, "most recent tokens always kept")

    def validate(self) -> None:
        if self.heavy < 0 or self.recent < 1:
            raise OjaKVError(f"h2o needs heavy >= 0 and recent >= 1, got {self.heavy}, {self.recent}")


class H2OLayer(SelectionLayer):
    def __init__(self, layer_idx, shared, config: H2OConfig):
        super().__init__(layer_idx, shared)
        self.config = config
        self.scores: torch.Tensor | None = None  # accumulated attention per kept token, [b, h, kept] float32

    def select(self, keys, values, step, attention):
        votes = attention_votes(keys, attention, step, keys.shape[2])
        keep = top_tokens_with_window(votes, step, self.config.heavy + self.config.recent, self.config.recent)
        self.scores = votes.gather(2, keep)
        return keep

    def after_append(self, attention) -> None:
        keys = self.keys_buf.view
        new = keys.shape[2] - self.scores.shape[2]
        self.scores = torch.cat([self.scores, self.scores.new_zeros(*self.scores.shape[:2], new)], dim=2)
        step = self.shared.step
        hidden = self.padding_columns()
        self.scores += current_attention(keys, attention, hidden, step.valid)

    def eviction_limit(self) -> int:
        return self.config.heavy + self.config.recent

    def before_append(self) -> None:
        """Evict down to heavy + recent by the scores accumulated so far (the original evicts right after the
        step; doing it at the start of the next call keeps the held tokens consistent with this call's mask)."""
        kept = self.keys_buf.length
        excess = kept - self.eviction_limit()
        if excess <= 0:
            return
        older = kept - self.config.recent
        priority = self.eviction_order(self.scores)  # held padding goes first
        survivors = priority[..., :older].topk(older - excess, dim=-1).indices.sort(dim=-1).values
        tail = torch.arange(older, kept, device=survivors.device).expand(*survivors.shape[:2], -1)
        keep = torch.cat([survivors, tail], dim=-1)
        self.scores = self.scores.gather(2, keep)
        self._retain(keep)

    def segments(self) -> dict[str, int]:
        return {**super().segments(), "scores": nbytes(self.scores)}


@dataclass
class H2OPrefillConfig:
    capacity: int = knob(1024, "prompt tokens kept per KV head, recent ones included")
    recent: int = knob(8, "most recent prompt tokens always kept")

    def validate(self) -> None:
        if self.recent < 1 or self.capacity < self.recent:
            raise OjaKVError(f"h2o-prefill needs 1 <= recent <= capacity, got {self.recent}, {self.capacity}")


class H2OPrefillLayer(SelectionLayer):
    def __init__(self, layer_idx, shared, config: H2OPrefillConfig):
        super().__init__(layer_idx, shared)
        self.config = config

    def select(self, keys, values, step, attention):
        votes = attention_votes(keys, attention, step, keys.shape[2])
        return top_tokens_with_window(votes, step, self.config.capacity, self.config.recent)


def _h2o_budget(knobs, geometry, prompt_tokens, new_tokens, dtype_bytes, budget) -> Sizing:
    # Constant size while decoding: heavy + recent tokens, split evenly as in the reference runs. The float32
    # scores cost (4 / (2 d s)) of a token each, which is counted in the held bytes.
    n = prompt_tokens + new_tokens
    scores = 4 / (2 * geometry.head_dim * dtype_bytes)  # a float32 score per kept token, in token units

    def ratio(total: int) -> float:
        return (held_tokens(total, prompt_tokens, new_tokens) + scores * min(n, total + 1)) / n

    total = largest_within(range(2, n + 1), ratio, budget)
    return Sizing({"heavy": total // 2, "recent": total - total // 2}, ratio(total), ratio(2),
                  "one heavy and one recent token")


def _h2o_prefill_budget(knobs, geometry, prompt_tokens, new_tokens, dtype_bytes, budget) -> Sizing:
    capacity = capacity_for_budget(prompt_tokens, new_tokens, budget)
    return Sizing({"capacity": capacity, "recent": min(knobs.get("recent", H2OPrefillConfig.recent), capacity)},
                  kept_fraction(capacity, prompt_tokens, new_tokens), kept_fraction(1, prompt_tokens, new_tokens),
                  "one prompt token, plus every generated one")


register(Method(name="h2o", summary="heavy hitters by accumulated attention + recent window; evicts while decoding",
                config_class=H2OConfig, build=lambda model, config: ((lambda i, s: H2OLayer(i, s, config)), False),
                reference="Zhang et al., H2O, arXiv 2306.14048", for_budget=_h2o_budget, size_knobs=("heavy", "recent"), full_prefill=always))
register(Method(name="h2o-prefill", summary="one-shot H2O: prompt tokens by attention received, at prefill only",
                config_class=H2OPrefillConfig,
                build=lambda model, config: ((lambda i, s: H2OPrefillLayer(i, s, config)), False),
                reference="Zhang et al., H2O, arXiv 2306.14048 (one-shot variant of later papers)",
                for_budget=_h2o_prefill_budget, size_knobs=("capacity",), full_prefill=always))
