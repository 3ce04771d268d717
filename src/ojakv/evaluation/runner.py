"""Sweeps of methods × budgets × tasks × lengths × question placements, one JSONL record per sample.

A sweep goes context by context. Each context is prefilled once with full-precision attention (``ojakv.prefill``)
and every method whose own prefill is full precision gets its cache derived from that (the same cache its own
prefill would build, tested); methods whose prefill attention runs on compressed K/V prefill for themselves.
With the question after the context, a compressed context is forked for each question asked of it, so one
prefill serves every method, budget and question. A task's next turn (the context-shift tasks) is fed through
each cell's compressed context in chunks of ``TURN_CHUNK`` tokens, as decoding would, before the questions
(so those tasks run with the question after only). Records are appended as each sample finishes, keyed by
everything that defines it, so an interrupted sweep resumes where it stopped. Quality comes from real greedy
generations (or token-by-token decode-mode perplexity); memory from the cache's own report after the sample.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import prefill as shared_prefill
from ..api import make_cache
from ..atomic import atomic_path
from ..errors import OjaKVError
from ..hf import cache_kwargs, geometry, stop_when
from ..methods import UnreachableBudget, get_method, knobs_for_budget, parse_value
from .tasks import SUITES, Sample, expand_tasks, make_sample, string_match_all

PLACEMENTS = ("after", "inside")  # question after the compressed context / inside the compressed prompt
PPL_CONTINUATION = 256  # tokens scored one by one after the compressed context
AFTER_ONLY = {"ppl", *SUITES["shift"]}  # tasks whose text after the context is not a question
TURN_CHUNK = 32  # tokens per forward call when a task's next turn arrives after its context


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

    def prefills_in_full(self, model=None, budget: float | None = None, prompt_tokens: int = 0,
                         new_tokens: int = 0) -> bool:
        """Whether this method's prompt attends to full-precision K/V (so its cache can be derived), with the knobs
        a budget sets for this prompt (a budget may choose how the prompt attends, as ``ojakv``'s does)."""
        method = get_method(self.name)
        knobs = dict(self.knobs)
        if budget is not None:
            try:
                knobs = knobs_for_budget(self.name, knobs, model, prompt_tokens, new_tokens, budget)
            except UnreachableBudget:
                return False  # the cache's own prefill raises it, as the record of an unreachable cell says
        return method.full_prefill(method.make_config(**knobs))

    def make_cache(self, model, budget: float | None, new_tokens: int):
        """A cache of this method; with a budget, its size knobs are set when it sees the prompt (raising
        ``UnreachableBudget`` there if the method cannot hold that little)."""
        if budget is None:
            return make_cache(model, self.name, **dict(self.knobs))
        return make_cache(model, self.name, budget=budget, new_tokens=new_tokens, **dict(self.knobs))


KEY = ("method", "budget", "task", "length", "placement", "index", "query")


def _key(record: dict) -> tuple:
    return tuple(record.get(k, 0) for k in KEY)  # records of sweeps before queries existed: query 0


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


@dataclass(frozen=True)
class Cell:
    """A method at a budget: one column of the results."""

    spec: MethodSpec
    budget: float | None


@dataclass(frozen=True)
class Context:
    """One sample's context, with one placement of its questions."""

    task: str
    length: int
    placement: str
    index: int


def run_sweep(model, tokenizer, specs: list[MethodSpec], *, tasks: list[str], lengths: list[int],
              samples: int, budgets: list[float | None], placements: list[str], out_dir: Path,
              seed: int = 0, max_new_tokens: int = 16, progress: bool = True, share_prefill: bool = True) -> Path:
    """Run every combination not yet in ``out_dir/samples.jsonl`` and append its record; returns that path.

    ``samples`` counts contexts per task and length; a task that asks several questions of one context records
    each as a sample. ``share_prefill=False`` gives every method its own prefill (the direct path)."""
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
    cells = [Cell(spec, budget) for spec in specs for budget in (budgets if spec.name != "full" else [None])]
    sweep = Sweep(model, tokenizer, seed, max_new_tokens, share_prefill)
    contexts = [(task, length, placement, index) for task in tasks for length in lengths
                for placement in (placements if task not in AFTER_ONLY else ["after"]) for index in range(samples)]
    with path.open("a") as sink, tqdm(total=len(contexts), desc="eval", unit="context", disable=not progress) as bar:
        for task, length, placement, index in contexts:
            for record in sweep.run(Context(task, length, placement, index), cells, done):
                sink.write(json.dumps(record) + "\n")
                sink.flush()
            bar.update()
    return path


class Sweep:
    """Runs the cells of one context at a time, sharing its prefill."""

    def __init__(self, model, tokenizer, seed: int, max_new_tokens: int, share_prefill: bool):
        self.model, self.tokenizer, self.seed = model, tokenizer, seed
        self.max_new_tokens, self.share_prefill = max_new_tokens, share_prefill

    def run(self, context: Context, cells: list[Cell], done: set):
        """Records of every (cell, query) of this context not in ``done``."""
        base = (context.task, context.length, context.placement, context.index)
        if context.task == "ppl":
            for cell in cells:
                if (cell.spec.label, cell.budget, *base, 0) not in done:
                    try:
                        yield _perplexity(self.model, self.tokenizer, cell.spec, cell.budget, context.length,
                                          context.index, self.seed)
                    except UnreachableBudget as unreachable:
                        yield _unreachable(cell, context, 0, unreachable)
            return
        sample = make_sample(context.task, self.tokenizer, context.length, context.index, self.seed)
        todo = {cell: [q for q in range(len(sample.queries)) if (cell.spec.label, cell.budget, *base, q) not in done]
                for cell in cells}
        todo = {cell: queries for cell, queries in todo.items() if queries}
        if not todo:
            return
        if context.placement == "after":
            yield from self._after(sample, context, todo)
        else:
            yield from self._inside(sample, context, todo)

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def _shared(self, cache_of_prompt: dict, ids: list[int]):
        """The full-precision prefill of ``ids``, captured once (timed) and reused."""
        key = tuple(ids)
        if key not in cache_of_prompt:
            start = time.perf_counter()
            captured = shared_prefill.capture(self.model, torch.tensor([ids], device=self.model.device))
            cache_of_prompt[key] = (captured, time.perf_counter() - start)
        return cache_of_prompt[key]

    def _prefilled(self, cell: Cell, ids: list[int], new_tokens: int, captured: dict):
        """A cell's cache holding ``ids`` (derived from the shared prefill where the method allows it), how it was
        made, the seconds it took, and the prompt's last logits."""
        cache = cell.spec.make_cache(self.model, cell.budget, new_tokens)
        start = time.perf_counter()
        if self.share_prefill and cell.spec.prefills_in_full(self.model, cell.budget, len(ids), new_tokens):
            shared, _ = self._shared(captured, ids)
            shared_prefill.derive(cache, shared)
            return cache, "derived", time.perf_counter() - start, shared.last_logits
        with torch.no_grad():
            logits = self.model(input_ids=torch.tensor([ids], device=self.model.device), use_cache=True,
                                **cache_kwargs(self.model, cache)).logits[:, -1]
        return cache, "own", time.perf_counter() - start, logits

    def _after(self, sample: Sample, context: Context, todo: dict):
        """The context is compressed once per cell; each question and its answer arrive afterwards, on a fork."""
        ids, turn = self._ids(sample.context), self._ids(sample.turn) if sample.turn else []
        questions = [self._ids(query.question) for query in sample.queries]
        new_tokens = len(turn) + max(len(q) for q in questions) + self.max_new_tokens
        captured: dict = {}
        for cell, queries in todo.items():
            try:
                base, path, prefill_seconds, _ = self._prefilled(cell, ids, new_tokens, captured)
            except UnreachableBudget as unreachable:  # recorded, so the sweep goes on and the report says why
                yield from (_unreachable(cell, context, query, unreachable) for query in queries)
                continue
            with base:
                start = time.perf_counter()
                self._feed(base, ids, turn)
                prefill_seconds += time.perf_counter() - start
                for position, query in enumerate(queries):
                    last = position == len(queries) - 1
                    cache = base if last else base.fork()
                    start = time.perf_counter()
                    completion = self._generate(ids + turn + questions[query], cache, sample.queries[query].answers)
                    record = self._record(cell, context, sample, query, cache, completion, path,
                                          prefill_seconds + time.perf_counter() - start)
                    cache.close()
                    yield record

    def _feed(self, cache, ids: list[int], turn: list[int]) -> None:
        """The next turn's tokens through ``cache`` (which holds ``ids``), ``TURN_CHUNK`` at a time."""
        device = self.model.device
        with torch.no_grad():
            for start in range(0, len(turn), TURN_CHUNK):
                seen = len(ids) + start
                chunk = torch.tensor([turn[start : start + TURN_CHUNK]], device=device)
                mask = torch.ones(1, seen + chunk.shape[1], dtype=torch.long, device=device)
                self.model(input_ids=chunk, attention_mask=mask, use_cache=True, **cache_kwargs(self.model, cache))

    def _inside(self, sample: Sample, context: Context, todo: dict):
        """Each question is part of the prompt the cell compresses; its answer is generated afterwards."""
        captured: dict = {}
        for query in sorted({q for queries in todo.values() for q in queries}):
            ids = self._ids(sample.context) + self._ids(sample.queries[query].question)
            for cell, queries in todo.items():
                if query not in queries:
                    continue
                try:
                    yield self._inside_one(cell, context, sample, query, ids, captured)
                except UnreachableBudget as unreachable:
                    yield _unreachable(cell, context, query, unreachable)

    def _inside_one(self, cell: Cell, context: Context, sample: Sample, query: int, ids: list[int],
                    captured: dict) -> dict:
        start = time.perf_counter()
        cache, path, _, logits = self._prefilled(cell, ids, self.max_new_tokens, captured)
        with cache:
            first = int(logits[0].argmax())
            completion = self._generate(ids + [first], cache, sample.queries[query].answers,
                                        self.max_new_tokens - 1, prefix=[first])
            return self._record(cell, context, sample, query, cache, completion, path, time.perf_counter() - start)

    def _generate(self, ids: list[int], cache, answers: list[str], max_new_tokens: int | None = None,
                  prefix: list[int] = ()) -> str:
        """Greedy completion of ``ids`` (the uncached tail is fed through ``cache`` first), decoded with ``prefix``.

        Generation stops once every answer is in the completion: the score (the fraction of answers found) cannot
        change after that, so the stop saves decode steps without changing any result."""
        new = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        tokens = list(prefix)
        if new > 0 and string_match_all(self._text(tokens), answers) < 1:
            inputs = torch.tensor([ids], device=self.model.device)
            answered = stop_when(len(ids), lambda new_ids: string_match_all(self._text(tokens + new_ids), answers) == 1)
            with torch.no_grad():
                out = self.model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs),
                                          max_new_tokens=new, do_sample=False, stopping_criteria=answered,
                                          pad_token_id=self.tokenizer.pad_token_id, **cache_kwargs(self.model, cache))
            tokens += out[0, inputs.shape[1]:].tolist()
        return self._text(tokens)

    def _text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def _record(self, cell: Cell, context: Context, sample: Sample, query: int, cache, completion: str, path: str,
                seconds: float) -> dict:
        answers = sample.queries[query].answers
        record = _base_record(cell.spec, cell.budget, context.task, context.length, context.placement,
                              context.index, cache, seconds)
        record.update(query=query, prefill=path, score=string_match_all(completion, answers),
                      completion=completion, answers=answers, meta=sample.meta)
        return record


def _unreachable(cell: Cell, context: Context, query: int, reason: Exception) -> dict:
    return {"method": cell.spec.label, "budget": cell.budget, "task": context.task, "length": context.length,
            "placement": context.placement, "index": context.index, "query": query, "unreachable": str(reason)}


def _base_record(spec, budget, task, length, placement, index, cache, seconds) -> dict:
    report = cache.memory()
    return {"method": spec.label, "budget": budget, "task": task, "length": length, "placement": placement,
            "index": index, "knobs": cache.config, "layout": cache.layout(), "held_bytes": report.held_bytes,
            "full_bytes": report.full_bytes,
            "held_ratio": report.ratio, "seconds": round(seconds, 3)}


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
