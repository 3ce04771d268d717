"""``pyramidkv``: SnapKV's selection with per-layer capacities that shrink linearly with depth.

Cai et al., arXiv 2406.02069. With m layers, average capacity C and window w: the lowest layer keeps
``max = 2(C − w) − min`` selected tokens and the top one ``min = (C − w) / β`` (β = 20), linearly in between, each
plus its w window tokens; the total equals SnapKV's at the same C. If the prompt is shorter than needed, the
schedule is clipped at the prompt length and the freed tokens go to the upper layers, as in the reference code.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import OjaKVError
from . import Method, always, knob, register
from .snapkv import SnapKVConfig, SnapKVLayer, _for_budget


@dataclass
class PyramidKVConfig(SnapKVConfig):
    beta: float = knob(20.0, "ratio of the lowest layer's selected tokens to the top layer's: min = (C - w) / beta")

    def validate(self) -> None:
        super().validate()
        if self.beta < 1:
            raise OjaKVError(f"beta must be >= 1, got {self.beta}")


def layer_capacities(config: PyramidKVConfig, num_layers: int, prompt_tokens: int) -> list[int]:
    """Tokens kept per layer (window included), largest at the bottom; they sum to num_layers × capacity.

    When the bottom layer's share exceeds what the prompt has, it is clipped to the prompt and the top layers
    get what it frees (the reference code's rule); with the whole prompt fitting, every layer keeps it all.
    """
    selected = config.capacity - config.window
    available = prompt_tokens - config.window
    if num_layers == 1 or selected <= 0 or selected >= available:
        return [config.capacity] * num_layers
    low = selected / config.beta
    high = 2 * selected - low
    if high >= available:
        high = available
        low = 2 * selected - high
    step = (high - low) / (num_layers - 1)
    counts = [round(high - i * step) for i in range(num_layers)]
    counts[-1] += selected * num_layers - sum(counts)  # rounding leftovers go to the top layer
    return [count + config.window for count in counts]


class PyramidKVLayer(SnapKVLayer):
    def select(self, keys, values, step, attention):
        self.capacity = layer_capacities(self.config, self.shared.geometry.num_layers, keys.shape[2])[self.layer_idx]
        return super().select(keys, values, step, attention)


def _build(model, config: PyramidKVConfig):
    return (lambda i, shared: PyramidKVLayer(i, shared, config)), False


register(Method(name="pyramidkv", summary="SnapKV selection with layer capacities decreasing linearly with depth",
                config_class=PyramidKVConfig, build=_build, reference="Cai et al., PyramidKV, arXiv 2406.02069",
                for_budget=_for_budget, size_knobs=("capacity",), full_prefill=always))
