"""Attention logits as a model's own attention computes them, per KV head and query group.

Token selection (SnapKV votes, H2O accumulation), PoD's layer similarity and any other scorer use this one
function, so every scorer applies the module's own scale (Gemma's query_pre_attn_scalar differs from 1/√d) and
Gemma 2's soft-capping, and keeps GQA groups apart without repeating KV heads.
"""

from __future__ import annotations

import torch

from .hf import attention_scale, logit_softcap


def grouped_logits(queries: torch.Tensor, keys: torch.Tensor, module: torch.nn.Module) -> torch.Tensor:
    """Logits [b, h, g, q, n] (float32) of post-RoPE ``queries`` [b, H, q, d] against ``keys`` [b, h, n, d];
    H = g·h, query head j belongs to KV head j // g, as in transformers' ``repeat_kv``."""
    b, heads, q, d = queries.shape
    kv_heads = keys.shape[1]
    grouped = queries.float().view(b, kv_heads, heads // kv_heads, q, d)
    logits = grouped @ keys.float().unsqueeze(2).transpose(-1, -2) * attention_scale(module, d)
    cap = logit_softcap(module)
    return logits if cap is None else torch.tanh(logits / cap) * cap
