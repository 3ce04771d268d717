"""What a run asks the plugin for: ``additional_config={"ojakv": {"method": ..., "budget": ... | knobs}}``.

Parsing is pure Python (no vLLM, no torch), so the same checks run in the front-end process, where a request that
cannot be served is refused before the engine starts, and in the engine's processes, which rebuild the settings
from the config they receive. Every refusal is one line naming what can be served.

Only formats with a fixed number of bytes per token and KV head fit vLLM's paged pool without core changes:

- ``quant``: per-token min/max quantization of keys and values, ``bits`` 2 / 4 / 8, one float16 scale and minimum
  per ``group`` channels (KIVI's value quantizer applied to keys too; KIVI's per-channel keys need a token group
  per scale, which an incrementally written page cannot provide).
- ``turboquant``: ojakv's TurboQuant MSE codes, ``bits`` 2 / 3 / 4, the same rotations (``rotation_seed``) and
  Lloyd-Max codebook as the library, every token quantized (``residual=0``).
- ``ojakv``: coefficients in a fixed basis per layer and KV head, shared by every request, from ojakv's offline
  calibration (the library's ``staticpca``: no online Oja update, no full-precision anchors). With ``body_bits``
  (or a budget) they are transform coded: ``body_bits`` × head_dim bits per key and per value, allocated by the
  calibration spectrum's variances (the coefficients left with none are dropped), Lloyd–Max codes of the
  whitened row plus a float16 gain (the library's ``staticpca:body_bits=...``). With ``rank`` or ``rank_ratio``
  the top ``rank`` coefficients are stored in the model's dtype.

Every format takes ``prefill_attention``: ``"full"`` (the default) lets a prompt's tokens attend to their own keys
and values as the model computed them, as the library's quantizers and budgeted ``ojakv`` prefill do; only tokens
of earlier steps (an earlier chunk of a chunked prefill, a prefix-cache hit, decoding) are read from the pages.
``"compressed"`` reads everything from the pages.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ..errors import OjaKVError

SECTION = "ojakv"  # the key of additional_config this plugin reads
BACKEND = "CUSTOM"  # the attention backend a run selects to use it

QUANT_BITS = (2, 4, 8)
TURBOQUANT_BITS = (2, 3, 4)
KEY_MODES = ("pre_rope", "post_rope")
PREFILL_ATTENTION = ("full", "compressed")
MAX_BODY_BITS = 8  # ojakv.transform_coding.MAX_BITS (this module imports no torch)

# Library methods that cannot be served, and why (the refusal says it).
_NOT_SERVED = {
    "full": "it is vLLM's default backend: drop attention_backend='CUSTOM'",
    "kivi": "its per-channel keys and full-precision recent window need per-request state outside fixed-size "
            "slots; method 'quant' quantizes keys and values per token",
    "ojakv-pf": "method 'ojakv' serves its full-precision prefill (prefill_attention='full', the default); the "
                "online basis and the anchors are not served",
    "ojakv+quant": "quantized coefficients are not implemented yet",
    "staticpca": "it is what method 'ojakv' serves (a fixed calibrated basis)",
    "staticpca-h": "its full-precision anchors need per-request slots of another size",
    "eigen": "its query-aware key basis is not implemented",
    "mla-latent": "its weight-derived latent is not implemented",
    "streaming-llm": "token eviction needs vLLM scheduler and KV-manager changes",
    "h2o": "token eviction needs vLLM scheduler and KV-manager changes",
    "h2o-prefill": "token eviction needs vLLM scheduler and KV-manager changes",
    "snapkv": "token eviction needs vLLM scheduler and KV-manager changes",
    "snapkv+ojakv": "token eviction needs vLLM scheduler and KV-manager changes",
    "pyramidkv": "token eviction needs vLLM scheduler and KV-manager changes",
    "pod": "sharing keys across layers needs pages shared across layers",
}


@dataclass(frozen=True)
class Settings:
    """The served format, its knobs resolved (a budget becomes bits or a rank once the head size is known)."""

    method: str
    bits: int | None = None  # quant, turboquant
    group: int | None = None  # quant
    rotation_seed: int = 0  # turboquant
    rank: int | None = None  # ojakv (keys and values alike)
    rank_ratio: float | None = None  # ojakv, resolved to rank with the head size
    body_bits: float | None = None  # ojakv transform coded: average bits per coordinate of a key (and a value)
    budget: float | None = None  # as asked; resolved to bits / rank
    key_mode: str = "pre_rope"  # ojakv
    calibration_file: str | None = None  # ojakv: a calibration file from `ojakv calibrate --out`
    # "full": a prompt chunk attends to its own keys and values as computed (earlier pages as stored), as the
    # library's quantizers and budgeted ojakv prefill; "compressed": to everything as stored in the pages
    prefill_attention: str = "full"
    extra: dict = field(default_factory=dict)

    def describe(self) -> str:
        prefill = "" if self.prefill_attention == "full" else ", prefill on compressed K/V"
        return self._describe_format() + prefill

    def _describe_format(self) -> str:
        if self.method == "quant":
            return f"quant {self.bits}-bit, group {self.group}"
        if self.method == "turboquant":
            return f"turboquant {self.bits}-bit (mse, rotation_seed {self.rotation_seed})"
        if self.body_bits is not None:
            return f"ojakv transform coded, {self.body_bits:g} bits per coordinate ({self.key_mode})"
        return f"ojakv rank {self.rank} ({self.key_mode})"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def served() -> str:
    """One line naming what the plugin serves."""
    return ("served methods: quant (bits 2/4/8, group; or budget), turboquant (bits 2/3/4, rotation_seed; or "
            "budget), ojakv (body_bits, budget, rank or rank_ratio; key_mode pre_rope/post_rope; calibration_file); "
            "any of them: prefill_attention full/compressed")


def refuse(message: str) -> OjaKVError:
    return OjaKVError(f"ojakv vLLM plugin: {message}; {served()}")


def _number(name: str, value: Any, kind: type) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise refuse(f"{name} must be a number, got {value!r}")
    if kind is int:
        if value != int(value):
            raise refuse(f"{name} must be a whole number, got {value!r}")
        return int(value)
    if not math.isfinite(value):
        raise refuse(f"{name} must be finite, got {value!r}")
    return float(value)


def _whole_at_least(knobs: dict, name: str, default: int, least: int) -> int:
    value = _number(name, knobs.get(name, default), int)
    if value < least:
        raise refuse(f"{name} must be >= {least}, got {value}")
    return value


def _budget(value: Any) -> float:
    value = _number("budget", value, float)
    if not 0.0 < value <= 1.0:
        raise refuse(f"a budget is a fraction of the full cache in (0, 1], got {value!r}")
    return value


_COMMON_KNOBS = {"prefill_attention"}
_KNOBS = {
    "quant": {"bits", "group", "budget"},
    "turboquant": {"bits", "rotation_seed", "budget", "key_variant", "residual"},
    "ojakv": {"rank", "rank_ratio", "body_bits", "budget", "key_mode", "init", "calibration_file", "eta_prefill",
              "eta_decode", "n_sink", "n_recent", "policy"},
}


def parse(section: Any) -> Settings:
    """Settings from the ``ojakv`` section of additional_config (a dict, or its JSON text)."""
    if isinstance(section, str):
        try:
            section = json.loads(section)
        except json.JSONDecodeError as error:
            raise refuse(f"the '{SECTION}' settings are not valid JSON ({error})") from None
    if not isinstance(section, dict):
        raise refuse(f"additional_config['{SECTION}'] must be a dict like {{\"method\": \"turboquant\", "
                     f"\"bits\": 4}}, got {section!r}")
    knobs = dict(section)
    method = knobs.pop("method", None)
    if method is None:
        raise refuse(f"additional_config['{SECTION}'] names no method")
    if not isinstance(method, str):
        raise refuse(f"method must be a name, got {method!r}")
    if method in _NOT_SERVED:
        raise refuse(f"method {method!r} cannot be served in vLLM's paged pool ({_NOT_SERVED[method]})")
    if method not in _KNOBS:
        raise refuse(f"unknown method {method!r}")
    unknown = sorted(set(knobs) - _KNOBS[method] - _COMMON_KNOBS)
    if unknown:
        raise refuse(f"method {method!r} has no knob {', '.join(map(repr, unknown))} here")
    budget = _budget(knobs.pop("budget")) if "budget" in knobs else None
    prefill = knobs.pop("prefill_attention", "full")
    if prefill not in PREFILL_ATTENTION:
        raise refuse(f"prefill_attention must be one of {', '.join(PREFILL_ATTENTION)}, got {prefill!r}")
    parser = {"quant": _parse_quant, "turboquant": _parse_turboquant, "ojakv": _parse_ojakv}[method]
    return replace(parser(knobs, budget), prefill_attention=prefill)


def _bits(knobs: dict, budget: float | None, method: str, allowed: tuple[int, ...]) -> int | None:
    """The bit width asked for (None when a budget will choose it), checked against what is served."""
    if budget is not None and "bits" in knobs:
        raise refuse("give either a budget or bits, not both")
    if budget is not None:
        return None
    bits = _number("bits", knobs.get("bits", 4), int)
    if bits not in allowed:
        raise refuse(f"{method} bits must be one of {'/'.join(map(str, allowed))}, got {bits}")
    return bits


def _parse_quant(knobs: dict, budget: float | None) -> Settings:
    bits = _bits(knobs, budget, "quant", QUANT_BITS)
    group = _whole_at_least(knobs, "group", 32, 1)
    return Settings("quant", bits=bits, group=group, budget=budget)


def _parse_turboquant(knobs: dict, budget: float | None) -> Settings:
    variant = knobs.get("key_variant", "mse")
    if variant != "mse":
        raise refuse(f"turboquant key_variant {variant!r} is not served (only 'mse', the library's default)")
    residual = knobs.get("residual", 0)
    if residual != 0:
        raise refuse("turboquant residual > 0 is not served (a full-precision recent window per request does "
                     "not fit fixed-size slots)")
    raw = knobs.get("bits", 4)
    if budget is None and isinstance(raw, float) and raw != int(raw):
        raise refuse(f"turboquant bits {raw} (outlier channels chosen per prompt) are not served; use "
                     f"{'/'.join(map(str, TURBOQUANT_BITS))}")
    bits = _bits(knobs, budget, "turboquant", TURBOQUANT_BITS)
    seed = _whole_at_least(knobs, "rotation_seed", 0, 0)
    return Settings("turboquant", bits=bits, rotation_seed=seed, budget=budget)


def _parse_ojakv(knobs: dict, budget: float | None) -> Settings:
    init = knobs.get("init", "calibration")
    if init != "calibration":
        raise refuse(f"ojakv init {init!r} is not served: a basis shared by all requests comes from calibration "
                     f"(init='calibration')")
    for name in ("eta_prefill", "eta_decode"):
        if knobs.get(name, 0) not in (0, 0.0):
            raise refuse(f"ojakv {name} > 0 is not served: the shared basis is fixed (no online Oja update yet)")
    for name in ("n_sink", "n_recent"):
        if knobs.get(name, 0) != 0:
            raise refuse(f"ojakv {name} > 0 is not served: full-precision anchors need per-request slots of "
                         f"another size (give {name}=0 or leave it out)")
    if knobs.get("policy", "positional") != "positional":
        raise refuse("ojakv policy 'residual' is not served (its exact tokens are chosen per request)")
    sizes = [name for name in ("rank", "rank_ratio", "body_bits") if name in knobs] + \
        (["budget"] if budget is not None else [])
    if len(sizes) > 1:
        raise refuse(f"give one of body_bits, budget, rank or rank_ratio, not {' and '.join(sizes)}")
    rank = ratio = body_bits = None
    if "body_bits" in knobs:
        body_bits = _number("body_bits", knobs["body_bits"], float)
        if not 0.0 < body_bits <= MAX_BODY_BITS:
            raise refuse(f"body_bits must be in (0, {MAX_BODY_BITS}] bits per coordinate, got {body_bits}")
    elif "rank" in knobs:
        rank = _number("rank", knobs["rank"], int)
        if rank < 1:
            raise refuse(f"rank must be >= 1, got {rank}")
    elif "rank_ratio" in knobs:
        ratio = _number("rank_ratio", knobs["rank_ratio"], float)
        if not 0.0 < ratio <= 1.0:
            raise refuse(f"rank_ratio must be in (0, 1], got {ratio}")
    elif budget is None:
        ratio = 0.5
    key_mode = knobs.get("key_mode", "pre_rope")
    if key_mode not in KEY_MODES:
        raise refuse(f"ojakv key_mode must be one of {', '.join(KEY_MODES)}, got {key_mode!r}")
    calibration = knobs.get("calibration_file")
    if calibration is not None and not isinstance(calibration, str):
        raise refuse(f"calibration_file must be a file path, got {calibration!r}")
    return Settings("ojakv", rank=rank, rank_ratio=ratio, body_bits=body_bits, budget=budget, key_mode=key_mode,
                    calibration_file=calibration)


def from_additional_config(additional_config: Any) -> Settings | None:
    """The settings in a VllmConfig's additional_config, or None when it has no ``ojakv`` section."""
    if not additional_config:
        return None
    if not isinstance(additional_config, dict):
        return None
    if SECTION not in additional_config:
        return None
    return parse(additional_config[SECTION])
