"""``kivi``: 2- or 4-bit asymmetric quantization, keys per channel and values per token (Liu et al., arXiv 2402.02750).

Keys are quantized in blocks of ``residual`` tokens, each channel's groups of ``group`` consecutive tokens sharing
a float16 scale and minimum; values per token, groups of ``group`` channels. The most recent tokens stay in full
precision: keys until ``residual`` of them have gathered (then the block is quantized), values beyond the last
``residual`` are quantized ``group`` tokens at a time (KIVI quantizes them one by one; grouping them keeps the
block count small and holds at most ``group`` − 1 extra tokens in full precision). Codes are packed into bytes,
so the held bytes are the bits. The prompt attends to its own full-precision keys and values; later calls run
attention on dequantized keys and values (reconstruct path).
Defaults: 2 bits, group 32, 128 full-precision tokens (the reference's documented setting).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..cache import CacheLayer, SharedState
from ..errors import OjaKVError
from ..memory import nbytes
from ..hf import geometry
from ..quantize import SUPPORTED_BITS, Quantized, dequantize, quantize
from . import Method, Sizing, always, knob, largest_within, register


@dataclass
class KIVIConfig:
    bits: int = knob(2, "bits per key/value element: 2, 4 or 8")
    group: int = knob(32, "elements sharing a scale and minimum (keys: tokens per channel; values: channels)")
    residual: int = knob(128, "recent tokens kept in full precision (a multiple of group)")

    def validate(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise OjaKVError(f"bits must be one of {', '.join(map(str, SUPPORTED_BITS))}, got {self.bits}")
        if self.group < 4 or self.group % 4:
            raise OjaKVError(f"group must be a positive multiple of 4, got {self.group}")
        if self.residual < self.group or self.residual % self.group:
            raise OjaKVError(f"residual must be a multiple of group ({self.group}), got {self.residual}")


class KIVILayer(CacheLayer):
    def __init__(self, layer_idx: int, shared: SharedState, config: KIVIConfig):
        super().__init__(layer_idx, shared)
        self.config = config
        self.key_blocks: list[Quantized] = []
        self.value_blocks: list[Quantized] = []
        self.keys_fp = self.values_fp = None

    def update(self, key_states, value_states, *args, **kwargs):
        _, step = self.begin_update(key_states, value_states)
        prompt = self.keys_fp is None
        real = step.valid[:, None, :, None]  # padding is masked in attention; zero it so it cannot stretch a range
        keys, values = key_states * real, value_states * real
        if prompt:
            self.keys_fp, self.values_fp = keys, values
        else:
            self.keys_fp = torch.cat([self.keys_fp, keys], dim=2)
            self.values_fp = torch.cat([self.values_fp, values], dim=2)
        self.seen += keys.shape[2]
        self._quantize_old_tokens()
        # The prompt attends to its own full-precision keys and values, as in the paper: quantization is for
        # what the cache keeps. Later calls attend to the stored (dequantized) tokens.
        return (key_states, value_states) if prompt else self._materialize()

    def _quantize_old_tokens(self) -> None:
        r, g, bits = self.config.residual, self.config.group, self.config.bits
        ready = (self.keys_fp.shape[2] // r) * r  # keys: whole blocks of `residual` tokens
        if ready:
            self.key_blocks.append(quantize(self.keys_fp[:, :, :ready], bits, dim=2, group=g))
            self.keys_fp = self.keys_fp[:, :, ready:].clone()
        ready = max(0, (self.values_fp.shape[2] - r) // g * g)  # values: beyond the last `residual`, by groups
        if ready:
            self.value_blocks.append(quantize(self.values_fp[:, :, :ready], bits, dim=-1, group=g))
            self.values_fp = self.values_fp[:, :, ready:].clone()

    def _materialize(self):
        keys = [dequantize(q, self.dtype) for q in self.key_blocks] + [self.keys_fp]
        values = [dequantize(q, self.dtype) for q in self.value_blocks] + [self.values_fp]
        return torch.cat(keys, dim=2), torch.cat(values, dim=2)

    def segments(self) -> dict[str, int]:
        blocks = self.key_blocks + self.value_blocks
        return {
            "quantized_codes": sum(nbytes(q.codes) for q in blocks),
            "quant_scales": sum(nbytes(q.scale, q.minimum) for q in blocks),
            "residual_fp": nbytes(self.keys_fp, self.values_fp),
        }


def _build(model, config: KIVIConfig):
    head_dim = geometry(model).head_dim
    if head_dim % config.group:
        raise OjaKVError(f"kivi's group ({config.group}) must divide the model's head_dim ({head_dim})")
    return (lambda i, shared: KIVILayer(i, shared, config)), False


def _for_budget(knobs, geometry, prompt_tokens, new_tokens, dtype_bytes, budget) -> Sizing:
    """Bits are discrete: pick the width whose predicted ratio is closest (the eval row says if it misses)."""
    config = KIVIConfig(**{k: v for k, v in knobs.items() if k != "bits"})
    n = prompt_tokens + new_tokens
    r, g = config.residual, config.group
    full_precision = n % r + (min(n, r) + max(0, n - r) % g)  # keys: n mod r; values: the last r, plus a partial group

    def ratio(bits: int) -> float:
        per_element = bits / 8 + 4 / g  # codes + float16 scale and minimum per group
        return (full_precision + (2 * n - full_precision) * per_element / dtype_bytes) / (2 * n)

    bits = largest_within(SUPPORTED_BITS, ratio, budget)
    return Sizing({"bits": bits}, ratio(bits), ratio(min(SUPPORTED_BITS)),
                  f"{min(SUPPORTED_BITS)}-bit codes, scales per group of {g} and {r} full-precision recent tokens",
                  ratio(max(SUPPORTED_BITS)), f"{max(SUPPORTED_BITS)}-bit codes")


register(Method(name="kivi", summary="2/4-bit asymmetric quantization (keys per channel, values per token), packed",
                config_class=KIVIConfig, build=_build, reference="Liu et al., KIVI, arXiv 2402.02750",
                for_budget=_for_budget, size_knobs=("bits",), full_prefill=always))
