"""``full``: no compression. The reference every other method's quality, memory and speed are compared with."""

from __future__ import annotations

from dataclasses import dataclass

from ..cache import FullLayer
from . import Method, always, register


@dataclass
class FullConfig:
    """The full cache has no knobs."""


def _build(model, config: FullConfig):
    return FullLayer, False


register(
    Method(
        name="full",
        summary="every key and value at full precision (reference)",
        config_class=FullConfig,
        build=_build,
        full_prefill=always,
    )
)
