"""Bases for the served ``ojakv`` format, read from a file written by ``ojakv calibrate --out FILE``.

The file is ojakv's calibration artefact (``ojakv/calibration.py``): per layer and KV head the full spectrum of
the keys before RoPE (``k_pre``), after RoPE (``k_post``) and of the values (``v``), eigenvectors as columns,
descending. The served basis is its top ``rank`` columns, as the library's ``staticpca`` takes them. It is read
with safetensors directly: the engine has no Hugging Face model object, so the model fingerprint ojakv checks
cannot be computed here; the file's format, model type and geometry (layers, KV heads, head size) are checked
instead.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch

from .settings import Settings, refuse

FORMAT_VERSION = "2"  # ojakv.calibration.FORMAT_VERSION, the version this reader understands


def _how_to_make(model_config) -> str:
    return (f"make one with `ojakv calibrate --model {model_config.model} --out calibration.safetensors` and pass "
            f"\"calibration_file\": \"calibration.safetensors\"")


@lru_cache(maxsize=4)
def _read(path: str):
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys() if key.endswith((".eigvecs", ".eigvals"))}
    except Exception as error:  # safetensors raises several types for a file that is not one
        raise refuse(f"{path} is not a readable calibration file ({error})") from None
    return metadata, tensors


def _geometry(model_config) -> tuple[int, int, int]:
    hf = model_config.hf_text_config
    return (hf.num_hidden_layers, model_config.get_total_num_kv_heads(), model_config.get_head_size())


def check_available(settings: Settings, model_config) -> tuple[dict, dict]:
    """The file's metadata and eigenvectors, checked against the model; a one-line refusal otherwise."""
    if not settings.calibration_file:
        raise refuse(f"method 'ojakv' needs a calibration file: {_how_to_make(model_config)}")
    path = Path(settings.calibration_file).expanduser()
    if not path.is_file():
        raise refuse(f"calibration file {path} does not exist: {_how_to_make(model_config)}")
    metadata, tensors = _read(str(path.resolve()))
    if metadata.get("format") != FORMAT_VERSION:
        raise refuse(f"{path} has calibration format {metadata.get('format')!r}, this plugin reads "
                     f"{FORMAT_VERSION}: {_how_to_make(model_config)}")
    expected = list(_geometry(model_config))
    try:
        found = json.loads(metadata.get("geometry", "null"))
    except json.JSONDecodeError:
        found = None
    model_type = getattr(model_config.hf_text_config, "model_type", None)
    if found != expected or metadata.get("model_type") not in (None, model_type):
        raise refuse(f"{path} was calibrated for a {metadata.get('model_type')} model of geometry {found} "
                     f"(layers, KV heads, head size), not this {model_type} model's {expected}: "
                     f"{_how_to_make(model_config)}")
    kind = "k_pre" if settings.key_mode == "pre_rope" else "k_post"
    for needed in (kind, "v"):
        if f"{needed}.eigvecs" not in tensors or f"{needed}.eigvals" not in tensors:
            raise refuse(f"{path} has no {needed} spectrum: {_how_to_make(model_config)}")
    if settings.key_mode == "pre_rope":
        rope_inverse_frequencies(model_config, model_config.get_head_size())  # refuses RoPE it cannot undo
    return metadata, tensors


def layer_bases(settings: Settings, model_config, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(U_k, U_v), each [KV heads, head_dim, rank] float32, for one layer."""
    _, tensors = check_available(settings, model_config)
    kind = "k_pre" if settings.key_mode == "pre_rope" else "k_post"
    r = settings.rank
    key = tensors[f"{kind}.eigvecs"][layer_idx, :, :, :r].float()
    value = tensors["v.eigvecs"][layer_idx, :, :, :r].float()
    return key, value


def layer_spectra(settings: Settings, model_config, layer_idx: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """For keys and values of one layer: per-token variances [all KV heads, d] (descending) and their directions
    [all KV heads, d, d], float32, as the library's calibrated transform coder reads them."""
    from ..calibration import counted_rows

    metadata, tensors = check_available(settings, model_config)
    rows = counted_rows(int(metadata["tokens"]), int(metadata["chunk_tokens"]))
    kind = "k_pre" if settings.key_mode == "pre_rope" else "k_post"
    return [(tensors[f"{name}.eigvals"][layer_idx].float() / rows, tensors[f"{name}.eigvecs"][layer_idx].float())
            for name in (kind, "v")]


def rope_inverse_frequencies(model_config, head_dim: int) -> torch.Tensor:
    """RoPE's inverse frequencies (float32, rotary_dim / 2) for the plain ('default') RoPE; other scalings are
    refused for keys before RoPE (``key_mode='post_rope'`` needs no RoPE)."""
    hf = model_config.hf_text_config
    params = dict(getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise refuse(f"key_mode 'pre_rope' undoes only plain RoPE, this model uses {rope_type!r}: give "
                     f"key_mode 'post_rope'")
    theta = params.get("rope_theta", getattr(hf, "rope_theta", None))
    if theta is None:
        raise refuse("the model config names no rope_theta: give key_mode 'post_rope'")
    partial = params.get("partial_rotary_factor", getattr(hf, "partial_rotary_factor", 1.0)) or 1.0
    rotary_dim = int(head_dim * partial)
    exponent = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
    return 1.0 / (float(theta) ** exponent)
