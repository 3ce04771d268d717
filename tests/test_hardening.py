"""Numerical safety: low-precision models, degenerate inputs, long decode runs, determinism."""

from __future__ import annotations

import pytest
import torch

import ojakv
from ojakv.models import tiny_model
from ojakv.subspace import orthogonality_error

from conftest import greedy_scores, padded_batch

SMALL = dict(n_sink=4, n_recent=8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_models_keep_float32_bases_and_finite_outputs(dtype):
    model = tiny_model("llama", num_layers=2, head_dim=16, max_context=1024, dtype=dtype)
    ids, mask = padded_batch(model.config.vocab_size, (80, 64), seed=1)
    cache = ojakv.make_cache(model, "ojakv", update_interval=4, **SMALL)
    assert torch.isfinite(greedy_scores(model, ids, mask, cache, steps=12).float()).all()
    for layer in cache.layers:
        assert layer.u_k.dtype == torch.float32 and layer.k_coef.view.dtype == dtype
        assert orthogonality_error(layer.u_k) <= 1e-5 and orthogonality_error(layer.u_v) <= 1e-5


def _drive(cache, keys, values, start):
    b, _, q, _ = keys.shape
    cache.begin_forward(None, torch.arange(start, start + q).expand(b, q), b, q, keys.device)
    for idx in range(len(cache.layers)):
        cache.update(keys, values, idx)


@pytest.mark.parametrize("key_mode", ["pre_rope", "post_rope"])
@pytest.mark.parametrize("features", ["zeros", "constant"])
def test_degenerate_features_never_produce_nan(tiny, key_mode, features):
    cache = ojakv.make_cache(tiny, "ojakv", key_mode=key_mode, update_interval=2, **SMALL)
    make = torch.zeros if features == "zeros" else (lambda *shape: torch.full(shape, 0.7))
    _drive(cache, make(1, 2, 40, 16), make(1, 2, 40, 16), 0)
    for t in range(40, 50):
        _drive(cache, make(1, 2, 1, 16), make(1, 2, 1, 16), t)
    for layer in cache.layers:
        keys, values = layer._materialize()
        assert torch.isfinite(keys).all() and torch.isfinite(values).all()
        assert orthogonality_error(layer.u_k) <= 1e-5 and orthogonality_error(layer.u_v) <= 1e-5


def test_long_decode_with_updates_every_8_tokens_stays_orthonormal_and_finite(tiny):
    gen = torch.Generator().manual_seed(0)
    cache = ojakv.make_cache(tiny, "ojakv", update_interval=8, eta_decode=0.3, **SMALL)
    _drive(cache, torch.randn(1, 2, 64, 16, generator=gen), torch.randn(1, 2, 64, 16, generator=gen), 0)
    drift = torch.randn(16, 16, generator=gen) * 0.01
    for t in range(64, 64 + 4096):
        key = torch.randn(1, 2, 1, 16, generator=gen) @ (torch.eye(16) + drift * (t / 512))
        _drive(cache, key, torch.randn(1, 2, 1, 16, generator=gen), t)
    for layer in cache.layers:
        assert orthogonality_error(layer.u_k) <= 1e-5 and orthogonality_error(layer.u_v) <= 1e-5
        keys, values = layer._materialize()
        assert keys.shape[2] == 64 + 4096 and torch.isfinite(keys).all() and torch.isfinite(values).all()


@pytest.mark.parametrize("method", ["ojakv", "snapkv"])
def test_same_inputs_give_identical_outputs(tiny, method):
    ids, mask = padded_batch(tiny.config.vocab_size, (90, 70), seed=2)
    knobs = dict(capacity=40, window=8) if method == "snapkv" else SMALL
    first = greedy_scores(tiny, ids, mask, ojakv.make_cache(tiny, method, **knobs), steps=10)
    second = greedy_scores(tiny, ids, mask, ojakv.make_cache(tiny, method, **knobs), steps=10)
    assert torch.equal(first, second)
