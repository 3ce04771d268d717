"""Rotary position embedding applied and undone on cached keys (for keys compressed before RoPE).

Angles come as HF passes them: ``cos``/``sin`` of shape [b, n, rotary_dim] in the half-split layout (or
[b, h, n, rotary_dim], one set per head). When ``rotary_dim`` is smaller than the head size (partial rotary, e.g.
Phi-3 variants) the trailing dims pass through.

A ``Rotation`` holds one set of angles prepared for many tensors (every layer of a decode step rotates the same
tokens): the half-split rotation x·cos + rotate_half(x)·sin is computed as x·cos + roll(x)·sin', with the sign of
rotate_half folded into sin' once, so each use is a roll, two products and a sum. ``apply_`` does the products
and the sum in place, for tensors made only to be rotated (rebuilt keys): at long contexts a decode step's
rotations are memory-bound, and every full-size result they allocate costs as much as the arithmetic.
"""

from __future__ import annotations

import torch

from .storage import gather_rows


class Rotation:
    """RoPE by fixed angles: ``apply`` rotates, ``undo`` rotates back (exact also for variants that scale cos and
    sin by a constant, YaRN's attention factor: it divides by cos² + sin²)."""

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor, *, folded: bool = False):
        if cos.dim() == 3:  # shared by the heads
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        if not folded:
            half = sin.shape[-1] // 2
            sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        self.cos, self.sin = cos, sin  # [b, 1 or h, n, rotary_dim]; sin with rotate_half's sign folded in
        self._inverse = None

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate ``x`` [b, h, n, d]."""
        return _rotate(x, self.cos, self.sin)

    def apply_(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate ``x`` [b, h, n, d] (float, not shared with anything else) in place; returns it."""
        cos, sin = _angles_like(self.cos, self.sin, x)
        rotated = x[..., : cos.shape[-1]]
        rolled = rotated.roll(cos.shape[-1] // 2, -1)
        rotated.mul_(cos).addcmul_(rolled, sin)
        return x

    def undo(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate ``x`` [b, h, n, d] back: recovers pre-RoPE keys from the post-RoPE keys the attention caches."""
        if self._inverse is None:
            norm = self.cos * self.cos + self.sin * self.sin
            self._inverse = self.cos / norm, -self.sin / norm
        return _rotate(x, *self._inverse)

    def narrow(self, start: int, end: int) -> "Rotation":
        """The angles of tokens [start, end)."""
        return Rotation(self.cos[..., start:end, :], self.sin[..., start:end, :], folded=True)

    def rows(self, index: torch.Tensor) -> "Rotation":
        """The angles of tokens ``index`` [b, h, k], per head."""
        heads = index.shape[1]
        per_head = lambda t: t.expand(-1, heads, -1, -1)  # noqa: E731
        return Rotation(gather_rows(per_head(self.cos), index), gather_rows(per_head(self.sin), index), folded=True)


def _angles_like(cos: torch.Tensor, sin: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return (cos, sin) if cos.dtype == x.dtype else (cos.to(x.dtype), sin.to(x.dtype))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    cos, sin = _angles_like(cos, sin, x)
    rotary_dim = cos.shape[-1]
    if rotary_dim == x.shape[-1]:
        return x * cos + x.roll(rotary_dim // 2, -1) * sin
    rotated = x[..., :rotary_dim]
    return torch.cat((rotated * cos + rotated.roll(rotary_dim // 2, -1) * sin, x[..., rotary_dim:]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [b, h, n, d] by the given angles."""
    return Rotation(cos, sin).apply(x)


def undo_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Inverse of ``apply_rope``."""
    return Rotation(cos, sin).undo(x)
