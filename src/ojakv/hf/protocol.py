"""transformers' cache protocol, and what ojakv's hooks tell a compressed cache beyond it.

``Cache`` / ``CacheLayerMixin`` are transformers' base classes; ``HookedCache`` is the part of ``CompressedCache``
the forward hooks call: one ``begin_forward`` per forward call (positions, padding) and one
``receive_attention_inputs`` per attention module (hidden states and RoPE angles).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

__all__ = ["AttentionInputs", "Cache", "CacheLayerMixin", "HookedCache"]


@dataclass
class AttentionInputs:
    """The attention module's inputs for the current call (held only until the layer's ``update`` returns)."""

    module: torch.nn.Module
    hidden_states: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor


class HookedCache(Cache):
    """A cache that the forward hooks inform; the hooks do nothing for any other cache."""

    def begin_forward(self, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None, batch: int,
                      q: int, device) -> None:
        raise NotImplementedError

    def receive_attention_inputs(self, layer_idx: int, inputs: AttentionInputs) -> None:
        raise NotImplementedError

    def returned_length(self, layer_idx: int) -> int:
        """Cached tokens layer ``layer_idx`` hands to attention besides this call's (sizes its mask columns)."""
        raise NotImplementedError
