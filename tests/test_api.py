"""The Python entry points: make_cache, compress (generate and pipelines), methods()."""

from __future__ import annotations

import pytest
import torch
from transformers import pipeline

import ojakv
from ojakv.errors import OjaKVError

from helpers import kv, padded_batch


def test_compress_gives_generate_a_fresh_cache_and_restores_it(tiny):
    ids, mask = padded_batch(tiny.config.vocab_size, (40, 33))
    knobs = dict(rank_ratio=0.5, n_sink=4, n_recent=8)
    explicit = tiny.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                             **kv(ojakv.make_cache(tiny, "ojakv", **knobs)))
    with ojakv.compress(tiny, "ojakv", **knobs) as run:
        first = tiny.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        tiny.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(first, explicit)
    assert len(run.caches) == 2 and run.caches[0] is not run.caches[1]
    assert run.last_cache.method == "ojakv" and run.last_cache.config["rank_ratio"] == 0.5
    assert "generate" not in vars(tiny)  # the model's own generate is back


def test_compress_checks_knobs_up_front(tiny):
    with pytest.raises(OjaKVError, match="rank_ratio"):
        with ojakv.compress(tiny, "ojakv", rank_ratio=2.0):
            pass
    assert "generate" not in vars(tiny)


def test_text_generation_pipeline_runs_compressed(tiny, tokenizer):
    from tiny import tiny_model

    model = tiny_model("llama", vocab_size=len(tokenizer), max_context=2048)
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    prompt = "The grass is green. " * 60
    plain = generator(prompt, max_new_tokens=5, do_sample=False)[0]["generated_text"]
    with ojakv.compress(model, "ojakv", rank_ratio=1.0, eta_decode=0.0) as run:
        compressed = generator(prompt, max_new_tokens=5, do_sample=False)[0]["generated_text"]
    assert run.caches and run.last_cache.get_seq_length() > 60
    assert compressed == plain  # at full rank the compressed cache is exact


def test_methods_lists_knobs_with_help():
    listed = ojakv.methods()
    assert {"full", "ojakv", "ojakv-pf"} <= set(listed)
    knobs = {k["name"]: k for k in listed["ojakv"]["knobs"]}
    assert knobs["key_mode"]["default"] == "pre_rope" and knobs["key_mode"]["help"]
