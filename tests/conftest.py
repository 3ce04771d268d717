"""Shared fixtures: tiny random-weight models for logic tests, and helpers to compare caches."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from ojakv.models import tiny_model


@pytest.fixture(autouse=True)
def _isolated_cache_dir(tmp_path_factory, monkeypatch):
    """Unit tests never read or write the user's cache folder (the embedded-model tests opt back in)."""
    monkeypatch.setenv("OJAKV_CACHE_DIR", str(tmp_path_factory.mktemp("ojakv-cache")))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return tiny_model("llama", num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, max_context=1024)


def padded_batch(vocab: int, lengths: tuple[int, ...], seed: int = 0):
    """Token ids and a left-padding mask for prompts of the given lengths."""
    gen = torch.Generator().manual_seed(seed)
    n = max(lengths)
    ids = torch.randint(3, vocab, (len(lengths), n), generator=gen)
    mask = torch.zeros(len(lengths), n, dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, n - length :] = 1
        ids[row, : n - length] = 0
    return ids, mask


def greedy_scores(model, ids, mask, cache, steps: int) -> torch.Tensor:
    """Logits of ``steps`` greedy decode steps, stacked [steps, b, vocab]."""
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=steps,
                             min_new_tokens=steps, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0)
    return torch.stack(out.logits)


def full_cache(model):
    return DynamicCache(config=model.config)
