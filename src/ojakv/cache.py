"""The compressed KV cache: a ``transformers.Cache`` whose layers store tokens however their method decides.

How a layer learns what it needs beyond the keys and values that ``update`` receives: the forward hooks of
``ojakv.hf`` tell the cache, once per forward call, the new tokens' positions and which are padding, and, per
attention module, the hidden states and RoPE angles of the call. That is a contract, checked at every update: a
layer never runs on assumed positions or padding. A forward call whose hooks did not run (another transformers
keyword, a cache made for another model, a cache already closed) raises ``HooksMissed``.

A cache holds the hooks on its model (and, for low-rank layers, the latent attention implementation) from
``make_cache`` until it is closed: ``cache.close()``, the end of a ``with`` block, or its garbage collection.
Then the model is as it was found.
"""

from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass
from typing import Callable

import torch

from .errors import OjaKVError
from .hf import (AttentionInputs, CacheLayerMixin, HookedCache, attach, cache_keyword, cache_kwargs,
                 describe_installed, geometry, rotary_embedding, sliding_windows)
from .layout import RESOLVED_AT_PREFILL, Terms, describe, merge_terms
from .memory import MemoryReport, nbytes
from .rope import Rotation
from .storage import GrowableTensor

__all__ = ["AttentionInputs", "CacheLayer", "CompressedCache", "HooksMissed", "LayerPlan", "SharedState",
           "StepInputs", "growable_segments", "observe_forward"]


class HooksMissed(OjaKVError):
    """A compressed cache was updated in a forward call that its hooks did not see."""

    def __init__(self, what: str):
        super().__init__(
            f"{what}: ojakv's forward hooks did not run for this call, so positions, padding and attention inputs "
            f"are unknown ({describe_installed()}). Pass the cache by keyword ({cache_keyword()}=cache) to the "
            f"model it was made for with ojakv.make_cache(model, ...), and do not use it after close()")


@dataclass
class StepInputs:
    """What one forward call brings: positions [b, q] and a validity mask [b, q] (False = padding)."""

    positions: torch.Tensor
    valid: torch.Tensor


class SharedState:
    """State shared by all layers of one cache: model geometry, the current step, and token positions."""

    def __init__(self, model, track_positions: bool):
        self.geometry = geometry(model)
        self.rotary = rotary_embedding(model)
        self.step: StepInputs | None = None  # set by the model hook, cleared after the last layer's update
        self.updated: set[int] = set()  # layers updated in the current forward call
        self.attention_inputs: dict[int, AttentionInputs] = {}
        self._step_memo: dict = {}  # cleared at every forward call and after the last layer
        self.seen = 0
        # Positions of every cached token, stored once for all layers (int32) when a layer needs to re-apply
        # RoPE at reconstruction; counted in the memory report.
        self.positions = GrowableTensor(dim=1) if track_positions else None

    def begin_forward(self, attention_mask, position_ids, batch: int, q: int, device) -> None:
        if position_ids is None:
            position_ids = torch.arange(self.seen, self.seen + q, device=device).unsqueeze(0)
        positions = position_ids.expand(batch, q).to(device)
        if attention_mask is None:  # no mask given: no padding
            valid = torch.ones(batch, q, dtype=torch.bool, device=device)
        elif attention_mask.shape[-1] < q:
            raise OjaKVError(f"attention_mask has {attention_mask.shape[-1]} columns for {q} new tokens: pass the "
                             "mask of every token so far (generate does)")
        else:
            valid = attention_mask[:, -q:].to(device).bool()
        self.step = StepInputs(positions=positions, valid=valid)
        self.updated = set()
        self.attention_inputs = {}
        self._step_memo = {}
        self.seen += q
        if self.positions is not None:
            self.positions.append(positions.to(torch.int32))

    def check_step(self, layer_idx: int, batch: int, q: int) -> None:
        """The contract: this update belongs to a forward call the hooks announced, and is its first for the
        layer."""
        step = self.step
        if step is None or layer_idx in self.updated:
            raise HooksMissed(f"layer {layer_idx} was updated outside a forward call the cache was told about")
        if tuple(step.valid.shape) != (batch, q):
            raise HooksMissed(f"layer {layer_idx} got {batch}x{q} new tokens, the forward call announced "
                              f"{tuple(step.valid.shape)}")
        self.updated.add(layer_idx)

    def take_attention_inputs(self, layer_idx: int) -> AttentionInputs:
        """This call's attention inputs for the layer, released so no activations outlive the step."""
        inputs = self.attention_inputs.pop(layer_idx, None)
        if inputs is None:
            raise HooksMissed(f"layer {layer_idx} has no attention inputs")
        return inputs

    def rope_angles(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [*positions.shape, d] (float32) for positions [b, n] (or [b, h, n]), from the model's own rotary
        module."""
        probe = torch.empty(0, dtype=torch.float32, device=positions.device)
        cos, sin = self.rotary(probe, positions.reshape(positions.shape[0], -1).long())
        return cos.view(*positions.shape, cos.shape[-1]), sin.view(*positions.shape, sin.shape[-1])

    def end_forward(self) -> None:
        self.step = None
        self.attention_inputs = {}
        self._step_memo = {}

    def span_rotation(self, start: int, count: int) -> Rotation:
        """RoPE of the stored tokens [start, start + count), prepared once per forward call for all layers (every
        layer asks for the same span when it rebuilds its body)."""
        return self.step_memo(("span", start, count),
                              lambda: Rotation(*self.rope_angles(self.positions.view[:, start : start + count])))

    def step_memo(self, key, compute):
        """``compute()``, once per forward call and key: what every layer of the step would compute alike."""
        if key not in self._step_memo:
            self._step_memo[key] = compute()
        return self._step_memo[key]

    def memory(self) -> dict[str, int]:
        return {"positions": self.positions.nbytes} if self.positions is not None else {}


class CacheLayer(CacheLayerMixin):
    """Base of every method's per-layer storage. Subclasses implement ``update`` and ``segments``."""

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, layer_idx: int, shared: SharedState):
        super().__init__()
        self.layer_idx = layer_idx
        self.shared = shared
        self.seen = 0  # tokens seen by this layer: what `get_seq_length` reports, so positions stay right
        self.dtype: torch.dtype | None = None
        self.batch_size = 0

    # --- transformers' layer protocol ---
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.batch_size = key_states.shape[0]
        self.is_initialized = True

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.returned_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def returned_length(self) -> int:
        """How many cached tokens ``update`` returns besides the new ones (all of them unless a method evicts)."""
        return self.seen

    def reset(self) -> None:
        raise OjaKVError("a CompressedCache cannot be reset: make a new one with ojakv.make_cache(model, ...)")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise OjaKVError("beam search is not supported by compressed caches: use greedy or sampling decoding")

    # --- helpers for subclasses ---
    def begin_update(self, key_states: torch.Tensor, value_states: torch.Tensor):
        """What every ``update`` starts with: lazy init, then this call's attention inputs and step inputs."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        return self.take_attention_inputs(), self.step_inputs()

    def step_inputs(self) -> StepInputs:
        """The current call's positions and padding mask (the cache checked the hooks announced them)."""
        return self.shared.step

    def take_attention_inputs(self) -> AttentionInputs:
        """The attention inputs of this call, released so no activations outlive the step."""
        return self.shared.take_attention_inputs(self.layer_idx)

    def segments(self) -> dict[str, int]:
        """Bytes held per named segment (e.g. ``anchors``, ``body``, ``bases``)."""
        raise NotImplementedError

    def layout(self) -> Terms:
        """How this layer holds tokens, as named terms (``ojakv.layout``); none by default, when the method's
        knobs say it all."""
        return {}

    def full_bytes(self) -> int:
        """Bytes a full cache would hold for this layer's tokens: keys and values, in the model's dtype."""
        if not self.is_initialized:
            return 0
        g = self.shared.geometry
        element = torch.empty(0, dtype=self.dtype).element_size()
        return 2 * self.batch_size * g.num_kv_heads * self.seen * g.head_dim * element


def growable_segments(**groups: tuple[GrowableTensor, ...]) -> dict[str, int]:
    """Bytes in use per named group of growable buffers, plus their spare capacity as one ``growth_slack``."""
    segments = {name: sum(b.used_bytes for b in buffers) for name, buffers in groups.items()}
    segments["growth_slack"] = sum(b.nbytes - b.used_bytes for buffers in groups.values() for b in buffers)
    return segments


class FullLayer(CacheLayer):
    """Every key and value at full precision, stored exactly as ``transformers.DynamicCache`` stores them.

    It is the baseline users have today, so it keeps DynamicCache's storage policy too (one exact-size tensor,
    re-concatenated per step): its memory and speed are the reference, not an improved full cache.
    """

    def __init__(self, layer_idx: int, shared: SharedState):
        super().__init__(layer_idx, shared)
        self.keys = self.values = None

    def update(self, key_states, value_states, *args, **kwargs):
        self.begin_update(key_states, value_states)
        if self.keys is None:
            self.keys, self.values = key_states, value_states
        else:
            self.keys = torch.cat([self.keys, key_states], dim=-2)
            self.values = torch.cat([self.values, value_states], dim=-2)
        self.seen += key_states.shape[-2]
        return self.keys, self.values

    def segments(self) -> dict[str, int]:
        return {"full": nbytes(self.keys, self.values)}


class ObserverLayer(CacheLayer):
    """Stores nothing: hands each call's keys, values and attention inputs to ``observe(layer, keys, values,
    attention, step)`` and returns this call's K/V. For measurements that read a model's attention (calibration,
    PoD's layer similarity)."""

    def __init__(self, layer_idx: int, shared: SharedState, observe):
        super().__init__(layer_idx, shared)
        self.observe = observe

    def update(self, key_states, value_states, *args, **kwargs):
        attention, step = self.begin_update(key_states, value_states)
        self.observe(self, key_states, value_states, attention, step)
        self.seen += key_states.shape[2]
        return key_states, value_states

    def segments(self) -> dict[str, int]:
        return {}


def observe_forward(model, input_ids: torch.Tensor, observe, *, method: str) -> None:
    """One forward pass of ``model`` on ``input_ids`` [b, n] with every layer an ``ObserverLayer``."""
    plan = LayerPlan(lambda i, shared: ObserverLayer(i, shared, observe), track_positions=False, config={})
    with CompressedCache(model, plan, method=method) as cache, torch.no_grad():
        ids = input_ids.to(next(model.parameters()).device)
        model(input_ids=ids, use_cache=True, **cache_kwargs(model, cache))


class SlidingWindowLayer(FullLayer):
    """A sliding-window attention layer (Gemma 2 / 3, Mistral v0.1), kept as ``DynamicCache`` keeps it: the last
    ``window - 1`` tokens at full precision. No method compresses it: it is small and bounded already, and its
    attention pattern is the model's own; the method chosen applies to the global-attention layers."""

    is_sliding = True

    def __init__(self, layer_idx: int, shared: SharedState, window: int):
        super().__init__(layer_idx, shared)
        self.window = window

    def update(self, key_states, value_states, *args, **kwargs):
        keys, values = super().update(key_states, value_states)
        self.keys, self.values = keys[..., -(self.window - 1) :, :], values[..., -(self.window - 1) :, :]
        return keys, values  # this call's queries still see the whole window, as in transformers

    def returned_length(self) -> int:
        return min(self.seen, self.window - 1)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.returned_length() + query_length, self.seen - self.returned_length()

    def get_max_length(self) -> int:
        return self.window

    def full_bytes(self) -> int:
        return nbytes(self.keys, self.values)  # DynamicCache holds exactly the same window


@dataclass
class LayerPlan:
    """How a cache's layers are made: ``factory(layer_idx, shared)`` for each global-attention layer, whether
    token positions are stored for all layers, and the method's knobs (reported as ``cache.config``)."""

    factory: Callable[[int, SharedState], CacheLayer]
    track_positions: bool
    config: dict
    sliding_too: bool = False  # the factory also makes the sliding-window layers (to observe every layer)


class PendingLayer(CacheLayer):
    """Stands in for a layer until the prompt arrives, when a budget becomes knobs and the real layers are made."""

    def update(self, key_states, value_states, *args, **kwargs):
        raise HooksMissed(f"layer {self.layer_idx} was never built")

    def segments(self) -> dict[str, int]:
        return {}


def _release_all(releases: list) -> None:
    while releases:
        releases.pop()()


class CompressedCache(HookedCache):
    """A KV cache for ``model.generate`` or hand-written loops, one layer object per layer.

    Build it with ``ojakv.make_cache(model, method=..., **knobs)``; ``memory()`` reports what it holds. Give either
    ``plan`` (layers made now) or ``plan_for_prompt(prompt_tokens) -> LayerPlan`` (made at the first forward call,
    when the prompt's length is known: how ``budget=`` is resolved).
    """

    def __init__(self, model, plan: LayerPlan | None = None, *, method: str,
                 plan_for_prompt: Callable[[int], LayerPlan] | None = None):
        if (plan is None) == (plan_for_prompt is None):
            raise ValueError("give exactly one of plan and plan_for_prompt")
        self.method = method
        self._model = model
        self._windows = sliding_windows(model)
        self._releases: list = [attach(model)]
        self._finalizer = weakref.finalize(self, _release_all, self._releases)
        self._plan_for_prompt = plan_for_prompt
        if plan is not None:
            layers = self._build(plan)
        else:
            self.shared, self.config = SharedState(model, track_positions=False), {}
            self.uses_latent_attention = False
            layers = [PendingLayer(i, self.shared) for i in range(len(self._windows))]
        super().__init__(layers=layers)

    def _build(self, plan: LayerPlan) -> list[CacheLayer]:
        self.shared = SharedState(self._model, plan.track_positions)
        self.config = plan.config
        layers = [SlidingWindowLayer(i, self.shared, window) if window and not plan.sliding_too
                  else plan.factory(i, self.shared) for i, window in enumerate(self._windows)]
        self.uses_latent_attention = any(getattr(layer, "latent", False) for layer in layers)
        if self.uses_latent_attention:
            self._releases.append(attach(self._model, latent_attention=True))
        return layers

    # --- lifetime ---------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Take this cache's hooks off the model (and give it back its attention implementation if this was the
        last cache using latent attention). Idempotent; a closed cache refuses further forward calls."""
        self._finalizer()

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def fork(self) -> "CompressedCache":
        """An independent copy of everything this cache holds, on the same model: e.g. one compressed context,
        then several questions asked of it, each from the state after the context."""
        if self.closed or self._plan_for_prompt is not None:
            raise OjaKVError("fork a cache after its prompt and before closing it")
        twin = copy.copy(self)
        memo = {id(module): module for module in self._model.modules()}  # the model is shared, not copied
        twin.layers, twin.shared = copy.deepcopy((self.layers, self.shared), memo)
        twin._releases = [attach(self._model, latent_attention=self.uses_latent_attention)]
        twin._finalizer = weakref.finalize(twin, _release_all, twin._releases)
        return twin

    def __enter__(self) -> "CompressedCache":
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

    # --- what the hooks tell ----------------------------------------------------------------------------------
    def begin_forward(self, attention_mask, position_ids, batch: int, q: int, device) -> None:
        if self.closed:
            raise OjaKVError("this cache was closed: make a new one with ojakv.make_cache(model, ...)")
        if self._plan_for_prompt is not None:
            plan, self._plan_for_prompt = self._plan_for_prompt(q), None
            self.layers[:] = self._build(plan)
        self.shared.begin_forward(attention_mask, position_ids, batch, q, device)

    def receive_attention_inputs(self, layer_idx: int, inputs: AttentionInputs) -> None:
        self.shared.attention_inputs[layer_idx] = inputs

    def returned_length(self, layer_idx: int) -> int:
        return self.layers[layer_idx].returned_length()

    # --- transformers' cache protocol -------------------------------------------------------------------------
    @property
    def is_compileable(self) -> bool:
        return False

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].get_seq_length()

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        """Sizes for the one mask transformers builds per forward: the longest any layer returns.

        Layers that return fewer tokens (per-layer budgets) take the mask's last columns in the attention
        pre-hook; kept tokens always map to the last columns, so the slice is exact.
        """
        if self.layers[layer_idx].is_sliding:  # the sliding-window mask (hybrid models) is sized by its own layer
            return self.layers[layer_idx].get_mask_sizes(query_length)
        longest = max(layer.returned_length() for layer in self.layers if not layer.is_sliding)
        return longest + query_length, self.layers[0].seen - longest

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        batch, _, q, _ = key_states.shape
        self.shared.check_step(layer_idx, batch, q)
        out = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if layer_idx == len(self.layers) - 1:
            self.shared.end_forward()  # nothing computed for this step outlives it
        return out

    def layout(self) -> Terms:
        """The configuration this cache resolved to (``ojakv.layout``): its layers' terms merged, numbers
        averaged over layers; or, for a method without such terms, its knobs. A budgeted cache knows it only
        once it has seen the prompt."""
        if self._plan_for_prompt is not None:
            return dict(RESOLVED_AT_PREFILL)
        terms = merge_terms([layer.layout() for layer in self.layers if not layer.is_sliding])
        return terms or {name: value for name, value in self.config.items() if value is not None}

    def describe(self) -> str:
        """``layout()`` as one line, after the method's name: what ``ojakv generate`` and ``memory()`` show."""
        terms = self.layout()
        return f"{self.method}: {describe(terms)}" if terms else self.method

    def memory(self) -> MemoryReport:
        return MemoryReport(
            full_bytes=sum(layer.full_bytes() for layer in self.layers),
            per_layer=[layer.segments() for layer in self.layers],
            shared=self.shared.memory(),
            layout=self.describe(),
        )
