"""Asymmetric min/max quantization with codes packed into bytes, so held bytes reflect bits, not a float copy.

``quantize(x, bits, dim, group)`` splits axis ``dim`` into groups of ``group`` elements; every group shares one
scale and one minimum (stored in float16, as KIVI does): q = round((x − min) / scale), scale = (max − min)/(2^b − 1).
Codes of 2 or 4 bits are packed 4 or 2 to a byte along the last axis; 8-bit codes take a byte each.
``pack_bits`` packs fields of any width from 1 to 8 bits (e.g. TurboQuant's 3-bit codes and 1-bit signs) into one
row of bytes with no bits wasted when a field's length is a multiple of 8; ``pack_mixed`` packs one row whose
entries each have their own width (a transform coder's bit allocation) with less than a byte wasted per slice width.
``codebook(dim, bits)`` is the Lloyd–Max quantizer of one coordinate of a uniformly random unit vector in R^dim,
shared by TurboQuant and the transform-coded OjaKV body.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import torch

SUPPORTED_BITS = (2, 4, 8)
_GRID = 1 << 15  # cells of the grid on [-1, 1] that Lloyd's iterations run on
_ITERATIONS = 2000  # a safety bound: on the grid, the iterations reach a fixed point within a few hundred
_TINY = 1e-30


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


def pack_mixed(codes: torch.Tensor, widths: Sequence[int]) -> torch.Tensor:
    """Codes ``[..., r]`` where entry j has ``widths[j]`` bits (0 to 8; 0 stores nothing) as one uint8 row: each
    width is split into binary digits and every entry's slice of one digit width is packed together, so a row
    takes Σ_w ceil(n_w · w / 8) bytes over the slice widths w ∈ {8, 4, 2, 1} (n_w entries have that digit)."""
    fields = []
    for width, columns, shifts in _mixed_layout(tuple(widths)):
        if columns:
            index = torch.tensor(columns, device=codes.device)
            shift = torch.tensor(shifts, device=codes.device, dtype=torch.uint8)
            fields.append(((codes.index_select(-1, index).to(torch.uint8) >> shift) & (2**width - 1), width))
    if not fields:
        return codes.new_zeros((*codes.shape[:-1], 0), dtype=torch.uint8)
    return pack_bits(fields)


def unpack_mixed(packed: torch.Tensor, widths: Sequence[int]) -> torch.Tensor:
    """The codes ``pack_mixed`` packed, ``[..., len(widths)]`` uint8 (entries of width 0 are 0)."""
    layout, placements = [], []
    for width, columns, shifts in _mixed_layout(tuple(widths)):
        if columns:
            layout.append((len(columns), width))
            placements.append((columns, shifts))
    codes = packed.new_zeros((*packed.shape[:-1], len(widths)))
    for part, (columns, shifts) in zip(unpack_bits(packed, layout), placements):
        index = torch.tensor(columns, device=packed.device)
        shift = torch.tensor(shifts, device=packed.device, dtype=torch.uint8)
        codes.index_add_(-1, index, part << shift)  # digits of one entry never overlap: adding is or-ing
    return codes


@functools.lru_cache(maxsize=None)
def mixed_slices(widths: tuple[int, ...]) -> tuple[tuple[tuple[int, int, int, int], ...], ...]:
    """Where ``pack_mixed`` puts each entry's bits: per entry, its slices as (byte, shift in that byte, width,
    shift in the code), so that code_j = Σ ((row[byte] >> shift) & (2^width − 1)) << code shift. A reader that
    decodes one row at a time (``ojakv.kernels``) needs this instead of ``unpack_mixed``'s whole-tensor passes."""
    slices: list[list[tuple[int, int, int, int]]] = [[] for _ in widths]
    start = 0
    for digit, columns, shifts in _mixed_layout(widths):
        per_byte = 8 // digit
        for k, (j, code_shift) in enumerate(zip(columns, shifts)):
            slices[j].append((start + k // per_byte, k % per_byte * digit, digit, code_shift))
        start += -(-len(columns) * digit // 8)
    return tuple(tuple(entry) for entry in slices)


def mixed_bytes(widths: Sequence[int]) -> int:
    """Bytes ``pack_mixed`` uses for one row of these widths."""
    return packed_bytes({width: len(columns) for width, columns, _ in _mixed_layout(tuple(widths))})


def packed_bytes(digit_counts: dict[int, int]) -> int:
    """Bytes of a ``pack_mixed`` row from how many entries have each binary digit (8, 4, 2, 1) in their width."""
    return sum(-(-count * digit // 8) for digit, count in digit_counts.items())


@functools.lru_cache(maxsize=None)
def _mixed_layout(widths: tuple[int, ...]) -> tuple:
    """(digit width, entries, shifts) for each digit width 8, 4, 2, 1: worked out once per allocation, not per
    decode step."""
    return tuple((digit, *_digit_columns(widths, digit)) for digit in (8, 4, 2, 1))


def _digit_columns(widths: Sequence[int], digit: int) -> tuple[list[int], list[int]]:
    """Entries whose width has the binary digit ``digit``, and where that slice starts in the code (its shift):
    the slices of a code are laid out widest first from its lowest bit, as ``pack_bits`` does."""
    columns, shifts = [], []
    for j, width in enumerate(widths):
        if not 0 <= width <= 8:
            raise ValueError(f"entries of 0 to 8 bits can be packed, got {width}")
        if width & digit:
            columns.append(j)
            shifts.append(sum(w for w in (8, 4, 2, 1) if width & w and w > digit))
    return columns, shifts


@functools.lru_cache(maxsize=None)
def codebook(dim: int, bits: int) -> torch.Tensor:
    """Lloyd–Max centroids (float64, ascending, symmetric) for one coordinate of a uniform unit vector in R^dim.

    Lloyd's iterations on a fine grid of the density ∝ (1 − t²)^((dim − 3)/2), starting from its quantiles.
    """
    if dim < 2 or not 1 <= bits <= 8:
        raise ValueError(f"a codebook needs dim >= 2 and 1..8 bits, got dim={dim}, bits={bits}")
    t, weight = _sphere_coordinate_density(dim)
    levels = 2**bits
    cdf = torch.cumsum(weight, 0) / weight.sum()
    centroids = t[torch.searchsorted(cdf, (torch.arange(levels, dtype=torch.float64) + 0.5) / levels)]
    for _ in range(_ITERATIONS):
        cell = torch.bucketize(t, (centroids[1:] + centroids[:-1]) / 2)
        mass = torch.zeros(levels, dtype=torch.float64).index_add_(0, cell, weight)
        moment = torch.zeros(levels, dtype=torch.float64).index_add_(0, cell, weight * t)
        updated = torch.where(mass > 0, moment / mass.clamp_min(_TINY), centroids)
        converged = (updated - centroids).abs().max().item() < 1e-12
        centroids = updated
        if converged:
            break
    return (centroids - centroids.flip(0)) / 2  # the density is even: remove the grid's rounding asymmetry


@functools.lru_cache(maxsize=None)
def codebook_distortion(dim: int, bits: int) -> float:
    """Mean squared error of ``codebook(dim, bits)`` relative to the coordinate's variance (1/dim): 1 at 0 bits
    (the coordinate dropped), falling by about 4× per bit."""
    if bits == 0:
        return 1.0
    t, weight = _sphere_coordinate_density(max(dim, 2))
    centroids = codebook(max(dim, 2), bits)
    nearest = centroids[torch.bucketize(t, (centroids[1:] + centroids[:-1]) / 2)]
    variance = (weight * t * t).sum() / weight.sum()
    return float((weight * (t - nearest) ** 2).sum() / weight.sum() / variance)


def _sphere_coordinate_density(dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fine grid on [-1, 1] and the (unnormalised) density of one coordinate of a uniform unit vector there."""
    t = (torch.arange(_GRID, dtype=torch.float64) + 0.5) * (2.0 / _GRID) - 1.0
    log_density = (dim - 3) / 2 * torch.log1p(-t * t)
    return t, torch.exp(log_density - log_density.max())
