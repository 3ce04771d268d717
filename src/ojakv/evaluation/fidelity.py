"""Fidelity without generation: how far a compressed cache moves each layer's attention and the next-token
distribution, against the full cache, on the same text.

For a text split into a context (what the cache compresses) and a continuation:

- **attention-output error per layer**: the continuation's keys, values and queries are taken from one
  full-precision forward of the whole text; each layer of the compressed cache (the context compressed, by the
  method's own prefill or derived from the shared one) receives the continuation's keys and values as in a
  forward call, and the continuation's queries attend to what it returns. The error is ‖o_c − o_f‖ / ‖o_f‖ over
  the continuation's positions and heads, o_f the full cache's attention output. Every layer sees the same
  queries, so each layer's number is that layer's own damage, not what earlier layers passed on.
- **KL divergence** KL(p_full ‖ p_compressed) of the next-token distributions over the continuation, fed token
  by token through the compressed cache after its context (decode mode, so evictions and decode-time updates
  act), in nats per token.

Cheap enough to run over every method and budget; it guides design, task accuracy stays the verdict.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .. import prefill as shared_prefill
from ..attention import latent_attention
from ..hf import (AttentionInputs, attention_scale, cache_kwargs, compute_queries, logit_softcap, sliding_windows,
                  take_posted_body)
from ..methods import UnreachableBudget
from .runner import MethodSpec
from .tasks import SUITES, TASKS


def known_task(name: str) -> bool:
    return name in TASKS


@dataclass
class Text:
    """A named text: the context a cache compresses and the continuation it is measured on (token ids)."""

    name: str
    context: list[int]
    continuation: list[int]


def essay_text(tokenizer, context_tokens: int, continuation_tokens: int, index: int = 0) -> Text:
    """Held-out essay text (the eval split), a window chosen by ``index``."""
    from ..data import essay_text as essays

    ids = tokenizer(essays("eval"), add_special_tokens=False).input_ids
    total = context_tokens + continuation_tokens
    start = (index * 7919) % max(1, len(ids) - total)
    return Text(f"essays#{index}", ids[start : start + context_tokens], ids[start + context_tokens : start + total])


def task_text(tokenizer, task: str, length: int, index: int = 0, seed: int = 0) -> Text:
    """A task prompt: its context, then (after the next turn, where the task has one) the first question with its
    right answer as the continuation."""
    from .tasks import make_sample

    sample = make_sample(task, tokenizer, length, index, seed)
    query = sample.queries[0]
    answered = sample.turn + query.question + " " + ", ".join(query.answers)
    continuation = tokenizer(answered, add_special_tokens=False).input_ids
    return Text(f"{task}#{index}", tokenizer(sample.context, add_special_tokens=False).input_ids, continuation)


class Reference:
    """The full cache's view of a text: one full-precision forward of context + continuation (per layer: keys,
    values, attention inputs, and the continuation's attention outputs), the context's own prefill (shared with
    derived caches), and the next-token logits over the continuation."""

    def __init__(self, model, text: Text):
        self.text, self.start = text, len(text.context)
        ids = torch.tensor([text.context + text.continuation], device=model.device)
        self.whole = shared_prefill.capture(model, ids)
        self.context = shared_prefill.capture(model, ids[:, : self.start])
        self.global_layers = [i for i, window in enumerate(sliding_windows(model)) if window is None]
        self.outputs = {i: attend(self.queries(i), self.whole.keys[i], self.whole.values[i], self.module(i))
                        for i in self.global_layers}
        with torch.no_grad():
            self.logits = model(input_ids=ids).logits[0, self.start - 1 : -1].float()

    def module(self, layer: int):
        return self.whole.inputs[layer].module

    def continuation_inputs(self, layer: int) -> AttentionInputs:
        """The continuation's attention inputs at ``layer``, as the hooks would hand them to a cache."""
        inputs, n = self.whole.inputs[layer], self.start
        return AttentionInputs(inputs.module, inputs.hidden_states[:, n:], inputs.cos[:, n:], inputs.sin[:, n:])

    def queries(self, layer: int) -> torch.Tensor:
        """Post-RoPE queries of the continuation at ``layer`` [1, H, m, d]."""
        inputs = self.continuation_inputs(layer)
        return compute_queries(inputs.module, inputs.hidden_states, inputs.cos, inputs.sin)


def attend(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, module, body=None) -> torch.Tensor:
    """Causal attention of the last m positions (``queries`` [1, H, m, d]) over ``keys``/``values`` [1, h, n, d]
    (the m new tokens last), with a posted low-rank ``body`` spliced in if there is one; returns [1, m, H, d]."""
    m, n = queries.shape[2], keys.shape[2] + (body.length if body is not None else 0)
    mask = torch.ones(m, n, dtype=torch.bool, device=queries.device).tril(n - m)[None, None]
    scale, cap = attention_scale(module, queries.shape[-1]), logit_softcap(module)
    if body is not None:
        return latent_attention(queries.float(), keys, values, mask, body, scale, cap).float()
    groups = queries.shape[1] // keys.shape[1]
    keys, values = keys.float().repeat_interleave(groups, 1), values.float().repeat_interleave(groups, 1)
    scores = queries.float() @ keys.transpose(-1, -2) * scale
    if cap is not None:
        scores = torch.tanh(scores / cap) * cap
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return (probs @ values).transpose(1, 2)


def measure(model, spec: MethodSpec, budget: float | None, reference: Reference) -> dict:
    """Attention-output errors per global layer and the KL over the continuation, for one method at a budget."""
    text, started = reference.text, time.perf_counter()
    record = {"method": spec.label, "budget": budget, "text": text.name, "context": len(text.context),
              "continuation": len(text.continuation)}
    try:
        errors, held = _layer_errors(model, spec, budget, reference)
        kl = _kl(model, spec, budget, reference)
    except UnreachableBudget as unreachable:
        return {**record, "unreachable": str(unreachable)}
    return {**record, "held_ratio": held, "layer_errors": errors, "mean_error": sum(errors.values()) / len(errors),
            "worst_layer": max(errors, key=errors.get), "kl": kl, "seconds": round(time.perf_counter() - started, 3)}


def _compressed_context(model, spec: MethodSpec, budget, reference: Reference):
    """The method's cache holding the context (derived from the shared prefill where the method allows it) and
    the context's next-token logits under it."""
    new_tokens = len(reference.text.continuation)
    cache = spec.make_cache(model, budget, new_tokens)
    if spec.prefills_in_full(model, budget, len(reference.text.context), new_tokens):
        return shared_prefill.derive(cache, reference.context), reference.context.last_logits[0].float()
    ids = torch.tensor([reference.text.context], device=model.device)
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=True, **cache_kwargs(model, cache)).logits[0, -1].float()
    return cache, logits


def _layer_errors(model, spec, budget, reference: Reference) -> tuple[dict[int, float], float]:
    """Each global layer: the continuation's K/V into the compressed cache, its queries on what comes back."""
    errors = {}
    cache, _ = _compressed_context(model, spec, budget, reference)
    n, m = reference.start, len(reference.text.continuation)
    with cache, torch.no_grad():
        cache.begin_forward(None, torch.arange(n, n + m, device=model.device)[None], 1, m, model.device)
        for layer in range(len(cache.layers)):
            cache.receive_attention_inputs(layer, reference.continuation_inputs(layer))
            keys, values = reference.whole.keys[layer][:, :, n:], reference.whole.values[layer][:, :, n:]
            returned_keys, returned_values = cache.update(keys, values, layer)
            if layer in reference.outputs:
                module = reference.module(layer)
                output = attend(reference.queries(layer), returned_keys, returned_values, module,
                                take_posted_body(module))
                full = reference.outputs[layer]
                errors[layer] = float((output - full).norm() / full.norm().clamp_min(1e-30))
        return errors, cache.memory().ratio


def _kl(model, spec, budget, reference: Reference) -> float:
    """Mean KL(p_full ‖ p_compressed) in nats over the continuation, decoded token by token."""
    cache, first = _compressed_context(model, spec, budget, reference)
    logits = [first]
    with cache, torch.no_grad():
        kv = cache_kwargs(model, cache)
        for token in reference.text.continuation[:-1]:
            step = torch.tensor([[token]], device=model.device)
            logits.append(model(input_ids=step, use_cache=True, **kv).logits[0, -1].float())
    compressed = torch.log_softmax(torch.stack(logits), -1)
    full = torch.log_softmax(reference.logits, -1)
    return float((full.exp() * (full - compressed)).sum(-1).mean())


def run_fidelity(model, specs: list[MethodSpec], budgets: list[float | None], texts: list[Text], *,
                 progress: bool = True) -> list[dict]:
    """``measure`` for every method × budget × text (the full cache's reference made once per text)."""
    from tqdm.auto import tqdm

    cells = [(spec, budget) for spec in specs for budget in (budgets if spec.name != "full" else [None])]
    records = []
    with tqdm(total=len(cells) * len(texts), desc="fidelity", unit="run", disable=not progress) as bar:
        for text in texts:
            reference = Reference(model, text)
            for spec, budget in cells:
                records.append(measure(model, spec, budget, reference))
                bar.update()
    return records


def fidelity_table(records: list[dict]) -> str:
    """Per method and budget, means over the texts: held ratio, attention-output error (mean over global layers,
    and the worst layer's), KL in nats per token."""
    from collections import defaultdict
    from statistics import mean

    groups = defaultdict(list)
    for record in records:
        groups[(record["method"], record["budget"])].append(record)
    lines = ["| method | budget | texts | held | attention error (mean over layers) | worst layer: error | "
             "KL nats/token |", "|---|---|---|---|---|---|---|"]
    for (method, budget), runs in groups.items():
        measured = [r for r in runs if "unreachable" not in r]
        if not measured:
            lines.append(f"| {method} | {budget} | {len(runs)} | | | | unreachable |")
            continue
        per_layer = defaultdict(list)
        for run in measured:
            for layer, error in run["layer_errors"].items():
                per_layer[int(layer)].append(error)
        worst = max(per_layer, key=lambda layer: mean(per_layer[layer]))
        lines.append(f"| {method} | {'' if budget is None else budget} | {len(measured)} | "
                     f"{mean(r['held_ratio'] for r in measured):.3f} | {mean(r['mean_error'] for r in measured):.4f} | "
                     f"{worst}: {mean(per_layer[worst]):.4f} | {mean(r['kl'] for r in measured):.4f} |")
    return "\n".join(lines) + "\n"


def plot_layer_errors(records: list[dict], path) -> None:
    """Attention-output error against layer, one line per method and budget (means over texts)."""
    from collections import defaultdict
    from statistics import mean

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    curves = defaultdict(lambda: defaultdict(list))
    for record in records:
        for layer, error in record.get("layer_errors", {}).items():
            curves[(record["method"], record["budget"])][int(layer)].append(error)
    fig, ax = plt.subplots(figsize=(7, 4))
    for (method, budget), layers in curves.items():
        xs = sorted(layers)
        ax.plot(xs, [mean(layers[x]) for x in xs], marker=".", label=f"{method} @ {budget}")
    ax.set_xlabel("layer")
    ax.set_ylabel("attention-output error ‖o_c − o_f‖ / ‖o_f‖")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
