"""CPU kernels (numba) over transform-coded rows (``ojakv.transform_coding.TransformCodedRows``).

A row t of a head is g_t · σ ⊙ centroid[code_t]: packed mixed-width codes, a gain, per-coefficient scales σ and
one codebook table. The kernels read each row's bytes once and never write a float copy of the context:

- ``decode``: the rows as float32 (what ``TransformCodedRows.view`` gives; for callers that need them, e.g. keys
  coded before RoPE, which ``ojakv.attention`` rebuilds and rotates a chunk at a time: measured on 2 cores at 4K,
  decoding a chunk here and rebuilding it with PyTorch's matmul took 3.9 ms a layer where one fused numba kernel
  (decode, rebuild, rotate, score per token) took 6.0 ms, its multiply-adds running at ~8 GMAC/s against MKL's);
- ``dot``: queries · rows, [G, r] × [n, r] → [G, n], a row's coefficients multiplied into every query as it is
  decoded (queries pre-scaled by σ, the gain applied once per row);
- ``weighted_sum``: Σ_t w_t · row_t, [G, n] × [n, r] → [G, r], accumulating w_t · g_t · centroid per
  coefficient and scaling by σ once at the end.

The kernels run on the calling thread. numba's parallel loops were tried: their OpenMP pool made every small
PyTorch op of the step several times slower (measured on 2 cores: a 3×64×64 matmul 15 µs → 100 µs after a
parallel kernel), its idle threads spinning against PyTorch's; a plain thread pool slowed them too on the loaded
machine. Work is laid out per (sequence × head, chunk of tokens) all the same, ``weighted_sum`` summing per chunk,
so a split over threads stays a small change to measure again. Arithmetic is float32 with float32 accumulation,
as the reference's matmuls; only the order of additions differs.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from ..quantize import mixed_slices

CHUNK = 256  # tokens per unit of work (a weighted sum's partial sums are per unit)
MAX_SLICES = 4  # binary digits of a width of at most 8 bits


def slice_arrays(bits) -> np.ndarray:
    """``mixed_slices`` as an int32 array [r, MAX_SLICES, 4] of (byte, shift, mask, code shift); unused slices
    have mask 0."""
    table = np.zeros((len(bits), MAX_SLICES, 4), dtype=np.int32)
    for j, entry in enumerate(mixed_slices(tuple(bits))):
        for s, (byte, shift, width, code_shift) in enumerate(entry):
            table[j, s] = (byte, shift, (1 << width) - 1, code_shift)
    return table


@numba.njit(inline="always")
def _centroids(row, slices, starts, table, out):
    """out[j] = table[starts[j] + code_j] for one packed row."""
    for j in range(slices.shape[0]):
        code = 0
        for s in range(MAX_SLICES):
            mask = slices[j, s, 2]
            if mask:
                code |= ((row[slices[j, s, 0]] >> slices[j, s, 1]) & mask) << slices[j, s, 3]
        out[j] = table[starts[j] + code]


@numba.njit(cache=True, nogil=True)
def _decode(codes, gains, scale, table, starts, slices, out):
    heads, n, r = codes.shape[0], codes.shape[1], slices.shape[0]
    chunks = (n + CHUNK - 1) // CHUNK
    for unit in range(heads * chunks):
        h, start = unit // chunks, unit % chunks * CHUNK
        centroid = np.empty(r, dtype=np.float32)
        for t in range(start, min(start + CHUNK, n)):
            _centroids(codes[h, t], slices, starts, table, centroid)
            for j in range(r):
                out[h, t, j] = centroid[j] * gains[h, t] * scale[h, j]


@numba.njit(cache=True, nogil=True)
def _dot(codes, gains, scale, table, starts, slices, queries, out):
    heads, n, r = codes.shape[0], codes.shape[1], slices.shape[0]
    groups = queries.shape[1]
    chunks = (n + CHUNK - 1) // CHUNK
    for unit in range(heads * chunks):
        h, start = unit // chunks, unit % chunks * CHUNK
        scaled = np.empty((groups, r), dtype=np.float32)
        for g in range(groups):
            for j in range(r):
                scaled[g, j] = queries[h, g, j] * scale[h, j]
        centroid = np.empty(r, dtype=np.float32)
        for t in range(start, min(start + CHUNK, n)):
            _centroids(codes[h, t], slices, starts, table, centroid)
            for g in range(groups):
                total = np.float32(0.0)
                for j in range(r):
                    total += scaled[g, j] * centroid[j]
                out[h, g, t] = total * gains[h, t]


@numba.njit(cache=True, nogil=True)
def _weighted_sum(codes, gains, table, starts, slices, weights, partial):
    heads, n, r = codes.shape[0], codes.shape[1], slices.shape[0]
    groups = weights.shape[1]
    chunks = partial.shape[1]
    for unit in range(heads * chunks):
        h, c = unit // chunks, unit % chunks
        centroid = np.empty(r, dtype=np.float32)
        for t in range(c * CHUNK, min((c + 1) * CHUNK, n)):
            _centroids(codes[h, t], slices, starts, table, centroid)
            for g in range(groups):
                w = weights[h, g, t] * gains[h, t]
                if w != 0.0:
                    for j in range(r):
                        partial[h, c, g, j] += w * centroid[j]


def _heads(x: torch.Tensor) -> np.ndarray:
    """A [b, h, ...] tensor as a numpy array [b·h, ...] (a view where the layout allows)."""
    return x.reshape(-1, *x.shape[2:]).numpy()


class CodedRowsKernels:
    """The kernels' fixed inputs for one store: codebook table, starts, slices (built once per store)."""

    def __init__(self, bits, table: torch.Tensor, starts: torch.Tensor):
        self.slices = slice_arrays(bits)
        self.table = table.float().contiguous().numpy()
        self.starts = starts.to(torch.int32).contiguous().numpy()

    @staticmethod
    def _scale(scale: torch.Tensor) -> np.ndarray:
        return _heads(scale.float().contiguous())

    def _rows(self, codes: torch.Tensor, gains: torch.Tensor):
        # A store's live codes are a narrowed view of its buffer: merging batch and heads keeps it a view (numba
        # reads the strides), where a contiguous copy would cost a pass over the codes per call.
        return _heads(codes), _heads(gains.float().squeeze(-1).contiguous())

    def decode(self, codes, gains, scale) -> torch.Tensor:
        b, h, n = codes.shape[:3]
        out = torch.empty(b, h, n, len(self.slices), dtype=torch.float32)
        rows, gain = self._rows(codes, gains)
        _decode(rows, gain, self._scale(scale), self.table, self.starts, self.slices, _heads(out))
        return out

    def dot(self, codes, gains, scale, queries: torch.Tensor) -> torch.Tensor:
        """queries [b, h, G, r] · rows [b, h, n, r] → [b, h, G, n] float32."""
        b, h, n = codes.shape[:3]
        out = torch.empty(b, h, queries.shape[2], n, dtype=torch.float32)
        rows, gain = self._rows(codes, gains)
        _dot(rows, gain, self._scale(scale), self.table, self.starts, self.slices, _heads(queries.float().contiguous()),
             _heads(out))
        return out

    def weighted_sum(self, codes, gains, scale, weights: torch.Tensor) -> torch.Tensor:
        """weights [b, h, G, n] · rows [b, h, n, r] → [b, h, G, r] float32."""
        b, h, n = codes.shape[:3]
        chunks = -(-n // CHUNK)
        partial = torch.zeros(b, h, chunks, weights.shape[2], len(self.slices), dtype=torch.float32)
        rows, gain = self._rows(codes, gains)
        _weighted_sum(rows, gain, self.table, self.starts, self.slices, _heads(weights.float().contiguous()),
                      _heads(partial))
        return partial.sum(2) * scale.float().unsqueeze(2)
