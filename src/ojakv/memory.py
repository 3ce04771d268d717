"""Memory accounting: the bytes a cache really holds, by layer and segment, against a full cache."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch


def nbytes(*tensors: torch.Tensor | None) -> int:
    """Allocated bytes of the tensors' storage (views count their whole storage once it is theirs alone)."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@dataclass
class MemoryReport:
    """What a cache holds.

    ``full_bytes`` is what a plain full cache (keys and values of every token seen, in the model's dtype, padding
    included, as ``DynamicCache`` holds them) would hold for the same tokens. ``held_bytes`` sums every tensor the
    compressed cache keeps alive between steps: stored tokens, coefficients, bases, optimiser state and
    bookkeeping such as positions, with growth slack included.
    """

    full_bytes: int
    per_layer: list[dict[str, int]]
    shared: dict[str, int] = field(default_factory=dict)
    layout: str = ""  # what the cache resolved to (``CompressedCache.describe``)

    @property
    def segments(self) -> dict[str, int]:
        total: Counter = Counter()
        for layer in self.per_layer:
            total.update(layer)
        total.update(self.shared)
        return dict(total)

    @property
    def held_bytes(self) -> int:
        return sum(self.segments.values())

    @property
    def ratio(self) -> float:
        return self.held_bytes / self.full_bytes if self.full_bytes else 0.0

    def to_dict(self) -> dict:
        return {
            "full_bytes": self.full_bytes,
            "held_bytes": self.held_bytes,
            "ratio": self.ratio,
            "segments": self.segments,
            "per_layer": self.per_layer,
            "layout": self.layout,
        }

    def table(self) -> str:
        """A small human-readable table: the layout, totals, then each segment's share of the full cache."""
        rows = [("full cache", self.full_bytes), ("held", self.held_bytes)]
        rows += [(f"  {name}", size) for name, size in sorted(self.segments.items(), key=lambda kv: -kv[1])]
        width = max(len(name) for name, _ in rows)
        lines = [f"layout: {self.layout}"] if self.layout else []
        lines.append(f"{'segment':<{width}}  {'bytes':>14}  {'MiB':>9}  {'of full':>8}")
        for name, size in rows:
            share = size / self.full_bytes if self.full_bytes else 0.0
            lines.append(f"{name:<{width}}  {size:>14,}  {size / 2**20:>9.2f}  {share:>8.3f}")
        return "\n".join(lines)
