"""Sweeps of methods × budgets × tasks × lengths × question placements, one JSONL record per sample.

Records are appended as each sample finishes, keyed by everything that defines it, so an interrupted sweep
resumes where it stopped. Quality comes from real greedy generations (or token-by-token decode-mode perplexity);
memory from the cache's own report after the sample.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..api import make_cache
from ..atomic import atomic_path
from ..errors import OjaKVError
from ..hf import cache_kwargs
from ..methods import UnreachableBudget, get_method, parse_value
from ..hf import geometry
from .tasks import expand_tasks, make_sample, string_match_all

PLACEMENTS = ("after", "inside")  # question after the compressed context / inside the compressed prompt
PPL_CONTINUATION = 256  # tokens scored one by one after the compressed context


@dataclass(frozen=True)
class MethodSpec:
    """A method with fixed knobs, written ``name`` or ``name:knob=value,knob=value`` (the label is the text)."""

    label: str
    name: str
    knobs: tuple

    @classmethod
    def parse(cls, text: str) -> MethodSpec:
        name, _, rest = text.strip().partition(":")
        method = get_method(name)
        knobs = []
        for item in filter(None, rest.split(",")):
            key, eq, value = item.partition("=")
            if not eq:
                raise OjaKVError(f"method spec {text!r}: write knobs as name=value, e.g. ojakv:key_mode=post_rope")
            knobs.append((key, parse_value(method.config_class, key, value)))
        method.make_config(**dict(knobs))  # fail fast on a bad knob
        return cls(text.strip(), name, tuple(knobs))

    def make_cache(self, model, budget: float | None, new_tokens: int):
        """A cache of this method; with a budget, its size knobs are set when it sees the prompt (raising
        ``UnreachableBudget`` there if the method cannot hold that little)."""
        if budget is None:
            return make_cache(model, self.name, **dict(self.knobs))
        return make_cache(model, self.name, budget=budget, new_tokens=new_tokens, **dict(self.knobs))


def _key(record: dict) -> tuple:
    return tuple(record[k] for k in ("method", "budget", "task", "length", "placement", "index"))


def _done(path: Path) -> set:
    """Keys of the finished records; a record cut by an interruption is dropped from the file, to be redone."""
    if not path.exists():
        return set()
    done, kept = set(), []
    text = path.read_text()
    for line in text.splitlines():
        try:
            done.add(_key(json.loads(line)))
            kept.append(line)
        except (json.JSONDecodeError, KeyError):
            continue
    repaired = "".join(line + "\n" for line in kept)
    if repaired != text:
        with atomic_path(path) as tmp:
            tmp.write_text(repaired)
    return done


def run_sweep(model, tokenizer, specs: list[MethodSpec], *, tasks: list[str], lengths: list[int],
              samples: int, budgets: list[float | None], placements: list[str], out_dir: Path,
              seed: int = 0, max_new_tokens: int = 16, progress: bool = True) -> Path:
    """Run every combination not yet in ``out_dir/samples.jsonl`` and append its record; returns that path."""
    tasks = expand_tasks(tasks)
    limit = geometry(model).max_context
    if max(lengths) + 64 > limit:
        raise OjaKVError(f"length {max(lengths)} leaves no room to answer in the model's context of {limit}")
    for placement in placements:
        if placement not in PLACEMENTS:
            raise OjaKVError(f"placement must be one of {', '.join(PLACEMENTS)}, got {placement!r}")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "samples.jsonl"
    done = _done(path)
    jobs = [
        (spec, budget, task, length, placement, index)
        for spec in specs for budget in (budgets if spec.name != "full" else [None])
        for task in tasks for length in lengths
        for placement in (placements if task != "ppl" else ["after"]) for index in range(samples)
    ]
    todo = [job for job in jobs if (job[0].label, job[1], *job[2:]) not in done]
    with path.open("a") as sink:
        for spec, budget, task, length, placement, index in tqdm(todo, desc="eval", unit="sample",
                                                                   disable=not progress):
            try:
                if task == "ppl":
                    record = _perplexity(model, tokenizer, spec, budget, length, index, seed)
                else:
                    record = _generate(model, tokenizer, spec, budget,
                                       make_sample(task, tokenizer, length, index, seed), placement, max_new_tokens)
            except UnreachableBudget as unreachable:  # recorded, so the sweep goes on and the report says why
                record = {"method": spec.label, "budget": budget, "task": task, "length": length,
                          "placement": placement, "index": index, "unreachable": str(unreachable)}
            sink.write(json.dumps(record) + "\n")
            sink.flush()
    return path


def _base_record(spec, budget, task, length, placement, index, cache, seconds) -> dict:
    report = cache.memory()
    return {"method": spec.label, "budget": budget, "task": task, "length": length, "placement": placement,
            "index": index, "knobs": cache.config, "held_bytes": report.held_bytes, "full_bytes": report.full_bytes,
            "held_ratio": report.ratio, "seconds": round(seconds, 3)}


def _generate(model, tokenizer, spec, budget, sample, placement, max_new_tokens) -> dict:
    context = tokenizer(sample.context, add_special_tokens=False).input_ids
    question = tokenizer(sample.question, add_special_tokens=False).input_ids
    ids = torch.tensor([context + question], device=model.device)
    start = time.perf_counter()
    # The budget covers every token cached: the prompt (context and question) and the answer.
    prompt_tokens = len(context) if placement == "after" else ids.shape[1]
    new_tokens = ids.shape[1] - prompt_tokens + max_new_tokens
    with spec.make_cache(model, budget, new_tokens) as cache, torch.no_grad():
        if placement == "after":  # the compressor sees the context alone; the question arrives afterwards
            model(input_ids=ids[:, : len(context)], use_cache=True, **cache_kwargs(model, cache))
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id, **cache_kwargs(model, cache))
    completion = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    record = _base_record(spec, budget, sample.task, sample.length, placement, sample.index, cache,
                          time.perf_counter() - start)
    record.update(score=string_match_all(completion, sample.answers), completion=completion,
                  answers=sample.answers, meta=sample.meta)
    return record


def _perplexity(model, tokenizer, spec, budget, length, index, seed) -> dict:
    """Decode-mode perplexity: compress ``length`` tokens of essay text, then score the next tokens one by one
    through the compressed cache, so eviction and decode-time updates are measured rather than bypassed."""
    from ..data import essay_text

    ids = tokenizer(essay_text("eval"), add_special_tokens=False).input_ids
    total = length + PPL_CONTINUATION
    start_at = (index * 7919 + seed * 104729) % max(1, len(ids) - total)
    ids = torch.tensor([ids[start_at : start_at + total]], device=model.device)
    nll, start = 0.0, time.perf_counter()
    with spec.make_cache(model, budget, PPL_CONTINUATION) as cache, torch.no_grad():
        kv = cache_kwargs(model, cache)
        logits = model(input_ids=ids[:, :length], use_cache=True, **kv).logits[:, -1]
        for t in range(length, total):
            nll -= torch.log_softmax(logits.float(), -1)[0, ids[0, t]].item()
            logits = model(input_ids=ids[:, t : t + 1], use_cache=True, **kv).logits[:, -1]
    record = _base_record(spec, budget, "ppl", length, "after", index, cache, time.perf_counter() - start)
    record.update(score=math.exp(nll / PPL_CONTINUATION))
    return record
