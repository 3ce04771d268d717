"""Shared machinery for token-selection methods: keep a subset of tokens per KV head, at full precision.

Not a method itself. A selection layer holds kept keys/values ``[b, h, k, d]`` (the same count k for every
sequence and head, different tokens), returns fewer tokens than it has seen, and reports mask sizes so that
transformers lines its 2-D padding mask up with them: kept tokens map to the last mask columns, which are real
tokens under left padding, because selection never keeps padding.
"""

from __future__ import annotations

import torch

from ..cache import AttentionInputs, CacheLayer, SharedState, StepInputs, growable_segments
from ..memory import nbytes
from ..hf import compute_queries
from ..scores import grouped_logits
from ..storage import GrowableTensor, growth_slack


class SelectionLayer(CacheLayer):
    """Prefill: attend to everything, then keep ``select(...)`` tokens; decode: append (subclasses may evict)."""

    def __init__(self, layer_idx: int, shared: SharedState):
        super().__init__(layer_idx, shared)
        self.keys_buf, self.values_buf = GrowableTensor(), GrowableTensor()
        # Left padding held, per sequence and head ([b, h] int): the first held columns when a padded prompt
        # fitted whole. Evictions drop it first and scores never count it; what stays keeps mapping onto the
        # mask's last columns because held tokens stay in order.
        self.held_padding: torch.Tensor | None = None

    def returned_length(self) -> int:
        """Tokens the next call returns besides its new ones: what is held once ``before_append`` has evicted
        (the mask is sized before the call runs)."""
        return min(self.keys_buf.length, self.eviction_limit())

    def eviction_limit(self) -> float:
        """Most tokens kept across calls (eviction methods override; selection alone never evicts)."""
        return float("inf")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        kept = self.returned_length()
        return kept + query_length, self.seen - kept

    def update(self, key_states, value_states, *args, **kwargs):
        attention, step = self.begin_update(key_states, value_states)
        q = key_states.shape[2]
        if self.seen == 0:
            keep = self.select(key_states, value_states, step, attention)
            rows = keep.unsqueeze(-1).expand(-1, -1, -1, key_states.shape[-1])
            self.keys_buf.append(self.stored_keys(key_states, attention).gather(2, rows))
            self.values_buf.append(value_states.gather(2, rows))
            padding = (~step.valid).sum(-1)[:, None, None]  # [b, 1, 1]: padding columns lead each row
            self.held_padding = (keep < padding).sum(-1)
            self.seen += q
            return key_states, value_states  # the prompt itself is attended to in full
        # Evict before appending, never after: the mask for this call was built for kept + q tokens, so the
        # tokens held when the call starts must all be returned with the new ones.
        self.before_append()
        self.keys_buf.append(self.stored_keys(key_states, attention))
        self.values_buf.append(value_states)
        self.held_padding = self.held_padding + (~step.valid).sum(-1)[:, None]  # left padding spanning calls
        self.seen += q
        self.after_append(attention)
        return self.returned_keys(self.keys_buf.view, step), self.values_buf.view

    def stored_keys(self, keys: torch.Tensor, attention: AttentionInputs) -> torch.Tensor:
        """Keys as the buffer keeps them (default: as the model rotated them)."""
        return keys

    def returned_keys(self, held: torch.Tensor, step: StepInputs) -> torch.Tensor:
        """Keys handed to attention, held ones and this call's (default: as stored)."""
        return held

    def select(self, keys, values, step: StepInputs, attention: AttentionInputs) -> torch.Tensor:
        """Indices [b, h, k] (ascending) of the prompt tokens to keep."""
        raise NotImplementedError

    def before_append(self) -> None:
        """Decode-time eviction, at the start of a call (default: keep everything)."""

    def after_append(self, attention: AttentionInputs) -> None:
        """Decode-time scoring of what is held now, new tokens included (default: none)."""

    def padding_columns(self) -> torch.Tensor:
        """[b, h, held] True where a held column is padding."""
        columns = torch.arange(self.keys_buf.length, device=self.held_padding.device)
        return columns < self.held_padding.unsqueeze(-1)

    def eviction_order(self, priority: torch.Tensor) -> torch.Tensor:
        """``priority`` [b, h, held] with padding put last (later padding before earlier, so that what a short
        sequence must keep of it lines up with the mask); then ``_retain`` keeps the top ones."""
        columns = torch.arange(priority.shape[-1], device=priority.device, dtype=torch.float32)
        return torch.where(self.padding_columns(), columns - 1e9, priority.float())

    def _retain(self, keep: torch.Tensor) -> None:
        """Keep only the tokens at indices ``keep`` [b, h, k] (ascending) of the held buffers."""
        self.held_padding = (keep < self.held_padding.unsqueeze(-1)).sum(-1)
        rows = keep.unsqueeze(-1).expand(-1, -1, -1, self.keys_buf.view.shape[-1])
        for buffer in (self.keys_buf, self.values_buf):
            retained = buffer.view.gather(2, rows)
            buffer.clear()
            buffer.append(retained)

    def segments(self) -> dict[str, int]:
        return {**growable_segments(kept_tokens=(self.keys_buf, self.values_buf)),
                "padding_count": nbytes(self.held_padding)}


def held_tokens(limit: int, prompt_tokens: int, new_tokens: int) -> int:
    """Token slots an evicting selection layer holds at the end (``limit`` kept across calls, plus the last call's
    token, plus the spare capacity of the buffer's growth): what its budget must count."""
    n = prompt_tokens + new_tokens
    if n <= limit:  # never evicts: the prompt, then appends
        return n + growth_slack(prompt_tokens, new_tokens)
    kept = min(limit, prompt_tokens)  # after each eviction the buffer is exact-size, then grows for one token
    return kept + (1 if new_tokens else 0) + (growth_slack(kept, 1) if new_tokens else 0)


def attention_votes(keys: torch.Tensor, attention: AttentionInputs, step: StepInputs, n_queries: int,
                    chunk: int = 256) -> torch.Tensor:
    """Softmax attention that the last ``n_queries`` prompt queries pay to each prompt token (causal, padding
    excluded), summed over those queries and averaged over each KV head's query group: [b, h, n].

    SnapKV's observation-window votes (n_queries = window) and H2O's accumulated attention (n_queries = n).
    Queries go in chunks so the scores never hold more than chunk × n per head.
    """
    b, h, n, d = keys.shape
    w = min(n_queries, n)
    positions = torch.arange(n, device=keys.device)
    votes = keys.new_zeros(b, h, n, dtype=torch.float32)
    for start in range(n - w, n, chunk):
        stop = min(start + chunk, n)
        queries = compute_queries(attention.module, attention.hidden_states[:, start:stop],
                                  attention.cos[:, start:stop], attention.sin[:, start:stop])
        logits = grouped_logits(queries, keys, attention.module)
        causal = positions[None, :] <= positions[start:stop, None]
        logits = logits.masked_fill(~(step.valid[:, None, None, None, :] & causal), float("-inf"))
        probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # a padded query row has no visible key
        votes += probs.mul(step.valid[:, None, None, start:stop, None]).sum(3).mean(2)
    return votes


def current_attention(keys: torch.Tensor, attention: AttentionInputs, hidden: torch.Tensor,
                      valid: torch.Tensor) -> torch.Tensor:
    """Attention of this step's queries over ``keys`` (the tokens held, this call's last), summed over the
    real queries and averaged over each KV head's group: [b, h, n]. ``hidden`` [b, h, n] marks held padding,
    which receives nothing; ``valid`` [b, q] the call's real tokens; the call's queries are causal among
    themselves."""
    b, h, n, d = keys.shape
    queries = compute_queries(attention.module, attention.hidden_states, attention.cos, attention.sin)
    q = queries.shape[2]
    logits = grouped_logits(queries, keys, attention.module)
    later = torch.arange(n, device=keys.device)[None, :] > torch.arange(n - q, n, device=keys.device)[:, None]
    blocked = later | ~torch.cat([~hidden[..., : n - q], valid[:, None, :].expand(-1, h, -1)], -1)[:, :, None]
    probs = torch.softmax(logits.masked_fill(blocked[:, :, None], float("-inf")), dim=-1).nan_to_num(0.0)
    return probs.mul(valid[:, None, None, :, None]).sum(3).mean(2)


def pool_scores(scores: torch.Tensor, kernel: int, how: str) -> torch.Tensor:
    """1-D pooling along tokens (kernel odd, stride 1, same length) so neighbours of a hit are kept too."""
    if kernel <= 1:
        return scores
    flat = scores.reshape(-1, 1, scores.shape[-1])
    pad = kernel // 2
    if how == "max":
        pooled = torch.nn.functional.max_pool1d(flat, kernel, stride=1, padding=pad)
    else:
        pooled = torch.nn.functional.avg_pool1d(flat, kernel, stride=1, padding=pad, count_include_pad=False)
    return pooled.reshape(scores.shape)


def top_tokens_with_window(scores: torch.Tensor, step: StepInputs, capacity: int, window: int) -> torch.Tensor:
    """Indices [b, h, k] of the last ``window`` tokens plus the best-scoring earlier real tokens, k ≤ capacity.

    k is the same for every sequence: capacity, or fewer when a sequence has fewer real tokens (padding is never
    kept). If the whole prompt fits the capacity, every token is kept (padding too, masked as in a full cache),
    so the no-compression setting is the full cache.
    """
    b, h, n = scores.shape
    if capacity >= n:
        return torch.arange(n, device=scores.device).expand(b, h, n)
    real = int(step.valid.sum(-1).min())
    keep = min(capacity, real)
    w = min(window, keep)
    earlier = keep - w
    scores = scores.masked_fill(~step.valid[:, None, :], float("-inf"))
    scores[..., n - w :] = float("-inf")  # the window is kept anyway
    chosen = scores.topk(earlier, dim=-1).indices if earlier > 0 else scores.new_zeros(b, h, 0, dtype=torch.long)
    tail = torch.arange(n - w, n, device=scores.device).expand(b, h, w)
    return torch.cat([chosen, tail], dim=-1).sort(dim=-1).values
