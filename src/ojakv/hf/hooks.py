"""The two forward pre-hooks that tell a compressed cache what ``update`` alone does not, installed only while a
cache (or a ``compress`` block) needs them.

- On the decoder stack: once per forward call, the new tokens' positions and which are padding (from
  ``position_ids`` and the 2-D ``attention_mask``).
- On every attention module: the hidden states and RoPE angles of the call (to undo RoPE or recompute queries),
  and, for layers that keep fewer tokens than the longest, the last columns of the 4-D mask.

Both read the cache from whichever keyword the installed transformers uses and do nothing for any cache that is
not a ``HookedCache``. ``attach`` counts the users of a model: the first installs the hooks (and, for low-rank
caches, the latent attention implementation), the last one's release removes them and restores the model's own
implementation, so a model is left as it was found.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import OjaKVError
from . import attention as latent
from .architecture import attention_modules, base_model, layer_index
from .compat import cache_argument
from .protocol import AttentionInputs, HookedCache


@dataclass
class _Attachment:
    handles: list = field(default_factory=list)
    users: int = 0
    latent_users: int = 0
    own_implementation: str | None = None


_ATTACHED: "weakref.WeakKeyDictionary[torch.nn.Module, _Attachment]" = weakref.WeakKeyDictionary()


def attach(model, *, latent_attention: bool = False) -> Callable[[], None]:
    """Make sure the hooks (and, if asked, the latent attention implementation) are on ``model``; returns the
    release function, which undoes this call's share (idempotent)."""
    state = _ATTACHED.get(model)
    if state is None:
        state = _ATTACHED[model] = _Attachment(handles=_install(model))
    state.users += 1
    if latent_attention:
        if state.latent_users == 0:
            state.own_implementation = latent.switch_to_latent(model)
        state.latent_users += 1
    released = False

    def release() -> None:
        nonlocal released
        if released:
            return
        released = True
        state.users -= 1
        if latent_attention:
            state.latent_users -= 1
            if state.latent_users == 0:
                latent.restore_implementation(model, state.own_implementation)
        if state.users == 0:
            for handle in state.handles:
                handle.remove()
            _ATTACHED.pop(model, None)

    return release


def _install(model) -> list:
    modules = attention_modules(model)
    handles = [base_model(model).register_forward_pre_hook(_model_pre_hook(modules), with_kwargs=True)]
    handles += [module.register_forward_pre_hook(_attention_pre_hook, with_kwargs=True) for module in modules]
    return handles


def _first(*candidates):
    return next((c for c in candidates if c is not None), None)


def _model_pre_hook(modules):
    def hook(module, args, kwargs):
        cache = cache_argument(kwargs)
        if not isinstance(cache, HookedCache):
            return None
        latent.clear_posted(modules)  # a body posted by a call that failed midway must not reach this one
        tokens = _first(kwargs.get("input_ids"), args[0] if args else None, kwargs.get("inputs_embeds"))
        if tokens is None:
            return None  # the cache's contract check names the problem at its first update
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() != 2:
            raise OjaKVError(f"a compressed cache needs the 2-D padding mask [batch, tokens] as attention_mask, got "
                             f"a {mask.dim()}-D tensor: pass the tokenizer's attention_mask")
        cache.begin_forward(mask, kwargs.get("position_ids"), tokens.shape[0], tokens.shape[1], tokens.device)
        return None

    return hook


def _attention_pre_hook(module, args, kwargs):
    cache = cache_argument(kwargs)
    if not isinstance(cache, HookedCache):
        return None
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    angles = kwargs.get("position_embeddings")
    if hidden is None or angles is None:
        return None  # the cache's contract check names the problem at this layer's update
    index = layer_index(module)
    cache.receive_attention_inputs(index, AttentionInputs(module, hidden, *angles))
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 4:
        length = cache.returned_length(index) + hidden.shape[1]
        if mask.shape[-1] > length:  # this layer keeps fewer tokens than the longest: its columns are the last
            return args, {**kwargs, "attention_mask": mask[..., -length:]}
    return None
