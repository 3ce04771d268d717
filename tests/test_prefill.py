"""One shared full-precision prefill: a derived cache must give what the method's own prefill gives."""

from __future__ import annotations

import pytest
import torch

import ojakv
from ojakv import prefill
from ojakv.methods import get_method, registered

from helpers import greedy_scores, kv, padded_batch
from test_methods import COMPRESSING, NO_COMPRESSION

FULL_PREFILL = sorted(name for name, method in registered().items()
                      if method.full_prefill(method.make_config(**COMPRESSING.get(name, {}))))


def test_the_methods_that_declare_a_full_precision_prefill():
    assert {"full", "snapkv", "pyramidkv", "h2o", "h2o-prefill", "streaming-llm", "ojakv-pf",
            "snapkv+ojakv"} <= set(FULL_PREFILL)
    assert "ojakv" not in FULL_PREFILL  # its prompt attends to the compressed K/V


def _continue(model, ids, mask, cache, first_logits, steps):
    """Greedy decoding from a cache that already holds the prompt: the first token from ``first_logits``."""
    token = first_logits.argmax(-1, keepdim=True)
    ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
    return torch.cat([first_logits[None], greedy_scores(model, ids, mask, cache, steps=steps - 1)])


@pytest.mark.parametrize("method", FULL_PREFILL)
@pytest.mark.parametrize("setting", ["compressing", "no compression"])
def test_a_derived_cache_gives_the_completions_of_the_direct_path(tiny, method, setting):
    knobs = COMPRESSING.get(method, {}) if setting == "compressing" else NO_COMPRESSION[method]
    ids, mask = padded_batch(tiny.config.vocab_size, (120, 101), seed=21)
    direct = greedy_scores(tiny, ids, mask, ojakv.make_cache(tiny, method, **knobs), steps=10)
    shared = prefill.capture(tiny, ids, mask)
    derived = prefill.derive(ojakv.make_cache(tiny, method, **knobs), shared)
    assert (_continue(tiny, ids, mask, derived, shared.last_logits, 10) - direct).abs().max() <= 1e-5


def test_ojakv_at_a_budget_attends_in_full_and_derives_the_direct_path(tiny):
    ids, mask = padded_batch(tiny.config.vocab_size, (160, 141), seed=24)
    direct_cache = ojakv.make_cache(tiny, "ojakv", budget=0.2, new_tokens=10, n_sink=4, n_recent=4)
    direct = greedy_scores(tiny, ids, mask, direct_cache, steps=10)
    assert direct_cache.config["prefill_attention"] == "full" and direct_cache.config["body_bits"] > 0
    shared = prefill.capture(tiny, ids, mask)
    derived = prefill.derive(ojakv.make_cache(tiny, "ojakv", budget=0.2, new_tokens=10, n_sink=4, n_recent=4), shared)
    assert (_continue(tiny, ids, mask, derived, shared.last_logits, 10) - direct).abs().max() <= 1e-5


def test_a_budget_is_resolved_when_the_derived_cache_sees_the_prompt(tiny):
    ids, mask = padded_batch(tiny.config.vocab_size, (200,), seed=22)
    shared = prefill.capture(tiny, ids, mask)
    cache = prefill.derive(ojakv.make_cache(tiny, "snapkv", budget=0.5), shared)
    assert cache.config["capacity"] < 110 and abs(cache.memory().ratio - 0.5) <= 0.02


@pytest.mark.parametrize("method", ["ojakv", "snapkv", "h2o", "kivi"])
def test_a_fork_continues_independently_of_its_original(tiny, method):
    knobs = {**COMPRESSING[method], **({"group": 16} if method == "kivi" else {})}
    ids, mask = padded_batch(tiny.config.vocab_size, (90, 70), seed=23)
    question, question_mask = ids[:, -12:], mask[:, -12:]
    context, context_mask = ids[:, :-12], mask[:, :-12]

    def ask(cache):
        with torch.no_grad():
            return tiny(input_ids=question, attention_mask=torch.cat([context_mask, question_mask], 1),
                        **kv(cache)).logits

    cache = ojakv.make_cache(tiny, method, **knobs)
    with torch.no_grad():
        tiny(input_ids=context, attention_mask=context_mask, **kv(cache))
    held = cache.memory().held_bytes
    twin = cache.fork()
    first = ask(twin)
    assert cache.memory().held_bytes == held and cache.get_seq_length() == context.shape[1]  # original untouched
    assert torch.equal(ask(cache), first)
    twin.close()
    assert not cache.closed
