"""Speed and memory, every method side by side with the full cache in the same run.

Methods run with their own knobs or, given ``budgets``, at each budget in the configuration it gives them (the knobs
``knobs_for_budget`` sets when the cache sees the prompt, as ``ojakv eval --budgets`` runs them); ``full`` runs
once, unbudgeted. For each context length, repeats interleave the methods (so drift in machine load hits them
alike). Each run times the prefill and ``decode_tokens`` greedy decode steps, reads the cache's held bytes, and
tracks peak memory: max allocated on CUDA; on CPU the process's resident set, sampled by a thread every millisecond,
above what it was before the run. Before each CPU run, memory freed by earlier runs is handed back to the system
(``malloc_trim`` where the C library has it): otherwise a run could reuse pages an earlier one left resident and
look smaller than it is, or find them gone and look larger. Reported figures are medians over repeats, with ratios
to the full cache.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import threading
import time
from statistics import median

import torch

from ..hf import cache_kwargs
from ..data import essay_text
from ..methods import UnreachableBudget
from .runner import Cell, MethodSpec

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _release_freed_memory() -> None:
    gc.collect()
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is not None and hasattr(libc, "malloc_trim"):  # glibc; elsewhere the base is what it is
        libc.malloc_trim(0)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


class PeakMemory:
    """Peak bytes above the start of the block: CUDA allocator on GPU, sampled RSS on CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            _release_freed_memory()
            self.base = _rss()
            self._stop = threading.Event()
            self._top = self.base
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self._top = max(self._top, _rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._top, _rss()) - self.base
        return False


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _one_run(model, cell: Cell, ids: torch.Tensor, decode_tokens: int) -> dict:
    device = ids.device
    cache = cell.spec.make_cache(model, cell.budget, decode_tokens)
    kv = cache_kwargs(model, cache)
    with cache, torch.no_grad(), PeakMemory(device) as peak:
        start = time.perf_counter()
        logits = model(input_ids=ids, use_cache=True, **kv).logits[:, -1]
        _sync(device)
        prefill = time.perf_counter() - start
        token = logits.argmax(-1, keepdim=True)
        start = time.perf_counter()
        for _ in range(decode_tokens):
            token = model(input_ids=token, use_cache=True, **kv).logits[:, -1].argmax(-1, keepdim=True)
        _sync(device)
        decode = time.perf_counter() - start
    update = sum(getattr(layer, "update_seconds", 0.0) for layer in cache.layers)
    return {"prefill_s": prefill, "decode_ms_per_token": 1000 * decode / decode_tokens,
            "update_ms_per_token": 1000 * update / decode_tokens, "held_bytes": cache.memory().held_bytes,
            "full_bytes": cache.memory().full_bytes, "peak_bytes": peak.peak}


def run_bench(model, tokenizer, specs: list[MethodSpec], lengths: list[int], *, budgets: list[float] | None = None,
              repeats: int = 3, decode_tokens: int = 32, progress: bool = True) -> list[dict]:
    """Median figures per (method, budget, length), with ``*_vs_full`` ratios when ``full`` is among the methods.
    Without ``budgets`` every method runs with its own knobs (budget None). Without a tokenizer (random-weight
    models) the prompt is seeded random token ids."""
    device = next(model.parameters()).device
    if tokenizer is not None:
        text_ids = tokenizer(essay_text("eval"), add_special_tokens=False).input_ids
    else:
        generator = torch.Generator().manual_seed(0)
        text_ids = torch.randint(0, model.config.vocab_size, (max(lengths),), generator=generator).tolist()
    cells = [Cell(spec, budget) for spec in specs
             for budget in (budgets if budgets and spec.name != "full" else [None])]
    records = []
    for length in lengths:
        ids = torch.tensor([text_ids[:length]], device=device)
        _one_run(model, Cell(specs[0], None), ids[:, :64], 2)  # warm-up: kernels, allocator, lazy imports
        runs: dict[Cell, list[dict]] = {cell: [] for cell in cells}
        unreachable: dict[Cell, str] = {}
        for repeat in range(repeats):
            for cell in cells if repeat % 2 == 0 else cells[::-1]:
                if cell in unreachable:
                    continue
                try:
                    runs[cell].append(_one_run(model, cell, ids, decode_tokens))
                except UnreachableBudget as error:  # e.g. kivi at 0.15: a row saying so, the other cells still run
                    unreachable[cell] = str(error)
                if progress:
                    print(f"  bench {_label(cell)} @ {length}: repeat {repeat + 1}/{repeats}", flush=True)
        for cell in cells:
            if cell in unreachable:
                records.append({"method": cell.spec.label, "budget": cell.budget, "length": length,
                                "unreachable": unreachable[cell]})
                continue
            summary = {key: median(run[key] for run in runs[cell]) for key in runs[cell][0]}
            records.append({"method": cell.spec.label, "budget": cell.budget, "length": length, "repeats": repeats,
                            **summary})
    _add_ratios(records)
    return records


def _label(cell: Cell) -> str:
    return cell.spec.label if cell.budget is None else f"{cell.spec.label} @ {cell.budget:g}"


def _add_ratios(records: list[dict]) -> None:
    full = {r["length"]: r for r in records if r["method"] == "full"}
    for record in records:
        base = full.get(record["length"])
        if base is None or "unreachable" in record:
            continue
        for key in ("prefill_s", "decode_ms_per_token", "held_bytes", "peak_bytes"):
            record[f"{key}_vs_full"] = record[key] / base[key] if base[key] else None


def bench_table(records: list[dict]) -> str:
    columns = ["method", "budget", "length", "prefill_s", "decode_ms_per_token", "update_ms_per_token", "held_bytes",
               "peak_bytes", "prefill_s_vs_full", "decode_ms_per_token_vs_full", "held_bytes_vs_full",
               "peak_bytes_vs_full"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in records:
        cells = []
        if "unreachable" in r:  # the method cannot hold this little: say so in the row
            r = {**r, "prefill_s": "unreachable"}
        for c in columns:
            value = r.get(c)
            if value is None:
                cells.append("" if c != "budget" else "-")
            elif isinstance(value, float) and not c.endswith("bytes"):
                cells.append(f"{value:.3f}")
            else:
                cells.append(str(int(value)) if isinstance(value, float) else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_decode_time(records: list[dict], path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for method, budget in sorted({(r["method"], r.get("budget") or 0.0) for r in records if "unreachable" not in r}):
        points = sorted((r["length"], r["decode_ms_per_token"]) for r in records if "unreachable" not in r
                        if (r["method"], r.get("budget") or 0.0) == (method, budget))
        label = method if not budget else f"{method} @ {budget:g}"
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("decode ms / token (median)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
