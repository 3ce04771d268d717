"""``turboquant``: data-oblivious vector quantization after a random rotation (Zandieh et al., arXiv 2504.19874).

Per KV head, a fixed random orthogonal Π (QR of a seeded Gaussian, signs fixed so it is Haar-distributed) turns
every key or value into a vector whose coordinates all follow the same known density, that of one coordinate of a
uniformly random unit vector in R^d, ∝ (1 − t²)^((d − 3)/2). So one Lloyd–Max codebook per (d, bits), computed
once numerically, quantizes every coordinate near-optimally without calibration. Per vector the cache stores
‖x‖ (float16) and the index of the nearest centroid of each coordinate of Π·x/‖x‖; it rebuilds Πᵀ·c[idx]·‖x‖.

- **Keys use the MSE variant by default** (``key_variant="mse"``), like values. ``key_variant="prod"`` is the
  paper's inner-product variant for keys: the MSE stage at b − 1 bits, then 1-bit QJL of the residual r: signs of
  S·r with S a seeded Gaussian d×d, plus γ = ‖r‖ (float16), added back as √(π/2)/d·γ·Sᵀ·signs, which makes every
  logit qᵀk unbiased. The paper does not say which variant goes to K or V. Unbiased is not more accurate: at equal
  bits the prod variant's logit error variance is about five times the MSE variant's (0.18/d against 0.034/d at
  3 bits), and on the embedded model the 3,000-token pass key was missed with prod keys at 2.5, 3.5 and 4 bits
  (also with 128 exact recent tokens) but found with MSE keys at 3, 3.5 and 4 bits
  (``ojakv generate --method turboquant --passkey 3000``, 2026-11-23). Hence the default.
- **Fractional bits** (2.5, 3.5) split each head's channels: ``outlier_fraction`` (¼) of them at b + 1 bits, the
  rest at b bits, each set its own independent quantizer (own rotation, projection and codebook). The paper does
  not say how outliers are chosen: here they are the channels with the largest RMS over the prompt, chosen per
  sequence and KV head (keys and values separately) at prefill and fixed thereafter. The codes then take
  b + ¼ bits per coordinate; the paper's "2.5 / 3.5 bits" also count one float16 norm per set at d = 128.
- **Every token is quantized, generated ones too** (no full-precision window, unlike KIVI), unless ``residual``
  keeps the most recent tokens exact; a huge ``residual`` stores nothing quantized (the full cache).
- **Storage**: all codes of a vector (MSE indices and QJL signs, every channel set) are packed together with
  ``quantize.pack_bits``: (d·b + outlier channels) / 8 bytes when the sets' sizes are multiples of 8 (d = 64:
  16 + 48); norms take 2 bytes each (1 or 2 per channel set). The rotations, projections and codebooks are held
  per layer in float32 and counted: three d×d matrices per KV head with prod keys (Π for K, S for K, Π for V),
  two with MSE keys; at 3.5 bits 2.0% (prod) or 1.3% (mse) of a float32 full cache of 3,000 tokens at d = 64,
  more for short prompts. Padding is stored as zero vectors (zero norm, so nothing is divided by zero); norms
  beyond float16's range are clamped.
- **Attention**: the prompt attends to its own full-precision keys and values (compression is for what the cache
  keeps); later calls run on dequantized keys and values (reconstruct path, as ``kivi``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..cache import SharedState, growable_segments
from ..errors import OjaKVError
from ..memory import nbytes
from ..hf import geometry
from ..quantize import codebook, pack_bits, unpack_bits
from ..storage import GrowableTensor
from . import Method, Sizing, always, knob, largest_within, register
from .kivi import KIVILayer

BITS = (2, 2.5, 3, 3.5, 4)
KEY_VARIANTS = ("prod", "mse")
_FLOAT16_MAX = torch.finfo(torch.float16).max
_TINY = 1e-30


@dataclass
class TurboQuantConfig:
    bits: float = knob(3.5, "bits per coordinate: 2, 3 or 4, or 2.5 / 3.5 (outlier channels one bit more)")
    key_variant: str = knob("mse", "keys: mse, or prod (b-1-bit MSE + 1-bit QJL of the residual, unbiased)")
    outlier_fraction: float = knob(0.25, "share of channels one bit wider at 2.5 / 3.5 bits (largest prompt RMS)")
    residual: int = knob(0, "recent tokens kept in full precision (0: every token quantized, as the paper)")
    rotation_seed: int = knob(0, "seed of the random rotations and QJL projections")

    def validate(self) -> None:
        if self.bits not in BITS:
            raise OjaKVError(f"bits must be one of {', '.join(map(str, BITS))}, got {self.bits}")
        if self.key_variant not in KEY_VARIANTS:
            raise OjaKVError(f"key_variant must be one of {', '.join(KEY_VARIANTS)}, got {self.key_variant!r}")
        if not 0.0 < self.outlier_fraction < 1.0:
            raise OjaKVError(f"outlier_fraction must be strictly between 0 and 1 (e.g. 0.25), "
                             f"got {self.outlier_fraction}")
        if self.residual < 0:
            raise OjaKVError(f"residual must be a number of tokens >= 0, got {self.residual}")
        if self.rotation_seed < 0:
            raise OjaKVError(f"rotation_seed must be >= 0, got {self.rotation_seed}")


def channel_sets(config: TurboQuantConfig, head_dim: int) -> list[tuple[int, int]]:
    """(channels, bits) of each independently quantized set: outliers first when the bit width is fractional."""
    base = int(config.bits)
    if config.bits == base:
        return [(head_dim, base)]
    outliers = round(config.outlier_fraction * head_dim)
    if not 2 <= outliers <= head_dim - 2:
        raise OjaKVError(f"outlier_fraction {config.outlier_fraction} gives {outliers} of head_dim {head_dim} "
                         f"channels; choose one that leaves at least 2 channels in each set")
    return [(outliers, base + 1), (head_dim - outliers, base)]


# --- one quantizer ----------------------------------------------------------------------------------------


def _derive_seed(*numbers: int) -> int:
    """A seed for one quantizer from the user's seed and where it is used (layer, role, channel set)."""
    value = 0
    for number in numbers:
        value = (value * 1_000_003 + number) % (2**63 - 1)
    return value


def random_rotations(count: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` Haar-random orthogonal matrices (float32): QR of Gaussians, columns signed by R's diagonal so that
    QR's sign convention does not bias the distribution."""
    gaussian = torch.randn(count, width, width, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    return (q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)).float()


def _norm16(x: torch.Tensor) -> torch.Tensor:
    """‖x‖ over the last axis as float16 (clamped to its range), keeping the axis."""
    return x.norm(dim=-1, keepdim=True).clamp_max(_FLOAT16_MAX).half()


class Quantizer(NamedTuple):
    """One TurboQuant instance for vectors of ``width`` channels, one rotation (and projection) per KV head.

    A tuple, so a layer's memory walk sees its matrices. Vectors are [..., heads, tokens, width].
    """

    rotation: torch.Tensor  # Π [heads, width, width]
    projection: torch.Tensor | None  # QJL's S [heads, width, width], prod variant only
    centroids: torch.Tensor  # [2^mse_bits], float32
    mse_bits: int

    @classmethod
    def create(cls, width: int, bits: int, variant: str, heads: int, seed: int, device=None) -> "Quantizer":
        """``bits`` per coordinate in all: the prod variant spends one of them on the QJL signs."""
        qjl = variant == "prod"
        mse_bits = bits - 1 if qjl else bits
        generator = torch.Generator().manual_seed(seed)  # one stream: each head's Π, then each head's S
        rotation = random_rotations(heads, width, generator)
        projection = torch.randn(heads, width, width, generator=generator) if qjl else None
        centroids = codebook(width, mse_bits).float()
        return cls(rotation.to(device), None if projection is None else projection.to(device), centroids.to(device),
                   mse_bits)

    @property
    def width(self) -> int:
        return self.rotation.shape[-1]

    @property
    def layout(self) -> list[tuple[int, int]]:
        """(count, bits) of the packed fields per vector: centroid indices, then QJL signs."""
        return [(self.width, self.mse_bits)] + ([(self.width, 1)] if self.projection is not None else [])

    @property
    def norms(self) -> int:
        """float16 norms per vector: ‖x‖, and γ = ‖r‖ for the prod variant."""
        return 1 if self.projection is None else 2

    @property
    def nbytes(self) -> int:
        return nbytes(self.rotation, self.projection, self.centroids)

    def encode(self, x: torch.Tensor) -> tuple[list[tuple[torch.Tensor, int]], torch.Tensor]:
        """Fields for ``pack_bits`` and the float16 norms [..., self.norms]."""
        x = x.float()
        norm = _norm16(x)
        # Zero vectors (padding) get a zero unit vector, any index, and norm 0: they decode to exactly zero.
        unit = x / x.norm(dim=-1, keepdim=True).clamp_min(_TINY)
        rotated = unit @ self.rotation.transpose(-1, -2)
        index = torch.bucketize(rotated, (self.centroids[1:] + self.centroids[:-1]) / 2)
        if self.projection is None:
            return [(index, self.mse_bits)], norm
        residual = x - self._rebuild(index, norm)  # against the float16 norm decoding will use
        signs = (residual @ self.projection.transpose(-1, -2)) >= 0
        return [(index, self.mse_bits), (signs, 1)], torch.cat([norm, _norm16(residual)], dim=-1)

    def decode(self, codes: list[torch.Tensor], norms: torch.Tensor) -> torch.Tensor:
        """float32 vectors from the fields of ``layout`` and the norms ``encode`` returned."""
        return self.coefficients(codes, norms) @ self.basis

    @property
    def basis(self) -> torch.Tensor:
        """[heads, width or 2·width, width]: Π, then S, so that one product rebuilds both stages."""
        return self.rotation if self.projection is None else torch.cat([self.rotation, self.projection], dim=-2)

    def coefficients(self, codes: list[torch.Tensor], norms: torch.Tensor) -> torch.Tensor:
        """What multiplies ``basis``: c[idx]·‖x‖, then (prod) ±1 signs · √(π/2)/width · γ."""
        mse = self.centroids[codes[0].long()] * norms[..., :1].float()
        if self.projection is None:
            return mse
        signs = codes[1].float() * 2 - 1
        return torch.cat([mse, signs * (norms[..., 1:2].float() * (math.sqrt(math.pi / 2) / self.width))], dim=-1)

    def _rebuild(self, index: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
        return (self.centroids[index.long()] * norm.float()) @ self.rotation  # Πᵀ c ‖x‖, as row vectors


# --- all channel sets of one role (keys or values) --------------------------------------------------------


def encode(x: torch.Tensor, quantizers: tuple[Quantizer, ...], order: torch.Tensor | None):
    """[b, h, n, d] → packed codes [b, h, n, ceil(d·bits/8)] (uint8) and norms [b, h, n, ·] (float16)."""
    if order is not None:
        x = x.gather(-1, order.long()[:, :, None, :].expand(x.shape))
    fields, norms = [], []
    for quantizer, part in zip(quantizers, x.split([q.width for q in quantizers], dim=-1)):
        own_fields, own_norms = quantizer.encode(part)
        fields += own_fields
        norms.append(own_norms)
    return pack_bits(fields), torch.cat(norms, dim=-1)


def decode(packed: torch.Tensor, norms: torch.Tensor, quantizers: tuple[Quantizer, ...],
           order: torch.Tensor | None) -> torch.Tensor:
    """The float32 vectors ``encode`` packed, channels back in their own order: one product of all sets'
    coefficients with their bases, each basis's columns placed at its set's channels."""
    codes = iter(unpack_bits(packed, [field for q in quantizers for field in q.layout]))
    coefficients, column = [], 0
    for quantizer in quantizers:
        own = [next(codes) for _ in quantizer.layout]
        coefficients.append(quantizer.coefficients(own, norms[..., column : column + quantizer.norms]))
        column += quantizer.norms
    if order is None:
        return coefficients[0] @ quantizers[0].basis
    bases, start = [], 0
    for quantizer in quantizers:
        bases.append(_placed(quantizer.basis, order[..., start : start + quantizer.width], order.shape[-1]))
        start += quantizer.width
    return torch.cat(coefficients, dim=-1) @ torch.cat(bases, dim=-2)


def _placed(basis: torch.Tensor, channels: torch.Tensor, d: int) -> torch.Tensor:
    """[heads, rows, width] basis → [b, heads, rows, d]: column j moved to channel ``channels[b, head, j]``, zeros
    elsewhere (a few KB per step, rebuilt rather than held)."""
    b, heads, width = channels.shape
    rows = basis.shape[-2]
    index = channels.long()[:, :, None, :].expand(b, heads, rows, width)
    return basis.new_zeros(b, heads, rows, d).scatter_(-1, index, basis.expand(b, heads, rows, width))


def outliers_first(x: torch.Tensor, outliers: int) -> torch.Tensor:
    """Per sequence and KV head, a channel order [b, h, d] (int16): the ``outliers`` channels with the largest RMS
    over the tokens of ``x`` [b, h, n, d], then the others, each in channel order. Padding must be zero: it then
    adds the same nothing to every channel's sum of squares, which ranks channels as their RMS over real tokens."""
    top = x.float().square().sum(2).topk(outliers, dim=-1).indices
    regular = torch.ones(x.shape[:2] + x.shape[-1:], dtype=torch.uint8, device=x.device).scatter(-1, top, 0)
    return torch.argsort(regular, dim=-1, stable=True).to(torch.int16)


# --- the cache layer --------------------------------------------------------------------------------------


class TurboQuantLayer(KIVILayer):
    """KIVI's skeleton, reused: padding zeroed, the last ``residual`` tokens exact, older ones quantized as they
    age, attention on rebuilt keys and values. What differs is how the old tokens are stored (KIVI's block lists
    stay empty)."""

    def __init__(self, layer_idx: int, shared: SharedState, config: TurboQuantConfig):
        super().__init__(layer_idx, shared, config)
        self.key_quantizers: tuple[Quantizer, ...] = ()
        self.value_quantizers: tuple[Quantizer, ...] = ()
        self.key_order = self.value_order = None  # channel orders [b, h, d], fractional bits only
        self.key_codes, self.value_codes = GrowableTensor(dim=2), GrowableTensor(dim=2)
        self.key_norms, self.value_norms = GrowableTensor(dim=2), GrowableTensor(dim=2)

    def _set_up(self) -> None:
        """Quantizers per channel set, and (fractional bits) the outlier channels, from the prompt: on the first
        call the exact tail holds exactly the prompt, padding zeroed."""
        heads, sets = self.keys_fp.shape[1], channel_sets(self.config, self.keys_fp.shape[-1])
        variants = {0: self.config.key_variant, 1: "mse"}
        self.key_quantizers, self.value_quantizers = (
            tuple(Quantizer.create(width, bits, variants[role], heads,
                                   _derive_seed(self.config.rotation_seed, self.layer_idx, role, index),
                                   self.keys_fp.device)
                  for index, (width, bits) in enumerate(sets))
            for role in (0, 1)
        )
        if len(sets) > 1:
            self.key_order = outliers_first(self.keys_fp, sets[0][0])
            self.value_order = outliers_first(self.values_fp, sets[0][0])

    def _quantize_old_tokens(self) -> None:
        if not self.key_quantizers:
            self._set_up()
        ready = self.keys_fp.shape[2] - self.config.residual
        if ready <= 0:
            return
        for states, quantizers, order, codes, norms in (
            (self.keys_fp, self.key_quantizers, self.key_order, self.key_codes, self.key_norms),
            (self.values_fp, self.value_quantizers, self.value_order, self.value_codes, self.value_norms),
        ):
            packed, scales = encode(states[:, :, :ready], quantizers, order)
            codes.append(packed)
            norms.append(scales)
        self.keys_fp = self.keys_fp[:, :, ready:].clone()
        self.values_fp = self.values_fp[:, :, ready:].clone()

    def _materialize(self):
        if self.key_codes.length == 0:
            return self.keys_fp, self.values_fp
        keys = decode(self.key_codes.view, self.key_norms.view, self.key_quantizers, self.key_order)
        values = decode(self.value_codes.view, self.value_norms.view, self.value_quantizers, self.value_order)
        return (torch.cat([keys.to(self.dtype), self.keys_fp], dim=2),
                torch.cat([values.to(self.dtype), self.values_fp], dim=2))

    def segments(self) -> dict[str, int]:
        segments = growable_segments(quantized_codes=(self.key_codes, self.value_codes),
                                     norms=(self.key_norms, self.value_norms))
        segments["rotations"] = sum(q.nbytes for q in self.key_quantizers + self.value_quantizers)
        segments["channel_order"] = nbytes(self.key_order, self.value_order)
        segments["residual_fp"] = nbytes(self.keys_fp, self.values_fp)
        return segments


# --- registration -----------------------------------------------------------------------------------------


def _build(model, config: TurboQuantConfig):
    channel_sets(config, geometry(model).head_dim)  # an impossible outlier split fails before any token
    return (lambda i, shared: TurboQuantLayer(i, shared, config)), False


def held_bytes(config: TurboQuantConfig, head_dim: int, kv_heads: int, tokens: int, dtype_bytes: int) -> int:
    """Bytes one layer holds for one sequence once ``tokens`` are cached (growth slack aside)."""
    sets = channel_sets(config, head_dim)
    qjl = config.key_variant == "prod"
    code_bytes = math.ceil(sum(width * bits for width, bits in sets) / 8)
    norm_bytes = 2 * len(sets) * ((2 if qjl else 1) + 1)  # keys: ‖x‖ (and γ); values: ‖x‖
    exact = min(tokens, config.residual)
    per_head = (tokens - exact) * (2 * code_bytes + norm_bytes) + exact * 2 * head_dim * dtype_bytes
    per_head += sum(4 * width * width * (3 if qjl else 2) for width, _ in sets)  # Π for K and V, S for K
    per_head += 2 * 2 * head_dim if len(sets) > 1 else 0  # channel orders, int16
    centroids = sum(4 * (2 ** (bits - qjl) + 2**bits) for _, bits in sets)  # float32, shared by the heads
    return kv_heads * per_head + centroids


def _for_budget(knobs, geometry, prompt_tokens, new_tokens, dtype_bytes, budget) -> Sizing:
    """Bits are discrete: pick the width whose predicted ratio is closest (the eval row says if it misses)."""
    others = {k: v for k, v in knobs.items() if k != "bits"}
    n = prompt_tokens + new_tokens
    d, heads = geometry.head_dim, geometry.num_kv_heads

    def ratio(bits: float) -> float:
        config = TurboQuantConfig(bits=bits, **others)
        return held_bytes(config, d, heads, n, dtype_bytes) / (2 * n * d * dtype_bytes * heads)

    bits = largest_within(sorted(BITS, key=ratio), ratio, budget)
    return Sizing({"bits": bits}, ratio(bits), min(map(ratio, BITS)), "the narrowest codes, norms and rotations",
                  max(map(ratio, BITS)), "the widest codes")


register(Method(name="turboquant",
                summary="random rotation + Lloyd-Max codebook per coordinate (QJL-corrected keys optional); 2-4 bits, packed",
                config_class=TurboQuantConfig, build=_build, reference="Zandieh et al., TurboQuant, arXiv 2504.19874",
                for_budget=_for_budget, size_knobs=("bits",), full_prefill=always))
