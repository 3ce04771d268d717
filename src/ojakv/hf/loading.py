"""Reading and writing models and tokenizers with transformers: Hugging Face folders, GGUF files, progress bars.

``ojakv.models`` decides what to load (embedded names, folders, hub ids) and where conversions are cached; this
module does the transformers calls, including silencing the GGUF de-quantiser's own progress bar (an attribute of
a transformers module, hence here).
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch


@contextlib.contextmanager
def hf_progress(enabled: bool):
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
        with hf_progress(enabled):
            yield
    finally:
        gguf_utils.tqdm = original


def _dequantized(path: Path) -> dict:
    """from_pretrained arguments that make every GGUF weight a plain tensor, which is what we save.

    From transformers 5.24 a GGUF can load with its weights left packed (``GgufConfig``), and for architectures
    that new loader handles that is the default; asking for ``dequantize=True`` keeps conversions working as
    those architectures grow, and silences its warning about packed weights in bfloat16, which it prints even
    for the ones (llama, qwen2, gemma3) it de-quantises anyway. Earlier releases always de-quantise.
    """
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(gguf_file=path.name, dequantize=True)}


def read_gguf(path: Path, *, dtype: torch.dtype = torch.float32, progress: bool = False):
    """(model, tokenizer) de-quantised from a GGUF file into ``dtype``, marked as an ordinary (unquantized) model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _gguf_progress(progress):
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype,
                                                     **_dequantized(path))
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    _forget_gguf_origin(model)
    return model.eval(), tokenizer


def _forget_gguf_origin(model) -> None:
    """De-quantised GGUF weights are plain float tensors, but transformers still marks the model as quantized
    and refuses to save it; drop those marks."""
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    with contextlib.suppress(AttributeError):
        model.is_quantized = False


def save_folder(model, tokenizer, folder: Path, on_step=None) -> None:
    """Write a loadable Hugging Face folder (safetensors weights, config, tokenizer); ``on_step(name)`` after each."""
    with hf_progress(False):
        model.save_pretrained(folder)  # tied weights (lm_head = embed_tokens) are stored once
        if on_step:
            on_step("weights")
        tokenizer.save_pretrained(folder)
        if on_step:
            on_step("tokenizer")


def random_model(model_type: str, shape: dict, *, dtype: torch.dtype, device, seed: int = 0):
    """A model of ``model_type`` with the given config fields and random weights, made on ``device`` in
    ``dtype`` (for speed measurements at the shapes of models we cannot download)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **shape)
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def read_config(source: str):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(source)


def read_tokenizer(source: str):
    """The tokenizer of a Hugging Face folder or hub id, without the model (serving engines load their own)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source)


def read_pretrained(source: str, *, dtype: torch.dtype, attn_implementation: str, progress: bool):
    """(model, tokenizer) from a Hugging Face folder or hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with hf_progress(progress):
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation=attn_implementation)
        tokenizer = AutoTokenizer.from_pretrained(source)
    return model, tokenizer
