"""Latent decode attention, wired into transformers' attention interface for the lifetime of a cache.

While a cache with low-rank layers is attached, the model's attention implementation is ``ojakv|<inner>`` (the
model's own, wrapped): a call for which a layer has posted its low-rank body goes to ``ojakv.attention``'s
latent attention; every other call (prefill, other caches, layers without a body) goes to the inner kernel
unchanged. When the last such cache is released, the model gets its own implementation back.

Bodies are posted per attention module in a table of this module's, not as attributes of the model's modules,
and each forward call starts with the table cleared for its model.
"""

from __future__ import annotations

import sys
import weakref

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..attention import LowRankBody, latent_attention

PREFIX = "ojakv|"
_posted: "weakref.WeakKeyDictionary[torch.nn.Module, LowRankBody]" = weakref.WeakKeyDictionary()


def implementation(model) -> str:
    return model.config._attn_implementation or "eager"


def switch_to_latent(model) -> str:
    """Route the model's attention through ``dispatch``; returns the implementation it had."""
    current = implementation(model)
    if current.startswith(PREFIX):
        return current.removeprefix(PREFIX)
    name = PREFIX + current
    AttentionInterface.register(name, dispatch)
    if current in ALL_MASK_ATTENTION_FUNCTIONS:  # the inner kernel's mask format, columns in cache order
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[current])
    model.set_attn_implementation(name)
    return current


def restore_implementation(model, previous: str) -> None:
    """Give the model back ``previous``, unless the user has chosen another implementation meanwhile."""
    if implementation(model) == PREFIX + previous:
        model.set_attn_implementation(previous)


def is_latent_enabled(module: torch.nn.Module) -> bool:
    """Whether this attention module's next call goes through ``dispatch`` (the user may have switched the
    implementation since the cache was made; then layers fall back to reconstruction)."""
    return (getattr(module.config, "_attn_implementation", None) or "").startswith(PREFIX)


def post_body(module: torch.nn.Module, body: LowRankBody) -> None:
    _posted[module] = body


def take_posted_body(module: torch.nn.Module) -> LowRankBody | None:
    """The body a layer posted for this module's next attention call (removed from the table), or None."""
    return _posted.pop(module, None)


def clear_posted(modules) -> None:
    for module in modules:
        _posted.pop(module, None)


def dispatch(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers' attention signature: query [b, H, q, d]; key/value [b, h, m, d]; returns ([b, q, H, d], None)."""
    body = take_posted_body(module)
    if body is None:
        inner = module.config._attn_implementation.removeprefix(PREFIX)
        function = ALL_ATTENTION_FUNCTIONS.get_interface(inner, _eager)
        return function(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return latent_attention(query, key, value, attention_mask, body, scale, kwargs.get("softcap")), None


def _eager(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """The model's own eager attention (each family's modeling file defines one)."""
    eager = sys.modules[type(module).__module__].eager_attention_forward
    return eager(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
