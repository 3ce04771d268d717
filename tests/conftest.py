"""Shared fixtures: tiny random-weight models for logic tests, and helpers to compare caches."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import DynamicCache

from ojakv.models import tiny_model
from ojakv.storage import GrowableTensor


def pytest_addoption(parser):
    parser.addoption("--fuzz-examples", type=int, default=None,
                     help="hypothesis examples per method in tests/test_fuzz.py (same as OJAKV_FUZZ_EXAMPLES)")


def pytest_configure(config):
    examples = config.getoption("--fuzz-examples", default=None)
    if examples:
        os.environ["OJAKV_FUZZ_EXAMPLES"] = str(examples)  # read when tests/test_fuzz.py is imported


@pytest.fixture(autouse=True)
def _isolated_cache_dir(tmp_path_factory, monkeypatch):
    """Unit tests never read or write the user's cache folder (the embedded-model tests opt back in)."""
    monkeypatch.setenv("OJAKV_CACHE_DIR", str(tmp_path_factory.mktemp("ojakv-cache")))


@pytest.fixture(scope="session")
def tokenizer():
    """A real byte-level BPE tokenizer built offline: GPT-2 style merges trained on the essays, plus a chat
    template, so prompts are counted the way a model would count them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from ojakv import data

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=800, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator([data.essay_text("calibration")[:60_000], data.NOISE], trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")
    tok.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
    )
    tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


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


def held_tensor_bytes(cache) -> int:
    """Walk every layer's attributes (into lists and quantized blocks) and add up the storage found."""
    from ojakv.quantize import Quantized
    from ojakv.storage import QuantizedRows

    def size(value) -> int:
        if isinstance(value, torch.Tensor):
            return value.numel() * value.element_size()
        if isinstance(value, GrowableTensor):
            return value.nbytes
        if isinstance(value, (list, tuple)):
            return sum(size(item) for item in value)
        if isinstance(value, QuantizedRows):
            return size(list(value.buffers))
        if isinstance(value, Quantized):
            return size([value.codes, value.scale, value.minimum])
        return 0

    total = cache.shared.positions.nbytes if cache.shared.positions is not None else 0
    return total + sum(size(value) for layer in cache.layers for value in vars(layer).values())
