"""The boundary to transformers: one package, a checked hook contract, the model left as it was found."""

from __future__ import annotations

import gc
import re
from pathlib import Path

import pytest
import torch
from packaging.version import Version

import ojakv
from ojakv import hf
from ojakv.cache import HooksMissed
from ojakv.hf import hooks as hf_hooks

from helpers import full_cache, greedy_scores, kv, padded_batch
from tiny import tiny_model

pytestmark = pytest.mark.compat
SOURCE = Path(ojakv.__file__).parent


def test_only_the_hf_package_imports_transformers():
    importing = re.compile(r"^\s*(from transformers\b|import transformers\b)", re.M)
    offenders = [str(path.relative_to(SOURCE)) for path in SOURCE.rglob("*.py")
                 if "hf" not in path.relative_to(SOURCE).parts[:1] and importing.search(path.read_text())]
    assert offenders == []


def test_the_cache_keyword_follows_the_installed_transformers():
    expected = "cache" if Version(hf.INSTALLED) >= Version("5.24.0") else "past_key_values"
    assert hf.cache_keyword() == expected
    assert hf.cache_argument({expected: "the cache"}) == "the cache"


@pytest.mark.parametrize("method, knobs", [("full", {}), ("ojakv", {}), ("snapkv", {}), ("kivi", dict(group=16))])
def test_a_forward_the_hooks_did_not_see_raises_naming_the_version(tiny, monkeypatch, method, knobs):
    ids, mask = padded_batch(tiny.config.vocab_size, (40, 30), seed=3)
    cache = ojakv.make_cache(tiny, method, **knobs)
    # What a renamed keyword does: the hooks look for the cache and do not find it.
    monkeypatch.setattr(hf_hooks, "cache_argument", lambda kwargs: None)
    with pytest.raises(HooksMissed) as raised, torch.no_grad():
        tiny(input_ids=ids, attention_mask=mask, **kv(cache))
    message = str(raised.value)
    assert f"transformers {hf.INSTALLED} is installed" in message and hf.SUPPORTED_RANGE in message


def test_a_closed_cache_is_refused(tiny):
    ids, mask = padded_batch(tiny.config.vocab_size, (20,), seed=4)
    cache = ojakv.make_cache(tiny, "ojakv")
    cache.close()
    with pytest.raises(ojakv.OjaKVError, match="close"), torch.no_grad():
        tiny(input_ids=ids, attention_mask=mask, **kv(cache))


def _hook_count(model) -> int:
    modules = [hf.base_model(model), *hf.attention_modules(model)]
    return sum(len(module._forward_pre_hooks) for module in modules)


def _dynamic_logits(model, ids, mask):
    return greedy_scores(model, ids, mask, full_cache(model), steps=6)


@pytest.mark.parametrize("release", ["close", "with", "garbage", "compress"])
def test_the_model_is_left_as_found(release):
    model = tiny_model("llama", num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, max_context=1024)
    ids, mask = padded_batch(model.config.vocab_size, (50, 36), seed=5)
    before, implementation = _dynamic_logits(model, ids, mask), model.config._attn_implementation
    knobs = dict(rank=4, n_sink=4, n_recent=4)  # a low-rank cache: it switches to latent attention
    if release == "compress":
        with ojakv.compress(model, "ojakv", **knobs) as run:
            assert _hook_count(model) > 0
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
            assert model.config._attn_implementation == "ojakv|" + implementation
        assert run.last_cache.closed and run.last_cache.memory().held_bytes > 0
    elif release == "with":
        with ojakv.make_cache(model, "ojakv", **knobs) as cache:
            greedy_scores(model, ids, mask, cache, steps=4)
    else:
        cache = ojakv.make_cache(model, "ojakv", **knobs)
        assert model.config._attn_implementation == "ojakv|" + implementation and _hook_count(model) > 0
        greedy_scores(model, ids, mask, cache, steps=4)
        if release == "close":
            cache.close()
        else:
            del cache
            gc.collect()
    assert _hook_count(model) == 0
    assert model.config._attn_implementation == implementation
    assert all(layer.self_attn.config._attn_implementation == implementation for layer in model.model.layers)
    assert torch.equal(_dynamic_logits(model, ids, mask), before)


def test_two_caches_share_the_hooks_until_the_last_is_closed(tiny):
    first, second = ojakv.make_cache(tiny, "ojakv"), ojakv.make_cache(tiny, "snapkv")
    first.close()
    assert tiny.config._attn_implementation == "sdpa"  # no low-rank cache left
    ids, mask = padded_batch(tiny.config.vocab_size, (12,))
    greedy_scores(tiny, ids, mask, second, steps=2)  # would raise HooksMissed had first's close taken the hooks
    second.close()
    assert _hook_count(tiny) == 0
