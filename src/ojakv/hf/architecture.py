"""What ojakv needs to know about a model's insides, for the families it supports.

Finding the decoder layers, their attention modules and the rotary embedding; the cache geometry; which layers
slide; recomputing a layer's queries; the projection weights; the attention's own score scale and soft-capping.
Every attribute name of a transformers model that ojakv relies on is read here and nowhere else.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import OjaKVError
from ..rope import apply_rope

# Architectures whose attention we know how to intercept (plain q/k/v projections + standard RoPE). Gemma 2 and
# Gemma 3 (text-only checkpoints, model type "gemma3_text") interleave sliding-window layers with global ones: the
# cache keeps their sliding layers exactly as transformers does and compresses the global layers only.
SUPPORTED_MODEL_TYPES: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3_text")

# Gemma 2 soft-caps attention logits, which transformers implements in eager attention only.
_EAGER_ONLY = ("gemma2",)


def check_supported(config) -> None:
    """Refuse architectures the cache code was not written for, before anything silently goes wrong."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise OjaKVError(
            f"model type {model_type!r} is not supported: use a model of type {', '.join(SUPPORTED_MODEL_TYPES)}"
        )


def is_model(value) -> bool:
    """A transformers model (anything with a config), as opposed to a path, a tokenizer or None."""
    return isinstance(value, nn.Module) and hasattr(value, "config")


@dataclass(frozen=True)
class ModelGeometry:
    """The shape of a model's KV cache: what a compressor has to size its buffers and projections by."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_context: int
    model_type: str


def config_of(model_or_config):
    return getattr(model_or_config, "config", model_or_config)


def head_dim(config) -> int:
    # Some configs (Phi-3) have no head_dim; others (Mistral) may carry head_dim=None.
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def geometry(model_or_config) -> ModelGeometry:
    """Read the cache geometry from a model or its config."""
    config = config_of(model_or_config)
    return ModelGeometry(
        num_layers=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        head_dim=head_dim(config),
        max_context=config.max_position_embeddings,
        model_type=config.model_type,
    )


def attention_implementation(model_type: str) -> str:
    """The attention kernel ojakv loads a model with: SDPA, unless the architecture needs eager attention."""
    return "eager" if model_type in _EAGER_ONLY else "sdpa"


def sliding_windows(model_or_config) -> list[int | None]:
    """Per decoder layer, its sliding-window size, or None for a global-attention layer.

    Read with transformers' own rule (``layer_types``, or ``sliding_window`` when a config has no layer types), so
    a compressed cache makes sliding layers exactly where ``DynamicCache`` would. transformers 5.16 returns one
    kwargs dict for all layers, later versions one per layer.
    """
    from transformers.cache_utils import get_layer_types_and_kwargs

    config = config_of(model_or_config)
    layer_types, layer_kwargs = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    unknown = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
    if unknown:
        raise OjaKVError(
            f"layers of type {', '.join(unknown)} are not supported: use a model of type {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if isinstance(layer_kwargs, dict):
        layer_kwargs = [layer_kwargs] * len(layer_types)
    return [kwargs.get("sliding_window") if kind == "sliding_attention" else None
            for kind, kwargs in zip(layer_types, layer_kwargs)]


# --- where things live inside a model ------------------------------------------------------------------------


def base_model(model) -> nn.Module:
    """The decoder stack inside a *ForCausalLM wrapper (embeddings, layers, final norm, rotary embedding)."""
    return model.model


def decoder_layers(model) -> list[nn.Module]:
    return list(base_model(model).layers)


def attention_modules(model) -> list[nn.Module]:
    return [layer.self_attn for layer in decoder_layers(model)]


def layer_index(attention_module: nn.Module) -> int:
    return attention_module.layer_idx


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


def attention_scale(attn_module: nn.Module, head_size: int) -> float:
    """The module's own score scale (Gemma's query_pre_attn_scalar differs from 1/√d)."""
    return getattr(attn_module, "scaling", head_size**-0.5)


def logit_softcap(attn_module: nn.Module) -> float | None:
    """Gemma 2's attention-logit soft-capping value, or None for models without it."""
    return getattr(attn_module, "attn_logit_softcapping", None)
