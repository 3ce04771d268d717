"""Fast paths against their PyTorch references: the same rows, products and generations, with kernels on and off."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ojakv
from helpers import kv
from ojakv.kernels import kernels_enabled, use_kernels
from ojakv.quantize import mixed_slices, pack_mixed, unpack_mixed
from ojakv.rope import Rotation
from ojakv.transform_coding import TransformCodedRows
from tiny import tiny_model

pytest.importorskip("numba")

widths = st.lists(st.integers(1, 8), min_size=1, max_size=40)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 8), min_size=1, max_size=40), st.integers(0, 2**31 - 1))
def test_mixed_slices_say_where_pack_mixed_put_every_bit(bits, seed):
    generator = torch.Generator().manual_seed(seed)
    codes = torch.stack([torch.randint(0, 2**b, (7,), generator=generator) for b in bits], -1).to(torch.uint8)
    packed = pack_mixed(codes, bits)
    rebuilt = torch.zeros_like(codes)
    for j, entry in enumerate(mixed_slices(tuple(bits))):
        for byte, shift, width, code_shift in entry:
            rebuilt[:, j] |= ((packed[:, byte] >> shift) & (2**width - 1)) << code_shift
    assert torch.equal(rebuilt, codes) and torch.equal(unpack_mixed(packed, bits), codes)


def _store(bits, tokens, seed, heads=2, batch=2):
    generator = torch.Generator().manual_seed(seed)
    scale = torch.rand(batch, heads, len(bits), generator=generator) + 0.05
    store = TransformCodedRows(bits, scale)
    rows = torch.randn(batch, heads, tokens, len(bits), generator=generator) * scale.unsqueeze(2)
    rows[:, :, ::5] = 0  # padding rows decode to zero
    store.append(rows)
    return store, generator


def _close(fast, reference, tolerance=1e-5):
    scale = reference.abs().max().clamp_min(1e-30)
    assert fast.shape == reference.shape and ((fast - reference).abs().max() / scale) <= tolerance


@settings(max_examples=40, deadline=None)
@given(widths, st.sampled_from([1, 3, 255, 256, 257, 700]), st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_the_cpu_kernels_read_the_codes_as_the_reference_decodes_them(bits, tokens, groups, seed):
    store, generator = _store(bits, tokens, seed)
    queries = torch.randn(2, 2, groups, len(bits), generator=generator)
    weights = torch.softmax(torch.randn(2, 2, groups, tokens, generator=generator), -1)
    index = torch.randint(0, tokens, (2, 2, 5), generator=generator)
    with use_kernels(False):
        expected = store.view, store.dot(queries), store.weighted_sum(weights), store.rows(index)
    assert kernels_enabled() and store._kernels() is not None
    rows, products, sums, picked = store.view, store.dot(queries), store.weighted_sum(weights), store.rows(index)
    assert torch.equal(rows, expected[0]) and torch.equal(picked, expected[3])  # same products, same order
    _close(products, expected[1])
    _close(sums, expected[2])


@settings(max_examples=30, deadline=None)
@given(widths, st.sampled_from([1, 200, 1500]), st.sampled_from([(64, 64), (64, 32)]), st.integers(0, 2**31 - 1))
def test_keys_coded_before_rope_score_chunk_by_chunk_as_if_rebuilt_at_once(bits, tokens, dims, seed):
    from ojakv.attention import LowRankBody, _rebuilt_scores

    d, rotary = dims
    store, generator = _store(bits[:d], tokens, seed)
    basis = torch.linalg.qr(torch.randn(2, 2, d, d, generator=generator))[0][..., : store.scale.shape[-1]]
    queries = torch.randn(2, 2, 3, d, generator=generator)
    angles = torch.rand(2, 1, tokens, rotary // 2, generator=generator) * 100
    rotation = Rotation(torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1))
    body = LowRankBody(0, store, store, basis, basis, key_angles=rotation)
    with use_kernels(False):
        expected = queries @ rotation.apply(store.view @ basis.transpose(-1, -2)).transpose(-1, -2)
    assert torch.equal(store.span(7 % tokens, tokens), store.view[:, :, 7 % tokens :])
    _close(_rebuilt_scores(queries, body), expected)


def test_the_switch_restores_what_it_found_and_the_reference_runs_without_kernels():
    store, _ = _store([3, 2, 1], 10, seed=1)
    with use_kernels(False):
        assert store._kernels() is None
        with use_kernels(True):
            assert store._kernels() is not None
        assert not kernels_enabled()
    assert kernels_enabled()


@pytest.mark.parametrize("key_mode", ["pre_rope", "post_rope"])
def test_a_budgeted_ojakv_generates_the_same_with_and_without_kernels(key_mode, monkeypatch):
    from ojakv.kernels.coded_cpu import CodedRowsKernels

    calls = []
    sums = CodedRowsKernels.weighted_sum
    monkeypatch.setattr(CodedRowsKernels, "weighted_sum", lambda *a: calls.append(1) or sums(*a))
    model = tiny_model("llama", num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64, vocab_size=300,
                       max_context=2048)
    ids = torch.randint(0, 300, (2, 400), generator=torch.Generator().manual_seed(3))
    runs = []
    for enabled in (True, False):
        with use_kernels(enabled), torch.no_grad():
            cache = ojakv.make_cache(model, "ojakv", budget=0.3, new_tokens=40, key_mode=key_mode)
            out = model.generate(ids, **kv(cache), max_new_tokens=40, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True)
            runs.append((out.sequences, torch.stack(out.scores)))
    assert len(calls) == 2 * 39  # every layer's decode step read its body's values from the codes
    assert torch.equal(runs[0][0], runs[1][0])
    _close(runs[0][1], runs[1][1], tolerance=1e-4)
