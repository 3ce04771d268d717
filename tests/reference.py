"""Slow, explicit references for the compression methods (test code, not the library).

Each reference runs the model on a plain ``DynamicCache`` (every key and value at full precision) through one
custom attention function, registered with transformers' ``AttentionInterface``, that computes eager attention
itself and lets a ``Reference`` object change what attention sees:

- token selection / eviction (snapkv, pyramidkv, h2o-prefill, h2o, streaming-llm): a per-layer, per-KV-head
  boolean mask over the full cache, decided by the reference from the attention probabilities it computes itself
  (never from the library's selection code);
- low rank (ojakv with eta_decode = 0, staticpca(-h), eigen, mla-latent): every non-anchor token's key and value
  replaced by its projection U Uᵀ x (pre-RoPE keys: RoPE undone, projected, redone). The bases are inputs, taken
  from the library's layers after the run (they are fixed when eta = 0);
- quantization (kivi, turboquant, ojakv+quant, ojakv-tc): the tokens the policy says are quantized are fake-quantized
  (quantized and rebuilt in plain float: KIVI's asymmetric min/max rule; TurboQuant's rotation, norm and nearest
  Lloyd–Max centroid; OjaKV's coefficients through the min/max rule, or transform coded). Turboquant and ojakv+quant settle float16
  near-ties (norms, scales, minima within 1e-5 of a rounding tie) by the value the library stored, as bases are
  taken; any other decision near its boundary makes the example ambiguous;
- selective decode (ojakv's ``select_tokens``): the low-rank projection, and in decode calls only the chunks whose
  mean exact key scores highest stay visible;
- composition (snapkv+ojakv): the SnapKV mask, and the low-rank projection of the held tokens;
- cross-layer key sharing (pod): a shared layer's distant keys replaced by its group's base layer's keys.

``run(model, reference, ids, mask, chunks, decode_ids)`` and ``run(model, cache, ...)`` drive the same calls
(prefill in chunks, then single-token decode steps with given tokens) and return the logits of every real token.
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager

import torch
from transformers import AttentionInterface, DynamicCache

from helpers import kv
from ojakv.methods.turboquant import _derive_seed, random_rotations
from ojakv.quantize import codebook
from ojakv.transform_coding import shape_codebook

NAME = "ojakv_reference"
_ACTIVE: list["Reference"] = []


# --- driving ----------------------------------------------------------------------------------------------------


def positions_for(mask: torch.Tensor) -> torch.Tensor:
    """Position ids as ``generate`` makes them from a left-padding mask (padding gets position 1)."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)


def run(model, cache_or_reference, ids, mask, chunks, decode_ids) -> list[torch.Tensor]:
    """Logits [b, q, vocab] of every call: the prompt ``ids`` [b, n] in calls of ``chunks`` tokens (summing to n),
    then one call per column of ``decode_ids`` [b, steps]. Padded query rows are zeroed (no output is defined
    for them)."""
    full_ids = torch.cat([ids, decode_ids], dim=1)
    full_mask = torch.cat([mask, torch.ones_like(decode_ids)], dim=1)
    positions = positions_for(full_mask)
    calls = list(chunks) + [1] * decode_ids.shape[1]
    reference = cache_or_reference if isinstance(cache_or_reference, Reference) else None
    cache = DynamicCache(config=model.config) if reference is not None else cache_or_reference
    outputs, end = [], 0
    with _reference_model(model, reference) as runner, torch.no_grad():
        for q in calls:
            start, end = end, end + q
            if reference is not None:
                reference.begin_call(full_mask[:, :end].bool(), positions[:, :end], q)
            logits = runner(input_ids=full_ids[:, start:end], attention_mask=full_mask[:, :end],
                            position_ids=positions[:, start:end], **kv(cache), use_cache=True).logits
            outputs.append(logits.float() * full_mask[:, start:end, None])
    return outputs


@contextmanager
def _reference_model(model, reference):
    if reference is None:
        yield model
        return
    if NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(NAME, reference_attention)
    twin = copy.deepcopy(model)  # same weights, own attention implementation; the caller's model is untouched
    twin.config._attn_implementation = NAME
    for module in twin.modules():
        if hasattr(module, "config") and module.config is not twin.config:
            module.config._attn_implementation = NAME
    reference.model = twin
    _ACTIVE.append(reference)
    try:
        yield twin
    finally:
        _ACTIVE.pop()


def reference_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Eager attention with the mask built here: causal, padding, and the reference's per-KV-head keep mask.

    transformers builds no mask for an implementation missing from its mask interface, so ``attention_mask`` is
    None and every visibility rule is explicit below."""
    reference = _ACTIVE[-1]
    layer = module.layer_idx
    attended = reference.query_keep_mask(layer, query, key)  # from the exact keys, before any transform
    key, value = reference.transform(layer, key, value)
    b, heads, q, d = query.shape
    kv_heads, total = key.shape[1], key.shape[2]
    group = heads // kv_heads
    valid = reference.valid  # [b, total]
    query_index = torch.arange(total - q, total)
    causal = torch.arange(total)[None, :] <= query_index[:, None]  # [q, total]
    visible = causal[None, None] & valid[:, None, None, :]
    keep = reference.keep_mask(layer, total)  # [b, kv_heads, total] or None
    for mask in (keep, attended):
        if mask is not None:
            visible = visible & mask.repeat_interleave(group, dim=1)[:, :, None, :]
    scores = (query.float() @ key.float().repeat_interleave(group, dim=1).transpose(-1, -2)) * scaling
    probs = torch.softmax(scores.masked_fill(~visible, -math.inf), dim=-1).nan_to_num(0.0)
    probs = probs * valid[:, None, total - q :, None]  # padded query rows attend to nothing
    reference.observe(layer, probs)
    out = probs @ value.float().repeat_interleave(group, dim=1)
    return out.to(query.dtype).transpose(1, 2).contiguous(), probs


class Reference:
    """What a method should do, stated over the full cache. Subclasses override the hooks they need."""

    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self.calls = 0
        self.valid = self.positions = None
        self.q = 0
        self.min_gap = math.inf  # smallest score margin of any selection decision (ties are ambiguous)

    def begin_call(self, valid: torch.Tensor, positions: torch.Tensor, q: int) -> None:
        self.valid, self.positions, self.q = valid, positions, q
        self.calls += 1

    @property
    def first_call(self) -> bool:
        return self.calls == 1

    def transform(self, layer, keys, values):
        return keys, values

    def keep_mask(self, layer, total):
        return None

    def query_keep_mask(self, layer, query, key):
        """Columns this call's queries may see [b, kv_heads, total], decided from them and the exact keys; None: all."""
        return None

    def observe(self, layer, probs):
        pass

    def note_gap(self, ranked: torch.Tensor, cut: int) -> None:
        """Record the margin between the last chosen and the first rejected score (ranked descending)."""
        if 0 < cut < ranked.shape[-1]:
            chosen, rejected = ranked[..., cut - 1], ranked[..., cut]
            finite = torch.isfinite(chosen) & torch.isfinite(rejected)
            if finite.any():
                self.min_gap = min(self.min_gap, float((chosen - rejected)[finite].min()))


# --- token selection ---------------------------------------------------------------------------------------------


def group_mean(probs: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[b, H, q, n] -> attention summed over queries, averaged over each KV head's query group: [b, kv, n]."""
    b, heads, q, n = probs.shape
    return probs.sum(2).view(b, kv_heads, heads // kv_heads, n).mean(2)


def pooled(scores: torch.Tensor, kernel: int, how: str) -> torch.Tensor:
    """Same-length pooling over tokens with a window of ``kernel`` centred on each token, truncated at the ends
    (the mean is over the tokens inside the window)."""
    n, half = scores.shape[-1], kernel // 2
    out = torch.empty_like(scores)
    for i in range(n):
        window = scores[..., max(0, i - half) : min(n, i + half + 1)]
        out[..., i] = window.max(-1).values if how == "max" else window.mean(-1)
    return out


class SelectionReference(Reference):
    """Keeps, per layer, a boolean [b, kv_heads, tokens] of the tokens still held; new tokens are held."""

    def __init__(self, num_layers: int, kv_heads: int):
        super().__init__(num_layers)
        self.kv_heads = kv_heads
        self.held: dict[int, torch.Tensor] = {}

    def keep_mask(self, layer, total):
        if self.first_call:
            return None  # the prompt attends to itself in full; selection happens after
        held = self.held[layer]
        new = torch.ones(*held.shape[:2], total - held.shape[2], dtype=torch.bool)
        held = torch.cat([held, new], dim=-1)
        self.held[layer] = self.evict(layer, held, total - self.q)
        return self.held[layer]

    def evict(self, layer, held, before_call: int):
        """Decode-time eviction at the start of a call, over the tokens held before it (default: none)."""
        return held

    def observe(self, layer, probs):
        if self.first_call:
            self.held[layer] = self.select(layer, probs)

    def select(self, layer, probs) -> torch.Tensor:
        raise NotImplementedError

    def top_with_window(self, scores, capacity: int, window: int) -> torch.Tensor:
        """Keep the last ``window`` prompt tokens and the ``capacity - window`` best-scoring earlier real tokens,
        the same count for every sequence (at most the shortest sequence's real tokens); everything if the
        prompt fits."""
        b, h, n = scores.shape
        if capacity >= n:
            return torch.ones(b, h, n, dtype=torch.bool)
        real = self.valid[:, :n]
        keep_count = min(capacity, int(real.sum(-1).min()))
        w = min(window, keep_count)
        keep = torch.zeros(b, h, n, dtype=torch.bool)
        keep[..., n - w :] = True
        candidates = scores.masked_fill(~real[:, None, :], -math.inf)[..., : n - w]
        ranked, order = candidates.sort(dim=-1, descending=True)
        earlier = keep_count - w
        self.note_gap(ranked, earlier)
        keep.scatter_(-1, order[..., :earlier], True)
        return keep


class SnapKVReference(SelectionReference):
    def __init__(self, num_layers, kv_heads, capacity, window=32, kernel=5, pooling="avg", beta=None):
        super().__init__(num_layers, kv_heads)
        self.capacity, self.window, self.kernel, self.pooling, self.beta = capacity, window, kernel, pooling, beta

    def layer_capacity(self, layer: int, n: int) -> int:
        return self.capacity

    def select(self, layer, probs):
        n = probs.shape[-1]
        w = min(self.window, n)
        votes = group_mean(probs[:, :, n - w :], self.kv_heads)
        votes = pooled(votes, self.kernel, self.pooling)
        return self.top_with_window(votes, self.layer_capacity(layer, n), self.window)


class PyramidKVReference(SnapKVReference):
    """Per-layer capacities: selected tokens fall linearly from 2(C-w) - (C-w)/beta at the bottom to (C-w)/beta
    at the top (total num_layers × (C - w)); when the bottom exceeds the prompt's n - w it is capped there and the
    top raised to keep the total; rounding leftovers go to the top layer."""

    def layer_capacity(self, layer, n):
        c, w, m = self.capacity, self.window, self.num_layers
        per_layer, room = c - w, n - w
        if m == 1 or per_layer <= 0 or per_layer >= room:
            return c
        top = per_layer / self.beta
        bottom = 2 * per_layer - top
        if bottom >= room:
            bottom, top = room, 2 * per_layer - room
        counts = [round(bottom + (top - bottom) * i / (m - 1)) for i in range(m)]
        counts[-1] += per_layer * m - sum(counts)
        return counts[layer] + w


class H2OPrefillReference(SelectionReference):
    def __init__(self, num_layers, kv_heads, capacity, recent=8):
        super().__init__(num_layers, kv_heads)
        self.capacity, self.recent = capacity, recent

    def select(self, layer, probs):
        return self.top_with_window(group_mean(probs, self.kv_heads), self.capacity, self.recent)


class H2OReference(SelectionReference):
    """Prefill: keep heavy + recent by attention received from every prompt query. Every call adds the attention
    its queries paid (as the model computed it) to each token's score; at the start of a call, while more than
    heavy + recent tokens are held, the lowest-scored held token outside the last ``recent`` held is dropped."""

    def __init__(self, num_layers, kv_heads, heavy, recent):
        super().__init__(num_layers, kv_heads)
        self.heavy, self.recent = heavy, recent
        self.scores: dict[int, torch.Tensor] = {}

    def select(self, layer, probs):
        return self.top_with_window(group_mean(probs, self.kv_heads), self.heavy + self.recent, self.recent)

    def observe(self, layer, probs):
        super().observe(layer, probs)
        received = group_mean(probs, self.kv_heads)
        previous = self.scores.get(layer)
        if previous is not None:
            received[..., : previous.shape[-1]] += previous
        self.scores[layer] = received

    def evict(self, layer, held, before_call):
        limit = self.heavy + self.recent
        scores = self.scores[layer]
        for row in range(held.shape[0]):
            for head in range(held.shape[1]):
                tokens = held[row, head, :before_call].nonzero().flatten().tolist()
                excess = len(tokens) - limit
                if excess <= 0:
                    continue
                older = tokens[: len(tokens) - self.recent]
                # padding received no attention: it goes first (ranked -inf so ties among it are not ambiguous)
                score = {t: float(scores[row, head, t]) if self.valid[row, t] else -math.inf for t in older}
                ranked = sorted(older, key=lambda t: -score[t])
                values = torch.tensor([score[t] for t in ranked])
                self.note_gap(values, len(older) - excess)
                for token in ranked[len(older) - excess :]:
                    held[row, head, token] = False
        return held


class StreamingLLMReference(SelectionReference):
    """Keep the first ``n_sink`` real tokens of each sequence and the last ``window`` tokens; the window slides
    at the start of every call."""

    def __init__(self, num_layers, kv_heads, n_sink=4, window=1020):
        super().__init__(num_layers, kv_heads)
        self.n_sink, self.window = n_sink, window

    def sinks(self, total: int) -> torch.Tensor:
        real_rank = self.valid[:, :total].long().cumsum(-1)  # 1 for the first real token
        return self.valid[:, :total] & (real_rank <= self.n_sink)

    def select(self, layer, probs):
        b, n = probs.shape[0], probs.shape[-1]
        if self.n_sink + self.window >= n:
            return torch.ones(b, self.kv_heads, n, dtype=torch.bool)
        keep = self.sinks(n).clone()
        keep[:, n - self.window :] = True
        return keep[:, None, :].expand(b, self.kv_heads, n).clone()

    def evict(self, layer, held, before_call):
        keep = held.clone()
        for row in range(held.shape[0]):
            tokens = held[row, 0, :before_call].nonzero().flatten()
            if len(tokens) <= self.n_sink + self.window:
                continue
            keep[row, :, :before_call] = False
            keep[row, :, tokens[-self.window :]] = True
            keep[row, :, :before_call] |= self.sinks(before_call)[row]
        return keep


# --- low rank --------------------------------------------------------------------------------------------------


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LowRankReference(Reference):
    """Token i of T (after the call) is exact if i < sinks (n_sink + the first call's largest padding, at most the
    prompt) or i >= T - n_recent; every other token's key and value become U Uᵀ x with the layer's bases
    (keys before RoPE in pre_rope mode: rotated back to position 0, projected, rotated again)."""

    def __init__(self, num_layers, bases, n_sink, n_recent, key_mode="pre_rope"):
        super().__init__(num_layers)
        self.bases = bases  # per layer: (U_k, U_v), each [b, kv_heads, d, r]
        self.n_sink, self.n_recent, self.key_mode = n_sink, n_recent, key_mode
        self.sink_count = None

    def begin_call(self, valid, positions, q):
        super().begin_call(valid, positions, q)
        if self.first_call:
            padding = int((~valid).sum(-1).max())
            self.sink_count = min(q, self.n_sink + padding)

    def exact(self, layer, total) -> torch.Tensor:
        """Which columns stay at full precision, broadcastable to [b, kv_heads, total]."""
        column = torch.arange(total)
        return ((column < self.sink_count) | (column >= total - self.n_recent))[None, None]

    def transform(self, layer, keys, values):
        exact = self.exact(layer, keys.shape[2]).expand(keys.shape[:3])
        u_k, u_v = self.bases[layer]
        keys, values = keys.float(), values.float()
        if self.key_mode == "pre_rope":
            cos, sin = self.model.model.rotary_emb(keys, self.positions)
            cos, sin = cos[:, None].float(), sin[:, None].float()
            plain = keys * cos - _rotate_half(keys) * sin  # rotation by -angle (cos² + sin² = 1 for plain RoPE)
            projected = self.project(plain, u_k, ~exact, layer, 0)
            projected = projected * cos + _rotate_half(projected) * sin
        else:
            projected = self.project(keys, u_k, ~exact, layer, 0)
        projected_v = self.project(values, u_v, ~exact, layer, 1)
        mask = exact[..., None]
        return torch.where(mask, keys, projected), torch.where(mask, values, projected_v)

    def project(self, x, basis, body, layer, role):
        """U code(Uᵀx) for every row; ``body`` [b, h, T] marks the rows the cache stores as coefficients; role 0
        keys, 1 values."""
        return self.code(x @ basis, body, layer, role) @ basis.transpose(-1, -2)

    def code(self, coefficients, body, layer, role):
        """Coefficients as the body holds them: in the model's dtype, exact for a float32 model."""
        return coefficients


class SelectiveLowRankReference(LowRankReference):
    """As ``LowRankReference``; in every single-token call after the first, a KV head sees
    of the low-rank tokens only the ``keep`` complete chunks of ``chunk`` (counted from the first low-rank token)
    whose mean exact key has the largest q·mean over the head's queries, and the tokens after the last complete
    chunk."""

    def __init__(self, num_layers, bases, n_sink, n_recent, key_mode, chunk, keep):
        super().__init__(num_layers, bases, n_sink, n_recent, key_mode)
        self.chunk, self.keep = chunk, keep

    def query_keep_mask(self, layer, query, key):
        if self.first_call or self.q > 1:
            return None
        b, kv_heads, total, d = key.shape
        start = self.sink_count
        chunks = (total - self.n_recent - start) // self.chunk
        if chunks <= self.keep:
            return None
        means = key.float()[:, :, start : start + chunks * self.chunk].unflatten(2, (chunks, self.chunk)).mean(3)
        scores = (query.float().reshape(b, kv_heads, -1, d) @ means.transpose(-1, -2)).amax(2)  # [b, h, chunks]
        self.note_gap(scores.sort(-1, descending=True).values, self.keep)
        chosen = torch.zeros_like(scores, dtype=torch.bool).scatter(-1, scores.topk(self.keep).indices, True)
        visible = torch.ones(b, kv_heads, total, dtype=torch.bool)
        visible[..., start : start + chunks * self.chunk] = chosen.repeat_interleave(self.chunk, dim=-1)
        return visible


class QuantizedLowRankReference(LowRankReference):
    """As ``LowRankReference``, each body token's coefficient row padded with zeros to a multiple of 16 and
    fake-quantized in groups of 16 with the asymmetric min/max rule (``bits``). Exact only while the bases never
    move (eta_decode = 0): a basis change would re-quantize the re-expressed rows. ``stored_ranges(layer, role)``
    gives the library's float16 (scale, minimum) of its body rows, [b, h, body, groups, 1], to settle float16
    near-ties (``float16``; a minimum rounded the other way shifts a group by ~1e-3, the logits by up to ~2e-4)."""

    GROUP = 16

    def __init__(self, num_layers, bases, n_sink, n_recent, key_mode="pre_rope", bits=4, stored_ranges=None):
        super().__init__(num_layers, bases, n_sink, n_recent, key_mode)
        self.bits, self.stored_ranges = bits, stored_ranges

    def code(self, coefficients, body, layer, role):
        rows = coefficients[body]  # [N, r]: only body rows, so exact tokens raise no rounding-boundary alarm
        r = rows.shape[-1]
        width = -(-r // self.GROUP) * self.GROUP
        grouped = torch.nn.functional.pad(rows, (0, width - r)).view(-1, width // self.GROUP, self.GROUP)
        coded = coefficients.clone()
        coded[body] = fake_quantize(grouped, self.bits, self, self.stored(layer, role, body)).view(-1, width)[:, :r]
        return coded

    def stored(self, layer, role, body):
        """The library's (scale, minimum) of this call's body rows, in ``coefficients[body]`` order: the body holds
        the same count per sequence and head, and this call's body is the first rows of the final one."""
        ranges = None if self.stored_ranges is None else self.stored_ranges(layer, role)
        if ranges is None or ranges[0] is None:
            return None
        count = int(body[0, 0].sum())
        return tuple(part[:, :, :count].float().reshape(-1, *part.shape[3:]) for part in ranges)


class TransformCodedLowRankReference(LowRankReference):
    """As ``LowRankReference``, each body token's coefficient row transform coded: divided by the layer's
    per-coefficient scales σ, its direction's every coordinate j replaced by the nearest of the 2^b_j Lloyd–Max
    centroids (found by an explicit distance search over the codebook), and rebuilt as gain · σ ⊙ centroids with the
    least-squares gain ⟨c, σ ⊙ ĉ⟩/‖σ ⊙ ĉ‖² in float16. The widths b_j and scales σ are inputs, taken from the library after the run, as
    the bases are (the allocation itself is tested against a brute-force search in test_transform_coding.py).
    ``coders(layer, role)`` gives (widths, σ [b, h, r], stored float16 gains [b, h, body, 1])."""

    def __init__(self, num_layers, bases, n_sink, n_recent, key_mode, coders):
        super().__init__(num_layers, bases, n_sink, n_recent, key_mode)
        self.coders = coders

    def code(self, coefficients, body, layer, role):
        widths, scale, stored_gains = self.coders(layer, role)
        count = int(body[0, 0].sum())
        if not count:
            return coefficients
        rows = coefficients[body].view(*coefficients.shape[:2], count, coefficients.shape[-1])  # the same count per sequence and head
        whitened = rows / scale[:, :, None, :]
        norm = whitened.norm(dim=-1, keepdim=True)
        unit = whitened / norm.clamp_min(1e-30)
        rebuilt = torch.empty_like(unit)
        for j, bits in enumerate(widths):
            centroids = shape_codebook(len(widths), bits)
            distance = (unit[..., j : j + 1] - centroids).abs()
            nearest = distance.argmin(-1)
            rebuilt[..., j] = centroids[nearest]
            if centroids.numel() > 1:  # how far this coordinate is from switching to its second-nearest centroid
                gap = distance.topk(2, dim=-1, largest=False).values
                margin = (gap[..., 1] - gap[..., 0]) / 2 * norm[..., 0] * scale[:, :, None, j]
                flag_boundary(self, margin, torch.ones_like(margin, dtype=torch.bool))
        approx = rebuilt * scale[:, :, None, :]
        gain = (rows * approx).sum(-1, keepdim=True) / (approx * approx).sum(-1, keepdim=True).clamp_min(1e-30)
        gain16 = float16(gain, None if stored_gains is None else stored_gains[:, :, :count].float())
        coded = coefficients.clone()
        coded[body] = (rebuilt * gain16 * scale[:, :, None, :]).reshape(-1, rows.shape[-1])
        return coded


class SelectedLowRankReference(LowRankReference):
    """A selection reference's mask (the prompt attends in full, then each KV head holds its chosen tokens plus
    every later one), with the held tokens of each head laid out as OjaKV lays out a sequence: its first
    min(k, n_sink + held padding) held tokens and its last n_recent held tokens exact, the others projected (keys
    at their own positions). ``bases`` are the ones fitted to the survivors, taken from the library after the run."""

    def __init__(self, selection: SelectionReference, bases, n_sink, n_recent, key_mode="pre_rope"):
        self.selection = selection
        super().__init__(selection.num_layers, bases, n_sink, n_recent, key_mode)

    @property
    def min_gap(self):  # a tie in the selection or a rounding boundary in the coding: either is ambiguous
        return min(self._own_gap, self.selection.min_gap)

    @min_gap.setter
    def min_gap(self, value):
        self._own_gap = value

    def begin_call(self, valid, positions, q):
        Reference.begin_call(self, valid, positions, q)
        self.selection.begin_call(valid, positions, q)

    def keep_mask(self, layer, total):
        return self.selection.keep_mask(layer, total)

    def observe(self, layer, probs):
        self.selection.observe(layer, probs)

    def exact(self, layer, total):
        if self.first_call:
            return torch.ones(1, 1, total, dtype=torch.bool)  # the prompt is attended to in full
        held = self.selection.held[layer]  # this call's tokens are not in it yet: keep_mask runs after transform
        if self.sink_count is None:  # second call: ``held`` is the prompt's selection; sinks cover its padding
            kept = int(held.sum(-1).max())
            padding = int((held & ~self.valid[:, None, : held.shape[-1]]).sum(-1).max())
            self.sink_count = min(kept, self.n_sink + padding)
        held = torch.cat([held, torch.ones(*held.shape[:2], total - held.shape[-1], dtype=torch.bool)], dim=-1)
        rank = held.long().cumsum(-1)  # 1 for a head's first held token
        count = rank[..., -1:]
        return ~held | (rank <= self.sink_count) | (rank > count - self.n_recent)


# --- quantization ----------------------------------------------------------------------------------------------


BOUNDARY = 1e-6  # library and reference keys differ by ~1e-7 (SDPA vs explicit attention upstream, float32)
FLOAT16_WINDOW = 1e-5  # float16 near-ties are settled by the library's stored value within this (see float16)


def flag_boundary(reference: "Reference", margin: torch.Tensor, where: torch.Tensor, bound: float = BOUNDARY) -> None:
    """A decision whose input lies within ``bound`` (in units of the keys and values) of its boundary may go
    either way in the library: the example is ambiguous."""
    margin = margin[where]
    if margin.numel() and float(margin.min()) < bound:
        reference.min_gap = 0.0


def float16(value: torch.Tensor, stored: torch.Tensor | None = None) -> torch.Tensor:
    """``value`` rounded to float16. Where it lies within FLOAT16_WINDOW of a tie between two float16 numbers,
    rounding noise upstream (~1e-6) decides the library's choice, and a tie comes up in a large share of examples
    (float16 steps are ~1e-3): there the ``stored`` float16 value, when given and one of the two, is taken."""
    own = value.half().float()
    if stored is None:
        return own
    below, above = (value - FLOAT16_WINDOW).half().float(), (value + FLOAT16_WINDOW).half().float()
    return torch.where((below != above) & ((stored == below) | (stored == above)), stored, own)


def fake_quantize(x: torch.Tensor, bits: int, reference: "Reference | None" = None, stored=None) -> torch.Tensor:
    """Asymmetric min/max quantization of each row of ``x`` [..., group] and back: scale = (max - min)/(2^b - 1)
    (at least 1e-8), scale and minimum stored as float16, codes rounded and clipped to [0, 2^b - 1]. ``stored``:
    the library's float16 (scale, minimum) [..., 1], to settle float16 near-ties (see ``float16``)."""
    low = x.min(-1, keepdim=True).values
    high = x.max(-1, keepdim=True).values
    levels = 2**bits - 1
    stored_scale, stored_low = (None, None) if stored is None else stored
    scale = float16(((high - low) / levels).clamp(min=1e-8), stored_scale)
    low = float16(low, stored_low)
    # a float16 scale can be 0 (a constant group, or a range under float16's resolution): then every code is 0
    exact = (x - low) / scale
    codes = torch.where(scale > 0, torch.clamp(torch.round(exact), 0, levels), 0.0)
    if reference is not None:  # a value this close to a rounding boundary may round either way in the library
        margin = ((exact - exact.floor() - 0.5).abs() * scale)[(scale > 0).expand_as(x) & (exact < levels)]
        if margin.numel() and float(margin.min()) < BOUNDARY:
            reference.min_gap = 0.0
    return codes * scale + low


class KIVIReference(Reference):
    """With T tokens after the call: keys 0 .. ⌊T/residual⌋·residual − 1 quantized per channel over groups of
    ``group`` consecutive tokens; values 0 .. max(0, ⌊(T − residual)/group⌋·group) − 1 quantized per token over
    groups of ``group`` channels; padding zeroed first; the rest exact."""

    def __init__(self, num_layers, bits=2, group=32, residual=128):
        super().__init__(num_layers)
        self.bits, self.group, self.residual = bits, group, residual

    def transform(self, layer, keys, values):
        if self.first_call:  # the prompt attends to its own full-precision keys and values
            return keys, values
        total, g = keys.shape[2], self.group
        real = self.valid[:, None, :, None]
        keys, values = keys.float() * real, values.float() * real
        keys, values = keys.clone(), values.clone()
        quantized_keys = total // self.residual * self.residual
        for start in range(0, quantized_keys, g):
            block = keys[:, :, start : start + g].transpose(-1, -2)  # [b, h, d, g]: one row per channel
            keys[:, :, start : start + g] = fake_quantize(block, self.bits, self).transpose(-1, -2)
        quantized_values = max(0, (total - self.residual) // g * g)
        for token in range(quantized_values):
            for channel in range(0, values.shape[-1], g):
                row = values[:, :, token, channel : channel + g]
                values[:, :, token, channel : channel + g] = fake_quantize(row, self.bits, self)
        return keys, values


_FLOAT16_MAX = 65504.0
# Later layers' keys reach the reference up to ~1e-6 away from the library's (SDPA against explicit attention
# upstream, measured), so a TurboQuant decision this close to its boundary may go either way.
TURBO_BOUNDARY = 2e-6


class TurboQuantReference(Reference):
    """With T tokens after the call, tokens 0 .. T − residual − 1 (padding zeroed) are fake-quantized per KV head,
    keys and values alike: x ≈ ‖x‖₁₆ · Πᵀ c, c the nearest Lloyd–Max centroid (``codebook(width, bits)``) of each
    coordinate of Π x / ‖x‖, ‖x‖₁₆ the norm rounded to float16. ``prod`` keys: that at b − 1 bits, plus the QJL
    term √(π/2)/width · γ₁₆ · Sᵀ sign(S r), r the residual left and γ = ‖r‖. Fractional bits: per sequence and KV
    head, the round(f·d) channels with the largest sum of squares over the first call's tokens (the prompt, as
    for every method here) form a set of their own at b + 1 bits, the others one at b bits, each set (channels
    ascending) with its own Π and S. Π and S are defined by the seed: a generator seeded with
    ``_derive_seed(rotation_seed, layer, role, set)`` (role 0 keys, 1 values) gives each head's Π
    (``random_rotations``), then each head's S (standard Gaussian).

    Near-ties: a centroid, QJL sign or outlier choice within TURBO_BOUNDARY of its boundary makes the example
    ambiguous. Float16 norms are too fine for that (a norm rounded the other way scales its vector by 1 ± 2⁻¹¹
    and, through the next layers, the logits by up to ~1e-4): ``stored_norms(layer, role)``, the float16 norms the
    library stored ([b, h, tokens, columns]: per channel set ‖x‖, then γ for prod keys), settles their near-ties
    (``float16``)."""

    def __init__(self, num_layers, head_dim, bits=3.5, key_variant="mse", outlier_fraction=0.25, residual=0,
                 rotation_seed=0, stored_norms=None):
        super().__init__(num_layers)
        whole, outliers = int(bits), round(outlier_fraction * head_dim)
        self.sets = [(head_dim, whole)] if bits == whole else [(outliers, whole + 1), (head_dim - outliers, whole)]
        self.variants = (key_variant, "mse")  # values always use the MSE variant
        self.residual, self.seed, self.stored_norms = residual, rotation_seed, stored_norms
        self.channels: dict[tuple[int, int], list[torch.Tensor]] = {}  # (layer, role) -> per set [b, h, width]

    def transform(self, layer, keys, values):
        real = self.valid[:, None, :, None]
        quantized = max(0, keys.shape[2] - self.residual)
        out = []
        for role, x in enumerate((keys.float() * real, values.float() * real)):
            if self.first_call:  # the prompt picks the outlier channels and attends in full precision
                self.channels[layer, role] = self.split_channels(x)
                out.append((keys, values)[role])
                continue
            x = x.clone()
            x[:, :, :quantized] = self.fake_quantize(x[:, :, :quantized], layer, role)
            out.append(x)
        return tuple(out)

    def split_channels(self, x):
        """Each set's channels [b, h, width], ascending: outliers by sum of squares over the tokens of ``x``."""
        b, h, n, d = x.shape
        if len(self.sets) == 1:
            return [torch.arange(d).expand(b, h, d)]
        energy = x.square().sum(2)
        outliers = self.sets[0][0]
        ranked, order = energy.sort(dim=-1, descending=True)
        # compared as root energies, which move by at most √n times the keys' own difference; equal energies
        # (a row that is all padding so far) are a tie
        gap = ranked[..., outliers - 1].sqrt() - ranked[..., outliers].sqrt()
        flag_boundary(self, gap, torch.ones_like(gap, dtype=torch.bool), TURBO_BOUNDARY * math.sqrt(n))
        return [order[..., :outliers].sort(-1).values, order[..., outliers:].sort(-1).values]

    def fake_quantize(self, x, layer, role):
        out = torch.empty_like(x)
        heads, tokens = x.shape[1], x.shape[2]
        stored = None if self.stored_norms is None else self.stored_norms(layer, role)
        stored = None if stored is None else stored[:, :, :tokens].float()  # None: nothing was quantized
        column = 0
        for index, ((width, bits), channels) in enumerate(zip(self.sets, self.channels[layer, role])):
            generator = torch.Generator().manual_seed(_derive_seed(self.seed, layer, role, index))
            rotation = random_rotations(heads, width, generator)
            prod = self.variants[role] == "prod"
            columns = channels[:, :, None, :].expand(*x.shape[:3], width)
            part = x.gather(-1, columns)
            norms = [None, None] if stored is None else [stored[..., column + i : column + i + 1] for i in (0, 1)]
            rebuilt = self.nearest_centroids(part, rotation, bits - prod, norms[0])
            if prod:
                projection = torch.randn(heads, width, width, generator=generator)
                rebuilt = rebuilt + self.qjl(part - rebuilt, projection, norms[1])
            out.scatter_(-1, columns, rebuilt)
            column += 1 + prod
        return out

    @staticmethod
    def float16_norm(x, stored):
        """‖x‖ [..., 1] and its float16 rounding (clamped to float16's range)."""
        norm = x.norm(dim=-1, keepdim=True)
        return norm, float16(norm.clamp_max(_FLOAT16_MAX), stored)

    def nearest_centroids(self, x, rotation, bits, stored=None):
        centroids = codebook(x.shape[-1], bits).float()
        norm, norm16 = self.float16_norm(x, stored)
        rotated = (x / norm.clamp_min(1e-30)) @ rotation.transpose(-1, -2)
        distance = (rotated[..., None] - centroids).abs()
        two = distance.topk(2, dim=-1, largest=False).values
        # half the gap between the two nearest centroids' distances is the distance to the cell boundary
        flag_boundary(self, (two[..., 1] - two[..., 0]) / 2 * norm, (norm > 0).expand_as(rotated), TURBO_BOUNDARY)
        return (centroids[distance.argmin(-1)] * norm16) @ rotation

    def qjl(self, residual, projection, stored=None):
        gamma, gamma16 = self.float16_norm(residual, stored)
        sketch = residual @ projection.transpose(-1, -2)
        flag_boundary(self, sketch.abs(), (gamma > 0).expand_as(sketch), TURBO_BOUNDARY)
        signs = torch.where(sketch >= 0, 1.0, -1.0)
        return (signs * gamma16 * (math.sqrt(math.pi / 2) / residual.shape[-1])) @ projection


# --- cross-layer key sharing -------------------------------------------------------------------------------------


def pod_bases(similarity: torch.Tensor, delta: float, max_group: int = 0) -> list[list[int]]:
    """First layer of each layer's group [L][h], per KV head: going up the layers, a layer stays in the current
    group while its similarity [L, L, h] to the group's first layer is at least ``delta`` and the group has fewer
    than ``max_group`` layers (0: no cap); otherwise it starts a group of its own."""
    layers, _, heads = similarity.shape
    bases = [[0] * heads for _ in range(layers)]
    for head in range(heads):
        first = 0
        for layer in range(1, layers):
            full = max_group and layer - first >= max_group
            if full or float(similarity[first, layer, head]) < delta:
                first = layer
            bases[layer][head] = first
    return bases


class PoDReference(Reference):
    """A layer that is not its own group's first layer (``bases`` [L][h], per KV head) attends, in the distant
    columns of that head, to the first layer's keys: every column of T (after the call) except the first
    n_sink + P (P: the batch's largest left padding, so each sequence keeps its first n_sink real tokens) and the
    last ``window``. Values are always the layer's own."""

    def __init__(self, num_layers, bases, n_sink=4, window=128):
        super().__init__(num_layers)
        self.bases, self.n_sink, self.window = bases, n_sink, window
        self.own_keys: dict[int, torch.Tensor] = {}

    def transform(self, layer, keys, values):
        self.own_keys[layer] = keys  # layers run in order: a group's first layer has attended already
        total = keys.shape[2]
        padding = int((~self.valid).sum(-1).max())  # all padding leads the prompt: this counts the prompt's
        column = torch.arange(total)
        distant = (column >= self.n_sink + padding) & (column < total - self.window)
        keys = keys.clone()
        for head, base in enumerate(self.bases[layer]):
            if base != layer:
                keys[:, head, distant] = self.own_keys[base][:, head, distant]
        return keys, values
