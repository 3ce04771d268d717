"""Shared fixtures: the offline tokenizer, a tiny random-weight model, an isolated cache folder (helpers for
comparing caches are in helpers.py)."""

from __future__ import annotations

import os

import pytest
import torch

from tiny import tiny_model


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
