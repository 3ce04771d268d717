"""``streaming-llm``: the first ``n_sink`` tokens (attention sinks) plus a sliding window of recent tokens.

Xiao et al., arXiv 2309.17453. Eviction happens at prefill and at the start of every later call, so memory stays
constant (the sinks and window plus the last call's new tokens).
By default keys keep the positions they were cached with. ``rerotate=True`` is the paper's ``pos_shift``: keys
are held before RoPE and rotated every call to consecutive in-cache positions. The query keeps the absolute
position the model gives it, so the held keys are placed at P − held + j (P: the call's first position, j: the
cache index), which gives every query–key pair the distance the in-cache positions would: RoPE only sees
differences. Costs one rotation of the held keys per layer and call.
Defaults follow the paper: 4 sinks; the window is the method's budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import OjaKVError
from ..rope import apply_rope, undo_rope
from . import Method, Sizing, always, knob, largest_within, register
from .selection import held_tokens
from .selection import SelectionLayer


@dataclass
class StreamingLLMConfig:
    n_sink: int = knob(4, "first real tokens always kept (attention sinks)")
    window: int = knob(1020, "most recent tokens kept")
    rerotate: bool = knob(False, "re-rotate kept keys to consecutive in-cache positions each call (pos_shift)")

    def validate(self) -> None:
        if self.n_sink < 0 or self.window < 1:
            raise OjaKVError(f"streaming-llm needs n_sink >= 0 and window >= 1, got {self.n_sink}, {self.window}")


class StreamingLLMLayer(SelectionLayer):
    def __init__(self, layer_idx, shared, config: StreamingLLMConfig):
        super().__init__(layer_idx, shared)
        self.config = config

    def select(self, keys, values, step, attention):
        b, h, n, _ = keys.shape
        if self.config.n_sink + self.config.window >= n:
            return torch.arange(n, device=keys.device).expand(b, h, n)
        return self._sinks_and_window(n, (~step.valid).sum(-1))[:, None, :].expand(b, h, -1)

    def _sinks_and_window(self, n: int, padding: torch.Tensor) -> torch.Tensor:
        """Indices [b, n_sink + window] (ascending) of each sequence's first ``n_sink`` real tokens and last
        ``window`` tokens, each once; a sequence with fewer real tokens fills up with its latest padding, which
        lines up with the mask's padding columns."""
        columns = torch.arange(n, device=padding.device)
        real_index = columns - padding[:, None]
        wanted = ((real_index >= 0) & (real_index < self.config.n_sink)) | (columns >= n - self.config.window)
        priority = torch.where(real_index < 0, columns - 1e9, wanted.float())
        limit = self.config.n_sink + self.config.window
        return priority.topk(limit, dim=-1).indices.sort(dim=-1).values

    def stored_keys(self, keys, attention):
        if not self.config.rerotate:
            return keys
        return undo_rope(keys, attention.cos, attention.sin)

    def returned_keys(self, held, step):
        if not self.config.rerotate:
            return held
        start = step.positions[:, :1] - (held.shape[2] - step.positions.shape[1])  # P − held tokens
        cos, sin = self.shared.step_memo(("in-cache angles", held.shape[2]), lambda: self.shared.rope_angles(
            start + torch.arange(held.shape[2], device=held.device)))
        return apply_rope(held, cos, sin)

    def eviction_limit(self) -> int:
        return self.config.n_sink + self.config.window

    def before_append(self) -> None:
        kept, limit = self.keys_buf.length, self.eviction_limit()
        if kept <= limit:
            return
        b, h = self.keys_buf.view.shape[:2]
        self._retain(self._sinks_and_window(kept, self.held_padding[:, 0])[:, None, :].expand(b, h, -1))


def _build(model, config: StreamingLLMConfig):
    return (lambda i, shared: StreamingLLMLayer(i, shared, config)), False


def _for_budget(knobs, geometry, prompt_tokens, new_tokens, dtype_bytes, budget) -> Sizing:
    n_sink = knobs.get("n_sink", StreamingLLMConfig.n_sink)
    n = prompt_tokens + new_tokens

    def ratio(window: int) -> float:
        return held_tokens(n_sink + window, prompt_tokens, new_tokens) / n

    window = largest_within(range(1, n + 1), ratio, budget)
    return Sizing({"window": window}, ratio(window), ratio(1), f"the {n_sink} sink tokens and a window of one")


register(Method(name="streaming-llm", summary="attention sinks + a sliding window; evicts while decoding",
                config_class=StreamingLLMConfig, build=_build, reference="Xiao et al., StreamingLLM, arXiv 2309.17453",
                for_budget=_for_budget, size_knobs=("window",), full_prefill=always))
