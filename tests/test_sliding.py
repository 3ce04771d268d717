"""Hybrid models (Gemma 2 / 3): sliding-window layers stay as transformers keeps them, global layers are compressed."""

from __future__ import annotations

import pytest
import torch

import ojakv
from ojakv.cache import SlidingWindowLayer
from ojakv.errors import OjaKVError
from ojakv.hf import check_supported, sliding_windows
from tiny import tiny_model

from helpers import full_cache, greedy_scores, kv, padded_batch


@pytest.mark.parametrize("model_type", ["gemma2", "gemma3_text"])
def test_sliding_layers_match_transformers_and_global_layers_are_compressed(model_type):
    model = tiny_model(model_type, num_layers=4, sliding_window=24, max_context=1024)
    assert sliding_windows(model) == [24, None, 24, None]
    ids, mask = padded_batch(model.config.vocab_size, (120, 97), seed=5)
    reference = full_cache(model)
    cache = ojakv.make_cache(model, "snapkv", capacity=32, window=8)
    with torch.no_grad():  # the prompt alone: layer 0 sees the same inputs with either cache
        model(input_ids=ids, attention_mask=mask, **kv(reference))
        model(input_ids=ids, attention_mask=mask, **kv(cache))
    first, expected = cache.layers[0], reference.layers[0]
    assert torch.equal(first.keys, expected.keys) and torch.equal(first.values, expected.values)
    cache = ojakv.make_cache(model, "snapkv", capacity=32, window=8)
    greedy_scores(model, ids, mask, cache, steps=8)
    for index in (0, 2):  # sliding: the last window - 1 tokens at full precision, the bytes DynamicCache holds
        layer = cache.layers[index]
        assert isinstance(layer, SlidingWindowLayer) and layer.keys.shape[-2] == 23
        assert layer.full_bytes() == sum(layer.segments().values())
    report = cache.memory()
    for index in (1, 3):  # global: the chosen method, holding less than the full cache would
        assert not isinstance(cache.layers[index], SlidingWindowLayer)
        assert sum(report.per_layer[index].values()) < cache.layers[index].full_bytes()
    assert report.held_bytes < report.full_bytes


def test_full_bytes_of_a_hybrid_model_are_what_dynamic_cache_holds():
    model = tiny_model("gemma2", num_layers=2, sliding_window=16, max_context=1024)
    ids, mask = padded_batch(model.config.vocab_size, (80,), seed=2)
    reference = full_cache(model)
    greedy_scores(model, ids, mask, reference, steps=4)
    cache = ojakv.make_cache(model, "full")
    greedy_scores(model, ids, mask, cache, steps=4)
    held = sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in reference.layers)
    assert cache.memory().full_bytes == held == cache.memory().held_bytes


def test_unsupported_layer_types_and_families_name_the_supported_ones():
    from types import SimpleNamespace

    with pytest.raises(OjaKVError, match="gemma2.*gemma3_text"):
        check_supported(SimpleNamespace(model_type="gemma3"))
    model = tiny_model("gemma2")
    model.config.layer_types = ["chunked_attention", "full_attention"]
    model.config.attention_chunk_size = 8
    with pytest.raises(OjaKVError, match="chunked_attention"):
        ojakv.make_cache(model, "full")
