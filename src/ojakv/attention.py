"""Latent attention: decode-time attention computed on a layer's stored coefficients, never rebuilding the body.

A low-rank layer holds its body tokens as coefficients c (keys and values, per KV head) in bases U_k and U_v.
The reconstruct path rebuilds K = c U_kᵀ and V = c U_vᵀ every step and hands full-size tensors to the model's
kernel; that costs n·r·d multiply-adds per KV head per step, more than the attention itself. Here instead:

- body scores: keys stored post-RoPE give q·(U_k c) = (U_kᵀ q)·c, one projection per query head and r numbers
  per token; keys stored pre-RoPE must be rotated to their own positions, so they are rebuilt a chunk at a time
  (bounded temporary) and scored at once; nothing full-size is kept;
- values: softmax weights times coefficients, then one multiply by U_v per head: (P c) U_vᵀ;
- the full-precision tokens (anchors, window, this step's) are scored as usual, and every segment's scores go
  through one softmax in cache order, so the result is the same attention, only computed in another order;
- with a ``ChunkSelection`` (the ``select_tokens`` knob), only the body chunks its landmarks pick are read,
  rebuilt and attended (``ojakv.landmarks`` says what that approximates); everything else is as above.

How it reaches the model: the layer posts its ``LowRankBody`` (``ojakv.hf.post_body``) in ``update`` and returns
only its full-precision tokens; the attention call that follows finds the body (``ojakv.hf.attention``) and
calls ``latent_attention`` here. This module is plain tensor arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .landmarks import select_chunks
from .rope import Rotation
from .storage import CodedRows, GrowableTensor, TensorRows, gather_rows

MAX_LATENT_QUERIES = 16  # longer calls (prefill, long chunks) take the reconstruct path and the model's kernel
KEY_CHUNK = 1024  # pre-RoPE body keys rebuilt this many tokens at a time


@dataclass
class ChunkSelection:
    """Attend to the ``keep`` body chunks (of ``chunk`` tokens) whose landmarks score highest, per KV head."""

    landmarks: torch.Tensor  # [b, h, m, d]: one per complete chunk (ojakv.landmarks.ChunkLandmarks)
    chunk: int
    keep: int


Rows = GrowableTensor | CodedRows | TensorRows  # stored rows: ``view`` (all), ``rows(index)`` (some), ``length``


@dataclass
class LowRankBody:
    """A layer's low-rank tokens for one attention call; they sit at mask columns [start, start + n)."""

    start: int
    key_coef: Rows  # [b, h, n, r_k] (a plain tensor is taken as the rows themselves)
    value_coef: Rows  # [b, h, n, r_v]
    key_basis: torch.Tensor  # [b, h, d, r_k] float32
    value_basis: torch.Tensor  # [b, h, d, r_v] float32
    key_angles: Rotation | None = None  # pre-RoPE keys: the RoPE of the body's tokens
    exact_index: torch.Tensor | None = None  # [b, h, e] body tokens whose exact K/V override the low-rank ones
    exact_keys: torch.Tensor | None = None  # [b, h, e, d]
    exact_values: torch.Tensor | None = None
    selection: ChunkSelection | None = None

    def __post_init__(self):
        if isinstance(self.key_coef, torch.Tensor):
            self.key_coef = TensorRows(self.key_coef)
        if isinstance(self.value_coef, torch.Tensor):
            self.value_coef = TensorRows(self.value_coef)
        if self.selection is not None and self.exact_index is not None:
            raise ValueError("a chunk selection cannot honour exact-token overrides (residual policy)")

    @property
    def length(self) -> int:
        return self.key_coef.length


def latent_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask, body: LowRankBody,
                     scale: float, softcap: float | None = None) -> torch.Tensor:
    """Attention of ``query`` [b, H, q, d] over the full-precision tokens ``key``/``value`` [b, h, m, d] with
    ``body`` spliced in at its columns; returns [b, q, H, d] in the query's dtype.

    Scores are laid out dense tokens first, then the body (one softmax does not care about the order; the mask's
    columns are moved to match), so the dense tokens take one product each way."""
    b, heads, q, d = query.shape
    kv_heads, dense = key.shape[1], key.shape[2]
    # [b, h, g·q, d]: each KV head's query group, rows ordered (group member, query)
    grouped = query.float().reshape(b, kv_heads, heads // kv_heads * q, d)
    index, stored = None, body.length
    if body.selection is not None:
        body, index = _selected(grouped, body)
    mask = _dense_first(attention_mask, body.start, stored, dense, index)
    scores = torch.cat([grouped @ key.float().transpose(-1, -2), _body_scores(grouped, body)], dim=-1) * scale
    if softcap is not None:  # Gemma 2's logit soft-capping, before the mask as in its eager attention
        scores = torch.tanh(scores / softcap) * softcap
    scores = _masked(scores, mask, heads // kv_heads, q, dense)
    probs = torch.softmax(scores, dim=-1)
    if mask is not None:
        probs = probs.nan_to_num(0.0)  # a padding query row sees nothing
    out = probs[..., :dense] @ value.float() + _body_values(probs[..., dense:], body)
    return out.reshape(b, heads, q, d).transpose(1, 2).contiguous().to(query.dtype)


def _selected(grouped: torch.Tensor, body: LowRankBody) -> tuple[LowRankBody, torch.Tensor]:
    """The body restricted to the tokens its selection picks for these queries (their rows gathered, their
    angles per KV head), and those tokens' indices [b, h, k] in the body."""
    chosen = body.selection
    index = select_chunks(grouped, chosen.landmarks, chosen.keep, chosen.chunk, body.length)
    angles = body.key_angles.rows(index) if body.key_angles is not None else None
    reduced = replace(body, key_coef=body.key_coef.rows(index), value_coef=body.value_coef.rows(index),
                      key_angles=angles, selection=None)
    return reduced, index


def _dense_first(mask, start: int, n: int, dense: int, index: torch.Tensor | None = None):
    """The model's mask [b, 1, q, kv] (cache order: ``start`` dense columns, the ``n`` body ones, the other dense
    ones) with the body's columns moved after the ``dense`` ones; with ``index`` [b, h, k], only those body
    columns, per KV head ([b, h, q, dense + k]). None stays None (nothing is hidden but the causal part)."""
    if mask is None:
        return None
    columns = mask[..., -(dense + n):]
    body = columns[..., start : start + n]
    dense_part = torch.cat([columns[..., :start], columns[..., start + n :]], dim=-1)
    if index is None:
        return torch.cat([dense_part, body], dim=-1)
    b, h, k = index.shape
    q = columns.shape[2]
    body = body.expand(b, h, q, n).gather(-1, index.unsqueeze(2).expand(b, h, q, k))
    return torch.cat([dense_part.expand(b, h, q, dense), body], dim=-1)


def _body_scores(grouped: torch.Tensor, body: LowRankBody) -> torch.Tensor:
    """q·k for every body token, [b, h, g·q, n]; exact keys where the layer keeps them."""
    if body.key_angles is None:  # post-RoPE: score in the subspace
        scores = body.key_coef.dot(grouped @ body.key_basis)
    else:
        scores = _rebuilt_scores(grouped, body)
    if body.exact_index is not None:
        index = body.exact_index.unsqueeze(2).expand(-1, -1, grouped.shape[2], -1)
        scores = scores.scatter(-1, index, grouped @ body.exact_keys.float().transpose(-1, -2))
    return scores


def _rebuilt_scores(grouped: torch.Tensor, body: LowRankBody) -> torch.Tensor:
    """q·k for pre-RoPE body keys, decoded, rebuilt and rotated ``KEY_CHUNK`` tokens at a time (bounded
    temporaries: no float copy of the whole body is made)."""
    spans = [(s, min(s + KEY_CHUNK, body.length)) for s in range(0, body.length, KEY_CHUNK)]
    parts = [grouped @ _rebuilt_keys(body.key_coef.span(s, e), body, s, e).transpose(-1, -2) for s, e in spans]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


def _rebuilt_keys(coef: torch.Tensor, body: LowRankBody, start: int, end: int) -> torch.Tensor:
    """Post-RoPE keys of body tokens [start, end) from their coefficients ``coef``."""
    rotation = body.key_angles if (start, end) == (0, body.length) else body.key_angles.narrow(start, end)
    return rotation.apply_(coef.float() @ body.key_basis.transpose(-1, -2))


def _body_values(probs: torch.Tensor, body: LowRankBody) -> torch.Tensor:
    """Σ p·v over the body, [b, h, g·q, d]: (P c) U_vᵀ, with exact values where the layer keeps them."""
    exact = None
    if body.exact_index is not None:
        index = body.exact_index.unsqueeze(2).expand(-1, -1, probs.shape[2], -1)
        exact = probs.gather(-1, index) @ body.exact_values.float()
        probs = probs.scatter(-1, index, 0.0)
    out = body.value_coef.weighted_sum(probs) @ body.value_basis.transpose(-1, -2)
    return out if exact is None else out + exact


def _masked(scores: torch.Tensor, mask: torch.Tensor | None, groups: int, q: int, dense: int) -> torch.Tensor:
    """Apply a mask ([b, 1 or h, q, kv] in the scores' column order, boolean or additive) to scores [b, h, g·q, kv];
    without one, the new tokens (the last q of the ``dense`` columns) are causal among themselves."""
    b, h, _, kv = scores.shape
    scores = scores.view(b, h, groups, q, kv)
    if mask is None:
        if q > 1:
            causal = torch.ones(q, q, dtype=torch.bool, device=scores.device).triu(1)
            scores[..., dense - q : dense] = scores[..., dense - q : dense].masked_fill(causal, float("-inf"))
    elif mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask.unsqueeze(2), float("-inf"))
    else:
        scores = scores + mask.unsqueeze(2).float()
    return scores.view(b, h, groups * q, kv)
