"""StreamingLLM's re-rotation (pos_shift): held keys sit at consecutive in-cache positions."""

from __future__ import annotations

import torch

import ojakv
from ojakv.rope import apply_rope

from helpers import full_cache, greedy_scores, kv, padded_batch


def test_rerotation_without_eviction_is_the_full_cache(tiny):
    """Until something is evicted, in-cache positions are the tokens' own (left padding included)."""
    ids, mask = padded_batch(tiny.config.vocab_size, (60, 41), seed=8)
    reference = greedy_scores(tiny, ids, mask, full_cache(tiny), steps=12)
    cache = ojakv.make_cache(tiny, "streaming-llm", window=1000, rerotate=True)
    assert (greedy_scores(tiny, ids, mask, cache, steps=12) - reference).abs().max() <= 1e-4


def test_rerotated_keys_sit_at_consecutive_positions_ending_at_the_query(tiny, monkeypatch):
    """Layer 0's keys depend on the token alone, so the keys it returns after evictions can be rebuilt from the
    embeddings: key j of the held tokens must be rotated to position P − held + j (P: the query's position)."""
    n_sink, window, prompt, steps = 3, 10, 30, 6
    ids = torch.randint(3, tiny.config.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(1))
    cache = ojakv.make_cache(tiny, "streaming-llm", n_sink=n_sink, window=window, rerotate=True)
    layer = cache.layers[0]
    returned = []
    original = type(layer).update

    def spy(self, key_states, value_states, *args, **kwargs):
        out = original(self, key_states, value_states, *args, **kwargs)
        if self is layer and self.seen > prompt:
            returned.append(out[0].clone())
        return out

    monkeypatch.setattr(type(layer), "update", spy)
    with torch.no_grad():
        out = tiny.generate(input_ids=ids, **kv(cache), max_new_tokens=steps, min_new_tokens=steps,
                            do_sample=False, pad_token_id=0)
    tokens = out[0]
    attention = tiny.model.layers[0].self_attn
    pre_rope = attention.k_proj(tiny.model.layers[0].input_layernorm(tiny.model.embed_tokens(tokens)))
    pre_rope = pre_rope.view(1, len(tokens), -1, attention.head_dim).transpose(1, 2)
    for step, keys in enumerate(returned, start=1):
        query_position = prompt + step - 1
        held = keys.shape[2]
        # which tokens are held: the sinks, then the most recent ones up to the query
        tokens_held = list(range(n_sink)) + list(range(query_position + 1 - (held - n_sink), query_position + 1))
        positions = torch.arange(query_position - held + 1, query_position + 1).unsqueeze(0)
        cos, sin = cache.shared.rope_angles(positions)
        expected = apply_rope(pre_rope[:, :, tokens_held].detach(), cos, sin)
        assert (keys - expected).abs().max() <= 1e-4, step
    assert len(returned) == steps - 1 and returned[-1].shape[2] == n_sink + window + 1
