"""Asymmetric min/max quantization with codes packed into bytes, so held bytes reflect bits, not a float copy.

``quantize(x, bits, dim, group)`` splits axis ``dim`` into groups of ``group`` elements; every group shares one
scale and one minimum (stored in float16, as KIVI does): q = round((x − min) / scale), scale = (max − min)/(2^b − 1).
Codes of 2 or 4 bits are packed 4 or 2 to a byte along the last axis; 8-bit codes take a byte each.
``pack_bits`` packs fields of any width from 1 to 8 bits (e.g. TurboQuant's 3-bit codes and 1-bit signs) into one
row of bytes with no bits wasted when a field's length is a multiple of 8.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

SUPPORTED_BITS = (2, 4, 8)


@dataclass
class Quantized:
    """Packed codes plus per-group scale and minimum; ``shape`` is the original tensor's."""

    codes: torch.Tensor  # uint8, last axis packed
    scale: torch.Tensor  # float16
    minimum: torch.Tensor  # float16
    bits: int
    dim: int
    group: int
    shape: tuple

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.minimum))


def _grouped(x: torch.Tensor, dim: int, group: int) -> torch.Tensor:
    """View with axis ``dim`` split into (n_groups, group) and the group axis moved last."""
    x = x.movedim(dim, -1)
    return x.reshape(*x.shape[:-1], x.shape[-1] // group, group)


def quantize(x: torch.Tensor, bits: int, dim: int, group: int) -> Quantized:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}")
    if x.shape[dim] % group:
        raise ValueError(f"axis {dim} of size {x.shape[dim]} is not a multiple of the group size {group}")
    grouped = _grouped(x.float(), dim, group)
    low = grouped.amin(-1, keepdim=True)
    high = grouped.amax(-1, keepdim=True)
    levels = 2**bits - 1
    # Clamp after the float16 cast: a smaller scale would round to 0 there and make the codes 0/0.
    scale16 = ((high - low) / levels).half().clamp_min(2.0**-24)  # float16's smallest subnormal
    low16 = low.half()
    # Round with the float16 scale and minimum that dequantization will use, so no error hides in the cast.
    codes = ((grouped - low16.float()) / scale16.float()).round().clamp(0, levels).to(torch.uint8)
    return Quantized(_pack(codes, bits), scale16, low16, bits, dim, group, tuple(x.shape))


def dequantize(q: Quantized, dtype: torch.dtype) -> torch.Tensor:
    codes = _unpack(q.codes, q.bits, q.group).float()
    grouped = codes * q.scale.float() + q.minimum.float()
    moved_shape = list(q.shape)
    moved_shape.append(moved_shape.pop(q.dim if q.dim >= 0 else len(q.shape) + q.dim))
    return grouped.reshape(moved_shape).movedim(-1, q.dim).to(dtype)


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    per_byte = 8 // bits
    if per_byte == 1:
        return codes
    codes = codes.reshape(*codes.shape[:-1], -1, per_byte)
    shifts = torch.arange(per_byte, device=codes.device, dtype=torch.uint8) * bits
    return (codes << shifts).sum(-1, dtype=torch.uint8)


def _unpack(packed: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    per_byte = 8 // bits
    if per_byte == 1:
        return packed
    shifts = torch.arange(per_byte, device=packed.device, dtype=torch.uint8) * bits
    codes = (packed.unsqueeze(-1) >> shifts) & (2**bits - 1)
    return codes.reshape(*packed.shape[:-1], group)


def pack_bits(fields: Sequence[tuple[torch.Tensor, int]]) -> torch.Tensor:
    """Fields ``(codes [..., count], bits)`` (same leading shape, codes < 2^bits, 1 to 8 bits) as one uint8 tensor
    along the last axis. A width that does not divide 8 is split into its binary digits (3 = 2 + 1 bits), each slice
    packed as above, so unpacking stays a few shifts per code: Σ ceil(count·slice / 8) bytes, which is
    ceil(count·bits / 8) per field when count is a multiple of 8."""
    packed = []
    for codes, bits in fields:
        shift = 0
        for width in _slices(bits):
            part = (codes.to(torch.uint8) >> shift) & (2**width - 1)
            spare = -part.shape[-1] % (8 // width)
            packed.append(_pack(torch.nn.functional.pad(part, (0, spare)) if spare else part, width))
            shift += width
    return torch.cat(packed, dim=-1)


def unpack_bits(packed: torch.Tensor, layout: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
    """The fields ``pack_bits`` packed, given their ``(count, bits)`` in the same order, as uint8 codes."""
    fields, start = [], 0
    for count, bits in layout:
        code, shift = None, 0
        for width in _slices(bits):
            size = -(-count * width // 8)
            part = _unpack(packed[..., start : start + size], width, size * 8 // width)[..., :count]
            code = part if code is None else code | (part << shift)
            shift, start = shift + width, start + size
        fields.append(code)
    return fields


def _slices(bits: int) -> list[int]:
    """The powers of two that sum to ``bits`` (its binary digits), widest first: 3 → [2, 1], the first slice
    holding a code's lowest bits."""
    if not 1 <= bits <= 8:
        raise ValueError(f"codes of 1 to 8 bits can be packed, got {bits}")
    return [width for width in (8, 4, 2, 1) if bits & width]
