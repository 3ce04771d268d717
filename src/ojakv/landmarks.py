"""Chunk landmarks: how a selective decode step picks the body tokens it attends to.

The exact decode path of a pre-RoPE low-rank body rebuilds and rotates every body key at every step (n·r·d
multiply-adds per KV head), which is what makes it slower than the full cache at long contexts. The selective path
scores the body cheaply first: the body is cut into chunks of ``chunk`` consecutive tokens, and each complete
chunk keeps one landmark, the mean of its exact post-RoPE keys (taken when the tokens enter the body, before they
are compressed). A single-token step scores each chunk by its landmark's largest q·landmark over the queries of
the KV head's group and attends exactly only to the ``keep`` best chunks of each KV head, plus the chunk still
filling up (a call of several positions attends exactly: ``OjaKVLayer._selection`` says why).

What it approximates: the softmax over the body is restricted to the chosen tokens (the others get no weight).
The chosen tokens themselves are attended exactly as on the exact path (rebuilt, rotated, their values through
the coefficients).
"""

from __future__ import annotations

import torch

from .storage import GrowableTensor


class ChunkLandmarks:
    """Mean post-RoPE key of every complete chunk of body tokens, per sequence and KV head, in ``dtype`` (``means``
    [b, h, m, d]), and a float32 running sum of the chunk still filling up (``tail`` [b, h, d])."""

    def __init__(self, chunk: int, dtype: torch.dtype):
        self.chunk, self.dtype = chunk, dtype
        self.means = GrowableTensor()
        self.tail: torch.Tensor | None = None
        self.tail_count = 0

    def append(self, keys: torch.Tensor) -> None:
        """Keys [b, h, n, d] of the next ``n`` body tokens, as the model cached them (post-RoPE)."""
        keys = keys.float()
        if self.tail is None:
            self.tail = keys.new_zeros(*keys.shape[:2], keys.shape[-1])
        fill = min(self.chunk - self.tail_count, keys.shape[2])
        self.tail += keys[:, :, :fill].sum(2)
        self.tail_count += fill
        if self.tail_count < self.chunk:
            return
        rest = keys[:, :, fill:]
        whole = rest.shape[2] // self.chunk * self.chunk
        means = [(self.tail / self.chunk).unsqueeze(2), rest[:, :, :whole].unflatten(2, (-1, self.chunk)).mean(3)]
        self.means.append(torch.cat(means, dim=2).to(self.dtype))
        self.tail = rest[:, :, whole:].sum(2)
        self.tail_count = rest.shape[2] - whole


def select_chunks(grouped: torch.Tensor, landmarks: torch.Tensor, keep: int, chunk: int,
                  body_length: int) -> torch.Tensor:
    """Body token indices [b, h, k] each KV head attends to: the ``keep`` chunks whose landmark (``landmarks``
    [b, h, m, d]) scores highest for some query row of ``grouped`` [b, h, g·q, d], then the tokens after the last
    complete chunk."""
    scores = (grouped @ landmarks.float().transpose(-1, -2)).amax(2)  # [b, h, m]
    top = scores.topk(keep, dim=-1, sorted=False).indices  # any order: the step's softmax does not depend on it
    offsets = torch.arange(chunk, device=top.device)
    tokens = (top.unsqueeze(-1) * chunk + offsets).flatten(-2)
    complete = landmarks.shape[2] * chunk
    if complete < body_length:
        tail = torch.arange(complete, body_length, device=top.device).expand(*top.shape[:2], -1)
        tokens = torch.cat([tokens, tail], dim=-1)
    return tokens
