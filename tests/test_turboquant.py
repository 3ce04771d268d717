"""TurboQuant: the codebook, its distortion, unbiased inner products, packed bytes, zero vectors, outlier channels."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ojakv
from helpers import feed, kv
from ojakv.errors import OjaKVError
from ojakv.methods import get_method
from ojakv.methods.turboquant import (BITS, Quantizer, TurboQuantConfig, codebook, decode, encode,
                                      held_bytes)
from ojakv.hf import geometry
from tiny import tiny_model
from ojakv.quantize import pack_bits, unpack_bits

# Distortion E‖x − x̃‖² of the Lloyd–Max quantizer of a standard Gaussian at 1..4 bits: the large-d limit of the
# per-coordinate density. The paper's ≈ 0.36 / 0.117 / 0.03 / 0.009 are these values rounded.
GAUSSIAN_LLOYD_MAX = {1: 1 - 2 / math.pi, 2: 0.1175, 3: 0.03454, 4: 0.009497}


def _unit_vectors(count: int, dim: int, seed: int) -> torch.Tensor:
    x = torch.randn(count, dim, generator=torch.Generator().manual_seed(seed))
    return x / x.norm(dim=-1, keepdim=True)


def _roundtrip(quantizer: Quantizer, x: torch.Tensor) -> torch.Tensor:
    fields, norms = quantizer.encode(x)
    return quantizer.decode([codes for codes, _ in fields], norms)


@pytest.mark.parametrize("dim", [3, 16, 64, 128])
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_codebook_is_sorted_symmetric_and_inside_the_sphere(dim, bits):
    c = codebook(dim, bits)
    assert c.shape == (2**bits,)
    assert (c[1:] > c[:-1]).all()
    assert torch.equal(c, -c.flip(0))
    assert c.abs().max() < 1


def test_low_bit_codebooks_match_the_papers_centroids():
    # Paper: b = 1 gives ±√(2/π)/√d, b = 2 gives ±0.453/√d and ±1.51/√d (Gaussian limit, 3 digits); at d = 128 the
    # exact density differs from the limit by well under 1%.
    scale = math.sqrt(128)
    assert codebook(128, 1)[1].item() * scale == pytest.approx(math.sqrt(2 / math.pi), rel=0.01)
    assert (codebook(128, 2)[2:] * scale).tolist() == pytest.approx([0.453, 1.51], rel=0.01)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_mse_distortion_of_unit_vectors_matches_the_paper(bits):
    # Within 5% of the Gaussian Lloyd–Max value: at d = 128 the exact coordinate density is a little narrower than
    # the Gaussian limit (measured 1–2% lower), and the mean over 4,000 vectors has a standard error near 0.2%
    # (each vector's error sums 128 nearly independent coordinates). A wrong codebook (uniform levels, unrotated
    # inputs) is off by far more. The paper's bounds 4^-b ≤ D ≤ (√3π/2)·4^-b must hold too.
    quantizer = Quantizer.create(128, bits, "mse", heads=1, seed=3)
    x = _unit_vectors(4000, 128, seed=bits)[None, None]
    distortion = (x - _roundtrip(quantizer, x)).square().sum(-1).mean().item()
    assert distortion == pytest.approx(GAUSSIAN_LLOYD_MAX[bits], rel=0.05)
    assert 4.0**-bits <= distortion <= math.sqrt(3) * math.pi / 2 * 4.0**-bits


def test_distortion_does_not_depend_on_the_input_the_rotation_makes_it_oblivious():
    # One-hot vectors are the worst case for a per-coordinate quantizer without rotation; with a random rotation
    # per head they are quantized as well as random directions (same 5% as above).
    heads = 64
    quantizer = Quantizer.create(128, 2, "mse", heads=heads, seed=4)
    x = torch.eye(128)[:32].expand(1, heads, 32, 128)
    distortion = (x - _roundtrip(quantizer, x)).square().sum(-1).mean().item()
    assert distortion == pytest.approx(GAUSSIAN_LLOYD_MAX[2], rel=0.05)


def _inner_products(variant: str, bits: int, draws: int = 2000) -> tuple[torch.Tensor, float]:
    """⟨y, x̃⟩ for one fixed x (an uneven vector) and y, over ``draws`` independent quantizers (one per head)."""
    dim = 64
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(dim, generator=gen) * torch.linspace(0.2, 3.0, dim)
    y = x + torch.randn(dim, generator=gen)
    quantizer = Quantizer.create(dim, bits, variant, heads=draws, seed=11)
    rebuilt = _roundtrip(quantizer, x.expand(1, draws, 1, dim))
    return rebuilt[0, :, 0] @ y, (x @ y).item()


@pytest.mark.parametrize("bits", [2, 3])
def test_prod_variant_gives_unbiased_inner_products(bits):
    # Unbiased over the random rotation and projection: the mean over 2,000 draws lies within 4 standard errors of
    # the true inner product (a false alarm has probability ~6e-5; the draws are seeded, so the test is fixed).
    estimates, truth = _inner_products("prod", bits)
    standard_error = estimates.std().item() / math.sqrt(len(estimates))
    assert abs(estimates.mean().item() - truth) <= 4 * standard_error


def test_the_same_check_catches_the_biased_mse_variant():
    # The 1-bit MSE quantizer shrinks inner products by about 2/π: the unbiasedness check above must see it.
    estimates, truth = _inner_products("mse", 1)
    standard_error = estimates.std().item() / math.sqrt(len(estimates))
    assert abs(estimates.mean().item() - truth) > 20 * standard_error
    assert estimates.mean().item() / truth == pytest.approx(2 / math.pi, rel=0.05)


@pytest.mark.parametrize("bits, paper", [(2, 0.56), (3, 0.18)])
def test_prod_inner_product_distortion_matches_the_paper(bits, paper):
    # Paper: E(⟨y, x̃⟩ − ⟨y, x⟩)² ≈ 0.56/d and 0.18/d for unit x, y at 2 and 3 bits (the 1-bit QJL term has variance
    # about π/2 times the MSE stage's residual energy, 1.57 × 0.36 and 1.57 × 0.117). Within 15%: the values are
    # rounded to two digits and the mean over 4,000 pairs has a standard error near 3%; a wrong QJL scale
    # (e.g. 1/d instead of √(π/2)/d) moves it by more than 20%.
    dim = 128
    quantizer = Quantizer.create(dim, bits, "prod", heads=1, seed=5)
    x, y = _unit_vectors(4000, dim, seed=8)[None, None], _unit_vectors(4000, dim, seed=9)[None, None]
    error = ((_roundtrip(quantizer, x) - x) * y).sum(-1)
    assert error.square().mean().item() * dim == pytest.approx(paper, rel=0.15)


@pytest.mark.parametrize("variant", ["mse", "prod"])
def test_zero_vectors_decode_to_zero_without_nan(variant):
    quantizer = Quantizer.create(16, 3, variant, heads=2, seed=0)
    x = torch.zeros(2, 2, 5, 16)
    x[0, 1, 2] = torch.linspace(-1, 1, 16)  # one real vector among zeros (padding)
    rebuilt = _roundtrip(quantizer, x)
    assert torch.isfinite(rebuilt).all()
    assert torch.equal(rebuilt[1], torch.zeros(2, 5, 16)) and rebuilt[0, 0].abs().max() == 0


@settings(max_examples=40, deadline=None)
@given(dim=st.sampled_from([4, 8, 24, 64]), bits=st.integers(1, 4), log_scale=st.floats(-3, 2.5),
       seed=st.integers(0, 10_000))
def test_every_coordinate_takes_its_nearest_centroid(dim, bits, log_scale, seed):
    # Invariant of the MSE stage: each rotated coordinate goes to its nearest centroid, so no other codeword (here:
    # random index vectors) rebuilds x more closely, at any scale the float16 norm holds (see the next test); and
    # the result scales with x.
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 1, 6, dim, generator=gen) * 10.0**log_scale
    x[..., 0] *= 20  # an outlier channel
    quantizer = Quantizer.create(dim, bits, "mse", heads=1, seed=seed)
    fields, norms = quantizer.encode(x)
    rebuilt = quantizer.decode([fields[0][0]], norms)
    assert torch.isfinite(rebuilt).all()
    error = (x - rebuilt).norm(dim=-1)
    for _ in range(5):
        other = torch.randint(0, 2**bits, fields[0][0].shape, generator=gen)
        other_error = (x - quantizer.decode([other], norms)).norm(dim=-1)
        assert (error <= other_error + 1e-3 * x.norm(dim=-1)).all()
    assert torch.allclose(_roundtrip(quantizer, 2 * x), 2 * rebuilt, rtol=1e-3, atol=1e-6 * 10.0**log_scale)


@pytest.mark.parametrize("variant", ["mse", "prod"])
def test_norms_beyond_float16_are_clamped_not_infinite(variant):
    # Vectors longer than float16's 65,504 lose length (their direction is still quantized), never become inf.
    quantizer = Quantizer.create(8, 2, variant, heads=1, seed=0)
    x = torch.full((1, 1, 2, 8), 1e5)
    rebuilt = _roundtrip(quantizer, x)
    assert torch.isfinite(rebuilt).all()
    assert torch.nn.functional.cosine_similarity(rebuilt, x, dim=-1).min() > 0.5


@settings(max_examples=40, deadline=None)
@given(layout=st.lists(st.tuples(st.integers(1, 40), st.integers(1, 8)), min_size=1, max_size=4),
       seed=st.integers(0, 999))
def test_pack_bits_is_lossless_and_wastes_no_bits_on_multiples_of_8(layout, seed):
    gen = torch.Generator().manual_seed(seed)
    fields = [(torch.randint(0, 2**bits, (2, 3, count), generator=gen).to(torch.uint8), bits)
              for count, bits in layout]
    packed = pack_bits(fields)
    assert packed.dtype == torch.uint8
    # each field in slices of 4, 2 and 1 bits (its binary digits), each slice rounded up to whole bytes
    slices = [(count, width) for count, bits in layout for width in (8, 4, 2, 1) if bits & width]
    assert packed.shape == (2, 3, sum(math.ceil(count * width / 8) for count, width in slices))
    for (codes, _), back in zip(fields, unpack_bits(packed, layout)):
        assert torch.equal(back, codes)
    eights = [(8 * count, bits) for count, bits in layout]
    assert pack_bits([(torch.zeros(1, count, dtype=torch.uint8), bits) for count, bits in eights]).shape[-1] == \
        sum(count * bits for count, bits in eights) // 8


# --- the cache layer -------------------------------------------------------------------------------------


def _model(head_dim=64, kv_heads=2):
    torch.manual_seed(0)
    return tiny_model("llama", num_layers=2, num_heads=4, num_kv_heads=kv_heads, head_dim=head_dim, max_context=1024)


def _generate(model, cache, prompt=200, new=8):
    ids = torch.randint(3, model.config.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kv(cache),
                       max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("key_variant", ["prod", "mse"])
def test_held_bytes_are_the_bit_formula(bits, key_variant):
    model = _model()
    cache = ojakv.make_cache(model, "turboquant", bits=bits, key_variant=key_variant)
    _generate(model, cache)  # 207 tokens cached (the last generated one is not)
    d, n = 64, 207
    outliers = 16 if bits != int(bits) else 0
    sets = 2 if outliers else 1
    for layer in cache.layers:
        # codes: every coordinate at floor(bits), outliers one bit more, one dense stream per vector
        assert layer.key_codes.view.shape == layer.value_codes.view.shape == (1, 2, n, (d * int(bits) + outliers) // 8)
        assert layer.key_norms.view.shape[-1] == sets * (2 if key_variant == "prod" else 1)
        assert layer.value_norms.view.shape[-1] == sets
    segments = cache.memory().segments
    per_layer = held_bytes(TurboQuantConfig(bits=bits, key_variant=key_variant), d, 2, n, 4)
    assert cache.memory().held_bytes - segments["growth_slack"] == 2 * per_layer


def test_budget_picks_the_widest_bits_whose_ratio_fits():
    # Ratios come from the byte formula checked above. At 1,552 tokens the d×d matrices weigh enough that 2.5 bits
    # (two smaller sets) hold less than 2 bits (one 64×64 set): the pick follows held bytes, not the label.
    method = get_method("turboquant")
    g = geometry(_model())
    ratios = {bits: held_bytes(TurboQuantConfig(bits=bits), 64, 2, 1552, 4) / (2 * 1552 * 64 * 4 * 2)
              for bits in BITS}
    for budget in (0.15, ratios[3] + 0.001, ratios[3.5] - 0.001, 0.9):
        fitting = [bits for bits in BITS if ratios[bits] <= budget]
        assert method.for_budget({}, g, 1536, 16, 4, budget).knobs["bits"] == max(fitting, key=ratios.get)
    assert method.for_budget({}, g, 1536, 16, 4, 0.9).knobs["bits"] == 4
    floor = method.for_budget({}, g, 1536, 16, 4, 0.01)
    assert floor.predicted == floor.floor == min(ratios.values()) > 0.01  # nothing fits: the caller reports it


def test_outlier_channels_come_from_the_prompt_and_stay_fixed():
    model = _model(head_dim=16)
    cache = ojakv.make_cache(model, "turboquant", bits=2.5)
    layer = cache.layers[0]
    gen = torch.Generator().manual_seed(2)
    keys, values = torch.randn(2, 2, 30, 16, generator=gen), torch.randn(2, 2, 30, 16, generator=gen)
    keys[0, 0, :, [3, 7, 11, 12]] *= 10  # sequence 0, head 0: four loud channels in its real tokens
    keys[0, 0, :5, 0] = 1e4  # ... and a louder one only in its padding, which must not count
    valid = torch.ones(2, 30, dtype=torch.bool)
    valid[0, :5] = False
    feed(cache, keys, values, valid=valid, layers=[0])
    assert layer.key_order[0, 0, :4].tolist() == [3, 7, 11, 12]
    assert sorted(layer.key_order[0, 0].tolist()) == list(range(16))
    chosen = layer.key_order.clone()
    loud = torch.zeros(2, 2, 1, 16)
    loud[..., 0] = 100
    feed(cache, loud, loud, layers=[0])  # a decoded token with another loud channel changes nothing
    assert torch.equal(layer.key_order, chosen)


def test_residual_tokens_stay_exact_and_older_ones_are_quantized():
    model = _model(head_dim=16)
    cache = ojakv.make_cache(model, "turboquant", bits=3, residual=8)
    keys = torch.randn(1, 2, 20, 16, generator=torch.Generator().manual_seed(3))
    [(returned, _)] = feed(cache, keys, keys, layers=[0])
    assert torch.equal(returned, keys)  # the prompt attends to its own full-precision keys
    step = torch.randn(1, 2, 1, 16, generator=torch.Generator().manual_seed(4))
    [(returned, _)] = feed(cache, step, step, layers=[0])  # the next call sees what the cache keeps
    assert torch.equal(returned[:, :, -8:], torch.cat([keys, step], 2)[:, :, -8:])
    assert not torch.allclose(returned[:, :, :13], keys[:, :, :13], atol=1e-3)
    assert cache.layers[0].key_codes.length == 13
    assert cache.memory().segments["residual_fp"] == 2 * 2 * 8 * 16 * 4  # K and V, 2 heads, 8 tokens, float32


@pytest.mark.parametrize("knobs, message", [
    (dict(bits=3.25), "bits must be one of"),
    (dict(bits=5), "bits must be one of"),
    (dict(key_variant="qjl"), "key_variant must be one of"),
    (dict(outlier_fraction=0.0), "outlier_fraction"),
    (dict(residual=-1), "residual"),
    (dict(rotation_seed=-2), "rotation_seed"),
])
def test_bad_knobs_say_what_to_choose(knobs, message):
    with pytest.raises(OjaKVError, match=message):
        get_method("turboquant").make_config(**knobs)


def test_an_outlier_split_that_leaves_a_set_too_small_is_refused():
    with pytest.raises(OjaKVError, match="outlier_fraction 0.05 gives 1 of head_dim 16"):
        ojakv.make_cache(_model(head_dim=16), "turboquant", bits=3.5, outlier_fraction=0.05)


def test_set_encode_decode_restores_channel_order():
    # Round trip through a channel permutation: with 4 bits per coordinate the error is small and channel-wise,
    # so a mix-up of the order (outliers decoded into the wrong channels) would show as a large error.
    quantizers = (Quantizer.create(4, 4, "mse", 1, seed=0), Quantizer.create(12, 4, "mse", 1, seed=1))
    x = torch.randn(1, 1, 50, 16, generator=torch.Generator().manual_seed(5)) * torch.arange(1, 17)
    order = torch.tensor([15, 14, 13, 12] + list(range(12)), dtype=torch.int16).view(1, 1, 16)
    packed, norms = encode(x, quantizers, order)
    rebuilt = decode(packed, norms, quantizers, order)
    assert (rebuilt - x).norm() / x.norm() < 0.15
