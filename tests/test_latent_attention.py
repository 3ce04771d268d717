"""The latent attention path computes the same attention as rebuilding K/V and calling the model's kernel."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ojakv
from ojakv import attention as latent
from tiny import tiny_model
from ojakv.rope import Rotation, apply_rope

from helpers import greedy_scores, padded_batch


def _model():
    torch.manual_seed(0)
    return tiny_model("llama", num_layers=2, num_heads=6, num_kv_heads=2, head_dim=16, max_context=1024)


@pytest.fixture(scope="module")
def gqa_model():
    return _model()


@pytest.mark.parametrize("method,knobs", [
    ("ojakv", dict(key_mode="pre_rope", policy="positional")),
    ("ojakv", dict(key_mode="post_rope", policy="positional")),
    ("ojakv", dict(key_mode="pre_rope", policy="residual", n_residual=5)),
    ("ojakv", dict(key_mode="post_rope", policy="residual", n_residual=5)),
    ("ojakv-pf", dict()),
    ("staticpca-h", dict(init="prompt")),
    ("mla-latent", dict()),
])
def test_latent_path_equals_the_reconstruct_path(gqa_model, method, knobs, monkeypatch):
    """Compressing (rank 6 of 16), Oja updates every 8 tokens, GQA groups of 3, left-padded batch of 3."""
    monkeypatch.setattr(latent, "KEY_CHUNK", 7)  # several pre-RoPE key chunks, the last one partial
    ids, mask = padded_batch(gqa_model.config.vocab_size, (80, 61, 45), seed=5)
    common = dict(rank=6, n_sink=4, n_recent=6, update_interval=8, **knobs)
    if method in ("staticpca-h", "mla-latent"):
        common.pop("update_interval")
    rebuilt = greedy_scores(gqa_model, ids, mask, ojakv.make_cache(gqa_model, method, attention="reconstruct",
                                                                   **common), steps=20)
    calls = []
    original = latent._body_scores
    monkeypatch.setattr(latent, "_body_scores", lambda *a: calls.append(1) or original(*a))
    scores = greedy_scores(gqa_model, ids, mask, ojakv.make_cache(gqa_model, method, **common), steps=20)
    assert len(calls) == 19 * 2  # every decode step of both layers went through the latent path
    assert (scores - rebuilt).abs().max() <= 1e-5


def test_switching_the_model_back_to_sdpa_falls_back_to_reconstruction(monkeypatch):
    model = _model()
    ids, mask = padded_batch(model.config.vocab_size, (50, 40), seed=2)
    expected = greedy_scores(model, ids, mask, ojakv.make_cache(model, "ojakv", rank=6, attention="reconstruct",
                                                                n_sink=4, n_recent=4), steps=6)
    cache = ojakv.make_cache(model, "ojakv", rank=6, n_sink=4, n_recent=4)
    assert model.config._attn_implementation == "ojakv|sdpa"
    model.set_attn_implementation("sdpa")
    monkeypatch.setattr(latent, "_body_scores", lambda *a: pytest.fail("latent path taken without the wrapper"))
    assert (greedy_scores(model, ids, mask, cache, steps=6) - expected).abs().max() <= 1e-5


def test_the_wrapper_is_inert_for_other_caches(gqa_model):
    from helpers import full_cache

    ojakv.make_cache(gqa_model, "ojakv")  # routes the model through the wrapper
    ids, mask = padded_batch(gqa_model.config.vocab_size, (30, 20), seed=3)
    before = greedy_scores(gqa_model, ids, mask, full_cache(gqa_model), steps=4)
    gqa_model.set_attn_implementation("sdpa")
    after = greedy_scores(gqa_model, ids, mask, full_cache(gqa_model), steps=4)
    assert torch.equal(before, after)


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 3), kv_heads=st.integers(1, 3), groups=st.integers(1, 4), q=st.integers(1, 4),
    n_dense=st.integers(1, 9), n_body=st.integers(1, 40), rank=st.integers(1, 8), pre_rope=st.booleans(),
    n_exact=st.integers(0, 3), padded=st.booleans(), seed=st.integers(0, 2**16), chunk=st.integers(0, 6),
)
def test_latent_attention_equals_sdpa_on_the_rebuilt_tensors(batch, kv_heads, groups, q, n_dense, n_body, rank,
                                                             pre_rope, n_exact, padded, seed, chunk):
    """Random coefficients, bases, angles, exact overrides and padding masks: same output as SDPA over the
    explicitly rebuilt keys and values in cache order. With a chunk selection that keeps every chunk (``chunk``
    > 0), the selective path's gathers (rows, per-head angles, mask columns) must give that same output."""
    gen = torch.Generator().manual_seed(seed)
    d, heads = 8, kv_heads * groups
    n_exact = 0 if chunk else min(n_exact, n_body)
    start = n_dense // 2  # dense tokens before the body (anchors); the rest (window and new tokens) after
    query = torch.randn(batch, heads, q, d, generator=gen)
    dense_k = torch.randn(batch, kv_heads, n_dense + q, d, generator=gen)
    dense_v = torch.randn(batch, kv_heads, n_dense + q, d, generator=gen)
    basis = lambda: torch.linalg.qr(torch.randn(batch, kv_heads, d, rank, generator=gen))[0]  # noqa: E731
    key_coef, value_coef = (torch.randn(batch, kv_heads, n_body, rank, generator=gen) for _ in range(2))
    body = latent.LowRankBody(start=start, key_coef=key_coef, value_coef=value_coef, key_basis=basis(),
                              value_basis=basis())
    if chunk and n_body >= chunk:
        chunks = n_body // chunk
        body.selection = latent.ChunkSelection(torch.randn(batch, kv_heads, chunks, d, generator=gen), chunk, chunks)
    body_k = key_coef @ body.key_basis.transpose(-1, -2)
    if pre_rope:
        angles = torch.rand(batch, n_body, d // 2, generator=gen) * 6.3
        cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
        body.key_angles = Rotation(cos, sin)
        body_k = apply_rope(body_k, cos, sin)
    body_v = value_coef @ body.value_basis.transpose(-1, -2)
    if n_exact:
        body.exact_index = torch.stack([torch.randperm(n_body, generator=gen)[:n_exact]
                                        for _ in range(batch * kv_heads)]).view(batch, kv_heads, n_exact)
        body.exact_keys = torch.randn(batch, kv_heads, n_exact, d, generator=gen)
        body.exact_values = torch.randn(batch, kv_heads, n_exact, d, generator=gen)
        rows = body.exact_index.unsqueeze(-1).expand(-1, -1, -1, d)
        body_k, body_v = body_k.scatter(2, rows, body.exact_keys), body_v.scatter(2, rows, body.exact_values)
    keys = torch.cat([dense_k[:, :, :start], body_k, dense_k[:, :, start:]], dim=2)
    values = torch.cat([dense_v[:, :, :start], body_v, dense_v[:, :, start:]], dim=2)
    kv = keys.shape[2]
    causal = torch.ones(q, kv, dtype=torch.bool).tril(kv - q)
    mask = causal.expand(batch, 1, q, kv).clone()
    if padded:
        mask[0, ..., : min(2, kv - q)] = False  # the first sequence is left-padded
    out = latent.latent_attention(query, dense_k, dense_v, mask if padded or q > 1 else None, body, d**-0.5)
    rep = lambda t: t.repeat_interleave(groups, dim=1)  # noqa: E731
    reference = torch.nn.functional.scaled_dot_product_attention(query, rep(keys), rep(values), attn_mask=mask)
    assert (out - reference.transpose(1, 2)).abs().max() <= 1e-5


def test_a_selection_attends_only_to_the_chosen_chunks_and_the_tail():
    """Keep 1 of 3 chunks: the output equals attention over the dense tokens, the best-scoring chunk and the two
    tokens after the last complete chunk, with every other body token left out."""
    gen = torch.Generator().manual_seed(4)
    b, h, d, r, chunk, n_body = 1, 2, 8, 8, 4, 14
    query = torch.randn(b, 2 * h, 1, d, generator=gen)
    dense_k, dense_v = (torch.randn(b, h, 5, d, generator=gen) for _ in range(2))
    basis = torch.eye(d).expand(b, h, d, r)
    key_coef, value_coef = (torch.randn(b, h, n_body, r, generator=gen) for _ in range(2))
    landmarks = key_coef[:, :, :12].unflatten(2, (3, chunk)).mean(3)
    body = latent.LowRankBody(start=2, key_coef=key_coef, value_coef=value_coef, key_basis=basis, value_basis=basis,
                              selection=latent.ChunkSelection(landmarks, chunk, 1))
    out = latent.latent_attention(query, dense_k, dense_v, None, body, d**-0.5)
    grouped = query.reshape(b, h, 2, d)
    best = (grouped @ landmarks.transpose(-1, -2)).amax(2).argmax(-1)  # [b, h]
    for head in range(h):
        chosen = [*range(best[0, head] * chunk, best[0, head] * chunk + chunk), 12, 13]
        keys = torch.cat([dense_k[0, head, :2], key_coef[0, head, chosen], dense_k[0, head, 2:]])
        values = torch.cat([dense_v[0, head, :2], value_coef[0, head, chosen], dense_v[0, head, 2:]])
        probs = torch.softmax(grouped[0, head] @ keys.T * d**-0.5, dim=-1)
        assert (out[0, 0, 2 * head : 2 * head + 2] - probs @ values).abs().max() <= 1e-5


@pytest.mark.compat
@pytest.mark.parametrize("model_type", ["qwen3", "gemma2", "gemma3_text"])
def test_latent_path_equals_the_reconstruct_path_on_other_families(model_type):
    """q/k norms (Qwen3, Gemma 3), soft-capping and query_pre_attn_scalar (Gemma 2), sliding layers left alone."""
    torch.manual_seed(0)
    model = tiny_model(model_type, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, max_context=1024)
    for layer in model.model.layers:  # a cap the random model's scores reach, so that capping matters
        if getattr(layer.self_attn, "attn_logit_softcapping", None):
            layer.self_attn.attn_logit_softcapping = 0.02
    ids, mask = padded_batch(model.config.vocab_size, (70, 52), seed=6)
    knobs = dict(rank=6, n_sink=4, n_recent=6, update_interval=8)
    rebuilt = greedy_scores(model, ids, mask, ojakv.make_cache(model, "ojakv", attention="reconstruct", **knobs),
                            steps=12)
    scores = greedy_scores(model, ids, mask, ojakv.make_cache(model, "ojakv", **knobs), steps=12)
    assert (scores - rebuilt).abs().max() <= 1e-5
