"""Rotary position embedding applied and undone on cached keys (for keys compressed before RoPE).

Angles come as HF passes them: ``cos``/``sin`` of shape [b, n, rotary_dim] in the half-split layout (or
[b, h, n, rotary_dim], one set per head). When
``rotary_dim`` is smaller than the head size (partial rotary, e.g. Phi-3 variants) the trailing dims pass through.
"""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _split(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    if cos.dim() == 3:  # [b, n, d], shared by the heads; [b, h, n, d] when every head keeps other tokens
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    rotary_dim = cos.shape[-1]
    return x[..., :rotary_dim], x[..., rotary_dim:], cos, sin


def _join(rotated: torch.Tensor, passed: torch.Tensor) -> torch.Tensor:
    return torch.cat((rotated, passed), dim=-1) if passed.shape[-1] else rotated


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [b, h, n, d] by the given angles."""
    rotated, passed, cos, sin = _split(x, cos, sin)
    return _join(rotated * cos + rotate_half(rotated) * sin, passed)


def undo_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Inverse of ``apply_rope``: recovers pre-RoPE keys from the post-RoPE keys the attention layer caches.

    Some RoPE variants scale cos and sin by a constant (YaRN's attention factor), so the division by
    cos² + sin² keeps the inverse exact for them too.
    """
    rotated, passed, cos, sin = _split(x, cos, sin)
    return _join((rotated * cos - rotate_half(rotated) * sin) / (cos * cos + sin * sin), passed)
