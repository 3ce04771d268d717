"""One full-precision prefill, shared: capture it once, then build any number of compressed caches from it.

A method whose prefill attention is full precision (token selection, quantization after the fact, ``ojakv-pf``)
compresses only what the prefill left in its cache; its cache after the prompt is a function of the prompt's
keys, values and attention inputs alone. So a benchmark can run the prompt through the model once, keep those
(``capture``), and hand them to each such method's cache as if the model had just run (``derive``): the same
calls in the same order as in a real forward, with the same contract checks. The prompt's logits are the full
cache's, which these methods share by definition.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .cache import CompressedCache, LayerPlan, ObserverLayer
from .hf import AttentionInputs, cache_kwargs


@dataclass
class Prefill:
    """What one full-precision forward of a prompt leaves: per layer its keys, values and attention inputs; the
    padding mask and positions; the logits of the last position."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    inputs: list[AttentionInputs]
    attention_mask: torch.Tensor
    positions: torch.Tensor
    last_logits: torch.Tensor  # [b, vocab]

    @property
    def length(self) -> int:
        return self.positions.shape[1]


def capture(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> Prefill:
    """Run the prompt once with full-precision attention and keep what every layer saw."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    # Positions as generate derives them from the padding mask, so a derived cache continues as generate would.
    positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    seen: dict[int, tuple] = {}
    step_of_call = []

    def record(layer, keys, values, attention, step) -> None:
        seen[layer.layer_idx] = (keys, values, attention)
        if not step_of_call:
            step_of_call.append(step)

    plan = LayerPlan(lambda i, shared: ObserverLayer(i, shared, record), track_positions=False, config={},
                     sliding_too=True)
    with CompressedCache(model, plan, method="prefill") as cache, torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True,
                       **cache_kwargs(model, cache)).logits[:, -1]
    order = range(len(seen))
    return Prefill([seen[i][0] for i in order], [seen[i][1] for i in order], [seen[i][2] for i in order],
                   attention_mask, step_of_call[0].positions, logits)


def derive(cache: CompressedCache, prefill: Prefill) -> CompressedCache:
    """Feed ``prefill`` into a fresh ``cache`` as the model's forward would have; returns the cache."""
    batch, length = prefill.positions.shape
    with torch.no_grad():
        cache.begin_forward(prefill.attention_mask, prefill.positions, batch, length, prefill.positions.device)
        for index, (keys, values, inputs) in enumerate(zip(prefill.keys, prefill.values, prefill.inputs)):
            cache.receive_attention_inputs(index, inputs)
            cache.update(keys, values, index)
    return cache
