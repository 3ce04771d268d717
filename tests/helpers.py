"""Helpers shared by the tests: padded batches, greedy runs, cache comparisons, feeding layers directly."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from ojakv.storage import GrowableTensor


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
        out = model.generate(input_ids=ids, attention_mask=mask, **kv(cache), max_new_tokens=steps,
                             min_new_tokens=steps, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0)
    return torch.stack(out.logits)


class CharacterTokens:
    """A tokenizer stand-in for calibration: one id per character."""

    def __call__(self, text, return_tensors=None, add_special_tokens=False):
        return type("Encoded", (), {"input_ids": torch.tensor([[3 + (ord(c) % 100) for c in text]])})()


def calibration_file(model, path, text: str = "calibration text for the bases. " * 30):
    """A calibration file fitted on ``text`` for ``model`` (ojakv.calibrate, small chunks, no progress bar)."""
    from ojakv.calibration import calibrate

    return calibrate(model, CharacterTokens(), text, chunk_tokens=256, path=path, progress=False)


def full_cache(model):
    return DynamicCache(config=model.config)


def held_tensor_bytes(cache) -> int:
    """Walk every layer's attributes (into lists and quantized blocks) and add up the storage found."""
    from ojakv.landmarks import ChunkLandmarks
    from ojakv.quantize import Quantized
    from ojakv.storage import CodedRows
    from ojakv.transform_coding import Int8Basis

    def size(value) -> int:
        if isinstance(value, torch.Tensor):
            return value.numel() * value.element_size()
        if isinstance(value, GrowableTensor):
            return value.nbytes
        if isinstance(value, (list, tuple)):
            return sum(size(item) for item in value)
        if isinstance(value, (CodedRows, Int8Basis)):
            return size(list(value.buffers))
        if isinstance(value, Quantized):
            return size([value.codes, value.scale, value.minimum])
        if isinstance(value, ChunkLandmarks):
            return size([value.means, value.tail])
        return 0

    total = cache.shared.positions.nbytes if cache.shared.positions is not None else 0
    return total + sum(size(value) for layer in cache.layers for value in vars(layer).values())


def feed(cache, keys, values, positions=None, valid=None, layers=None):
    """Feed one chunk of keys/values [b, h, q, d] straight into the cache's layers, announcing the call as the
    model's hooks would (positions [b, q], padding mask ``valid`` [b, q]; RoPE angles from the model's own rotary
    module, hidden states zero). Returns each fed layer's (keys, values)."""
    from ojakv.hf import AttentionInputs, attention_modules

    b, _, q, _ = keys.shape
    if positions is None:
        positions = torch.arange(cache.shared.seen, cache.shared.seen + q).expand(b, q)
    mask = None if valid is None else valid.long()
    cache.begin_forward(mask, positions.expand(b, q), b, q, keys.device)
    modules = attention_modules(cache._model)
    cos, sin = cache.shared.rope_angles(positions.expand(b, q))
    hidden = torch.zeros(b, q, cache._model.config.hidden_size)
    out = []
    for idx in range(len(cache.layers)) if layers is None else layers:
        cache.receive_attention_inputs(idx, AttentionInputs(modules[idx], hidden, cos, sin))
        out.append(cache.update(keys, values, idx))
    return out


def kv(cache) -> dict:
    """``{keyword: cache}`` for a model call under the installed transformers (``cache`` from 5.24 on)."""
    from ojakv.hf import cache_keyword

    return {cache_keyword(): cache}
