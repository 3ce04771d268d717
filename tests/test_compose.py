"""Compositions: snapkv+ojakv (selection, then low-rank storage) and ojakv+quant (quantized coefficients)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ojakv
from ojakv.storage import QuantizedRows

from helpers import greedy_scores, held_tensor_bytes, padded_batch

SELECTION = dict(capacity=40, window=8, kernel=5, pooling="max")


@pytest.mark.parametrize("key_mode", ["pre_rope", "post_rope"])
@pytest.mark.parametrize("attention", ["latent", "reconstruct"])
def test_snapkv_then_ojakv_at_full_rank_is_snapkv(tiny, key_mode, attention):
    """At full rank without updates the low-rank store is lossless, so the composition must keep exactly the
    tokens SnapKV keeps, per head, at their own positions (pre-RoPE keys are rotated back per head)."""
    ids, mask = padded_batch(tiny.config.vocab_size, (96, 71), seed=4)
    expected = greedy_scores(tiny, ids, mask, ojakv.make_cache(tiny, "snapkv", **SELECTION), steps=20)
    cache = ojakv.make_cache(tiny, "snapkv+ojakv", rank_ratio=1.0, eta_decode=0.0, n_sink=4, n_recent=6,
                             key_mode=key_mode, attention=attention, **SELECTION)
    assert (greedy_scores(tiny, ids, mask, cache, steps=20) - expected).abs().max() <= 1e-4
    assert cache.layers[0].held_tokens() == SELECTION["capacity"] + 19  # decoded tokens are appended


def test_snapkv_then_ojakv_holds_what_it_reports_and_less_than_either(tiny):
    ids, mask = padded_batch(tiny.config.vocab_size, (96, 71), seed=4)
    ratios = {}
    for method, knobs in [("snapkv", SELECTION), ("ojakv", dict(rank=4, n_sink=4, n_recent=6)),
                          ("snapkv+ojakv", dict(rank=4, n_sink=4, n_recent=6, **SELECTION))]:
        cache = ojakv.make_cache(tiny, method, **knobs)
        scores = greedy_scores(tiny, ids, mask, cache, steps=8)
        assert scores.isfinite().all()
        assert cache.memory().held_bytes == held_tensor_bytes(cache)
        ratios[method] = cache.memory().ratio
    assert ratios["snapkv+ojakv"] < min(ratios["snapkv"], ratios["ojakv"])


def test_ojakv_quant_stays_close_to_ojakv_with_8_bit_coefficients(tiny):
    ids, mask = padded_batch(tiny.config.vocab_size, (80, 64), seed=9)
    knobs = dict(rank=8, n_sink=4, n_recent=6, update_interval=8)
    plain = greedy_scores(tiny, ids, mask, ojakv.make_cache(tiny, "ojakv", **knobs), steps=16)
    for bits, tolerance in ((8, 0.05), (4, 0.5)):
        quantized = greedy_scores(tiny, ids, mask, ojakv.make_cache(tiny, "ojakv+quant", coef_bits=bits, **knobs),
                                  steps=16)
        assert 0 < (quantized - plain).abs().max() <= tolerance


@settings(max_examples=40, deadline=None)
@given(width=st.integers(1, 40), tokens=st.lists(st.integers(1, 6), min_size=1, max_size=4),
       bits=st.sampled_from([2, 4, 8]), scale=st.floats(1e-3, 1e3), seed=st.integers(0, 2**16))
def test_quantized_rows_round_trip_within_half_a_step(width, tokens, bits, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    rows = QuantizedRows(bits)
    chunks = [torch.randn(2, 3, n, width, generator=gen) * scale for n in tokens]
    for chunk in chunks:
        rows.append(chunk)
    stored = torch.cat(chunks, dim=2)
    assert rows.view.shape == stored.shape and rows.length == sum(tokens)
    padded = torch.nn.functional.pad(stored, (0, QuantizedRows.padded(width) - width))
    groups = padded.unflatten(-1, (-1, QuantizedRows.GROUP))
    step = (groups.amax(-1, keepdim=True) - groups.amin(-1, keepdim=True)) / (2**bits - 1)
    # half a step, plus float16 rounding of the scale and minimum (relative 2^-11, or 2^-25 absolute once the
    # scale is subnormal, times the largest code)
    subnormal = (2**bits - 1) * 2.0**-25
    bound = (step / 2 + 2e-3 * groups.abs().amax(-1, keepdim=True) + subnormal).expand_as(groups).flatten(-2)
    bound = bound[..., :width]
    assert ((rows.view - stored).abs() <= bound).all()
    assert rows.used_bytes == 2 * 3 * sum(tokens) * QuantizedRows.bytes_per_row(width, bits)
