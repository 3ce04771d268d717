"""Fixed-size slot formats: one token's key and value of one KV head as a row of bytes, and back.

Pure PyTorch (no vLLM), so every format is tested on its own. A format packs keys and values of shape
[tokens, heads, head_dim] into uint8 slots [tokens, heads, slot_bytes] (the key's bytes, then the value's, then
at most one byte of padding so the slot is a whole number of the pool's elements) and rebuilds float32 keys and
values [heads, tokens, head_dim] from slots [heads, tokens, slot_bytes].

The codes are ojakv's own: ``quantize.quantize`` / ``dequantize`` for ``quant``, the TurboQuant rotations and
Lloyd-Max codebook of ``methods/turboquant.py`` (same seeds per layer and role, so the served codes are the
library's ``turboquant`` with ``residual=0``), the transform coder of ``ojakv.transform_coding`` in the calibrated
bases (the library's ``staticpca:body_bits=...``), and ojakv's RoPE helpers for low-rank keys before RoPE.
"""

from __future__ import annotations

import functools
import math

import torch

from ..quantize import Quantized, dequantize, mixed_bytes, pack_bits, quantize, unpack_bits
from ..transform_coding import GAIN_BYTES, Int8Basis, coder_for, ordered_allocation
from ..rope import apply_rope, undo_rope
from .settings import QUANT_BITS, TURBOQUANT_BITS, Settings, refuse

_FLOAT16_MAX = torch.finfo(torch.float16).max
_TINY = 1e-30
# A transform-coded row packs each binary digit of its widths (4, 2, 1; 8 fills whole bytes) separately, so it
# takes at most this many bytes more than its bits: the slot is sized before the calibration's allocation is read.
PARTIAL_BYTES = 3


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


# --- sizes: known before any weight is loaded (customize_spec needs them) --------------------------------------


def part_bytes(settings: Settings, head_dim: int, dtype_bytes: int) -> int:
    """Bytes of one key (or one value) of one KV head."""
    if settings.method == "quant":
        return head_dim * settings.bits // 8 + 4 * (head_dim // settings.group)  # codes + float16 scale, minimum
    if settings.method == "turboquant":
        return math.ceil(head_dim * settings.bits / 8) + 2  # codes + float16 norm
    if settings.body_bits is not None:  # transform coded: codes + float16 gain
        return math.ceil(coded_bits(settings, head_dim) / 8) + PARTIAL_BYTES + GAIN_BYTES
    return settings.rank * dtype_bytes  # coefficients in the model's dtype


def coded_bits(settings: Settings, head_dim: int) -> int:
    """Bits of one transform-coded key (or value): the library's ``total_bits`` at ``value_share`` 0.5."""
    return round(settings.body_bits * head_dim)


def slot_bytes(settings: Settings, head_dim: int, dtype_bytes: int) -> int:
    """Bytes per token per KV head, keys and values together, padded to whole elements of the pool's dtype."""
    return _round_up(2 * part_bytes(settings, head_dim, dtype_bytes), dtype_bytes)


def resolve(settings: Settings, head_dim: int, dtype_bytes: int) -> Settings:
    """The settings with a budget (or rank ratio) turned into bits or a rank, checked against the head size. An
    ``ojakv`` budget is served transform coded (a rank-sized fixed basis loses pass keys, docs/RESULTS.md)."""
    from dataclasses import replace

    dense = 2 * head_dim * dtype_bytes
    if settings.method in ("quant", "turboquant"):
        if settings.method == "quant":
            if head_dim % settings.group:
                raise refuse(f"quant group {settings.group} does not divide head_dim {head_dim}")
            choices = [b for b in QUANT_BITS if settings.group * b % 8 == 0]
        else:
            choices = list(TURBOQUANT_BITS)
        if settings.bits is None:  # a budget: the width whose slot comes closest to it, as the library's sizing
            bits = min(choices, key=lambda b: abs(slot_bytes(replace(settings, bits=b), head_dim, dtype_bytes)
                                                  / dense - settings.budget))
            settings = replace(settings, bits=bits)
        elif settings.bits not in choices:
            raise refuse(f"quant group {settings.group} at {settings.bits} bits does not fill whole bytes")
        return settings
    if settings.budget is not None:  # a budget: the most bits whose transform-coded slot fits it
        fits = [bits for bits in range(1, 8 * head_dim + 1)
                if slot_bytes(replace(settings, body_bits=bits / head_dim), head_dim, dtype_bytes) / dense
                <= settings.budget]
        if not fits:
            smallest = slot_bytes(replace(settings, body_bits=1 / head_dim), head_dim, dtype_bytes) / dense
            raise refuse(f"budget {settings.budget} is below the smallest transform-coded slot ({smallest:.3f} of "
                         f"the full cache, 1 bit per key and value)")
        return replace(settings, body_bits=max(fits) / head_dim)
    if settings.body_bits is not None:
        return settings
    if settings.rank is None:  # slot / dense = rank / head_dim
        settings = replace(settings, rank=max(1, round(settings.rank_ratio * head_dim)))
    if settings.rank > head_dim:
        raise refuse(f"ojakv rank {settings.rank} exceeds head_dim {head_dim}")
    return settings


# --- formats ------------------------------------------------------------------------------------------------


class Format:
    """One layer's codec. ``encode(key, value, positions)`` → slots; ``decode(slots, positions)`` → (K, V)."""

    def __init__(self, settings: Settings, num_kv_heads: int, head_dim: int, dtype: torch.dtype):
        self.settings = settings
        self.heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.dtype_bytes = torch.empty((), dtype=dtype).element_size()
        self.part = part_bytes(settings, head_dim, self.dtype_bytes)
        self.slot = slot_bytes(settings, head_dim, self.dtype_bytes)

    needs_positions = False

    def encode(self, key: torch.Tensor, value: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """[n, heads, d] keys and values → uint8 slots [n, heads, slot]."""
        k, v = self.encode_part(key, 0, positions), self.encode_part(value, 1, positions)
        pad = self.slot - 2 * self.part
        parts = [k, v] + ([k.new_zeros(*k.shape[:-1], pad)] if pad else [])
        return torch.cat(parts, dim=-1)

    def decode(self, slots: torch.Tensor, positions: torch.Tensor | None = None):
        """uint8 slots [heads, n, slot] → float32 keys and values [heads, n, d]."""
        return (self.decode_part(slots[..., : self.part], 0, positions),
                self.decode_part(slots[..., self.part : 2 * self.part], 1, positions))

    def encode_part(self, x, role, positions):  # pragma: no cover - abstract
        raise NotImplementedError

    def decode_part(self, data, role, positions):  # pragma: no cover - abstract
        raise NotImplementedError

    # Attention may run in another orthonormal frame (or a subspace) per KV head: scores qᵀk = (qM)ᵀ(kM) when
    # k = (kM)Mᵀ, and Σ p v = (Σ p vN) Nᵀ. A format that stores coordinates in such a frame hands them over
    # without rebuilding every key and value; the query and the output are mapped once per step instead.

    def attention_operands(self, slots: torch.Tensor, positions: torch.Tensor | None = None):
        """(keys, values) [heads, n, ·] float32 in the frame ``map_query`` / ``map_output`` expect."""
        return self.decode(slots, positions)

    def map_query(self, q: torch.Tensor) -> torch.Tensor:
        """Queries [..., query heads, L, d] into the keys' frame (identity unless a format overrides it)."""
        return q

    def map_output(self, o: torch.Tensor) -> torch.Tensor:
        """Attention output [..., query heads, L, ·] from the values' frame back to channels."""
        return o


def _per_kv_head(x: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """x [..., query heads, L, a] @ matrices [kv heads, a, b], query head j using KV head j // group."""
    heads = matrices.shape[0]
    lead, hq, length, a = x.shape[:-3], x.shape[-3], x.shape[-2], x.shape[-1]
    grouped = x.reshape(*lead, heads, hq // heads, length, a)
    return (grouped @ matrices[:, None]).reshape(*lead, hq, length, matrices.shape[-1])


@functools.lru_cache(maxsize=None)
def byte_codes(bits: int) -> torch.Tensor:
    """[256, 8 // bits] int64: the codes one byte holds, in ``quantize.pack_bits``'s order (2, 4 or 8 bits)."""
    return unpack_bits(torch.arange(256, dtype=torch.uint8)[:, None], [(8 // bits, bits)])[0].long()


def _lookup(table: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    """table [256, k] rows for each byte of data [..., m] → [..., m·k] (one gather instead of shifts + masks)."""
    return table.index_select(0, data.reshape(-1).long()).reshape(*data.shape[:-1], -1)


class QuantFormat(Format):
    """Per-token asymmetric min/max codes, ``bits`` per channel, float16 scale and minimum per ``group`` channels:
    ``quantize(x, bits, dim=-1, group)``, its three tensors laid end to end."""

    def __init__(self, settings, num_kv_heads, head_dim, dtype):
        super().__init__(settings, num_kv_heads, head_dim, dtype)
        self.bits, self.group = settings.bits, settings.group
        self.groups = head_dim // self.group
        self.code_bytes = head_dim * self.bits // 8
        self.table = byte_codes(self.bits).float()

    def encode_part(self, x, role, positions):
        q = quantize(x, self.bits, dim=-1, group=self.group)
        lead = x.shape[:-1]
        return torch.cat([q.codes.reshape(*lead, self.code_bytes),
                          q.scale.reshape(*lead, self.groups).view(torch.uint8),
                          q.minimum.reshape(*lead, self.groups).view(torch.uint8)], dim=-1)

    def decode_part(self, data, role, positions):
        """``dequantize`` of the stored tensors (``decode_reference``), with the codes unpacked by one byte-table
        gather: codes·scale + minimum per group, in float32."""
        lead = data.shape[:-1]
        c, g = self.code_bytes, 2 * self.groups
        codes = _lookup(self.table, data[..., :c]).reshape(*lead, self.groups, self.group)
        scale = data[..., c : c + g].contiguous().view(torch.float16).reshape(*lead, self.groups, 1).float()
        minimum = data[..., c + g : c + 2 * g].contiguous().view(torch.float16).reshape(*lead, self.groups, 1)
        return torch.addcmul(minimum.float(), codes, scale).reshape(*lead, self.head_dim)

    def decode_reference(self, data, role):
        """The same through ``quantize.dequantize`` (tests check both agree)."""
        lead = data.shape[:-1]
        c, g = self.code_bytes, 2 * self.groups
        codes = data[..., :c].reshape(*lead, self.groups, c // self.groups)
        scale = data[..., c : c + g].contiguous().view(torch.float16).reshape(*lead, self.groups, 1)
        minimum = data[..., c + g : c + 2 * g].contiguous().view(torch.float16).reshape(*lead, self.groups, 1)
        q = Quantized(codes, scale, minimum, self.bits, -1, self.group, (*lead, self.head_dim))
        return dequantize(q, torch.float32)


class TurboQuantFormat(Format):
    """ojakv's TurboQuant MSE quantizer per KV head: ‖x‖ in float16, Π·x/‖x‖ as Lloyd–Max indices packed with
    ``quantize.pack_bits``. Π is drawn exactly as the library draws it for this layer and role, so a token codes to
    the same bytes in both."""

    def __init__(self, settings, num_kv_heads, head_dim, dtype, layer_idx: int, head_offset: int = 0,
                 total_heads: int | None = None):
        super().__init__(settings, num_kv_heads, head_dim, dtype)
        from ..methods.turboquant import codebook, random_rotations

        self.bits = settings.bits
        total = total_heads or num_kv_heads
        self.rotations = []
        for role in (0, 1):  # keys, values: the library's (layer, role, channel set 0) seeds
            generator = torch.Generator().manual_seed(_derive_seed(settings.rotation_seed, layer_idx, role, 0))
            rotation = random_rotations(total, head_dim, generator)
            self.rotations.append(rotation[head_offset : head_offset + num_kv_heads].contiguous())
        self.centroids = codebook(head_dim, self.bits).float()
        self.midpoints = (self.centroids[1:] + self.centroids[:-1]) / 2
        # centroid values per byte (2 and 4 bits pack whole codes into bytes; 3 bits are split by pack_bits)
        self.table = self.centroids[byte_codes(self.bits)] if 8 % self.bits == 0 else None

    def encode_part(self, x, role, positions):
        x = x.float().transpose(0, 1)  # [heads, n, d], as the library's [b, heads, n, d]
        norm = x.norm(dim=-1, keepdim=True)
        unit = x / norm.clamp_min(_TINY)
        rotated = unit @ self.rotations[role].transpose(-1, -2)
        index = torch.bucketize(rotated, self.midpoints)
        packed = pack_bits([(index, self.bits)])
        norm16 = norm.clamp_max(_FLOAT16_MAX).half().view(torch.uint8)
        return torch.cat([packed, norm16], dim=-1).transpose(0, 1)

    def rotated(self, data: torch.Tensor) -> torch.Tensor:
        """c[idx]·‖x‖ [..., d]: the vector in its rotated frame (x = rotated @ Π)."""
        norm = data[..., -2:].contiguous().view(torch.float16).float()
        if self.table is not None:
            return _lookup(self.table, data[..., :-2]) * norm
        codes = unpack_bits(data[..., :-2], [(self.head_dim, self.bits)])[0]
        return self.centroids[codes.long()] * norm

    def decode_part(self, data, role, positions):
        return self.rotated(data) @ self.rotations[role]

    def attention_operands(self, slots, positions=None):
        """Keys and values left in their rotated frames: qᵀk = (qΠ_kᵀ)ᵀ(c‖k‖), Σ p v = (Σ p c‖v‖) Π_v."""
        return self.rotated(slots[..., : self.part]), self.rotated(slots[..., self.part : 2 * self.part])

    def map_query(self, q):
        return _per_kv_head(q.float(), self.rotations[0].transpose(-1, -2))

    def map_output(self, o):
        return _per_kv_head(o, self.rotations[1])


class LowRankFormat(Format):
    """Coefficients of each key and value in a fixed orthonormal basis per layer and KV head (keys before RoPE by
    default, rotated back to their positions when rebuilt), stored in the model's dtype."""

    def __init__(self, settings, num_kv_heads, head_dim, dtype, key_basis: torch.Tensor, value_basis: torch.Tensor,
                 inv_freq: torch.Tensor | None):
        super().__init__(settings, num_kv_heads, head_dim, dtype)
        self.bases = [key_basis.float().contiguous(), value_basis.float().contiguous()]  # [heads, d, r]
        self.pre_rope = settings.key_mode == "pre_rope"
        self.inv_freq = inv_freq
        self.needs_positions = self.pre_rope

    def _angles(self, positions: torch.Tensor):
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos()[None], emb.sin()[None]  # [1, n, rotary_dim]: rope.py's [b, n, d]

    def encode_part(self, x, role, positions):
        x = x.transpose(0, 1)  # [heads, n, d]
        if role == 0 and self.pre_rope:
            cos, sin = self._angles(positions)
            x = undo_rope(x.float()[None], cos, sin)[0]
        coefficients = (x.float() @ self.bases[role]).to(self.dtype)
        return self.store(coefficients, role).transpose(0, 1)

    def decode_part(self, data, role, positions):
        x = self.coefficients(data, role) @ self.bases[role].transpose(-1, -2)
        if role == 0 and self.pre_rope:
            cos, sin = self._angles(positions)
            x = apply_rope(x[None], cos, sin)[0]
        return x

    def store(self, coefficients: torch.Tensor, role: int) -> torch.Tensor:
        """Coefficients [heads, n, r] (model dtype) → their bytes [heads, n, part]."""
        return coefficients.contiguous().view(torch.uint8)

    def coefficients(self, data: torch.Tensor, role: int) -> torch.Tensor:
        """Bytes [heads, n, part] → float32 coefficients [heads, n, r]."""
        return data.contiguous().view(self.dtype).float()

    def attention_operands(self, slots, positions=None):
        """Values as coefficients (Σ p v = (Σ p c_v) U_vᵀ); keys too after RoPE (qᵀk = (U_kᵀq)ᵀc_k); keys before
        RoPE are rebuilt and rotated to their positions."""
        keys = self.decode_part(slots[..., : self.part], 0, positions) if self.pre_rope \
            else self.coefficients(slots[..., : self.part], 0)
        return keys, self.coefficients(slots[..., self.part : 2 * self.part], 1)

    def map_query(self, q):
        return q.float() if self.pre_rope else _per_kv_head(q.float(), self.bases[0])

    def map_output(self, o):
        return _per_kv_head(o, self.bases[1].transpose(-1, -2))


class TransformCodedFormat(LowRankFormat):
    """``LowRankFormat`` in the calibrated KL bases with the coefficients transform coded
    (``ojakv.transform_coding``): per layer, ``coded_bits`` bits per key and per value allocated by the calibration's
    variances over all KV heads (one layout for every head and request), each row whitened by the calibration's
    standard deviations and stored as packed Lloyd–Max codes and a float16 gain, then padded to the slot. The
    bases are the calibration's columns rounded to int8 (``Int8Basis``), as the library holds a coded body's fixed
    bases, so a token codes to the same bytes as in the library's ``staticpca:body_bits=...``."""

    def __init__(self, settings, num_kv_heads, head_dim, dtype, spectra, inv_freq, head_offset: int = 0):
        bases, self.coders = [], []
        heads = slice(head_offset, head_offset + num_kv_heads)
        for variances, vectors in spectra:  # keys, values: [all heads, d], [all heads, d, d]
            bits = ordered_allocation(variances, coded_bits(settings, head_dim))
            index, coder = coder_for(variances[heads][None], bits)
            bases.append(Int8Basis(vectors[heads].index_select(-1, index)).float())
            self.coders.append(coder)
        super().__init__(settings, num_kv_heads, head_dim, dtype, *bases, inv_freq)

    def store(self, coefficients, role):
        codes, gains = self.coders[role].encode(coefficients[None])
        data = torch.cat([codes[0], gains[0].view(torch.uint8)], dim=-1)
        return torch.nn.functional.pad(data, (0, self.part - data.shape[-1]))

    def coefficients(self, data, role):
        coder = self.coders[role]
        width = mixed_bytes(coder.bits)
        gains = data[..., width : width + GAIN_BYTES].contiguous().view(torch.float16)
        return coder.decode(data[None, ..., :width], gains[None])[0]


def _derive_seed(*numbers: int) -> int:
    """The library's per-quantizer seed (``methods/turboquant.py``), repeated here so that this module does not
    depend on a private name there; tests/vllm/test_formats.py checks both agree."""
    value = 0
    for number in numbers:
        value = (value * 1_000_003 + number) % (2**63 - 1)
    return value
