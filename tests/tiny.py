"""Tiny random-weight models of every supported architecture, small enough for unit tests of cache logic."""

from __future__ import annotations

import torch

from ojakv.errors import OjaKVError
from ojakv.hf import attention_implementation

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

