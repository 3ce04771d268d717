"""Rotary position embedding applied and undone on cached keys (for keys compressed before RoPE)."""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [b, h, n, d] by angles given as ``cos``/``sin`` [b, n, d] (HF's half-split layout)."""
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
    return x * cos + rotate_half(x) * sin


def undo_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Inverse of ``apply_rope``: recovers pre-RoPE keys from the post-RoPE keys the attention layer caches.

    Some RoPE variants scale cos and sin by a constant (YaRN's attention factor), so the division by
    cos² + sin² keeps the inverse exact for them too.
    """
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
    return (x * cos - rotate_half(x) * sin) / (cos * cos + sin * sin)
