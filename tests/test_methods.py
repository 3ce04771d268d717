"""The shared test matrix every registered method must pass (a new method adds its row to NO_COMPRESSION)."""

from __future__ import annotations

import re
import sys
import warnings

import pytest
import torch

import ojakv
from ojakv.hf import cache_kwargs
from ojakv.methods import BudgetAboveCeiling, UnreachableBudget
from ojakv.methods import get_method, registered
from ojakv.hf import geometry
from tiny import tiny_model
from ojakv.storage import GrowableTensor

from helpers import full_cache, greedy_scores, held_tensor_bytes, kv, padded_batch

# Each method's setting that must reproduce the full cache exactly (init="prompt" where a method would otherwise
# need an offline calibration file).
NO_COMPRESSION = {
    "full": {},
    "ojakv": dict(rank_ratio=1.0, eta_decode=0.0),
    "ojakv-pf": dict(rank_ratio=1.0, eta_decode=0.0),
    "staticpca": dict(rank_ratio=1.0, init="prompt"),
    "staticpca-h": dict(rank_ratio=1.0, init="prompt"),
    "streaming-llm": dict(window=100_000),
    "snapkv": dict(capacity=100_000),
    "pyramidkv": dict(capacity=100_000),
    "h2o": dict(heavy=50_000, recent=50_000),
    "h2o-prefill": dict(capacity=100_000),
    "kivi": dict(residual=100_000 // 16 * 16, group=16),
    "mla-latent": dict(rank_ratio=1.0),
    "eigen": dict(rank_ratio=1.0, init="prompt", key_basis="keys"),
    "turboquant": dict(residual=100_000),
    "pod": dict(delta=2.0),  # δ > 1: no layer shares keys
    "ojakv+quant": dict(rank_ratio=1.0, eta_decode=0.0, coef_bits=0),  # the codec off
    "ojakv-tc": dict(rank_ratio=1.0, body_bits=0),  # the transform coder off
    "snapkv+ojakv": dict(capacity=100_000, rank_ratio=1.0, eta_decode=0.0),
}
# Knobs for a compressing run that needs no calibration file.
COMPRESSING = {
    "ojakv": {}, "ojakv-pf": {}, "staticpca": dict(init="prompt"), "staticpca-h": dict(init="prompt"),
    "streaming-llm": dict(window=40), "snapkv": dict(capacity=48, window=8), "pyramidkv": dict(capacity=48, window=8),
    "h2o": dict(heavy=24, recent=24), "h2o-prefill": dict(capacity=48), "kivi": dict(group=16, residual=32),
    "mla-latent": {}, "eigen": dict(init="prompt", key_basis="keys"),
    "turboquant": dict(bits=2.5),
    "pod": dict(delta=0.0, window=16),  # δ = 0: every layer shares its base's distant keys, no file needed
    "ojakv+quant": {},
    "ojakv-tc": {},
    "snapkv+ojakv": dict(capacity=48, window=8),
}
METHODS = sorted(registered())


def test_every_registered_method_is_in_the_matrix():
    assert set(METHODS) == set(NO_COMPRESSION) and set(COMPRESSING) == set(METHODS) - {"full"}


@pytest.mark.compat
@pytest.mark.parametrize("method", METHODS)
def test_no_compression_setting_reproduces_the_full_cache(tiny, method):
    ids, mask = padded_batch(tiny.config.vocab_size, (96, 71), seed=11)
    reference = greedy_scores(tiny, ids, mask, full_cache(tiny), steps=24)
    cache = ojakv.make_cache(tiny, method, **NO_COMPRESSION[method])
    assert (greedy_scores(tiny, ids, mask, cache, steps=24) - reference).abs().max() <= 1e-4


# Compressing settings whose every token is coded on its own, so padding a batch must not change any sequence's
# result. (OjaKV's layout is shared by the batch: its anchors cover the longest padding, so a longer sequence keeps
# a few more exact tokens than it would alone.)
PER_SEQUENCE = {"turboquant": dict(bits=3)}


@pytest.mark.compat
@pytest.mark.parametrize("method, knobs", [(m, NO_COMPRESSION[m]) for m in METHODS]
                         + [(m, k) for m, k in PER_SEQUENCE.items()])
def test_a_padded_batch_equals_its_prompts_run_one_by_one(tiny, method, knobs):
    """What a silent failure of the hooks would break: positions and padding of each sequence."""
    lengths = (96, 71)
    ids, mask = padded_batch(tiny.config.vocab_size, lengths, seed=16)
    batch = greedy_scores(tiny, ids, mask, ojakv.make_cache(tiny, method, **knobs), steps=12)
    for row, length in enumerate(lengths):
        alone = ids[row : row + 1, -length:]
        single = greedy_scores(tiny, alone, torch.ones_like(alone), ojakv.make_cache(tiny, method, **knobs), steps=12)
        assert (batch[:, row] - single[:, 0]).abs().max() <= 1e-4, row


@pytest.mark.compat
@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3_text"])
@pytest.mark.parametrize("method", ["ojakv", "snapkv", "streaming-llm"])
def test_every_supported_family_is_exact_at_no_compression(model_type, method):
    model = tiny_model(model_type, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, max_context=1024)
    ids, mask = padded_batch(model.config.vocab_size, (64, 50), seed=13)
    reference = greedy_scores(model, ids, mask, full_cache(model), steps=10)
    cache = ojakv.make_cache(model, method, **NO_COMPRESSION[method])
    assert (greedy_scores(model, ids, mask, cache, steps=10) - reference).abs().max() <= 1e-4


def _stored_tensors(layer):
    for value in vars(layer).values():
        if isinstance(value, GrowableTensor) and value.view is not None:
            yield value.view
        elif isinstance(value, torch.Tensor) and value.dim() == 4:
            yield value


@pytest.mark.parametrize("method", [m for m in METHODS if m != "full"])
def test_compressing_run_holds_what_it_reports_per_kv_head(tiny, method):
    ids, mask = padded_batch(tiny.config.vocab_size, (120, 101), seed=12)
    cache = ojakv.make_cache(tiny, method, **COMPRESSING[method])
    scores = greedy_scores(tiny, ids, mask, cache, steps=16)
    assert torch.isfinite(scores).all()
    report = cache.memory()
    assert report.held_bytes == held_tensor_bytes(cache)
    assert report.held_bytes < report.full_bytes
    kv_heads = geometry(tiny).num_kv_heads
    for layer in cache.layers:  # GQA: storage per KV head, never per query head
        for tensor in _stored_tensors(layer):
            assert tensor.shape[0] == 2 and tensor.shape[1] == kv_heads


@pytest.mark.parametrize("method", [m for m in METHODS if m != "full"])
def test_a_bfloat16_model_compresses_against_a_16_bit_full_cache(method):
    model = tiny_model("llama", num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, max_context=1024,
                       dtype=torch.bfloat16)
    ids, mask = padded_batch(model.config.vocab_size, (300, 281), seed=17)  # long enough to outweigh bases
    knobs = {**COMPRESSING[method], **({"group": 16} if method == "kivi" else {})}
    cache = ojakv.make_cache(model, method, **knobs)
    assert torch.isfinite(greedy_scores(model, ids, mask, cache, steps=8).float()).all()
    report = cache.memory()
    assert report.full_bytes == 2 * 2 * 2 * 2 * cache.get_seq_length() * 16 * 2  # K/V x layers x batch x heads, bf16
    assert report.held_bytes == held_tensor_bytes(cache) < report.full_bytes


CALIBRATION_FREE = {"staticpca": {"init": "prompt"}, "staticpca-h": {"init": "prompt"},
                    "eigen": {"init": "prompt", "key_basis": "keys"}}
# Sizes that come in steps coarser than 0.02: bit widths, 4-bit coefficient rows padded to 16 ranks.
DISCRETE = {"kivi", "turboquant", "ojakv+quant"}
# Methods that cannot hold more than a ceiling (a transform-coded body: 8 bits per coefficient, about 0.5 of a 16-bit
# cache and 0.25 of a float32 one, plus anchors; ojakv given a budget codes its body so): above it they hold what
# the ceiling holds.
CEILING = {"ojakv-tc", "ojakv"}
FLOOR_ABOVE = {"pod": 0.75}  # layer groups: values stay per layer, so 2 layers cannot go below 0.75 (test_pod.py)


def _ratio_after(method, knobs, prompt=1536, new=16):
    model = tiny_model("llama", num_layers=2, num_heads=2, num_kv_heads=1, head_dim=64, max_context=4096)
    ids = torch.randint(3, model.config.vocab_size, (1, prompt))
    with ojakv.make_cache(model, method, **knobs) as cache, torch.no_grad():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                       do_sample=False, pad_token_id=0, **cache_kwargs(model, cache))
    return cache.memory().ratio


@pytest.mark.parametrize("method,budget", [
    (m, b) for m in METHODS if get_method(m).for_budget is not None and m not in FLOOR_ABOVE
    for b in (0.6, 0.4, 0.25, 0.15)])
def test_a_budget_is_a_cap_met_within_two_hundredths(method, budget):
    # The budget is resolved from the prompt's length when the cache sees it (make_cache(..., budget=)): never
    # more than 0.02 over it, and within 0.02 of it where the method's sizes come in fine steps.
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", BudgetAboveCeiling)
            ratio = _ratio_after(method, dict(budget=budget, new_tokens=16, **CALIBRATION_FREE.get(method, {})))
    except UnreachableBudget as unreachable:
        assert method in DISCRETE and "the least it holds is" in str(unreachable)
        return
    above_ceiling = [str(w.message) for w in caught if issubclass(w.category, BudgetAboveCeiling)]
    assert ratio <= budget + 0.02, ratio
    if method in CEILING and ratio < budget - 0.02:
        assert ratio == pytest.approx(_ratio_after(method, dict(budget=1.0, new_tokens=16)), abs=1e-9)
        # The Python API says so (as the CLI does), naming the ceiling it holds.
        assert len(above_ceiling) == 1, above_ceiling
        named = float(re.search(r"can use at most ([0-9.]+) of the full cache", above_ceiling[0]).group(1))
        assert named == pytest.approx(ratio, abs=0.01)
    elif method not in DISCRETE:
        assert ratio >= budget - 0.02, ratio
        assert not above_ceiling, above_ceiling


@pytest.mark.parametrize("method", ["ojakv", "ojakv-pf"])
@pytest.mark.parametrize("budget", [0.2, 0.12])  # below a coded body's ceiling on this float32 model
def test_a_budget_pays_for_the_landmarks_of_selective_decoding(method, budget):
    ratio = _ratio_after(method, dict(budget=budget, new_tokens=16, select_tokens=64, select_chunk=8))
    assert budget - 0.02 <= ratio <= budget + 0.02, ratio


def test_a_budget_under_the_floor_raises_at_the_prompt_naming_it():
    model = tiny_model("llama", num_layers=2, num_heads=2, num_kv_heads=1, head_dim=64, max_context=4096)
    cache = ojakv.make_cache(model, "pod", budget=0.5)  # nothing is sized until the prompt arrives
    ids = torch.randint(3, model.config.vocab_size, (1, 600))
    with pytest.raises(UnreachableBudget, match=r"pod cannot hold 0.5 of the full cache .* the least it holds is 0\.8"):
        with torch.no_grad():
            model(input_ids=ids, **cache_kwargs(model, cache))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_kivi_holds_its_packed_bits(bits):
    # float32 model, group 32: codes bits/8 bytes + float16 scale and minimum per 32 elements, over 4 bytes.
    # 1551 tokens cached (the last generated one is not): keys keep n mod 128 in float32, values the last 128
    # plus (n - 128) mod 32.
    n = 1536 + 15
    fp_keys, fp_values = n % 128, 128 + (n - 128) % 32
    per_element = (bits / 8 + 4 / 32) / 4
    expected = ((fp_keys + fp_values) + (2 * n - fp_keys - fp_values) * per_element) / (2 * n)
    assert abs(_ratio_after("kivi", dict(bits=bits)) - expected) <= 0.02


def test_attention_votes_match_a_dense_reference(tiny):
    from ojakv.cache import AttentionInputs, StepInputs
    from ojakv.methods.selection import attention_votes

    torch.manual_seed(0)
    attn = tiny.model.layers[0].self_attn
    b, n, h, d = 2, 37, 2, 16
    hidden = torch.randn(b, n, tiny.config.hidden_size)
    positions = torch.arange(n).expand(b, n)
    cos, sin = tiny.model.rotary_emb(hidden, positions)
    keys = torch.randn(b, h, n, d)
    valid = torch.ones(b, n, dtype=torch.bool)
    valid[1, :5] = False
    votes = attention_votes(keys, AttentionInputs(attn, hidden, cos, sin), StepInputs(positions, valid), 20, chunk=7)
    from ojakv.hf import compute_queries

    q = compute_queries(attn, hidden, cos, sin)[:, :, n - 20 :]  # [b, 4, 20, d]
    logits = q @ keys.repeat_interleave(2, dim=1).transpose(-1, -2) / d**0.5
    visible = (torch.arange(n)[None, :] <= torch.arange(n - 20, n)[:, None]) & valid[:, None, None, :]
    probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
    reference = probs.sum(2).view(b, h, 2, n).mean(2)
    assert torch.allclose(votes, reference, atol=1e-5)


@pytest.mark.parametrize("method, knobs, size", [("h2o", dict(heavy=20, recent=12), 32),
                                                 ("streaming-llm", dict(n_sink=4, window=28), 32)])
def test_decode_time_eviction_keeps_memory_constant(tiny, method, knobs, size):
    ids, mask = padded_batch(tiny.config.vocab_size, (100, 90), seed=14)
    cache = ojakv.make_cache(tiny, method, **knobs)
    greedy_scores(tiny, ids, mask, cache, steps=20)
    # sinks/heavy + window held, plus the last call's token (evicted when the next call starts)
    assert [layer.keys_buf.length for layer in cache.layers] == [size + 1] * len(cache.layers)
    assert [layer.returned_length() for layer in cache.layers] == [size] * len(cache.layers)
    assert cache.get_seq_length() == 100 + 19


@pytest.mark.parametrize("method", [m for m in METHODS if m != "full"])
def test_a_multi_token_chunk_after_the_prompt_works(tiny, method):
    # The question after a compressed context arrives as one chunk of several tokens: every method must return
    # exactly the tokens the mask was built for (a bug once evicted inside that call).
    ids, mask = padded_batch(tiny.config.vocab_size, (120, 100), seed=15)
    cache = ojakv.make_cache(tiny, method, **COMPRESSING[method])
    with torch.no_grad():
        tiny(input_ids=ids[:, :100], attention_mask=mask[:, :100], **kv(cache))
        tiny(input_ids=ids[:, 100:], attention_mask=mask, **kv(cache))
        out = tiny.generate(input_ids=ids, attention_mask=mask, **kv(cache), max_new_tokens=3,
                            do_sample=False, pad_token_id=0)
    assert out.shape[1] == 123


def test_votes_use_the_model_s_own_scale_and_soft_capping(monkeypatch):
    """Gemma 2 scales scores by query_pre_attn_scalar and soft-caps them: SnapKV's votes must equal the
    probabilities its eager attention computes."""
    from ojakv.methods import selection

    torch.manual_seed(0)
    model = tiny_model("gemma2", num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, max_context=1024)
    for layer in model.model.layers:
        layer.self_attn.attn_logit_softcapping = 0.05
        layer.self_attn.scaling = 0.7
    ids = torch.randint(3, model.config.vocab_size, (1, 60))
    captured = {}
    original = selection.attention_votes

    def spy(keys, attention, step, n_queries, chunk=256):
        captured[attention.module.layer_idx] = original(keys, attention, step, n_queries, chunk)
        return captured[attention.module.layer_idx]

    monkeypatch.setattr(sys.modules["ojakv.methods.snapkv"], "attention_votes", spy)
    with torch.no_grad():
        model(ids, **kv(ojakv.make_cache(model, "snapkv", capacity=30, window=8)), use_cache=True)
        probs = model(ids, output_attentions=True).attentions[1][0]  # the global layer, [H, n, n]
    reference = probs[:, -8:].sum(1).view(2, 2, -1).mean(1)
    assert torch.allclose(captured[1][0], reference, atol=1e-5)


def _conversation(model, cache, turns, new_tokens: int = 5):
    """Greedy replies to each turn in turn, the cache carried from one generate call to the next (as a chat does);
    returns every reply's logits, [turns · new_tokens, b, vocab]."""
    ids = torch.empty(1, 0, dtype=torch.long)
    scores = []
    for turn in turns:
        ids = torch.cat([ids, turn], dim=1)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True, pad_token_id=0, **kv(cache))
        ids = out.sequences
        scores.append(torch.stack(out.logits))
    return torch.cat(scores)


@pytest.mark.parametrize("method", METHODS)
def test_a_cache_carries_a_three_turn_conversation_like_dynamic_cache(tiny, method):
    gen = torch.Generator().manual_seed(18)
    turns = [torch.randint(3, tiny.config.vocab_size, (1, n), generator=gen) for n in (60, 17, 23)]
    reference = _conversation(tiny, full_cache(tiny), turns)
    with ojakv.make_cache(tiny, method, **NO_COMPRESSION[method]) as cache:
        assert (_conversation(tiny, cache, turns) - reference).abs().max() <= 1e-4


def _hybrid_ratio_after(method, budget, prompt=200, new=8):
    # Gemma 3 layout: sliding-window layers (kept in full by every method) between the global ones.
    model = tiny_model("gemma3_text", num_layers=4, num_heads=2, num_kv_heads=1, head_dim=64, sliding_window=64,
                       max_context=1024, dtype=torch.bfloat16)  # a 16-bit cache: 0.5 is within a coded body's reach
    ids = torch.randint(3, model.config.vocab_size, (1, prompt))
    with ojakv.make_cache(model, method, budget=budget, new_tokens=new) as cache, torch.no_grad():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                       do_sample=False, pad_token_id=0, **cache_kwargs(model, cache))
    return cache.memory().ratio


@pytest.mark.parametrize("method", ["ojakv", "snapkv", "streaming-llm", "h2o"])
def test_a_budget_on_a_hybrid_model_counts_the_sliding_layers_it_cannot_compress(method):
    # The two sliding layers hold 63 of 208 tokens each, 0.23 of the full cache: the global layers get the rest.
    assert 0.5 - 0.02 <= _hybrid_ratio_after(method, 0.5) <= 0.5 + 0.02


def test_a_budget_below_the_sliding_layers_share_is_refused_naming_it():
    with pytest.raises(UnreachableBudget, match=r"sliding-window layers, never compressed, alone hold 0\.23"):
        _hybrid_ratio_after("snapkv", 0.2)
