"""``snapkv``: keep the prompt tokens the last prompt queries attend to most, plus that observation window.

Prefill-only and one-shot (Li et al., arXiv 2404.14469): the prompt is attended to in full, then each KV head
keeps its own top tokens by pooled attention votes from the last ``window`` prompt queries (averaged over the
query heads of its GQA group), plus the window itself. Decoded tokens are appended and never evicted.
Defaults follow the paper's LongBench configurations: window 32, kernel 7, max pooling. (The reference
repository's initial settings, kernel 5 with average pooling, lost every 3K pass key on the embedded model even
when only 9 of 3,000 tokens were dropped: its digits are tokenised one by one and early layers give them the
lowest votes, so the neighbourhood that average pooling spreads a hit over is too small to keep them.)
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import OjaKVError
from ..storage import growth_slack
from . import Method, Sizing, always, knob, register
from .selection import SelectionLayer, attention_votes, pool_scores, top_tokens_with_window


@dataclass
class SnapKVConfig:
    capacity: int = knob(1024, "prompt tokens kept per KV head, observation window included")
    window: int = knob(32, "observation window: the last prompt tokens whose queries vote (kept too)")
    kernel: int = knob(7, "pooling kernel over the votes (odd; 1 = no pooling)")
    pooling: str = knob("max", "avg or max pooling")

    def validate(self) -> None:
        if self.window < 1 or self.capacity < self.window:
            raise OjaKVError(f"snapkv needs 1 <= window <= capacity, got window {self.window}, capacity {self.capacity}")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise OjaKVError(f"kernel must be a positive odd number, got {self.kernel}")
        if self.pooling not in ("avg", "max"):
            raise OjaKVError(f"pooling must be avg or max, got {self.pooling!r}")


class SnapKVLayer(SelectionLayer):
    def __init__(self, layer_idx, shared, config: SnapKVConfig, capacity: int | None = None):
        super().__init__(layer_idx, shared)
        self.config = config
        self.capacity = capacity if capacity is not None else config.capacity

    def select(self, keys, values, step, attention):
        votes = attention_votes(keys, attention, step, self.config.window)
        votes = pool_scores(votes, self.config.kernel, self.config.pooling)
        return top_tokens_with_window(votes, step, self.capacity, self.config.window)


def _build(model, config: SnapKVConfig):
    return (lambda i, shared: SnapKVLayer(i, shared, config)), False


def kept_fraction(kept: int, prompt_tokens: int, new_tokens: int) -> float:
    """Held / full bytes when ``kept`` prompt tokens stay at full precision and every new token is appended
    (with the spare capacity the buffer's growth leaves)."""
    return (kept + new_tokens + growth_slack(kept, new_tokens)) / (prompt_tokens + new_tokens)


def capacity_for_budget(prompt_tokens: int, new_tokens: int, budget: float) -> int:
    """The most prompt tokens to keep so that ``kept_fraction`` stays within the budget (at least one)."""
    capacity = max(1, min(prompt_tokens, int(budget * (prompt_tokens + new_tokens)) - new_tokens))
    while capacity > 1 and kept_fraction(capacity, prompt_tokens, new_tokens) > budget:
        capacity -= 1
    return capacity


def _for_budget(knobs, geometry, prompt_tokens, new_tokens, dtype_bytes, budget) -> Sizing:
    capacity = capacity_for_budget(prompt_tokens, new_tokens, budget)
    window = min(knobs.get("window", SnapKVConfig.window), capacity)
    return Sizing({"capacity": capacity, "window": window}, kept_fraction(capacity, prompt_tokens, new_tokens),
                  kept_fraction(1, prompt_tokens, new_tokens), "one prompt token, plus every generated one")


register(Method(name="snapkv", summary="prefill-only top-k tokens by observation-window attention (per KV head)",
                config_class=SnapKVConfig, build=_build, reference="Li et al., SnapKV, arXiv 2404.14469",
                for_budget=_for_budget, size_knobs=("capacity",), full_prefill=always))
