"""OjaKV in the cache, on tiny random-weight models: exactness, re-expression, memory, padding."""

from __future__ import annotations

import pytest
import torch

import ojakv
from ojakv.errors import OjaKVError
from ojakv.subspace import orthogonality_error

from helpers import calibration_file, feed, full_cache, greedy_scores, held_tensor_bytes, kv, padded_batch

SMALL = dict(n_sink=4, n_recent=8, n_residual=6, query_window=4)


@pytest.mark.parametrize("method", ["ojakv", "ojakv-pf"])
@pytest.mark.parametrize("key_mode", ["pre_rope", "post_rope"])
@pytest.mark.parametrize("policy", ["positional", "residual"])
def test_full_rank_without_updates_equals_the_full_cache(tiny, method, key_mode, policy):
    ids, mask = padded_batch(tiny.config.vocab_size, (90, 77))
    reference = greedy_scores(tiny, ids, mask, full_cache(tiny), steps=64)
    cache = ojakv.make_cache(tiny, method, rank_ratio=1.0, init="prompt", eta_prefill=0.0, eta_decode=0.0,
                             key_mode=key_mode, policy=policy, **SMALL)
    scores = greedy_scores(tiny, ids, mask, cache, steps=64)
    assert (scores - reference).abs().max() <= 1e-4
    assert cache.get_seq_length() == 90 + 64 - 1  # the last token is generated, not yet cached


@pytest.mark.parametrize("key_mode", ["pre_rope", "post_rope"])
def test_full_rank_with_oja_updates_stays_exact_because_coefficients_are_re_expressed(tiny, key_mode):
    # At rank = head_dim every basis spans everything, so any loss would come from a wrong re-expression.
    ids, mask = padded_batch(tiny.config.vocab_size, (60, 41), seed=1)
    reference = greedy_scores(tiny, ids, mask, full_cache(tiny), steps=40)
    cache = ojakv.make_cache(tiny, "ojakv", rank_ratio=1.0, init="prompt", eta_decode=0.9, update_interval=4,
                             key_mode=key_mode, **SMALL)
    scores = greedy_scores(tiny, ids, mask, cache, steps=40)
    assert (scores - reference).abs().max() <= 1e-4


def test_bases_stay_orthonormal_through_many_updates(tiny):
    ids, mask = padded_batch(tiny.config.vocab_size, (50, 50), seed=2)
    cache = ojakv.make_cache(tiny, "ojakv", rank_ratio=0.5, init="prompt", eta_decode=0.5, update_interval=2,
                             **SMALL)
    greedy_scores(tiny, ids, mask, cache, steps=30)
    for layer in cache.layers:
        assert orthogonality_error(layer.u_k) <= 1e-5 and orthogonality_error(layer.u_v) <= 1e-5


def _drive(cache, keys, values, positions):
    """Feed one chunk straight into every layer, as the model's hooks would."""
    feed(cache, keys, values, positions)


def test_stored_tokens_reconstruct_no_worse_after_updates(tiny):
    # The prompt lives in a 4-dim subspace P; decoded tokens also use a second block Q. At rank 8 the prompt's
    # PCA basis is P plus 4 arbitrary directions, which the updates turn towards Q: the basis really moves, and
    # the re-expressed coefficients must still reconstruct every stored token as well as when it was stored.
    gen = torch.Generator().manual_seed(0)
    span = torch.linalg.qr(torch.randn(16, 8, generator=gen))[0]
    p_block, q_block = span[:, :4], span[:, 4:]

    def chunk(n, blocks):
        return sum(torch.randn(1, 2, n, 4, generator=gen) @ block.T for block in blocks)

    cache = ojakv.make_cache(tiny, "ojakv", rank_ratio=0.5, init="prompt", eta_decode=0.9, update_interval=3,
                             key_mode="post_rope", **SMALL)
    keys, values = chunk(40, [p_block]), chunk(40, [p_block])
    _drive(cache, keys, values, torch.arange(40)[None])
    layer = cache.layers[0]
    stored_k, stored_v = (t[:, :, 4:32] for t in layer._materialize())
    err_k, err_v = (stored_k - keys[:, :, 4:32]).norm(), (stored_v - values[:, :, 4:32]).norm()
    basis_before = layer.u_k.clone()
    for t in range(40, 52):
        # Each token lies in P or in Q, so the covariance the update sees is exactly block-diagonal.
        block = [p_block] if t % 2 else [q_block]
        _drive(cache, chunk(1, block), chunk(1, block), torch.tensor([[t]]))
    assert (layer.u_k - basis_before).abs().max() > 0.05, "the basis should have moved"
    after_k, after_v = (t[:, :, 4:32] for t in layer._materialize())
    assert (after_k - keys[:, :, 4:32]).norm() <= err_k + 1e-4
    assert (after_v - values[:, :, 4:32]).norm() <= err_v + 1e-4


@pytest.mark.parametrize("policy", ["positional", "residual"])
@pytest.mark.parametrize("key_mode", ["pre_rope", "post_rope"])
def test_memory_report_equals_the_tensors_held(tiny, policy, key_mode):
    ids, mask = padded_batch(tiny.config.vocab_size, (120, 99), seed=3)
    cache = ojakv.make_cache(tiny, "ojakv", rank_ratio=0.5, init="prompt", key_mode=key_mode, policy=policy, **SMALL)
    greedy_scores(tiny, ids, mask, cache, steps=12)
    report = cache.memory()
    assert report.held_bytes == held_tensor_bytes(cache)
    g = cache.shared.geometry
    assert report.full_bytes == 2 * g.num_layers * 2 * g.num_kv_heads * cache.get_seq_length() * g.head_dim * 4


@pytest.mark.parametrize("select_tokens", [0, 256])
def test_memory_formula_at_4k_tokens_with_half_rank(select_tokens):
    from tiny import tiny_model

    model = tiny_model("llama", num_layers=2, num_heads=2, num_kv_heads=1, head_dim=64, max_context=8192)
    n, batch = 4096, 1
    ids = torch.randint(3, model.config.vocab_size, (batch, n))
    cache = ojakv.make_cache(model, "ojakv", rank_ratio=0.5, init="prompt", select_tokens=select_tokens)
    with torch.no_grad():
        model(input_ids=ids, **kv(cache))
    report = cache.memory()
    seg = report.segments
    layers, heads, d, r, s = 2, 1, 64, 32, 4
    anchors = layers * 2 * batch * heads * (32 + 32) * d * s
    body = layers * 2 * batch * heads * (n - 64) * r * s
    bases = oja_state = layers * 2 * batch * heads * d * r * 4
    positions = batch * n * 4
    # selective decoding: a mean key per 16 body tokens and a float32 sum for the chunk filling up
    landmarks = layers * batch * heads * ((n - 64) // 16 * d * s + d * 4) if select_tokens else 0
    assert seg["anchors"] + seg["window"] == anchors
    assert seg["body"] == body and seg["growth_slack"] == 0
    assert seg["bases"] == bases and seg["oja_state"] == oja_state and seg["positions"] == positions
    assert seg.get("landmarks", 0) == landmarks
    assert report.held_bytes == anchors + body + bases + oja_state + positions + landmarks
    assert report.held_bytes <= 0.5 * report.full_bytes + anchors + bases + oja_state + positions + landmarks


@pytest.mark.parametrize("method", ["ojakv", "ojakv-pf", "ojakv+quant", "ojakv-tc"])
def test_selective_decode_holds_its_landmarks_in_the_report(tiny, method):
    """One mean key per complete chunk of body tokens (model dtype) and a float32 sum for the chunk filling up, per
    layer, sequence and KV head; every coefficient store serves the selective path."""
    ids, mask = padded_batch(tiny.config.vocab_size, (120, 99), seed=3)
    cache = ojakv.make_cache(tiny, method, init="prompt", select_tokens=8, select_chunk=4, **SMALL)
    greedy_scores(tiny, ids, mask, cache, steps=12)
    report = cache.memory()
    assert report.held_bytes == held_tensor_bytes(cache)
    g, layer = cache.shared.geometry, cache.layers[0]
    body = layer.k_coef.length
    per_head = (body // 4) * g.head_dim * 4 + g.head_dim * 4  # float32 tiny model: means and tail alike
    assert report.segments["landmarks"] == g.num_layers * 2 * g.num_kv_heads * per_head
    assert layer.landmarks.tail_count == body % 4


def test_selecting_more_tokens_than_the_body_holds_is_the_exact_path(tiny):
    ids, mask = padded_batch(tiny.config.vocab_size, (90, 77), seed=4)
    knobs = dict(rank_ratio=0.5, init="prompt", **SMALL)
    exact = greedy_scores(tiny, ids, mask, ojakv.make_cache(tiny, "ojakv", **knobs), steps=16)
    selective = greedy_scores(tiny, ids, mask, ojakv.make_cache(tiny, "ojakv", select_tokens=4096, **knobs), steps=16)
    narrow = greedy_scores(tiny, ids, mask, ojakv.make_cache(tiny, "ojakv", select_tokens=8, **knobs), steps=16)
    assert (selective - exact).abs().max() <= 1e-5
    assert (narrow - exact).abs().max() > 1e-3  # a real selection changes what is attended


def test_a_call_of_several_positions_attends_exactly_under_selection(tiny):
    """A question or a turn's chunk (here 6 tokens, on the latent path) reads every body chunk: one choice for all
    its rows would lose the chunk its last row needs."""
    ids = torch.randint(3, tiny.config.vocab_size, (1, 120), generator=torch.Generator().manual_seed(5))
    knobs = dict(rank_ratio=0.5, init="prompt", **SMALL)
    logits = []
    for select_tokens in (0, 8):
        cache = ojakv.make_cache(tiny, "ojakv", select_tokens=select_tokens, select_chunk=4, **knobs)
        with torch.no_grad():
            tiny(input_ids=ids[:, :110], **kv(cache))
            logits.append(tiny(input_ids=ids[:, 110:116], **kv(cache)).logits)
    assert (logits[1] - logits[0]).abs().max() <= 1e-5


def test_calibration_init_round_trip_and_mismatch_is_refused(tiny, tmp_path):
    path = calibration_file(tiny, tmp_path / "c.safetensors", "some calibration text, " * 40)
    cache = ojakv.make_cache(tiny, "ojakv", init="calibration", calibration_file=str(path), **SMALL)
    ids, mask = padded_batch(tiny.config.vocab_size, (64, 64))
    assert torch.isfinite(greedy_scores(tiny, ids, mask, cache, steps=4)).all()
    from tiny import tiny_model

    other = tiny_model("llama", seed=7, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)
    with pytest.raises(OjaKVError, match="calibrated for model"):
        ojakv.make_cache(other, "ojakv", init="calibration", calibration_file=str(path))
    (tmp_path / "bad.safetensors").write_text("not a tensor file")
    with pytest.raises(OjaKVError, match="not a readable calibration file"):
        ojakv.make_cache(tiny, "ojakv", init="calibration", calibration_file=str(tmp_path / "bad.safetensors"))


@pytest.mark.parametrize(
    "knobs, message",
    [
        (dict(rank_ratio=0.0), "rank_ratio must be in"),
        (dict(rank_ratio=1.5), "rank_ratio must be in"),
        (dict(rank_ratio=0.5, energy=0.9), "not rank_ratio and energy"),
        (dict(rank=0), "rank must be at least 1"),
        (dict(rank=17), "exceeds this model's head_dim 16"),
        (dict(key_mode="sideways"), "key_mode must be one of"),
        (dict(n_sink=-1), "n_sink must be"),
        (dict(colour="red"), "has no knob colour"),
        (dict(select_tokens=-1), "select_tokens must be >= 0"),
        (dict(select_tokens=64, select_chunk=0), "select_chunk >= 1"),
        (dict(select_tokens=64, policy="residual"), "cannot keep the residual policy"),
        (dict(select_tokens=64, attention="reconstruct"), "mode of the latent decode path"),
    ],
)
def test_bad_knobs_get_clear_errors(tiny, knobs, message):
    with pytest.raises(OjaKVError, match=message):
        ojakv.make_cache(tiny, "ojakv", init="prompt", **knobs)


def test_unknown_method_lists_the_known_ones(tiny):
    with pytest.raises(OjaKVError, match="choose one of .*ojakv"):
        ojakv.make_cache(tiny, "zip")


def test_missing_calibration_says_how_to_make_one(tiny):
    with pytest.raises(OjaKVError, match="ojakv calibrate"):
        ojakv.make_cache(tiny, "ojakv", init="calibration")


def test_energy_with_prompt_init_takes_the_rank_from_the_prompt_spectrum(tiny):
    ids, mask = padded_batch(tiny.config.vocab_size, (80, 80), seed=5)
    low = ojakv.make_cache(tiny, "ojakv", energy=0.5, **SMALL)
    high = ojakv.make_cache(tiny, "ojakv", energy=0.999, **SMALL)
    for cache in (low, high):
        assert torch.isfinite(greedy_scores(tiny, ids, mask, cache, steps=3)).all()
    assert 1 <= low.layers[0].rank_k < high.layers[0].rank_k <= 16


@pytest.mark.parametrize("key_mode", ["pre_rope", "post_rope"])
def test_calibration_initialised_bases_at_full_rank_equal_the_full_cache(tiny, tmp_path, key_mode):
    path = calibration_file(tiny, tmp_path / "c.safetensors")
    ids, mask = padded_batch(tiny.config.vocab_size, (70, 58), seed=4)
    reference = greedy_scores(tiny, ids, mask, full_cache(tiny), steps=20)
    cache = ojakv.make_cache(tiny, "ojakv", rank_ratio=1.0, init="calibration", calibration_file=str(path), key_mode=key_mode,
                             update_interval=4, **SMALL)
    assert (greedy_scores(tiny, ids, mask, cache, steps=20) - reference).abs().max() <= 1e-4


def test_interrupted_calibration_leaves_no_file_behind(tiny, tmp_path, monkeypatch):
    import ojakv.calibration as calibration_module

    def interrupted(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(calibration_module, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        calibration_file(tiny, tmp_path / "c.safetensors", "text to fit. " * 40)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("method", ["eigen", "staticpca-h", "mla-latent"])
def test_static_bases_at_full_rank_equal_the_full_cache(tiny, tmp_path, method):
    path = calibration_file(tiny, tmp_path / "c.safetensors", "queries and keys share a subspace. " * 30)
    ids, mask = padded_batch(tiny.config.vocab_size, (70, 58), seed=6)
    reference = greedy_scores(tiny, ids, mask, full_cache(tiny), steps=12)
    knobs = dict(rank_ratio=1.0) if method == "mla-latent" else dict(rank_ratio=1.0, calibration_file=str(path))
    cache = ojakv.make_cache(tiny, method, **knobs)
    assert (greedy_scores(tiny, ids, mask, cache, steps=12) - reference).abs().max() <= 1e-4
    if method == "eigen":  # the key basis really comes from queries and keys together
        from ojakv.calibration import load_calibration
        calibration = load_calibration(tiny, path)
        assert not torch.allclose(calibration.eigvecs["qk_pre"], calibration.eigvecs["k_pre"])
