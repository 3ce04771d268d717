"""The slot formats on their own (no engine): sizes, round trips, and the same codes as the library's."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("vllm.v1")  # "vllm" alone would find this folder as a namespace package

import torch  # noqa: E402

from ojakv.errors import OjaKVError  # noqa: E402
from ojakv.methods import turboquant as library_turboquant  # noqa: E402
from ojakv.quantize import quantize, dequantize  # noqa: E402
from ojakv.rope import apply_rope  # noqa: E402
from ojakv.vllm_plugin import formats  # noqa: E402
from ojakv.vllm_plugin.settings import parse  # noqa: E402

D, HEADS, N = 64, 3, 40


def _kv(seed=0, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    k = (torch.randn(N, HEADS, D, generator=g) * 3).to(dtype)
    v = torch.randn(N, HEADS, D, generator=g).to(dtype)
    return k, v


def _make(section, layer_idx=0):
    s = formats.resolve(parse(section), D, 2)
    if s.method == "quant":
        return formats.QuantFormat(s, HEADS, D, torch.bfloat16)
    return formats.TurboQuantFormat(s, HEADS, D, torch.bfloat16, layer_idx)


@pytest.mark.parametrize("section, slot", [
    ({"method": "quant", "bits": 4}, 2 * (32 + 8)),
    ({"method": "quant", "bits": 2}, 2 * (16 + 8)),
    ({"method": "quant", "bits": 8, "group": 64}, 2 * (64 + 4)),
    ({"method": "turboquant", "bits": 4}, 2 * (32 + 2)),
    ({"method": "turboquant", "bits": 3}, 2 * (24 + 2)),
    ({"method": "turboquant", "bits": 2}, 2 * (16 + 2)),
    ({"method": "ojakv", "rank": 16}, 2 * 16 * 2),
    ({"method": "ojakv", "body_bits": 2}, 2 * (16 + 3 + 2)),  # 128 bits of codes, partly filled bytes, gain
])
def test_slot_sizes_are_codes_plus_scales(section, slot):
    assert formats.slot_bytes(formats.resolve(parse(section), D, 2), D, 2) == slot


def test_slots_are_padded_to_whole_pool_elements():
    s = formats.resolve(parse({"method": "turboquant", "bits": 3}), 40, 2)  # 15 + 2 bytes per part
    assert formats.part_bytes(s, 40, 2) == 17 and formats.slot_bytes(s, 40, 2) == 34
    assert formats.slot_bytes(s, 40, 4) == 36


@pytest.mark.parametrize("budget, bits", [(0.3, 4), (0.2, 3), (0.15, 2)])
def test_a_budget_picks_the_turboquant_width_closest_to_it(budget, bits):
    assert formats.resolve(parse({"method": "turboquant", "budget": budget}), D, 2).bits == bits


def test_the_settings_body_bits_limit_is_the_coders():
    from ojakv.transform_coding import MAX_BITS
    from ojakv.vllm_plugin.settings import MAX_BODY_BITS

    assert MAX_BODY_BITS == MAX_BITS


def test_an_ojakv_budget_is_served_transform_coded_with_the_most_bits_that_fit():
    s = formats.resolve(parse({"method": "ojakv", "budget": 0.25}), D, 2)
    assert s.body_bits == 216 / D and formats.slot_bytes(s, D, 2) == 64  # 27 + 3 + 2 bytes a part: 0.25 of 256
    assert formats.resolve(parse({"method": "ojakv", "rank_ratio": 0.5}), D, 2).rank == 32
    with pytest.raises(OjaKVError, match="below the smallest transform-coded slot"):
        formats.resolve(parse({"method": "ojakv", "budget": 0.03}), D, 2)


def test_quant_slots_hold_what_quantize_holds():
    k, v = _kv()
    fmt = _make({"method": "quant", "bits": 4})
    slots = fmt.encode(k, v)
    assert slots.dtype == torch.uint8 and slots.shape == (N, HEADS, fmt.slot)
    keys, values = fmt.decode(slots.transpose(0, 1))
    expected = dequantize(quantize(k, 4, dim=-1, group=32), torch.float32).transpose(0, 1)
    torch.testing.assert_close(keys, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(values, dequantize(quantize(v, 4, dim=-1, group=32), torch.float32).transpose(0, 1),
                               rtol=1e-6, atol=1e-6)
    # the byte-table decoding is dequantize's
    data = slots.transpose(0, 1)[..., : fmt.part]
    torch.testing.assert_close(fmt.decode_part(data, 0, None), fmt.decode_reference(data, 0), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_turboquant_slots_decode_to_the_librarys_reconstruction(bits):
    """Same rotation seeds, codebook and rounding as ``methods/turboquant.py``: the vectors rebuilt from the slots
    are the library's for the same layer and role."""
    k, v = _kv(1)
    layer_idx = 7
    fmt = _make({"method": "turboquant", "bits": bits}, layer_idx)
    keys, values = fmt.decode(fmt.encode(k, v).transpose(0, 1))
    for role, x, rebuilt in ((0, k, keys), (1, v, values)):
        seed = library_turboquant._derive_seed(0, layer_idx, role, 0)
        quantizer = library_turboquant.Quantizer.create(D, bits, "mse", HEADS, seed)
        packed, norms = library_turboquant.encode(x.transpose(0, 1)[None], (quantizer,), None)
        expected = library_turboquant.decode(packed, norms, (quantizer,), None)[0]
        torch.testing.assert_close(rebuilt, expected, rtol=0, atol=1e-5)


def test_turboquant_seed_derivation_is_the_librarys():
    for numbers in [(0, 0, 0, 0), (3, 29, 1, 0), (12345, 7, 0, 1)]:
        assert formats._derive_seed(*numbers) == library_turboquant._derive_seed(*numbers)


@pytest.mark.parametrize("section, tolerance", [
    ({"method": "quant", "bits": 8}, 0.01), ({"method": "quant", "bits": 4}, 0.12),
    ({"method": "turboquant", "bits": 4}, 0.12), ({"method": "turboquant", "bits": 2}, 0.45),
])
def test_round_trip_error_shrinks_with_bits(section, tolerance):
    k, v = _kv(2)
    fmt = _make(section)
    keys, values = fmt.decode(fmt.encode(k, v).transpose(0, 1))
    for x, rebuilt in ((k, keys), (v, values)):
        x = x.float().transpose(0, 1)
        assert (rebuilt - x).norm() / x.norm() < tolerance


def test_zero_vectors_stay_zero():
    zeros = torch.zeros(4, HEADS, D, dtype=torch.bfloat16)
    for section in ({"method": "quant", "bits": 4}, {"method": "turboquant", "bits": 4}):
        fmt = _make(section)
        keys, values = fmt.decode(fmt.encode(zeros, zeros).transpose(0, 1))
        assert torch.equal(keys, torch.zeros_like(keys)) and torch.equal(values, torch.zeros_like(values))


def _low_rank(rank, key_mode, bases=None):
    s = formats.resolve(parse({"method": "ojakv", "rank": rank, "key_mode": key_mode}), D, 2)
    if bases is None:
        q = torch.linalg.qr(torch.randn(2, HEADS, D, D, generator=torch.Generator().manual_seed(3)))[0]
        bases = q[0, :, :, :rank], q[1, :, :, :rank]
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, D, 2).float() / D))
    return formats.LowRankFormat(s, HEADS, D, torch.float32, bases[0], bases[1], inv_freq), bases


@pytest.mark.parametrize("key_mode", ["pre_rope", "post_rope"])
def test_low_rank_at_full_rank_is_exact(key_mode):
    k, v = _kv(4, torch.float32)
    fmt, _ = _low_rank(D, key_mode)
    positions = torch.arange(100, 100 + N)
    keys, values = fmt.decode(fmt.encode(k, v, positions).transpose(0, 1), positions)
    torch.testing.assert_close(keys, k.transpose(0, 1), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(values, v.transpose(0, 1), atol=1e-4, rtol=1e-4)


def test_pre_rope_low_rank_projects_keys_before_rotary():
    """A key that is RoPE(position) of a vector in the basis's span is rebuilt exactly, at its own position."""
    fmt, (key_basis, _) = _low_rank(8, "pre_rope")
    g = torch.Generator().manual_seed(5)
    pre = (key_basis @ torch.randn(HEADS, 8, N, generator=g)).transpose(-1, -2)  # [heads, n, d] in the span
    positions = torch.arange(N) * 7
    cos, sin = fmt._angles(positions)
    post = apply_rope(pre[None], cos, sin)[0]
    keys, _ = fmt.decode(fmt.encode(post.transpose(0, 1), post.transpose(0, 1), positions).transpose(0, 1),
                         positions)
    torch.testing.assert_close(keys, post, atol=1e-4, rtol=1e-4)
    assert math.isclose(fmt.slot, 2 * 8 * 4)


@pytest.mark.parametrize("section", [{"method": "turboquant", "bits": 4}, {"method": "turboquant", "bits": 3},
                                     {"method": "quant", "bits": 2}])
def test_attention_in_the_formats_frame_equals_attention_on_rebuilt_keys_and_values(section):
    """Scores and outputs computed from the stored frame (rotated codes, coefficients) equal those on the
    rebuilt vectors, grouped-query heads included."""
    k, v = _kv(6)
    fmt = _make(section)
    slots = fmt.encode(k, v).transpose(0, 1)
    q = torch.randn(2, 2 * HEADS, 5, D, generator=torch.Generator().manual_seed(7))  # [batch, query heads, L, d]
    _check_frame(fmt, slots, q)


@pytest.mark.parametrize("key_mode", ["pre_rope", "post_rope"])
def test_low_rank_attention_in_coefficients_equals_attention_on_rebuilt_vectors(key_mode):
    k, v = _kv(8, torch.float32)
    fmt, _ = _low_rank(16, key_mode)
    positions = torch.arange(N)
    slots = fmt.encode(k, v, positions).transpose(0, 1)
    q = torch.randn(1, 2 * HEADS, 3, D, generator=torch.Generator().manual_seed(9))
    _check_frame(fmt, slots, q, positions)


def _check_frame(fmt, slots, q, positions=None, head_dim=D):
    import torch.nn.functional as F

    keys, values = fmt.decode(slots, positions)
    expected = F.scaled_dot_product_attention(q, keys[None], values[None], enable_gqa=True)
    k_frame, v_frame = fmt.attention_operands(slots, positions)
    result = F.scaled_dot_product_attention(fmt.map_query(q), k_frame[None], v_frame[None], enable_gqa=True,
                                            scale=1 / math.sqrt(head_dim))
    torch.testing.assert_close(fmt.map_output(result), expected, rtol=1e-4, atol=1e-4)


def _library_coded_staticpca(tmp_path, body_bits):
    """A tiny model's calibration, the library's ``staticpca:body_bits=...`` cache after one prompt, the prompt's
    keys and values as a full cache holds them, and the format serving the same calibration."""
    from helpers import calibration_file, full_cache, kv, padded_batch
    from tiny import tiny_model

    import ojakv
    from ojakv.calibration import load_calibration

    model = tiny_model("llama", num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, max_context=1024)
    path = calibration_file(model, tmp_path / "c.safetensors")
    ids, mask = padded_batch(model.config.vocab_size, (90,), seed=2)
    coded, full = ojakv.make_cache(model, "staticpca", body_bits=body_bits, calibration_file=str(path)), \
        full_cache(model)
    with torch.no_grad():
        for cache in (coded, full):
            model(input_ids=ids, attention_mask=mask, **kv(cache))
    calibration = load_calibration(model, path)
    spectra = [(calibration.eigvals[kind][0] / calibration.rows(), calibration.eigvecs[kind][0])
               for kind in ("k_pre", "v")]
    inv_freq = model.model.rotary_emb.inv_freq.float()
    s = formats.resolve(parse({"method": "ojakv", "body_bits": body_bits}), 16, 4)
    fmt = formats.TransformCodedFormat(s, 2, 16, torch.float32, spectra, inv_freq)
    return coded.layers[0], full.layers[0], fmt


@pytest.mark.parametrize("body_bits", [1.5, 3])
def test_transform_coded_slots_hold_the_librarys_codes(tmp_path, body_bits):
    """The served format and the library's ``staticpca:body_bits`` (same calibration) keep the same coefficients,
    widths and scales, code a value to the same bytes, and rebuild the same keys and values."""
    layer, full, fmt = _library_coded_staticpca(tmp_path, body_bits)
    for role, (store, basis) in enumerate(((layer.k_coef, layer.u_k), (layer.v_coef, layer.u_v))):
        assert fmt.coders[role].bits == store.bits
        torch.testing.assert_close(fmt.coders[role].scale, store.scale[:1])
        torch.testing.assert_close(fmt.bases[role], basis.float()[0])
    keys, values = full.keys[0].transpose(0, 1), full.values[0].transpose(0, 1)  # [n, heads, d]
    positions = torch.arange(keys.shape[0])
    slots = fmt.encode(keys, values, positions)
    width = formats.mixed_bytes(layer.v_coef.bits)
    served_value_codes = slots[..., fmt.part : fmt.part + width].transpose(0, 1)
    assert torch.equal(served_value_codes, layer.v_coef.codes.view[0])
    rebuilt_keys, rebuilt_values = fmt.decode(slots.transpose(0, 1), positions)
    library_keys, library_values = layer._materialize()
    torch.testing.assert_close(rebuilt_values, library_values[0].float(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(rebuilt_keys, library_keys[0].float(), atol=1e-3, rtol=1e-3)


def test_transform_coded_attention_in_coefficients_equals_attention_on_rebuilt_vectors(tmp_path):
    _, full, fmt = _library_coded_staticpca(tmp_path, 2)
    keys, values = full.keys[0].transpose(0, 1), full.values[0].transpose(0, 1)
    positions = torch.arange(keys.shape[0])
    slots = fmt.encode(keys, values, positions).transpose(0, 1)
    q = torch.randn(1, 4, 3, 16, generator=torch.Generator().manual_seed(9))
    _check_frame(fmt, slots, q, positions, 16)
