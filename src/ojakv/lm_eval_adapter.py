"""The lm-evaluation-harness model ``ojakv``: a Hugging Face model that scores and generates through a compressed
KV cache.

``--model ojakv --model_args pretrained=embedded,method=ojakv,rank_ratio=0.5`` takes lm-eval's HF arguments
(``batch_size``, ``max_length``, ...) plus ``method`` and that method's knobs, parsed as ``ojakv generate`` parses
them. Importing this module registers the model; ``python -m ojakv.lm_eval`` does so before lm-eval's own
command line runs (lm-eval 0.4 finds models only in its registry and loads no plugins).

What each request type measures:
- ``loglikelihood``: the context is the prompt the cache compresses; the continuation is scored in one more forward
  call through the compressed cache, so every scored prediction attends to the compressed context. One request at a
  time, each with its own cache: lm-eval's batches are right-padded without a mask, and padding must never enter a
  basis or a score.
- ``loglikelihood_rolling``: each window has no context (one prefix token), so the window itself is the prompt:
  the scores show what compression does during the prompt's own forward (methods that compress only after the
  prompt, such as ``ojakv-pf`` or SnapKV, score as the full cache here).
- ``generate_until``: ``generate`` with a fresh cache per batch (left-padded with a mask, as ojakv expects).
"""

from __future__ import annotations

import dataclasses
import inspect

import torch
import torch.nn.functional as F
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils_hf import get_dtype
from tqdm import tqdm

from .api import make_cache
from .errors import OjaKVError
from .methods import get_method, parse_value
from .hf import cache_keyword, check_supported
from .models import EMBEDDED, converted_folder, load_model

# `pretrained=embedded` is the embedded default model.
EMBEDDED_ALIAS = "embedded"
_HF_ARGUMENTS = frozenset(inspect.signature(HFLM.__init__).parameters) - {"self", "kwargs", "pretrained"}


def split_model_args(method: str, args: dict) -> tuple[dict, dict]:
    """``args`` (lm-eval's ``--model_args``, values already typed by lm-eval) -> (the method's knobs, HFLM's
    arguments). Knob values are re-read from text with ojakv's own parser, so ``eta_decode=0`` becomes a float and
    ``rank=24`` an int whatever lm-eval guessed; an argument that is neither is refused rather than ignored."""
    config_class = get_method(method).config_class
    knob_names = {field.name for field in dataclasses.fields(config_class)}
    knobs = {name: parse_value(config_class, name, str(value)) for name, value in args.items() if name in knob_names}
    unknown = sorted(set(args) - knob_names - _HF_ARGUMENTS)
    if unknown:
        raise OjaKVError(
            f"lm-eval model ojakv has no argument {', '.join(unknown)}: method {method!r} takes "
            f"{', '.join(sorted(knob_names)) or 'no knobs'}, and lm-eval's HF arguments are accepted too"
        )
    get_method(method).make_config(**knobs)  # a bad value fails now, not at the first request
    return knobs, {name: value for name, value in args.items() if name not in knob_names}


def _model_name(pretrained: str) -> str:
    return next(iter(EMBEDDED)) if pretrained == EMBEDDED_ALIAS else pretrained


@register_model("ojakv")
class OjaKVLM(HFLM):
    """lm-eval's HFLM with every forward and every ``generate`` going through ``ojakv.make_cache(model, method,
    **knobs)``. ``pretrained`` is ``embedded``, an embedded model name, a local HF folder, a hub id, or a loaded
    model (whose tokenizer then comes as ``tokenizer=``)."""

    def __init__(self, pretrained="embedded", method: str = "ojakv", device: str | None = None,
                 dtype: str | torch.dtype = "float32", **kwargs):
        knobs, hf_args = split_model_args(method, kwargs)
        if isinstance(pretrained, str):
            name = _model_name(pretrained)
            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            model, tokenizer = load_model(name, dtype=get_dtype(dtype), device=device, progress=False)
            hf_args.setdefault("tokenizer", tokenizer)
            source = str(converted_folder(name)) if name in EMBEDDED else name
        else:
            check_supported(pretrained.config)
            model, source = pretrained, getattr(pretrained.config, "_name_or_path", "")
        super().__init__(pretrained=model, **hf_args)
        self.pretrained = source  # what lm-eval reports (and looks up on the hub), not the module object
        self.method, self.knobs = method, knobs

    def make_cache(self):
        """A fresh compressed cache for one request or one generation batch."""
        return make_cache(self.model, self.method, **self.knobs)

    def get_model_info(self) -> dict:
        return {**super().get_model_info(), "ojakv_method": self.method, "ojakv_knobs": self.knobs}

    # --- scoring -----------------------------------------------------------------------------------------------
    def _model_call(self, inps, attn_mask=None, labels=None, prompt_length: int | None = None):
        """Logits of ``inps`` [b, n] through a fresh cache. The first ``prompt_length`` tokens (all if None) are the
        prompt it compresses; the rest go in one more call that attends to the compressed prompt."""
        if attn_mask is not None or labels is not None:
            raise OjaKVError("lm-eval model ojakv serves decoder-only models: use a causal LM")
        split = prompt_length or inps.shape[1]
        autocast = torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                                  enabled=self.mixed_precision_dtype is not None)
        with self.make_cache() as cache, torch.no_grad(), autocast:
            kv = {cache_keyword(type(self.model)): cache}
            logits = [self.model(inps[:, :split], **kv).logits]
            if split < inps.shape[1]:
                logits.append(self.model(inps[:, split:], **kv).logits)
        return torch.cat(logits, dim=1)

    def _score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        """(log-probability of ``continuation`` after ``context``, whether greedy decoding would produce it)."""
        tokens = (context + continuation)[-(self.max_length + 1) :]  # too long: drop the oldest, as HFLM does
        inputs = torch.tensor([tokens[:-1]], dtype=torch.long, device=self.device)
        scored = len(continuation)
        logits = self._model_call(inputs, prompt_length=max(inputs.shape[1] - scored, 0))
        logprobs = F.log_softmax(logits[0, -scored:], dim=-1, dtype=self.softmax_dtype)
        target = torch.tensor(continuation, dtype=torch.long, device=self.device)
        return float(logprobs.gather(-1, target[:, None]).sum()), bool((logprobs.argmax(-1) == target).all())

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        """One request at a time, each with its own cache (see the module docstring for why)."""
        results = []
        for key, context, continuation in tqdm(requests, disable=disable_tqdm or self.rank != 0,
                                               desc="Running loglikelihood requests through ojakv"):
            answer = self._score(context, continuation)
            if key is not None:  # rolling windows come without a key; lm-eval caches their sum itself
                self.cache_hook.add_partial("loglikelihood", key, answer)
            results.append(answer)
        return results

    # --- generation --------------------------------------------------------------------------------------------
    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        with self.make_cache() as cache:
            generation_kwargs[cache_keyword(type(self.model))] = cache
            return super()._model_generate(context, max_length, stop, **generation_kwargs)
