"""``pod``: cross-layer key sharing for distant tokens, grouped per KV head by attention similarity.

PoD (Ma et al., "Compressing KV Cache for Long-Context LLM Inference with Inter-Layer Attention Similarity",
arXiv 2412.02252) observes that consecutive layers attend alike to distant tokens. Offline, each KV head's layers
are grouped greedily: a layer joins the group of the layers before it while its attention over distant tokens
stays similar (≥ ``delta``) to the group's first layer, the base. In a group, only the base stores the distant
tokens' keys of that head; the other layers reuse them and keep their own keys only for the proximal tokens
(the first ``n_sink`` real tokens and the last ``window``). Values always stay per layer.

**Training-free variant.** The paper then post-trains the model to adapt to the shared keys; ojakv does not:
the model runs as it is, every layer attending with its own queries to the base layer's distant keys. That costs
accuracy: on SmolLM2-135M, δ = 0.5 shares 26 of 90 layer-heads (held 0.88 of the full cache at 3K tokens) and
misses the 3K-token pass key on all three test prompts; δ = 0.8 (6 shared) finds it on the one prompt tried.

Similarity (decided here, the paper leaves room): for a query, its attention over the distant keys (keys older
than ``SIM_WINDOW`` tokens before it, sink tokens excluded; query heads of a KV group averaged, then renormalised
to a distribution), compared between two layers by overlap Σ min(p_a, p_b) (1 − total variation distance, in
[0, 1]), averaged over queries from the second half of a few calibration prompts. The artefact keeps the whole
layer × layer matrix per KV head, so any ``delta`` and ``max_group`` are served from one file; ``delta ≤ 0``
groups every layer (capped by ``max_group``) and ``delta > 1`` none, whatever the similarities, so those need no
file. The file is a safetensors with the model fingerprint in its metadata, made on first use from the essays'
calibration split and cached beside the calibration spectra; a file made for another model is refused.

Storage per layer: values of every token (all heads); for each KV head it is the base of, every key; for each
head it shares, the keys of the first sink columns (left padding + ``n_sink``, so every sequence keeps at least its
first ``n_sink`` real tokens) and of the last ``window`` tokens. Shared heads' keys are rebuilt at every call as
own sinks + the base layer's keys for the columns between + own recent window. Base layers have lower indices, so
they have already stored this call's keys when a later layer asks for them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..artefact import ArtefactKind
from ..atomic import atomic_path
from ..cache import CacheLayer, SharedState, growable_segments, observe_forward
from ..errors import OjaKVError
from ..memory import nbytes
from ..hf import compute_queries, geometry
from ..models import fingerprint
from ..scores import grouped_logits
from ..storage import GrowableTensor
from . import Method, Sizing, knob, largest_within, register

FORMAT_VERSION = "1"
ARTEFACT = ArtefactKind("pod grouping", FORMAT_VERSION, folder="pod", made="measured",
                        remake="measure it with ojakv.methods.pod.make_similarity")
# Proximal tokens left out of the similarity. Fixed (not the cache's knobs) so that one file serves every setting.
SIM_SINK, SIM_WINDOW = 4, 128
QUERIES_PER_PROMPT = 64  # evenly spaced over the second half of each prompt
CALIBRATION_PROMPTS, PROMPT_TOKENS = 4, 1024  # about 50 s on 2 CPU cores for SmolLM2-135M


@dataclass
class PoDConfig:
    delta: float = knob(0.5, "similarity to the group's base layer needed to share its keys (≤0: all, >1: none)")
    n_sink: int = knob(4, "first real tokens whose keys every layer keeps")
    window: int = knob(128, "most recent tokens whose keys every layer keeps")
    max_group: int = knob(0, "most layers per group (0: no cap)")
    grouping: str = knob("", "similarity file (default: made from the calibration essays on first use, cached)")

    def validate(self) -> None:
        if self.n_sink < 0 or self.window < 1:
            raise OjaKVError(f"pod needs n_sink >= 0 and window >= 1, got {self.n_sink}, {self.window}")
        if self.max_group < 0:
            raise OjaKVError(f"max_group is a number of layers (0 for no cap), got {self.max_group}")

    def needs_similarity(self) -> bool:
        return 0.0 < self.delta <= 1.0


# --- measuring similarity ----------------------------------------------------------------------------------


def _query_rows(n: int) -> torch.Tensor:
    first = max(n // 2, SIM_SINK + SIM_WINDOW + 1)  # a query needs distant keys
    if n <= first:
        raise OjaKVError(f"a similarity prompt of {n} tokens is too short: give at least {first + 1} tokens")
    return torch.linspace(first, n - 1, min(QUERIES_PER_PROMPT, n - first)).round().long().unique()


def distant_attention(keys: torch.Tensor, attention, rows: torch.Tensor) -> torch.Tensor:
    """Attention of the queries at ``rows`` over their distant keys, per KV head (group's query heads averaged),
    renormalised to sum to one: [b, h, Q, n]. Prompts are unpadded."""
    b, h, n, d = keys.shape
    module = attention.module
    queries = compute_queries(module, attention.hidden_states[:, rows], attention.cos[:, rows],
                              attention.sin[:, rows])
    logits = grouped_logits(queries, keys, module)
    columns = torch.arange(n, device=keys.device)
    rows = rows.to(keys.device)
    probs = torch.softmax(logits.masked_fill(columns > rows[:, None], float("-inf")), dim=-1).mean(2)
    distant = (columns >= SIM_SINK) & (columns < rows[:, None] - SIM_WINDOW)  # [Q, n]
    probs = probs * distant
    return probs / probs.sum(-1, keepdim=True).clamp_min(1e-30)


def _pairwise_overlap(records: list[torch.Tensor]) -> torch.Tensor:
    """Mean over sequences and queries of Σ min(p_a, p_b) = 1 − ½ Σ |p_a − p_b|, for every pair of layers:
    [L, L, h]. (``cdist`` computes the L1 distances without an L × L × n temporary.)"""
    layers, (b, h, q, n) = len(records), records[0].shape
    flat = torch.stack(records, dim=3).reshape(b * h * q, layers, n)  # [b·h·Q, L, n]
    overlap = 1 - torch.cdist(flat, flat, p=1) / 2
    return overlap.view(b, h, q, layers, layers).mean((0, 2)).permute(1, 2, 0)


def attention_similarity(model, ids, *, progress: bool = False) -> torch.Tensor:
    """Similarity [L, L, h] of every two layers' attention over distant tokens, per KV head, measured on token
    ids: one tensor [b, n] or [n], or a list of them (unpadded prompts). Deterministic for given ids."""
    prompts = [ids] if isinstance(ids, torch.Tensor) else list(ids)
    total = None
    for prompt in tqdm(prompts, desc="pod: measuring inter-layer attention similarity", unit="prompt",
                       disable=not progress):
        records: dict[int, torch.Tensor] = {}

        def record(layer, key_states, value_states, attention, step) -> None:
            records[layer.layer_idx] = distant_attention(key_states, attention, _query_rows(key_states.shape[2]))

        observe_forward(model, prompt.view(-1, prompt.shape[-1]), record, method="pod-probe")
        overlap = _pairwise_overlap([records[i] for i in range(len(records))]).double().cpu()
        total = overlap if total is None else total + overlap
    return (total / len(prompts)).float()


# --- grouping ----------------------------------------------------------------------------------------------


def group_layers(similarity: torch.Tensor, delta: float, max_group: int = 0) -> torch.Tensor:
    """Base layer [L, h] of every layer and KV head: consecutive layers join the group of the layer before them
    while their similarity to the group's first layer is ≥ ``delta`` and the group has fewer than ``max_group``
    layers (0: no cap). A base is its own base."""
    layers, _, heads = similarity.shape
    bases = torch.zeros(layers, heads, dtype=torch.long)
    for head in range(heads):
        base = 0
        for layer in range(1, layers):
            capped = max_group and layer - base >= max_group
            if capped or similarity[base, layer, head] < delta:
                base = layer
            bases[layer, head] = base
    return bases


def layer_bases(model, config: PoDConfig) -> torch.Tensor:
    """The grouping a cache with ``config`` uses on ``model``: base layer [L, h]."""
    g = geometry(model)
    if config.needs_similarity():
        similarity = load_similarity(model, config.grouping or None)
    else:  # δ ≤ 0 groups everything and δ > 1 nothing, whatever the similarity: no file needed
        similarity = torch.ones(g.num_layers, g.num_layers, g.num_kv_heads)
    return group_layers(similarity, config.delta, config.max_group)


# --- the similarity file -----------------------------------------------------------------------------------


def default_path(model) -> Path:
    return ARTEFACT.default_path(model)


def save_similarity(model, similarity: torch.Tensor, path: str | os.PathLike | None = None,
                    source: str = "user token ids") -> Path:
    """Write a similarity matrix [L, L, h] for ``model`` atomically, with its fingerprint."""
    g = geometry(model)
    if tuple(similarity.shape) != (g.num_layers, g.num_layers, g.num_kv_heads):
        raise OjaKVError(f"similarity has shape {tuple(similarity.shape)}, this model needs "
                         f"{(g.num_layers, g.num_layers, g.num_kv_heads)}: measure it with attention_similarity")
    metadata = {"format": FORMAT_VERSION, "fingerprint": fingerprint(model), "model_type": g.model_type,
                "geometry": json.dumps([g.num_layers, g.num_kv_heads]), "measure": "overlap sum(min(p_a, p_b))",
                "sim_sink": str(SIM_SINK), "sim_window": str(SIM_WINDOW), "source": source}
    target = Path(path) if path is not None else default_path(model)
    with atomic_path(target) as tmp:
        save_file({"similarity": similarity.float().contiguous()}, str(tmp), metadata=metadata)
    return target


def make_similarity(model, tokenizer, path: str | os.PathLike | None = None, *, progress: bool = True) -> Path:
    """Measure the similarity on the essays' calibration split (disjoint from benchmark text) and save it."""
    from ..data import essay_text

    ids = tokenizer(essay_text("calibration"), return_tensors="pt", add_special_tokens=False).input_ids[0]
    length = min(PROMPT_TOKENS, geometry(model).max_context)
    prompts = list(ids[: CALIBRATION_PROMPTS * length].split(length))
    prompts = [p for p in prompts if p.numel() > SIM_SINK + SIM_WINDOW + 2]
    similarity = attention_similarity(model, prompts, progress=progress)
    return save_similarity(model, similarity, path, source=f"essays, calibration split, {len(prompts)} prompts")


def load_similarity(model, path: str | os.PathLike | None = None) -> torch.Tensor:
    """The checked similarity [L, L, h] for ``model``; without a path the cached one, made on first use."""
    tensors, _ = ARTEFACT.load(
        model, path, make_similarity, missing="omit grouping= to make one from the essays",
        no_tokenizer="no pod grouping for this model yet: call ojakv.methods.pod.make_similarity(model, tokenizer), "
                     "load the model with ojakv.load_model, or use delta <= 0 (group all)",
    )
    similarity = tensors.get("similarity")
    g = geometry(model)
    if similarity is None or tuple(similarity.shape) != (g.num_layers, g.num_layers, g.num_kv_heads):
        raise OjaKVError(f"{path or default_path(model)} does not match this model's shape: measure it again "
                         "with make_similarity")
    return similarity


# --- storage -----------------------------------------------------------------------------------------------


class PoDLayer(CacheLayer):
    """Values of every token; keys of every token for the heads it is the base of, proximal keys for the rest.

    Per-head keys are [b, n, d] (heads own or share independently); ``layers`` is the cache's registry, through
    which a shared head reaches its base layer's keys.
    """

    def __init__(self, layer_idx: int, shared: SharedState, config: PoDConfig, bases: list[int], layers: dict):
        super().__init__(layer_idx, shared)
        self.config = config
        self.bases = bases
        self.layers = layers
        self.values_buf = GrowableTensor()  # `keys`/`values` belong to transformers' layer protocol
        self.owned = [GrowableTensor(dim=1) if base == layer_idx else None for base in bases]
        self.sinks = [None if base == layer_idx else GrowableTensor(dim=1) for base in bases]
        self.recent: list[torch.Tensor | None] = [None] * len(bases)
        self.sink_columns = config.n_sink  # grows by each call's left padding (a prefill may come in chunks)

    def update(self, key_states, value_states, *args, **kwargs):
        _, step = self.begin_update(key_states, value_states)
        # Left padding is a prefix and the most-padded row is the same in every call, so the per-call maxima add
        # up to the longest padding even when the first chunk is shorter than it.
        self.sink_columns += int((~step.valid).sum(-1).max())
        self.values_buf.append(value_states)
        for head, base in enumerate(self.bases):
            if base == self.layer_idx:
                self.owned[head].append(key_states[:, head])
            else:
                self._keep_proximal(head, key_states[:, head])
        self.seen += key_states.shape[2]
        return self.attention_keys(), self.values_buf.view

    def _keep_proximal(self, head: int, new: torch.Tensor) -> None:
        """Sink columns until there are ``sink_columns`` of them, then the last ``window`` of the rest."""
        sinks = self.sinks[head]
        take = min(max(self.sink_columns - sinks.length, 0), new.shape[1])
        if take:
            sinks.append(new[:, :take])
        rest = new[:, take:]
        recent = rest if self.recent[head] is None else torch.cat([self.recent[head], rest], dim=1)
        self.recent[head] = recent[:, -self.config.window :].clone()  # exact size: no view of a larger tensor

    def attention_keys(self) -> torch.Tensor:
        """Keys as attention sees them [b, h, n, d]: shared heads get the base layer's keys between their own
        sink and recent columns."""
        return torch.stack([self._head_keys(head, base) for head, base in enumerate(self.bases)], dim=1)

    def _head_keys(self, head: int, base: int) -> torch.Tensor:
        if base == self.layer_idx:
            return self.owned[head].view
        base_layer = self.layers[base]
        if base_layer.seen != self.seen:
            raise OjaKVError("pod layers must all run in every forward call, in layer order: use one cache per "
                             "generation with the whole model")
        sinks, recent = self.sinks[head].view, self.recent[head]
        start = 0 if sinks is None else sinks.shape[1]
        distant = base_layer.owned[head].view[:, start : self.seen - recent.shape[1]]
        return torch.cat([part for part in (sinks, distant, recent) if part is not None], dim=1)

    def segments(self) -> dict[str, int]:
        owned = tuple(buffer for buffer in self.owned if buffer is not None)
        sinks = tuple(buffer for buffer in self.sinks if buffer is not None)
        segments = growable_segments(values=(self.values_buf,), keys=owned, proximal_keys=sinks)
        segments["proximal_keys"] += nbytes(*self.recent)
        return segments


def _build(model, config: PoDConfig):
    bases = layer_bases(model, config).tolist()
    layers: dict[int, PoDLayer] = {}  # this cache's layers, so a shared head can reach its base

    def factory(layer_idx: int, shared: SharedState) -> PoDLayer:
        layers[layer_idx] = PoDLayer(layer_idx, shared, config, bases[layer_idx], layers)
        return layers[layer_idx]

    return factory, False


def held_fraction(layers: int, group_size: int, n_tokens: int, proximal: int) -> float:
    """Held / full bytes when every KV head's layers form groups of ``group_size`` (values full, keys once per
    group plus each other layer's ``proximal`` tokens); padding and growth slack ignored."""
    groups = -(-layers // group_size)
    kept = min(proximal, n_tokens)
    return (layers * n_tokens + groups * n_tokens + (layers - groups) * kept) / (2 * layers * n_tokens)


def _for_budget(knobs, geometry, prompt_tokens, new_tokens, dtype_bytes, budget) -> Sizing:
    """A budget sets the group size: ``delta = 0`` (group regardless of similarity, so the bytes are predictable)
    and the ``max_group`` whose held fraction comes closest. Values stay per layer, so below about half the full
    cache (one key copy per head, plus proximal keys) no group size reaches it."""
    config = PoDConfig(**{k: v for k, v in knobs.items() if k not in ("delta", "max_group")})
    n, layers = prompt_tokens + new_tokens, geometry.num_layers
    proximal = config.n_sink + config.window

    def fraction(size: int) -> float:
        return held_fraction(layers, size, n, proximal)

    size = largest_within(range(layers, 0, -1), fraction, budget)  # larger groups hold less
    return Sizing({"delta": 0.0, "max_group": size}, fraction(size), fraction(layers),
                  "values stay per layer, keys at least once per KV head")


register(Method(name="pod", summary="distant tokens' keys shared across similar consecutive layers (training-free)",
                config_class=PoDConfig, build=_build, for_budget=_for_budget, size_knobs=("delta", "max_group"),
                reference="Ma et al., PoD, arXiv 2412.02252 (training-free variant)"))
