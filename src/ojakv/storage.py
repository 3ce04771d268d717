"""Token-indexed tensors that grow by amortised appends instead of a full concatenation per decode step."""

from __future__ import annotations

import torch

from .quantize import Quantized, dequantize, quantize

# Capacity grows geometrically, so appends stay amortised O(1), by a small factor, so that spare capacity
# (reported as growth slack) stays within max(MIN_GROWTH tokens, 3%) of what is stored.
GROWTH = 1.03
MIN_GROWTH = 16  # tokens


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` [b, h, k] of ``x`` [b, h, n, ...] along the token axis (2): [b, h, k, ...]."""
    trailing = x.shape[3:]
    index = index.view(*index.shape, *(1,) * len(trailing)).expand(*index.shape, *trailing)
    return x.gather(2, index)


def growth_slack(stored: int, appended: int) -> int:
    """Spare token slots a ``GrowableTensor`` ends with when it is filled with ``stored`` tokens at once and then
    given ``appended`` more one at a time: what a byte budget must leave room for."""
    capacity = length = max(stored, 1)
    while length + appended > capacity:
        appended -= capacity - length
        length = capacity
        capacity = max(length + 1, int(capacity * GROWTH), capacity + MIN_GROWTH)
    return capacity - length - appended


class RowReads:
    """What attention reads from stored rows ``[b, h, n, r]`` (``view``): their products with queries and with
    attention weights, here through a float32 copy of every row; a store that can compute them from its codes
    (``ojakv.kernels``) overrides them."""

    def dot(self, queries: torch.Tensor) -> torch.Tensor:
        """queries [b, h, G, r] · rows → [b, h, G, n] float32."""
        return queries.float() @ self.view.float().transpose(-1, -2)

    def weighted_sum(self, weights: torch.Tensor) -> torch.Tensor:
        """Σ_t weights[..., t] · row_t: weights [b, h, G, n] → [b, h, G, r] float32."""
        return weights.float() @ self.view.float()

    def span(self, start: int, end: int) -> torch.Tensor:
        """Rows [start, end) along the token axis, [b, h, end − start, r] (decoded where the store holds codes)."""
        return self.view[:, :, start:end]


class GrowableTensor(RowReads):
    """A tensor ``[*lead, n, *tail]`` that grows along dimension ``dim`` (the token axis).

    ``view`` is the live part; ``nbytes`` is the allocated storage, slack included, because that is what the
    process really holds (memory reports show the slack as its own segment). The first append allocates exactly
    what it is given, so a prefill is not padded.
    """

    def __init__(self, dim: int = 2):
        self.dim = dim
        self._data: torch.Tensor | None = None
        self.length = 0

    @property
    def view(self) -> torch.Tensor | None:
        if self._data is None:
            return None
        return self._data.narrow(self.dim, 0, self.length)

    @property
    def capacity(self) -> int:
        return 0 if self._data is None else self._data.shape[self.dim]

    @property
    def nbytes(self) -> int:
        return 0 if self._data is None else self._data.numel() * self._data.element_size()

    @property
    def used_bytes(self) -> int:
        view = self.view
        return 0 if view is None else view.numel() * view.element_size()

    def append(self, x: torch.Tensor) -> None:
        n = x.shape[self.dim]
        if self._data is None:
            self._data = x.contiguous().clone()
            self.length = n
            return
        if self.length + n > self.capacity:
            self._grow(self.length + n)
        self._data.narrow(self.dim, self.length, n).copy_(x)
        self.length += n

    def _grow(self, needed: int) -> None:
        new_capacity = max(needed, int(self.capacity * GROWTH), self.capacity + MIN_GROWTH)
        shape = list(self._data.shape)
        shape[self.dim] = new_capacity
        grown = self._data.new_empty(shape)
        grown.narrow(self.dim, 0, self.length).copy_(self.view)
        self._data = grown

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """Live rows ``index`` [b, h, k] (token axis 2): what a step reads when it attends only to some tokens."""
        return gather_rows(self.view, index)

    def apply_(self, fn) -> None:
        """Replace the live part by ``fn(view)`` (same token count), e.g. to re-express coefficients."""
        if self._data is not None and self.length:
            self._data.narrow(self.dim, 0, self.length).copy_(fn(self.view))

    def clear(self) -> None:
        self._data = None
        self.length = 0


class CodedRows(RowReads):
    """Rows ``[b, h, n, r]`` kept as codes that grow along tokens. A subclass codes rows (``append``), decodes the
    per-token parts of some rows (``decode``, a float32 temporary) and names the tensors that hold them
    (``buffers``: growable ones, plus any fixed per-head tensor). ``view`` decodes every row, ``rows`` only the
    ones asked for. ``apply_`` decodes, transforms and codes again, so every re-expression adds one rounding."""

    codes: GrowableTensor

    @property
    def buffers(self) -> tuple:
        raise NotImplementedError

    def decode(self, *per_token: torch.Tensor) -> torch.Tensor:
        """Rows from the growable buffers' parts for them (in ``buffers`` order), float32."""
        raise NotImplementedError

    @property
    def view(self) -> torch.Tensor | None:
        if not self.length:
            return None
        return self.decode(*(buffer.view for buffer in self._growable))

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """Decoded rows ``index`` [b, h, k] only, [b, h, k, r] float32."""
        return self.decode(*(buffer.rows(index) for buffer in self._growable))

    def span(self, start: int, end: int) -> torch.Tensor:
        return self.decode(*(buffer.view[:, :, start:end] for buffer in self._growable))

    @property
    def _growable(self) -> list[GrowableTensor]:
        return [buffer for buffer in self.buffers if isinstance(buffer, GrowableTensor)]

    @property
    def length(self) -> int:
        return self.codes.length

    @property
    def nbytes(self) -> int:
        return sum(_held(buffer, used=False) for buffer in self.buffers)

    @property
    def used_bytes(self) -> int:
        return sum(_held(buffer, used=True) for buffer in self.buffers)

    def apply_(self, fn) -> None:
        if self.length:
            rows = fn(self.view)
            self.clear()
            self.append(rows)

    def clear(self) -> None:
        for buffer in self.buffers:
            if isinstance(buffer, GrowableTensor):
                buffer.clear()


def _held(buffer, used: bool) -> int:
    if isinstance(buffer, GrowableTensor):
        return buffer.used_bytes if used else buffer.nbytes
    return buffer.numel() * buffer.element_size()


class QuantizedRows(CodedRows):
    """Rows ``[b, h, n, r]`` kept as packed ``bits``-bit codes, growing along tokens like ``GrowableTensor``.

    Each token's row is padded with zeros to a multiple of ``GROUP`` and quantized in groups of ``GROUP``
    consecutive entries, each with a float16 scale and minimum (low-rank coefficients come ordered by variance,
    so a group holds entries of similar size).
    """

    GROUP = 16

    def __init__(self, bits: int):
        self.bits = bits
        self.codes, self.scale, self.minimum = GrowableTensor(), GrowableTensor(), GrowableTensor()
        self.width = 0  # r, before padding

    @staticmethod
    def padded(width: int) -> int:
        return -(-width // QuantizedRows.GROUP) * QuantizedRows.GROUP

    @staticmethod
    def bytes_per_row(width: int, bits: int) -> float:
        """Bytes one token's row takes: packed codes plus a float16 scale and minimum per group."""
        padded = QuantizedRows.padded(width)
        return padded * bits / 8 + padded // QuantizedRows.GROUP * 4

    @property
    def buffers(self) -> tuple[GrowableTensor, ...]:
        return self.codes, self.scale, self.minimum

    def decode(self, codes, scale, minimum) -> torch.Tensor:
        shape = (*codes.shape[:3], self.padded(self.width))
        return dequantize(Quantized(codes, scale, minimum, self.bits, -1, self.GROUP, shape), torch.float32)[
            ..., : self.width]

    def append(self, x: torch.Tensor) -> None:
        self.width = x.shape[-1]
        x = torch.nn.functional.pad(x, (0, self.padded(self.width) - self.width))
        stored = quantize(x, self.bits, dim=-1, group=self.GROUP)
        for buffer, part in zip(self.buffers, (stored.codes, stored.scale, stored.minimum)):
            buffer.append(part)


class TensorRows(RowReads):
    """Rows ``[b, h, n, r]`` already in a plain tensor, behind the stores' reading interface (``view``, ``rows``,
    ``length``): e.g. a selection's gathered rows, or coefficients a test makes."""

    def __init__(self, rows: torch.Tensor):
        self.view = rows

    @property
    def length(self) -> int:
        return self.view.shape[2]

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        return gather_rows(self.view, index)
