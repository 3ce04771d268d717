"""The compressed KV cache: a ``transformers.Cache`` whose layers store tokens however their method decides.

How a layer learns what it needs beyond the keys and values that ``update`` receives:
- a forward pre-hook on the decoder model tells the cache, once per forward call, the new tokens' positions and
  which of them are padding (from ``position_ids`` and the 2-D ``attention_mask``), so padding never enters a
  basis or a score and keys can be rotated back to their own positions;
- a forward pre-hook on each attention module hands its layer the hidden states and the RoPE angles of the call,
  from which a layer can undo RoPE on the new keys or recompute queries (for query-aware token scores).
Both hooks look at ``past_key_values`` and do nothing unless it is a ``CompressedCache``, so a model stays usable
with any other cache, and the hooks keep no reference to a cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from . import attention as latent_attention
from .errors import OjaKVError
from .memory import MemoryReport, nbytes
from .models import attention_modules, base_model, geometry, rotary_embedding, sliding_windows
from .storage import GrowableTensor


@dataclass
class StepInputs:
    """What one forward call brings: positions [b, q] and a validity mask [b, q] (False = padding)."""

    positions: torch.Tensor
    valid: torch.Tensor


@dataclass
class AttentionInputs:
    """The attention module's inputs for the current call (held only until the layer's ``update`` returns)."""

    module: torch.nn.Module
    hidden_states: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor


class SharedState:
    """State shared by all layers of one cache: model geometry, the current step, and token positions."""

    def __init__(self, model, track_positions: bool):
        self.geometry = geometry(model)
        self.rotary = rotary_embedding(model)
        self.step: StepInputs | None = None
        self._step_memo: dict = {}  # cleared at every forward call and after the last layer
        self.seen = 0
        # Positions of every cached token, stored once for all layers (int32) when a layer needs to re-apply
        # RoPE at reconstruction; counted in the memory report.
        self.positions = GrowableTensor(dim=1) if track_positions else None

    def begin_forward(self, attention_mask, position_ids, batch: int, q: int, device) -> None:
        if position_ids is None:
            position_ids = torch.arange(self.seen, self.seen + q, device=device).unsqueeze(0)
        positions = position_ids.expand(batch, q).to(device)
        if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape[-1] >= q:
            valid = attention_mask[:, -q:].to(device).bool()
        else:
            valid = torch.ones(batch, q, dtype=torch.bool, device=device)
        self.step = StepInputs(positions=positions, valid=valid)
        self._step_memo = {}
        self.seen += q
        if self.positions is not None:
            self.positions.append(positions.to(torch.int32))

    def rope_angles(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [*positions.shape, d] (float32) for positions [b, n] (or [b, h, n]), from the model's own rotary
        module."""
        probe = torch.empty(0, dtype=torch.float32, device=positions.device)
        cos, sin = self.rotary(probe, positions.reshape(positions.shape[0], -1).long())
        return cos.view(*positions.shape, cos.shape[-1]), sin.view(*positions.shape, sin.shape[-1])

    def end_forward(self) -> None:
        self._step_memo = {}

    def span_angles(self, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of the stored tokens [start, start + count), computed once per forward call for all layers
        (every layer asks for the same span when it rebuilds its body)."""
        return self.step_memo(("span", start, count),
                              lambda: self.rope_angles(self.positions.view[:, start : start + count]))

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
    needs_positions = False  # set by layers that re-apply RoPE to stored keys

    def __init__(self, layer_idx: int, shared: SharedState):
        super().__init__()
        self.layer_idx = layer_idx
        self.shared = shared
        self.seen = 0  # tokens seen by this layer: what `get_seq_length` reports, so positions stay right
        self.dtype: torch.dtype | None = None
        self.batch_size = 0
        self.attention_inputs: AttentionInputs | None = None

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
        attention = self.take_attention_inputs()
        batch, _, q, _ = key_states.shape
        return attention, self.step_inputs(batch, q, key_states.device)

    def step_inputs(self, batch: int, q: int, device) -> StepInputs:
        """The current call's positions and padding mask; defaults when no hook told us (no padding)."""
        step = self.shared.step
        if step is not None and step.valid.shape == (batch, q):
            return step
        positions = torch.arange(self.seen, self.seen + q, device=device).expand(batch, q)
        return StepInputs(positions=positions, valid=torch.ones(batch, q, dtype=torch.bool, device=device))

    def take_attention_inputs(self) -> AttentionInputs | None:
        """The attention inputs of this call, released so no activations outlive the step."""
        inputs, self.attention_inputs = self.attention_inputs, None
        return inputs

    def segments(self) -> dict[str, int]:
        """Bytes held per named segment (e.g. ``anchors``, ``body``, ``bases``)."""
        raise NotImplementedError

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
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.take_attention_inputs()
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
    cache = CompressedCache(model, lambda i, shared: ObserverLayer(i, shared, observe), method=method, config={})
    with torch.no_grad():
        model(input_ids=input_ids.to(next(model.parameters()).device), past_key_values=cache, use_cache=True)


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


class CompressedCache(Cache):
    """A KV cache for ``model.generate(past_key_values=...)`` or hand-written loops, one layer object per layer.

    Build it with ``ojakv.make_cache(model, method=..., **knobs)``; ``memory()`` reports what it holds.
    """

    def __init__(self, model, layer_factory, *, method: str, config: dict, track_positions: bool = False):
        install_hooks(model)
        self.shared = SharedState(model, track_positions)
        layers = [SlidingWindowLayer(i, self.shared, window) if window else layer_factory(i, self.shared)
                  for i, window in enumerate(sliding_windows(model))]
        if any(getattr(layer, "latent", False) for layer in layers):
            latent_attention.enable(model)
        super().__init__(layers=layers)
        self.method = method
        self.config = config

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

    def begin_forward(self, attention_mask, position_ids, batch: int, q: int, device) -> None:
        self.shared.begin_forward(attention_mask, position_ids, batch, q, device)

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        out = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if layer_idx == len(self.layers) - 1:
            self.shared.end_forward()  # nothing computed for this step outlives it
        return out

    def memory(self) -> MemoryReport:
        return MemoryReport(
            full_bytes=sum(layer.full_bytes() for layer in self.layers),
            per_layer=[layer.segments() for layer in self.layers],
            shared=self.shared.memory(),
        )


# --- hooks -----------------------------------------------------------------------------------------------

_HOOKED = "_ojakv_hooks_installed"


def _model_pre_hook(module, args, kwargs):
    cache = kwargs.get("past_key_values")
    if not isinstance(cache, CompressedCache):
        return None
    tokens = kwargs.get("input_ids")
    if tokens is None and args:
        tokens = args[0]
    if tokens is None:
        tokens = kwargs.get("inputs_embeds")
    if tokens is None:
        return None
    batch, q = tokens.shape[0], tokens.shape[1]
    cache.begin_forward(kwargs.get("attention_mask"), kwargs.get("position_ids"), batch, q, tokens.device)
    return None


def _attention_pre_hook(module, args, kwargs):
    cache = kwargs.get("past_key_values")
    if not isinstance(cache, CompressedCache):
        return None
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    angles = kwargs.get("position_embeddings")
    if hidden is None or angles is None:
        return None
    cos, sin = angles
    layer = cache.layers[module.layer_idx]
    layer.attention_inputs = AttentionInputs(module, hidden, cos, sin)
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 4:
        length = layer.returned_length() + hidden.shape[1]
        if mask.shape[-1] > length:  # this layer keeps fewer tokens than the longest: its columns are the last
            return args, {**kwargs, "attention_mask": mask[..., -length:]}
    return None


def install_hooks(model) -> None:
    """Attach the two pre-hooks once per model (idempotent; they are inert for other caches)."""
    if getattr(model, _HOOKED, False):
        return
    base_model(model).register_forward_pre_hook(_model_pre_hook, with_kwargs=True)
    for attention in attention_modules(model):
        attention.register_forward_pre_hook(_attention_pre_hook, with_kwargs=True)
    setattr(model, _HOOKED, True)
