"""Transform coding of low-rank coefficients: the bit allocation, mixed-width packing, the gain-shape coder, and
the ``ojakv-tc`` method's knobs."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ojakv
from ojakv.errors import OjaKVError
from ojakv.quantize import mixed_bytes, pack_mixed, unpack_mixed
from ojakv.transform_coding import TransformCodedRows, allocate_bits, bit_order, distortion, fitted_allocation

variances = st.lists(st.floats(1e-4, 1e4), min_size=1, max_size=6)


def _distortion(variance, bits):
    return sum(v * distortion(b) for v, b in zip(variance, bits))


@settings(max_examples=60, deadline=None)
@given(variance=st.lists(st.floats(1e-4, 1e4), min_size=1, max_size=4), total=st.integers(0, 20))
def test_the_greedy_allocation_is_optimal_among_all_allocations_of_its_total(variance, total):
    bits = allocate_bits(variance, total)
    spent = min(total, 8 * len(variance))
    assert sum(bits) == spent and all(0 <= b <= 8 for b in bits)
    best = min(_distortion(variance, choice) for choice in itertools.product(range(9), repeat=len(variance))
               if sum(choice) == spent)
    assert _distortion(variance, bits) <= best * (1 + 1e-9)


@settings(max_examples=40, deadline=None)
@given(variance=variances, total=st.integers(0, 48))
def test_a_larger_variance_never_gets_fewer_bits(variance, total):
    bits = allocate_bits(variance, total)
    for i, j in itertools.permutations(range(len(variance)), 2):
        if variance[i] > variance[j]:
            assert bits[i] >= bits[j]


@settings(max_examples=40, deadline=None)
@given(variance=variances, total=st.integers(0, 48))
def test_the_allocation_of_t_bits_is_the_first_t_of_the_greedy_order(variance, total):
    order = bit_order(variance, 8 * len(variance))
    assert allocate_bits(variance, total) == [order[:total].count(j) for j in range(len(variance))]


def _held(bits, rows, bytes_per_column):
    kept = [b for b in bits if b]
    return rows * TransformCodedRows.bytes_per_row(kept) + TransformCodedRows.fixed_bytes(kept) + len(kept) * bytes_per_column


@settings(max_examples=60, deadline=None)
@given(spectrum=st.lists(st.floats(1e-3, 1e3), min_size=2, max_size=12), rows=st.integers(1, 4000),
       per_row=st.floats(2.5, 12.0), per_column=st.sampled_from([0, 64, 128, 256]))
def test_the_fitted_allocation_is_the_largest_one_whose_codes_and_bases_fit(spectrum, rows, per_row, per_column):
    eigenvalues = torch.tensor(sorted(spectrum, reverse=True)).reshape(1, 1, -1)
    bits = fitted_allocation(eigenvalues, per_row, rows, per_column)
    shares = (eigenvalues / eigenvalues.sum()).flatten().tolist()
    assert bits == allocate_bits(shares, sum(bits))  # one of the greedy allocations
    assert sum(bits) == 0 or _held(bits, rows, per_column) <= rows * per_row
    for more in range(sum(bits) + 1, 8 * len(spectrum) + 1):  # no allocation with more bits fits
        assert _held(allocate_bits(shares, more), rows, per_column) > rows * per_row


@settings(max_examples=60, deadline=None)
@given(widths=st.lists(st.integers(0, 8), min_size=1, max_size=40), seed=st.integers(0, 100))
def test_mixed_width_codes_round_trip_in_the_bytes_counted(widths, seed):
    generator = torch.Generator().manual_seed(seed)
    codes = torch.stack([torch.randint(0, 2**w, (2, 3, 5), generator=generator) for w in widths], dim=-1)
    packed = pack_mixed(codes, widths)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 3, 5, mixed_bytes(widths))
    assert mixed_bytes(widths) <= sum(widths) // 8 + 4  # under one partly filled byte per slice width
    assert torch.equal(unpack_mixed(packed, widths), codes.to(torch.uint8))


def _gaussian_rows(variance, n=20000, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(1, 1, n, len(variance), generator=generator) * torch.tensor(variance).sqrt()


def test_each_coefficient_is_coded_with_about_its_allocated_distortion():
    variance = [16.0, 4.0, 1.0, 0.25]
    bits = allocate_bits(variance, 12)
    assert bits[0] > bits[-1] > 0
    rows = _gaussian_rows(variance)
    coder = TransformCodedRows(bits, torch.tensor(variance).sqrt().view(1, 1, -1))
    coder.append(rows)
    error = (coder.view - rows).pow(2).mean(dim=(0, 1, 2))
    expected = torch.tensor([v * distortion(b) for v, b in zip(variance, bits)])
    # No coefficient is coded worse than an independent Lloyd–Max quantizer with its bits would code it (the
    # least-squares gain makes the large ones better: the well-coded coefficients set it).
    assert ((error / expected) < 1.1).all(), (error / expected)


def test_more_bits_code_more_finely_and_zero_rows_stay_zero():
    variance = [4.0, 2.0, 1.0, 0.5]
    rows = _gaussian_rows(variance, n=4000)
    rows[0, 0, :10] = 0.0  # padding-like rows
    errors = []
    for bits in ([1, 1, 1, 1], [3, 2, 2, 1], [6, 5, 5, 4]):
        coder = TransformCodedRows(bits, torch.tensor(variance).sqrt().view(1, 1, -1))
        coder.append(rows)
        assert torch.equal(coder.view[0, 0, :10], torch.zeros(10, 4))
        errors.append(float((coder.view - rows).pow(2).mean()))
    assert errors[0] > errors[1] > errors[2]


def test_held_bytes_are_the_codes_gains_scales_and_codebooks():
    bits = [5, 3, 3, 2, 1]
    coder = TransformCodedRows(bits, torch.ones(2, 3, 5))
    coder.append(torch.randn(2, 3, 7, 5))
    assert coder.length == 7
    codebooks = 4 * (2**5 + 2**3 + 2**2 + 2**1) + 4 * 5  # float32 centroids of the widths used, int32 starts
    assert coder.used_bytes == 2 * 3 * 7 * TransformCodedRows.bytes_per_row(bits) + 2 * 3 * 5 * 4 + codebooks
    assert TransformCodedRows.fixed_bytes(bits) == 5 * 4 + codebooks  # one head's scales, and the codebooks


def test_selected_rows_decode_as_the_same_rows_of_the_whole():
    from ojakv.storage import GrowableTensor, QuantizedRows

    gen = torch.Generator().manual_seed(2)
    rows = torch.randn(2, 3, 40, 6, generator=gen)
    index = torch.stack([torch.randperm(40, generator=gen)[:9] for _ in range(6)]).view(2, 3, 9)
    stores = [GrowableTensor(), QuantizedRows(4), TransformCodedRows([3, 2, 2, 1, 1, 1], rows.std(2))]
    for store in stores:
        store.append(rows[:, :, :25])
        store.append(rows[:, :, 25:])  # grown once: rows come from the live part only
        whole = store.view
        assert torch.equal(store.rows(index), whole.gather(2, index.unsqueeze(-1).expand(-1, -1, -1, 6)))


def test_re_expression_re_codes_with_one_more_rounding():
    variance = [4.0, 1.0, 0.25]
    rows = _gaussian_rows(variance, n=2000)
    coder = TransformCodedRows([4, 3, 2], torch.tensor(variance).sqrt().view(1, 1, -1))
    coder.append(rows)
    once = coder.view.clone()
    coder.apply_(lambda coefficients: coefficients)  # the identity re-expression: decoded, then coded again
    twice = coder.view
    assert float((twice - rows).pow(2).mean()) <= 1.5 * float((once - rows).pow(2).mean())


def test_a_coefficient_needs_at_least_one_bit():
    with pytest.raises(ValueError, match="1 to 8 bits"):
        TransformCodedRows([2, 0], torch.ones(1, 1, 2))


@pytest.mark.parametrize("knobs, message", [
    (dict(body_bits=2, rank=8), "body_bits decides the rank"),
    (dict(body_bits=9), "body_bits must be in"),
    (dict(body_bits=2, init="weights"), "use init='prompt' or init='calibration'"),
    (dict(body_bits=2, init="calibration", eta_prefill=0.1), "give eta_prefill=0"),
    (dict(body_bits=2, init="calibration", eta_prefill=0, key_basis="queries+keys"), "key_basis='keys'"),
    (dict(body_bits=2, coef_bits=4), "not both"),
])
def test_knobs_that_contradict_the_coder_are_refused(tiny, knobs, message):
    with pytest.raises(OjaKVError, match=message):
        ojakv.make_cache(tiny, "ojakv-tc", **knobs)


def test_the_rank_is_where_the_bits_reach_zero(tiny):
    from helpers import greedy_scores, padded_batch

    ids, mask = padded_batch(tiny.config.vocab_size, (300,), seed=3)
    head_dim = ojakv.hf.geometry(tiny).head_dim
    cache = ojakv.make_cache(tiny, "ojakv-tc", body_bits=0.5)  # head_dim / 2 bits per token: at most that rank
    greedy_scores(tiny, ids, mask, cache, steps=4)
    for layer in cache.layers:
        assert sum(layer.k_coef.bits) == head_dim // 2 and layer.u_k.shape[-1] == len(layer.k_coef.bits)
        assert layer.u_k.shape[-1] < head_dim


def test_a_budget_makes_ojakv_code_its_body_and_pay_for_its_int8_bases(tiny):
    from helpers import greedy_scores, padded_batch
    from ojakv.transform_coding import Int8Basis

    ids, mask = padded_batch(tiny.config.vocab_size, (600,), seed=5)
    cache = ojakv.make_cache(tiny, "ojakv", budget=0.3, new_tokens=4)
    greedy_scores(tiny, ids, mask, cache, steps=4)
    for layer in cache.layers:
        assert layer.config.body_bits > 0 and layer.config.fit_bases and layer.config.prefill_attention == "full"
        assert isinstance(layer.u_k, Int8Basis) and layer.stat_k is None  # frozen bases, no Oja statistics
        assert layer.u_k.codes.dtype == torch.int8 and layer.u_k.scale.shape[-2] == 1  # a scale per column
        heads = layer.u_k.shape[0] * layer.u_k.shape[1]
        basis = sum(t.numel() * t.element_size() for t in layer.u_k.buffers)
        assert basis == heads * layer.u_k.shape[-1] * Int8Basis.column_bytes(layer.u_k.shape[-2])
        per_head = (layer.k_coef.nbytes + basis) / heads  # codes, gains, scales and the basis
        # every row slot (decoded rows and growth slack too) within what the budget gives a body row
        assert per_head <= layer.k_coef.codes.capacity * layer.config.coefficient_bytes(0, 0, layer.u_k.shape[-2], 0)
    assert cache.memory().ratio <= 0.3 + 0.02


def test_an_int8_basis_rounds_each_column_to_within_half_a_step():
    from ojakv.transform_coding import Int8Basis

    basis = torch.linalg.qr(torch.randn(2, 3, 64, 20, generator=torch.Generator().manual_seed(0)))[0]
    held = Int8Basis(basis)
    step = basis.abs().amax(-2, keepdim=True) / 127
    assert ((held.float() - basis).abs() <= step / 2 + 1e-7).all()
    x = torch.randn(500, 64, generator=torch.Generator().manual_seed(1))
    exact, rounded = x @ basis @ basis.mT, x @ held.float() @ held.float().mT
    assert (rounded - exact).norm() / exact.norm() < 0.02  # far below a 2-bit code's error


SMOLLM2 = dict(num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, max_context=8192, model_type="llama")


@pytest.mark.parametrize("prompt,budget,anchors", [
    (1024, 0.15, 4), (2048, 0.15, 4), (8192, 0.15, 32),  # 32 + 32 would leave 1.19, 1.59 and 1.92 bits
    (1024, 0.25, 32), (1024, 0.5, 32)])
def test_a_budget_lowers_ojakv_s_anchors_only_when_they_would_starve_the_body(prompt, budget, anchors):
    from ojakv.hf.architecture import ModelGeometry
    from ojakv.methods.ojakv_tc import MIN_BODY_BITS, ojakv_budget

    geometry = ModelGeometry(**SMOLLM2)
    sizing = ojakv_budget({}, geometry, prompt, 64, 2, budget)
    assert (sizing.knobs["n_sink"], sizing.knobs["n_recent"]) == (anchors, anchors)
    assert sizing.predicted <= budget
    defaults = ojakv_budget({"n_sink": 32, "n_recent": 32}, geometry, prompt, 64, 2, budget)
    if anchors == 32:
        assert sizing.knobs["body_bits"] == defaults.knobs["body_bits"] >= MIN_BODY_BITS
    else:
        assert defaults.knobs["body_bits"] < MIN_BODY_BITS < sizing.knobs["body_bits"]


def test_anchors_the_user_gives_stay_under_a_budget():
    from ojakv.hf.architecture import ModelGeometry
    from ojakv.methods.ojakv_tc import ojakv_budget

    sizing = ojakv_budget({"n_sink": 16}, ModelGeometry(**SMOLLM2), 1024, 64, 2, 0.15)
    assert "n_sink" not in sizing.knobs and "n_recent" not in sizing.knobs  # n_recent keeps its default


def test_a_cache_given_a_small_budget_holds_the_fewer_anchors_it_chose():
    from tiny import tiny_model

    from ojakv.hf import cache_kwargs

    # float32 model: 0.07 of its cache is about 0.14 of a 16-bit one, where 32 + 32 anchors starve a 1K body
    model = tiny_model("llama", num_layers=2, num_heads=2, num_kv_heads=1, head_dim=64, max_context=4096)
    ids = torch.randint(3, model.config.vocab_size, (1, 1024))
    with ojakv.make_cache(model, "ojakv", budget=0.07, new_tokens=8) as cache, torch.no_grad():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, min_new_tokens=8,
                       do_sample=False, pad_token_id=0, **cache_kwargs(model, cache))
    for layer in cache.layers:
        assert (layer.config.n_sink, layer.config.n_recent) == (4, 4) and layer.k_win.shape[2] == 4
    assert 0.05 <= cache.memory().ratio <= 0.07 + 0.02


def test_a_budget_with_coef_bits_keeps_ojakv_at_a_rank(tiny):
    from helpers import greedy_scores, padded_batch

    ids, mask = padded_batch(tiny.config.vocab_size, (600,), seed=5)
    cache = ojakv.make_cache(tiny, "ojakv", budget=0.3, coef_bits=4)
    greedy_scores(tiny, ids, mask, cache, steps=2)
    assert all(not layer.config.body_bits and layer.config.rank for layer in cache.layers)


def test_fit_bases_needs_a_transform_coded_body(tiny):
    with pytest.raises(OjaKVError, match="give body_bits too"):
        ojakv.make_cache(tiny, "ojakv", fit_bases=True)


@pytest.mark.parametrize("budget", [0.2, 0.12])
@pytest.mark.parametrize("eta_decode", [0.0, 0.05])
def test_a_budget_spreads_the_bases_over_the_tokens_still_to_come(budget, eta_decode):
    """The budget counts the prompt and new_tokens; the bases serve all their body rows, so with as many new
    tokens as prompt ones the cache still holds what was asked (not less, as bases charged to the prompt alone);
    moving bases pay for their Oja statistics at the rank kept, not at head_dim."""
    from test_methods import _ratio_after

    ratio = _ratio_after("ojakv", dict(budget=budget, new_tokens=400, eta_decode=eta_decode), prompt=400, new=400)
    assert budget - 0.02 <= ratio <= budget + 0.02


def test_value_share_splits_the_body_s_bits_between_values_and_keys(tiny):
    from helpers import greedy_scores, padded_batch

    ids, mask = padded_batch(tiny.config.vocab_size, (300,), seed=6)
    head_dim = tiny.config.hidden_size // tiny.config.num_attention_heads
    cache = ojakv.make_cache(tiny, "ojakv-tc", body_bits=1.0, value_share=0.75)
    greedy_scores(tiny, ids, mask, cache, steps=2)
    for layer in cache.layers:
        assert sum(layer.k_coef.bits) == head_dim // 2 and sum(layer.v_coef.bits) == 3 * head_dim // 2
    with pytest.raises(OjaKVError, match="value_share must be in"):
        ojakv.make_cache(tiny, "ojakv-tc", value_share=1.0)
    ratio = _ratio_after_budget(0.2, value_share=0.3)
    assert 0.18 <= ratio <= 0.22


def _ratio_after_budget(budget, **knobs):
    from test_methods import _ratio_after

    return _ratio_after("ojakv", dict(budget=budget, new_tokens=16, **knobs), prompt=600, new=16)


def test_a_calibrated_coder_codes_every_prompt_in_one_fixed_basis_allocation_and_scale(tiny, tmp_path):
    """``init='calibration'`` with ``body_bits``: the bases, bits and scales come from the calibration spectra
    alone, so two different prompts get the same per-token layout and code a token the same way (what a paged
    serving format needs), and the scales are the calibration's per-token standard deviations."""
    from helpers import calibration_file, greedy_scores, padded_batch
    from ojakv.calibration import load_calibration

    path = calibration_file(tiny, tmp_path / "c.safetensors")
    calibration = load_calibration(tiny, path)
    layers = []
    for seed in (1, 2):
        ids, mask = padded_batch(tiny.config.vocab_size, (200,), seed=seed)
        cache = ojakv.make_cache(tiny, "staticpca", body_bits=3, calibration_file=str(path))
        greedy_scores(tiny, ids, mask, cache, steps=2)
        layers.append(cache.layers)
    for index, (first, second) in enumerate(zip(*layers)):
        assert first.k_coef.bits == second.k_coef.bits and first.v_coef.bits == second.v_coef.bits
        assert torch.equal(first.u_k.float(), second.u_k.float()) and torch.equal(first.k_coef.scale, second.k_coef.scale)
        values, vectors = calibration.layer("k_pre", index)
        kept = list(range(len(first.k_coef.bits)))  # the leading columns: bits go by variance
        assert torch.allclose(first.u_k.float()[0], vectors[..., kept], atol=3e-3)  # int8 columns
        expected = (values[..., kept] / calibration.rows()).sqrt()
        floor = expected.amax(-1, keepdim=True) * 1e-3
        assert torch.allclose(first.k_coef.scale[0], torch.maximum(expected, floor), rtol=1e-5)


def test_a_calibrated_coder_with_many_bits_is_close_to_the_full_cache(tiny, tmp_path):
    from helpers import calibration_file, full_cache, greedy_scores, padded_batch

    path = calibration_file(tiny, tmp_path / "c.safetensors")
    ids, mask = padded_batch(tiny.config.vocab_size, (150, 120), seed=3)
    reference = greedy_scores(tiny, ids, mask, full_cache(tiny), steps=3)
    coarse, fine = (greedy_scores(tiny, ids, mask, ojakv.make_cache(tiny, "staticpca", body_bits=bits,
                                                                    calibration_file=str(path)), steps=3)
                    for bits in (1, 6))
    error = lambda scores: float((scores - reference).norm() / reference.norm())
    assert error(fine) < 0.05 and error(fine) < error(coarse) / 3
