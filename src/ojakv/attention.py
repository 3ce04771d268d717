"""Latent attention: decode-time attention computed on a layer's stored coefficients, never rebuilding the body.

A low-rank layer holds its body tokens as coefficients c (keys and values, per KV head) in bases U_k and U_v.
The reconstruct path rebuilds K = c U_kᵀ and V = c U_vᵀ every step and hands full-size tensors to the model's
kernel; that costs n·r·d multiply-adds per KV head per step, more than the attention itself. Here instead:

- body scores: keys stored post-RoPE give q·(U_k c) = (U_kᵀ q)·c, one projection per query head and r numbers
  per token; keys stored pre-RoPE must be rotated to their own positions, so they are rebuilt a chunk at a time
  (bounded temporary) and scored at once; nothing full-size is kept;
- values: softmax weights times coefficients, then one multiply by U_v per head: (P c) U_vᵀ;
- the full-precision tokens (anchors, window, this step's) are scored as usual, and every segment's scores go
  through one softmax in cache order, so the result is the same attention, only computed in another order.

How it reaches the model: the layer posts its ``LowRankBody`` (``ojakv.hf.post_body``) in ``update`` and returns
only its full-precision tokens; the attention call that follows finds the body (``ojakv.hf.attention``) and
calls ``latent_attention`` here. This module is plain tensor arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .rope import apply_rope

MAX_LATENT_QUERIES = 16  # longer calls (prefill, long chunks) take the reconstruct path and the model's kernel
KEY_CHUNK = 1024  # pre-RoPE body keys rebuilt this many tokens at a time


@dataclass
class LowRankBody:
    """A layer's low-rank tokens for one attention call; they sit at mask columns [start, start + n)."""

    start: int
    key_coef: torch.Tensor  # [b, h, n, r_k]
    value_coef: torch.Tensor  # [b, h, n, r_v]
    key_basis: torch.Tensor  # [b, h, d, r_k] float32
    value_basis: torch.Tensor  # [b, h, d, r_v] float32
    key_angles: tuple[torch.Tensor, torch.Tensor] | None = None  # pre-RoPE: cos/sin [b, (h,) n, d] of the tokens
    exact_index: torch.Tensor | None = None  # [b, h, e] body tokens whose exact K/V override the low-rank ones
    exact_keys: torch.Tensor | None = None  # [b, h, e, d]
    exact_values: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return self.key_coef.shape[2]


def latent_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask, body: LowRankBody,
                     scale: float, softcap: float | None = None) -> torch.Tensor:
    """Attention of ``query`` [b, H, q, d] over the full-precision tokens ``key``/``value`` [b, h, m, d] with
    ``body`` spliced in at its columns; returns [b, q, H, d] in the query's dtype."""
    b, heads, q, d = query.shape
    kv_heads = key.shape[1]
    # [b, h, g·q, d]: each KV head's query group, rows ordered (group member, query)
    grouped = query.float().reshape(b, kv_heads, heads // kv_heads * q, d)
    body_scores = _body_scores(grouped, body)
    dense_scores = grouped @ key.float().transpose(-1, -2)
    start = body.start
    scores = torch.cat([dense_scores[..., :start], body_scores, dense_scores[..., start:]], dim=-1) * scale
    if softcap is not None:  # Gemma 2's logit soft-capping, before the mask as in its eager attention
        scores = torch.tanh(scores / softcap) * softcap
    scores = _masked(scores, attention_mask, heads // kv_heads, q)
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a padding query row sees nothing
    end = start + body.length
    out = probs[..., :start] @ value[:, :, :start].float() + probs[..., end:] @ value[:, :, start:].float()
    out = out + _body_values(probs[..., start:end], body)
    out = out.reshape(b, heads, q, d).transpose(1, 2).contiguous()
    return out.to(query.dtype)


def _body_scores(grouped: torch.Tensor, body: LowRankBody) -> torch.Tensor:
    """q·k for every body token, [b, h, g·q, n]; exact keys where the layer keeps them."""
    if body.key_angles is None:  # post-RoPE: score in the subspace
        scores = (grouped @ body.key_basis) @ body.key_coef.float().transpose(-1, -2)
    else:
        cos, sin = body.key_angles
        scores = grouped.new_empty(*grouped.shape[:-1], body.length)
        for s in range(0, body.length, KEY_CHUNK):
            e = min(s + KEY_CHUNK, body.length)
            keys = apply_rope(body.key_coef[:, :, s:e].float() @ body.key_basis.transpose(-1, -2),
                              cos[..., s:e, :], sin[..., s:e, :])
            scores[..., s:e] = grouped @ keys.transpose(-1, -2)
    if body.exact_index is not None:
        index = body.exact_index.unsqueeze(2).expand(-1, -1, grouped.shape[2], -1)
        scores = scores.scatter(-1, index, grouped @ body.exact_keys.float().transpose(-1, -2))
    return scores


def _body_values(probs: torch.Tensor, body: LowRankBody) -> torch.Tensor:
    """Σ p·v over the body, [b, h, g·q, d]: (P c) U_vᵀ, with exact values where the layer keeps them."""
    exact = None
    if body.exact_index is not None:
        index = body.exact_index.unsqueeze(2).expand(-1, -1, probs.shape[2], -1)
        exact = probs.gather(-1, index) @ body.exact_values.float()
        probs = probs.scatter(-1, index, 0.0)
    out = (probs @ body.value_coef.float()) @ body.value_basis.transpose(-1, -2)
    return out if exact is None else out + exact


def _masked(scores: torch.Tensor, mask: torch.Tensor | None, groups: int, q: int) -> torch.Tensor:
    """Apply the model's mask ([b, 1, q, kv], boolean or additive) to scores [b, h, g·q, kv]; without one, the
    new tokens are causal among themselves (they are the last q columns)."""
    b, h, _, kv = scores.shape
    scores = scores.view(b, h, groups, q, kv)
    if mask is None:
        if q > 1:
            causal = torch.ones(q, q, dtype=torch.bool, device=scores.device).triu(1)
            scores[..., kv - q :] = scores[..., kv - q :].masked_fill(causal, float("-inf"))
    elif mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask[..., -kv:].unsqueeze(2), float("-inf"))
    else:
        scores = scores + mask[..., -kv:].unsqueeze(2).float()
    return scores.view(b, h, groups * q, kv)
