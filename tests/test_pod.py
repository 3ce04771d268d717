"""PoD-style cross-layer key sharing: the grouping, the storage it implies, and the grouping file's checks."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import ojakv
from ojakv.errors import OjaKVError
from ojakv.methods import knobs_for_budget
from ojakv.methods.pod import (attention_similarity, default_path, group_layers, held_fraction, layer_bases,
                               load_similarity, PoDConfig, save_similarity)
from ojakv.hf import geometry
from tiny import tiny_model

from helpers import greedy_scores, held_tensor_bytes, kv, padded_batch


@pytest.fixture(scope="module")
def deep():
    return tiny_model("llama", num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16, max_context=2048)


def _ids(vocab: int, n: int = 300, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def _assert_consecutive(bases: torch.Tensor) -> None:
    for layer in range(bases.shape[0]):  # a layer is its own base or joins the previous layer's group
        assert ((bases[layer] == layer) | (layer > 0 and bases[layer] == bases[layer - 1])).all()


def test_similarity_is_a_deterministic_overlap_in_unit_range(deep):
    ids = _ids(deep.config.vocab_size)
    similarity = attention_similarity(deep, ids)
    assert similarity.shape == (4, 4, 2)
    assert torch.equal(similarity, attention_similarity(deep, ids))
    assert (similarity >= 0).all() and (similarity <= 1 + 1e-5).all()
    assert torch.allclose(similarity, similarity.transpose(0, 1))
    assert torch.allclose(torch.diagonal(similarity, dim1=0, dim2=1), torch.ones(2, 4), atol=1e-5)


def test_grouping_is_greedy_per_head_against_the_base_layer():
    similarity = torch.ones(5, 5, 2)
    similarity[0, 2, 0] = 0.4  # head 0: layer 2 is unlike base 0, so it starts a group; 3 and 4 join it
    similarity[2, 4, 1] = 0.1  # head 1 does not care: layer 2 is not its base
    similarity[0, 3, 1] = 0.45  # head 1: layer 3 is unlike base 0, so it starts a group; 4 joins it
    bases = group_layers(similarity, 0.5)
    assert bases[:, 0].tolist() == [0, 0, 2, 2, 2]
    assert bases[:, 1].tolist() == [0, 0, 0, 3, 3]
    _assert_consecutive(bases)
    assert group_layers(similarity, 0.5, max_group=2)[:, 0].tolist() == [0, 0, 2, 2, 4]


def test_delta_zero_groups_maximally_and_above_one_groups_nothing(deep):
    similarity = attention_similarity(deep, _ids(deep.config.vocab_size))
    assert (group_layers(similarity, 0.0) == 0).all()
    assert group_layers(similarity, 0.0, max_group=3)[:, 0].tolist() == [0, 0, 0, 3]
    assert group_layers(similarity, 1.01).tolist() == [[layer] * 2 for layer in range(4)]
    # Those two ends need no file (the tiny model has no tokenizer to make one).
    assert (layer_bases(deep, PoDConfig(delta=0.0)) == 0).all()
    assert layer_bases(deep, PoDConfig(delta=2.0))[:, 1].tolist() == [0, 1, 2, 3]


def _prefill_and_decode(model, cache, ids, mask, steps: int):
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, **kv(cache))
        for _ in range(steps):
            token = out.logits[:, -1:].argmax(-1)
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            out = model(input_ids=token, attention_mask=mask, **kv(cache))
    return mask


def _mixed_grouping(model, tmp_path):
    """Layer 1 shares head 0 with base 0 and owns head 1; layers 2-3 share both heads with base 2, except that
    layer 3's head 0 is its own base."""
    similarity = torch.ones(4, 4, 2)
    similarity[0, 1, 1] = similarity[0, 2, 0] = similarity[1, 2, 1] = similarity[2, 3, 0] = 0.0
    return save_similarity(model, similarity, tmp_path / "mixed.safetensors")


def _record_inputs(cache) -> dict[int, tuple[list, list]]:
    """Every key and value tensor each layer is given (what it computed itself in this run)."""
    given = {layer.layer_idx: ([], []) for layer in cache.layers}
    for layer in cache.layers:
        def update(keys, values, *args, _update=layer.update, _given=given[layer.layer_idx], **kwargs):
            _given[0].append(keys)
            _given[1].append(values)
            return _update(keys, values, *args, **kwargs)

        layer.update = update
    return given


def test_a_grouped_layer_returns_its_base_distant_keys_and_its_own_proximal_keys(deep, tmp_path):
    path = _mixed_grouping(deep, tmp_path)
    ids, mask = padded_batch(deep.config.vocab_size, (90, 70), seed=3)
    cache = ojakv.make_cache(deep, "pod", grouping=str(path), n_sink=3, window=10)
    given = _record_inputs(cache)
    _prefill_and_decode(deep, cache, ids, mask, steps=5)
    assert [layer.bases for layer in cache.layers] == [[0, 0], [0, 1], [2, 2], [3, 2]]
    own = {i: [torch.cat(tensors, dim=2) for tensors in pair] for i, pair in given.items()}
    n, sink = 95, 20 + 3  # 20 columns of padding in the shorter prompt, then its first 3 real tokens
    for layer_idx, layer in enumerate(cache.layers):
        keys, (own_keys, own_values) = layer.attention_keys(), own[layer_idx]
        assert torch.equal(layer.values_buf.view, own_values)  # values stay per layer
        for head, base in enumerate(layer.bases):
            if base == layer_idx:
                assert torch.equal(keys[:, head], own_keys[:, head])
                continue
            assert layer.owned[head] is None  # the distant keys are not held here
            assert torch.equal(keys[:, head, :sink], own_keys[:, head, :sink])
            assert torch.equal(keys[:, head, n - 10 :], own_keys[:, head, n - 10 :])
            assert torch.equal(keys[:, head, sink : n - 10], own[base][0][:, head, sink : n - 10])
            assert not torch.equal(keys[:, head, sink : n - 10], own_keys[:, head, sink : n - 10])


def test_memory_is_the_tensors_held_and_below_full_when_grouped(deep):
    ids, mask = padded_batch(deep.config.vocab_size, (160, 130), seed=4)
    caches = {delta: ojakv.make_cache(deep, "pod", delta=delta, window=16) for delta in (0.0, 2.0)}
    for cache in caches.values():
        greedy_scores(deep, ids, mask, cache, steps=8)
        assert cache.memory().held_bytes == held_tensor_bytes(cache)
    grouped, ungrouped = caches[0.0].memory(), caches[2.0].memory()
    # nothing grouped: every key and value, plus the spare capacity decoding grew
    assert ungrouped.held_bytes - ungrouped.segments["growth_slack"] == ungrouped.full_bytes
    g, n = geometry(deep), 167  # 160 prompt tokens + 7 decoded ones cached
    element = 2 * g.num_kv_heads * g.head_dim * 4  # one token of one layer, batch of 2, float32
    proximal = (30 + 4) + 16  # sink columns (30 of padding + n_sink) and the window
    assert grouped.segments["values"] == 4 * n * element
    assert grouped.segments["keys"] == n * element  # one base layer per head
    assert grouped.segments["proximal_keys"] == 3 * proximal * element
    assert grouped.held_bytes < 0.8 * grouped.full_bytes  # (4 + 1 + 3 · 50/167) / 8 + slack


def test_budget_sets_the_group_size_and_refuses_what_it_cannot_reach(deep):
    knobs = knobs_for_budget("pod", {}, deep, 1536, 16, 0.66)
    assert knobs["delta"] == 0.0 and knobs["max_group"] == 4  # one group of all 4 layers
    assert abs(held_fraction(4, 4, 1552, 132) - 0.66) <= 0.02
    assert knobs_for_budget("pod", {}, deep, 1536, 16, 0.8)["max_group"] == 2
    with pytest.raises(OjaKVError, match="at least 0.66"):
        knobs_for_budget("pod", {}, deep, 1536, 16, 0.4)


def test_the_budgeted_cache_holds_its_budget(deep):
    knobs = knobs_for_budget("pod", {}, deep, 1536, 16, 0.66)
    cache = ojakv.make_cache(deep, "pod", **knobs)
    ids = _ids(deep.config.vocab_size, 1536, seed=5)
    with torch.no_grad():
        deep.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kv(cache), max_new_tokens=16,
                      min_new_tokens=16, do_sample=False, pad_token_id=0)
    assert abs(cache.memory().ratio - 0.66) <= 0.02


def test_a_file_for_another_model_or_format_is_refused(deep, tmp_path):
    path = save_similarity(deep, attention_similarity(deep, _ids(deep.config.vocab_size)), tmp_path / "s.safetensors")
    assert ojakv.make_cache(deep, "pod", grouping=str(path)).layers[0].bases == [0, 0]
    other = tiny_model("llama", seed=1, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16, max_context=2048)
    with pytest.raises(OjaKVError, match="measured for model"):
        ojakv.make_cache(other, "pod", grouping=str(path))
    stale = tmp_path / "stale.safetensors"
    save_file({"similarity": torch.ones(4, 4, 2)}, str(stale), metadata={"format": "0"})
    with pytest.raises(OjaKVError, match="format"):
        load_similarity(deep, stale)
    with pytest.raises(OjaKVError, match="does not exist"):
        load_similarity(deep, tmp_path / "missing.safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:100])
    with pytest.raises(OjaKVError, match="is not a readable pod grouping file"):
        load_similarity(deep, cut)
    with pytest.raises(OjaKVError, match="make_similarity"):
        ojakv.make_cache(other, "pod")  # no file yet and no tokenizer to make one


def test_the_default_file_is_made_on_first_use_and_remade_when_stale(tokenizer):
    model = tiny_model("llama", num_layers=3, num_heads=2, num_kv_heads=1, head_dim=16, vocab_size=1024,
                       max_context=2048)
    model.ojakv_tokenizer = tokenizer
    cache = ojakv.make_cache(model, "pod")
    path = default_path(model)
    assert path.is_file() and [p.name for p in path.parent.iterdir()] == [path.name]  # nothing half-written
    assert len(cache.layers) == 3
    save_file({"similarity": torch.ones(3, 3, 1)}, str(path), metadata={"format": "0"})
    assert load_similarity(model).shape == (3, 3, 1)  # our own stale file: measured again
    assert load_similarity(model).ne(1).any()
