"""Long decode runs: the process's memory follows the cache's own accounting, and nothing full-size hides.

2,000 decode steps after a 256-token prompt on a tiny model wide enough (8 KiB of full K/V per token) that the
cache's growth (megabytes) stands out from allocator noise. After a warm-up (the first steps allocate the model's
temporaries), resident memory may grow by at most what ``cache.memory()`` says the cache grew by, plus a slack.
"""

from __future__ import annotations

import ctypes
import gc
import os

import pytest
import torch

import ojakv
from helpers import held_tensor_bytes, kv
from tiny import tiny_model
from ojakv.quantize import Quantized
from ojakv.storage import GrowableTensor

PROMPT, STEPS, WARMUP = 256, 2000, 200
# RSS is read after gc and glibc's malloc_trim, so freed per-step temporaries are handed back and do not count.
# What remains besides the cache: heap fragmentation around the growing buffers (a GrowableTensor's old buffer is
# freed when it grows, leaving holes), and pages of the longest-lived temporaries. 4 MiB is under half the full
# cache here (2 layers x 4 heads x 64 dims x 2,256 tokens x 2 x 4 bytes = 8.8 MiB): a hidden full-size copy
# kept alive, or a leak of 2.5 KiB per step, exceeds it.
SLACK = 4 * 2**20


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS keeps freed pages, the slack has to absorb them
        pass


def rss() -> int:
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def held_storages(cache) -> set[int]:
    """Data pointers of every tensor storage the cache holds (what ``memory()`` counts)."""
    found: set[int] = set()

    def walk(value):
        if isinstance(value, torch.Tensor):
            found.add(value.untyped_storage().data_ptr())
        elif isinstance(value, GrowableTensor):
            walk(value._data)
        elif isinstance(value, Quantized):
            walk([value.codes, value.scale, value.minimum])
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item)

    walk(cache.shared.positions)
    for layer in cache.layers:
        walk(list(vars(layer).values()))
    return found


def stray_large_tensors(cache, model, threshold: int) -> list[tuple]:
    """Live tensors of at least ``threshold`` bytes that are neither the cache's nor the model's weights."""
    gc.collect()
    known = held_storages(cache) | {p.untyped_storage().data_ptr() for p in model.parameters()}
    known |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    stray = []
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.untyped_storage().nbytes() >= threshold:
            if obj.untyped_storage().data_ptr() not in known:
                stray.append((tuple(obj.shape), obj.dtype))
    return stray


@pytest.fixture(scope="module")
def wide():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2,000 tiny steps: thread hand-offs cost more than they save on shared cores
    yield tiny_model("llama", num_layers=2, num_heads=8, num_kv_heads=4, head_dim=64, max_context=4096)
    torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.parametrize("method, knobs", [("ojakv", {}), ("streaming-llm", dict(window=252))])
def test_rss_follows_held_bytes_over_2000_decode_steps(wide, method, knobs):
    cache = ojakv.make_cache(wide, method, **knobs)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, wide.config.vocab_size, (1, PROMPT + STEPS), generator=gen)
    with torch.inference_mode():
        wide(input_ids=ids[:, :PROMPT], **kv(cache))
        for step in range(STEPS):
            if step == WARMUP:
                _trim()
                rss_start, held_start = rss(), cache.memory().held_bytes
            wide(input_ids=ids[:, PROMPT + step : PROMPT + step + 1], **kv(cache))
    _trim()
    report = cache.memory()
    rss_growth, held_growth = rss() - rss_start, report.held_bytes - held_start
    print(f"{method}: RSS +{rss_growth / 2**20:.2f} MiB, held +{held_growth / 2**20:.2f} MiB "
          f"(held {report.held_bytes / 2**20:.2f} of full {report.full_bytes / 2**20:.2f} MiB)")
    assert cache.get_seq_length() == PROMPT + STEPS
    assert report.held_bytes == held_tensor_bytes(cache)  # what the layers hold is what memory() reports
    assert rss_growth <= held_growth + SLACK
    if method == "streaming-llm":
        assert held_growth == 0  # constant memory: sinks + window, evicted every step
    # No full-size tensor outlives the step: one layer's keys at full size is the smallest such copy.
    one_layer_keys = report.full_bytes // (2 * len(cache.layers))
    assert stray_large_tensors(cache, wide, one_layer_keys) == []
