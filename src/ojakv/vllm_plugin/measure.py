"""Measure the plugin: KV pool size, greedy agreement (with vLLM's default backend and with ojakv's Hugging Face
path) and throughput, per served format, on one model (default: the embedded SmolLM2-135M).

    VLLM_CPU_KVCACHE_SPACE=1 python -m ojakv.vllm_plugin.measure \\
        --formats default,turboquant:bits=4,quant:bits=4 --lengths 1000,3000 --seeds 0,1,2 --hf --json runs/vllm.json

A format is ``default`` (vLLM's own backend) or ``method:knob=value+knob=value`` as in ``ojakv eval``
(``turboquant:bits=4``, ``quant:budget=0.25``, ``ojakv:budget=0.25+calibration_file=cal.safetensors``). The
engine for each format is started and stopped in turn (one at a time: they share the CPU).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from pathlib import Path

PASSKEY_TOKENS = 16  # new tokens per pass-key answer: "The pass key is" → " 12345. ..."


def parse_format(spec: str) -> dict | None:
    """``default`` → None; ``method:k=v+k=v`` → the plugin's settings dict (numbers parsed)."""
    if spec == "default":
        return None
    method, _, rest = spec.partition(":")
    settings: dict = {"method": method}
    for item in filter(None, rest.split("+")):
        name, sep, raw = item.partition("=")
        if not sep:
            raise SystemExit(f"knob {item!r} of {spec!r} needs a value: name=value")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        settings[name] = value
    return settings


def engine_kwargs(settings: dict | None) -> dict:
    if settings is None:
        return {}
    return {"attention_backend": "CUSTOM", "additional_config": {"ojakv": settings}}


def make_llm(model: str, settings: dict | None, *, max_model_len: int = 4096, **extra):
    from vllm import LLM

    return LLM(model=model, dtype="bfloat16", max_model_len=max_model_len, enforce_eager=True,
               **engine_kwargs(settings), **extra)


def pool_tokens(llm) -> int:
    cache = llm.llm_engine.vllm_config.cache_config
    return int(cache.num_gpu_blocks) * int(cache.block_size)


def passkey_prompts(tokenizer, lengths, seeds, haystacks=("noise", "essays")):
    from ..data import passkey_prompt

    items = []
    for haystack in haystacks:
        for n in lengths:
            for seed in seeds:
                prompt, key = passkey_prompt(tokenizer, n, seed=seed, haystack=haystack)
                items.append({"haystack": haystack, "tokens": n, "seed": seed, "prompt": prompt, "key": key})
    return items


def needle_prompts(tokenizer, tasks, lengths, samples: int):
    """RULER-style needle prompts of ojakv's eval tasks (``ojakv.evaluation.tasks``): context + first question,
    answered when every expected string is in the continuation."""
    from ..evaluation.tasks import make_sample

    items = []
    for task in tasks:
        for n in lengths:
            for index in range(samples):
                sample = make_sample(task, tokenizer, n, index)
                items.append({"haystack": task, "tokens": n, "seed": index, "prompt": sample.context + sample.question,
                              "key": sample.answers})
    return items


def answered(item: dict, text: str) -> bool:
    keys = item["key"] if isinstance(item["key"], list) else [item["key"]]
    return all(key in text for key in keys)


def greedy(llm, prompts: list[str], max_tokens: int) -> list[list[int]]:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


def hf_greedy(model_path: str, method: str, knobs: dict, prompts: list[str], max_tokens: int) -> list[list[int]]:
    """Greedy tokens from ojakv's Hugging Face path (``make_cache`` + ``generate``), bfloat16, one prompt at a
    time."""
    import torch

    import ojakv
    from ..hf.compat import cache_kwargs

    model, tokenizer = ojakv.load_model(model_path, dtype=torch.bfloat16)
    results = []
    for prompt in prompts:
        inputs = tokenizer(prompt, return_tensors="pt")
        with ojakv.make_cache(model, method, **knobs) as cache, torch.no_grad():  # closed: hooks removed
            out = model.generate(**inputs, **cache_kwargs(model, cache), max_new_tokens=max_tokens, do_sample=False)
        results.append(out[0, inputs.input_ids.shape[1]:].tolist())
    return results


def library_equivalent(settings: dict | None, head_dim: int) -> tuple[str, dict] | None:
    """The library method (and knobs) that stores what a served format stores, where there is one."""
    if settings is None:
        return "full", {}
    from .formats import resolve
    from .settings import parse

    resolved = resolve(parse(settings), head_dim, 2)
    if resolved.method == "turboquant" and resolved.prefill_attention == "full":  # the library's only prefill
        return "turboquant", {"bits": resolved.bits, "rotation_seed": resolved.rotation_seed, "residual": 0,
                              "key_variant": "mse"}
    if resolved.method == "ojakv":
        size = {"body_bits": resolved.body_bits} if resolved.body_bits is not None else {"rank": resolved.rank}
        return "staticpca", {**size, "key_mode": resolved.key_mode, "calibration_file": resolved.calibration_file,
                             "prefill_attention": resolved.prefill_attention}
    return None  # quant: per-token keys have no library method (the library's kivi quantizes keys per channel)


def agreement(a: list[int], b: list[int]) -> float:
    """Share of positions where two greedy continuations agree, up to the first difference counted as all after."""
    n = max(len(a), len(b))
    same = 0
    for x, y in zip(a, b):
        if x != y:
            break
        same += 1
    return same / n if n else 1.0


def throughput(llm, tokenizer, concurrency: int, prompt_tokens: int, new_tokens: int) -> dict:
    from vllm import SamplingParams

    from ..data import passkey_prompt

    prompts = [passkey_prompt(tokenizer, prompt_tokens, seed=1000 + i, haystack="essays", depth=(i % 10) / 10)[0]
               for i in range(concurrency)]
    params = SamplingParams(max_tokens=new_tokens, min_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    return {"concurrency": concurrency, "seconds": elapsed, "output_tokens_per_s": generated / elapsed,
            "total_tokens_per_s": (generated + prompt) / elapsed}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ojakv.vllm_plugin.measure", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="model folder (default: the embedded model, converted)")
    parser.add_argument("--formats", default="default,turboquant:bits=4,quant:bits=4")
    parser.add_argument("--lengths", default="1000,3000", help="pass-key prompt lengths in tokens ('' for none: "
                        "pool sizes only)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--haystacks", default="noise,essays")
    parser.add_argument("--needles", default="", help="needle tasks of ojakv eval at the same lengths, e.g. "
                        "niah_single_1,niah_single_2 ('' for none)")
    parser.add_argument("--needle-samples", type=int, default=2)
    parser.add_argument("--hf", action="store_true", help="also run the library's HF path for each format")
    parser.add_argument("--throughput", default="", help="concurrency levels, e.g. 1,8,32 (2K prompt + 64 new)")
    parser.add_argument("--throughput-prompt", type=int, default=2048)
    parser.add_argument("--throughput-new", type=int, default=64)
    parser.add_argument("--json", type=Path, dest="json_out")
    parser.add_argument("--baseline", type=Path, help="a JSON of an earlier run with the same prompts whose "
                        "'default' entry is compared with (instead of running the default backend again)")
    args = parser.parse_args(argv)

    from ..hf.architecture import head_dim as config_head_dim
    from ..hf.loading import read_config, read_tokenizer  # transformers only through ojakv.hf

    model = args.model
    if model is None:
        from ..models import convert_embedded

        model = str(convert_embedded())
    tokenizer = read_tokenizer(model)
    head_dim = config_head_dim(read_config(model))
    items = passkey_prompts(tokenizer, [int(x) for x in args.lengths.split(",") if x],
                            [int(x) for x in args.seeds.split(",") if x], tuple(args.haystacks.split(",")))
    items += needle_prompts(tokenizer, [t for t in args.needles.split(",") if t],
                            [int(x) for x in args.lengths.split(",") if x], args.needle_samples)
    prompts = [item["prompt"] for item in items]
    levels = [int(x) for x in args.throughput.split(",") if x]
    report: dict = {"model": model, "formats": {}}
    default_tokens = default_texts = None
    if args.baseline:
        earlier = json.loads(args.baseline.read_text())["formats"]["default"]
        report["formats"]["default"] = earlier
        default_tokens = earlier.get("tokens")  # files from before tokens were kept: compared by text below
        default_texts = earlier["texts"]
    for spec in args.formats.split(","):
        settings = parse_format(spec)
        llm = make_llm(model, settings, enable_prefix_caching=False)
        entry: dict = {"settings": settings, "pool_tokens": pool_tokens(llm)}
        entry["max_concurrency"] = entry["pool_tokens"] / llm.llm_engine.vllm_config.model_config.max_model_len
        start = time.perf_counter()
        tokens = greedy(llm, prompts, PASSKEY_TOKENS) if prompts else []
        entry["passkey_seconds"] = time.perf_counter() - start
        entry["throughput"] = [throughput(llm, tokenizer, c, args.throughput_prompt, args.throughput_new)
                               for c in levels]
        del llm
        gc.collect()
        texts = [tokenizer.decode(t) for t in tokens]
        entry["found"] = [answered(item, text) for item, text in zip(items, texts)]
        entry["texts"] = texts
        entry["tokens"] = tokens
        if spec == "default":
            default_tokens, default_texts = tokens, texts
        if default_tokens is not None:
            entry["agreement_with_default"] = [agreement(a, b) for a, b in zip(tokens, default_tokens)]
        if default_texts is not None:
            entry["same_as_default"] = [a == b for a, b in zip(texts, default_texts)]
        report["formats"][spec] = entry
        _save(args.json_out, report, items)
        equivalent = library_equivalent(settings, head_dim) if args.hf else None
        if equivalent is not None:
            hf_tokens = hf_greedy(model, *equivalent, prompts, PASSKEY_TOKENS)
            entry["hf_method"] = {"method": equivalent[0], **equivalent[1]}
            entry["hf_texts"] = [tokenizer.decode(t) for t in hf_tokens]
            entry["hf_found"] = [answered(item, text) for item, text in zip(items, entry["hf_texts"])]
            entry["agreement_with_hf"] = [agreement(a, b) for a, b in zip(tokens, hf_tokens)]
            entry["same_as_hf"] = [a == b for a, b in zip(tokens, hf_tokens)]
            _save(args.json_out, report, items)
        _print_row(spec, entry, report["formats"].get("default"))
    return 0


def _save(path: Path | None, report: dict, items: list[dict]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**report, "items": [{k: v for k, v in i.items() if k != "prompt"} for i in items]},
                               indent=1))


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else math.nan


def _print_row(spec: str, entry: dict, default: dict | None) -> None:
    parts = [f"{spec}: pool {entry['pool_tokens']:,} tokens (max concurrency {entry['max_concurrency']:.2f}x)"]
    if default is not None and default is not entry:
        parts.append(f"({entry['pool_tokens'] / default['pool_tokens']:.2f}x default)")
    if entry["found"]:
        parts.append(f"pass key found {sum(entry['found'])}/{len(entry['found'])}")
    if entry.get("same_as_default"):
        parts.append(f"identical to default {sum(entry['same_as_default'])}/{len(entry['same_as_default'])}")
    if "same_as_hf" in entry:
        parts.append(f"HF {entry['hf_method']['method']}: found {sum(entry['hf_found'])}/{len(entry['hf_found'])}, "
                     f"identical {sum(entry['same_as_hf'])}/{len(entry['same_as_hf'])}, "
                     f"mean agreement {_mean(entry['agreement_with_hf']):.2f}")
    for t in entry["throughput"]:
        parts.append(f"[{t['concurrency']} concurrent: {t['output_tokens_per_s']:.1f} out tok/s]")
    print("  ".join(parts), flush=True)


if __name__ == "__main__":
    sys.exit(main())
