"""Transform coding of low-rank coefficients: bits allocated by variance, gain-shape codes.

In a head's Karhunen–Loève (PCA) basis the coefficients of keys or values are uncorrelated, with variances λ_j
(the eigenvalues). Classic transform coding spends a fixed number of bits per token where they remove the most
error: ``allocate_bits`` hands out one bit at a time to the coefficient whose expected squared error falls most
(λ_j · (D(b_j) − D(b_j + 1)), D the quantizer's relative distortion): greedy reverse water-filling. A coefficient
left at 0 bits is dropped, so the rank is where the bits reach zero.

``TransformCodedRows`` stores rows of coefficients that way. Each row is whitened (divided by σ_j = √λ_j per token),
split into a shape w/‖w‖ on the unit sphere, every shape coordinate j replaced by the nearest of 2^b_j Lloyd–Max
centroids for a coordinate of a random unit vector in R^r (``shape_codebook``), and a gain (float16): the
least-squares scale of σ ⊙ centroids to the row. Whitening makes the shape close to isotropic, which is what that
codebook assumes. TurboQuant reaches isotropy by a
random rotation, with equal bits per coordinate; here the KL basis both isotropises (after whitening) and tells
where the bits pay.
"""

from __future__ import annotations

import heapq
import itertools
import math
from typing import Sequence

import torch

from .kernels import coded_rows_kernels, kernels_enabled
from .quantize import codebook, codebook_distortion, mixed_bytes, pack_mixed, packed_bytes, unpack_mixed
from .storage import CodedRows, GrowableTensor

MAX_BITS = 8
# One codebook per width serves every rank: a coordinate of a uniform unit vector in R^SPHERE_DIM is Gaussian to
# within a fraction of a percent, so its Lloyd–Max codebook, rescaled by √(SPHERE_DIM / r), is the codebook of
# the near-isotropic shapes in R^r (computing one per (r, width) would cost seconds each, per rank met).
SPHERE_DIM = 256
SCALE_FLOOR = 1e-3  # relative to a head's largest coefficient scale
_FLOAT16_MAX = torch.finfo(torch.float16).max
_TINY = 1e-30
GAIN_BYTES = 2  # each row's float16 gain


def allocate_bits(variances: Sequence[float], total_bits: int, max_bits: int = MAX_BITS) -> list[int]:
    """Bits per coefficient (same order as ``variances``) summing to ``total_bits`` (or to max_bits per
    coefficient, if that is less), greedily where the expected squared error drops most under the codebooks'
    distortion (``distortion``)."""
    bits = [0] * len(variances)
    for j in bit_order(variances, total_bits, max_bits):
        bits[j] += 1
    return bits


def bit_order(variances: Sequence[float], limit: int, max_bits: int = MAX_BITS) -> list[int]:
    """The coefficient each of the first ``limit`` bits goes to, in the greedy order of ``allocate_bits``. The
    greedy choice never depends on how many bits follow, so the allocation of T bits is the first T of these."""
    dim = len(variances)
    bits = [0] * dim
    gain = lambda j: variances[j] * (distortion(bits[j]) - distortion(bits[j] + 1))
    heap = [(-gain(j), j) for j in range(dim) if variances[j] > 0]
    heapq.heapify(heap)
    order = []
    for _ in range(min(limit, max_bits * dim)):
        if not heap:
            break
        _, j = heapq.heappop(heap)
        bits[j] += 1
        order.append(j)
        if bits[j] < max_bits:
            heapq.heappush(heap, (-gain(j), j))
    return order


def distortion(bits: int) -> float:
    """Relative mean squared error of a coefficient coded with ``bits`` (1 at 0 bits: dropped)."""
    return codebook_distortion(SPHERE_DIM, bits)


def shape_codebook(rank: int, bits: int) -> torch.Tensor:
    """Lloyd–Max centroids (float32) for one coordinate of a near-isotropic unit vector in R^rank."""
    return (codebook(SPHERE_DIM, bits) * math.sqrt(SPHERE_DIM / max(rank, 1))).float()


def ordered_allocation(eigenvalues: torch.Tensor, total_bits: int) -> list[int]:
    """One allocation for a layer's basis columns from eigenvalues ``[..., d]`` (descending per head and
    sequence): each head's spectrum is normalised to its total, then averaged, so every head's j-th principal
    direction gets the same width (codes of all heads then share one packed layout)."""
    return allocate_bits(_mean_shares(eigenvalues), total_bits)


def fitted_allocation(eigenvalues: torch.Tensor, bytes_per_row: float, rows: int, basis_bytes: float) -> list[int]:
    """The allocation of ``ordered_allocation`` with the most bits whose bytes for ``rows`` tokens
    (``TransformCodedRows.bytes_per_row`` each), its ``fixed_bytes`` and ``basis_bytes`` per coefficient kept (its
    basis column) stay within ``rows × bytes_per_row``: the rank follows from what the bases cost against the body
    they serve, not from a guess made before the spectrum is known. Counted per head, the codebooks (held once per
    layer) as if each head held its own."""
    shares = _mean_shares(eigenvalues)
    order = bit_order(shares, MAX_BITS * len(shares))
    bits, rank, fitting = [0] * len(shares), 0, 0
    digits = {digit: 0 for digit in (8, 4, 2, 1)}  # coefficients whose width has this binary digit
    widths = [0] * (MAX_BITS + 1)  # coefficients of each width
    for spent, j in enumerate(order, start=1):
        for digit in digits:
            digits[digit] += bool((bits[j] + 1) & digit) - bool(bits[j] & digit)
        rank += not bits[j]
        widths[bits[j]] -= 1
        bits[j] += 1
        widths[bits[j]] += 1
        # bytes_per_row and fixed_bytes of ``bits``, kept up to date as each bit is added
        packed = packed_bytes(digits) + GAIN_BYTES
        fixed = _fixed_bytes(rank, [w for w in range(1, MAX_BITS + 1) if widths[w]])
        if rows * packed + fixed + rank * basis_bytes <= rows * bytes_per_row:
            fitting = spent
    best = [0] * len(shares)
    for j in order[:fitting]:
        best[j] += 1
    return best


def coder_for(variances: torch.Tensor, bits: Sequence[int]) -> tuple[torch.Tensor, "TransformCodedRows"]:
    """The indices of the coefficients an allocation keeps (``bits`` > 0; the first one if none) and an empty
    store coding them, whitened by the per-token standard deviations of ``variances`` [..., h, d] (the prompt's,
    or the calibration's)."""
    columns = [j for j, b in enumerate(bits) if b] or [0]
    index = torch.tensor(columns, device=variances.device)
    return index, TransformCodedRows([max(bits[j], 1) for j in columns], variances.index_select(-1, index).sqrt())


def _mean_shares(eigenvalues: torch.Tensor) -> list[float]:
    spectra = eigenvalues.double().flatten(0, -2)
    shares = spectra / spectra.sum(-1, keepdim=True).clamp_min(_TINY)
    return shares.mean(0).tolist()


class TransformCodedRows(CodedRows):
    """Rows ``[b, h, n, r]`` of KL coefficients as gain-shape codes with per-coefficient widths ``bits`` (all > 0)
    and per-coefficient scales σ ``[b, h, r]``, growing along tokens like ``GrowableTensor``.

    Re-expression (``apply_``) codes again with the same σ and widths.
    """

    def __init__(self, bits: Sequence[int], scale: torch.Tensor):
        if not bits or min(bits) < 1 or max(bits) > MAX_BITS:
            raise ValueError(f"every coded coefficient needs 1 to {MAX_BITS} bits, got {list(bits)}")
        self.bits = list(bits)
        # [b, h, r]; a direction with (numerically) no variance in one head is floored to a small share of that
        # head's largest scale, so whitening cannot blow its rounding noise up to overflow; a head whose prompt
        # gave no body tokens to measure is not whitened at all.
        scale = scale.float()
        scale = torch.where(scale.amax(-1, keepdim=True) > _TINY, scale, torch.ones_like(scale))  # no statistics
        self.scale = torch.maximum(scale, scale.amax(-1, keepdim=True) * SCALE_FLOOR).clamp_min(_TINY)
        self.codes, self.gains = GrowableTensor(), GrowableTensor()
        device = scale.device
        # The codebooks of the widths used, end to end, and where each coefficient's starts: decoding looks every
        # code up in one indexing (both are held, so counted: ``fixed_bytes``).
        widths = sorted(set(self.bits))
        starts = dict(zip(widths, itertools.accumulate((2**b for b in widths), initial=0)))
        self.table = torch.cat([shape_codebook(len(self.bits), b) for b in widths]).to(device)
        self.starts = torch.tensor([starts[b] for b in self.bits], dtype=torch.int32, device=device)
        self._centroids = {b: self.table[starts[b] : starts[b] + 2**b] for b in widths}  # views
        self._columns = {b: torch.tensor([j for j, w in enumerate(self.bits) if w == b], device=device)
                         for b in widths}
        self._cpu_kernels = None  # built on first use (``_kernels``)

    @staticmethod
    def bytes_per_row(bits: Sequence[int]) -> int:
        """Bytes one token's row takes: the packed codes plus a float16 gain."""
        return mixed_bytes(bits) + GAIN_BYTES

    @staticmethod
    def fixed_bytes(bits: Sequence[int]) -> int:
        """Bytes held per head whatever the length: a float32 scale and an int32 codebook start per coefficient,
        plus the float32 codebooks of the widths used (per sequence of the batch, as the scales)."""
        return _fixed_bytes(len(bits), set(bits))

    @property
    def buffers(self) -> tuple:
        return self.codes, self.gains, self.scale, self.table, self.starts

    def decode(self, codes, gains) -> torch.Tensor:
        kernels = self._kernels()
        if kernels is not None:
            return kernels.decode(codes, gains, self.scale)
        shape = self.table[unpack_mixed(codes, self.bits).long() + self.starts]
        return shape * gains.float() * self.scale.unsqueeze(2)

    def dot(self, queries: torch.Tensor) -> torch.Tensor:
        kernels = self._kernels()
        if kernels is None or not self.length:
            return super().dot(queries)
        return kernels.dot(self.codes.view, self.gains.view, self.scale, queries)

    def weighted_sum(self, weights: torch.Tensor) -> torch.Tensor:
        kernels = self._kernels()
        if kernels is None or not self.length:
            return super().weighted_sum(weights)
        return kernels.weighted_sum(self.codes.view, self.gains.view, self.scale, weights)

    def _kernels(self):
        """The fused CPU kernels for this store, or None where they do not apply (another device, turned off,
        numba missing): then the PyTorch reference runs."""
        if not kernels_enabled() or self.table.device.type != "cpu":
            return None
        if self._cpu_kernels is None:
            self._cpu_kernels = coded_rows_kernels(self.bits, self.table, self.starts)
        return self._cpu_kernels

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed codes ``[b, h, n, bytes]`` and float16 gains ``[b, h, n, 1]`` of rows ``x`` [b, h, n, r], not
        stored (a serving format lays them out in its own pages)."""
        return encode_rows(x, self.bits, self._centroids, self._columns, self.scale)

    def append(self, x: torch.Tensor) -> None:
        codes, gains = self.encode(x)
        self.codes.append(codes)
        self.gains.append(gains)


class Int8Basis:
    """A fixed basis ``[..., d, r]`` held as int8 entries with one float32 scale per column (its largest entry
    over 127): d + 4 bytes a column instead of 2d in float16. Rows are coded in the rounded basis itself, so coding
    and decoding agree; the rounding moves a projection by about 1% of its norm (columns no longer exactly
    orthonormal), far below the error of the codes it serves (about 30% at 2 bits a coordinate)."""

    def __init__(self, basis: torch.Tensor):
        self.scale = (basis.float().abs().amax(-2, keepdim=True) / 127).clamp_min(_TINY)
        self.codes = (basis.float() / self.scale).round().clamp(-127, 127).to(torch.int8)

    @staticmethod
    def column_bytes(head_dim: int) -> int:
        return head_dim + 4

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    @property
    def buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.codes, self.scale

    def float(self) -> torch.Tensor:
        """The basis as float32, a temporary."""
        return self.codes.float() * self.scale


def _fixed_bytes(rank: int, widths) -> int:
    return 8 * rank + 4 * sum(2**b for b in widths)


def encode_rows(x, bits, centroids, columns, scale) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed codes ``[b, h, n, bytes]`` and float16 gains ``[b, h, n, 1]`` of rows ``x`` [b, h, n, r]."""
    whitened = x.float() / scale.unsqueeze(2)
    # Zero rows (padding) get any codes and gain 0: they decode to exactly zero.
    shape = whitened / whitened.norm(dim=-1, keepdim=True).clamp_min(_TINY)
    index = torch.zeros(shape.shape, dtype=torch.uint8, device=x.device)
    coded = torch.zeros_like(shape)
    for width, centres in centroids.items():
        part = shape.index_select(-1, columns[width])
        nearest = torch.bucketize(part, (centres[1:] + centres[:-1]) / 2)
        index.index_copy_(-1, columns[width], nearest.to(torch.uint8))
        coded.index_copy_(-1, columns[width], centres[nearest])
    # The gain that fits σ·centroids to the row by least squares in coefficient space (where the large-variance
    # coefficients weigh most, as in the keys and values), not ‖w‖: less error, and a decoded row codes to itself
    # again when the centroids' norm is near 1, which keeps re-expression from adding a full rounding each time.
    approx = coded * scale.unsqueeze(2)
    gain = (x.float() * approx).sum(-1, keepdim=True) / approx.pow(2).sum(-1, keepdim=True).clamp_min(_TINY)
    return pack_mixed(index, bits), gain.clamp(-_FLOAT16_MAX, _FLOAT16_MAX).half()
