"""Benchmark tasks, scoring, budgets and resumable sweeps, on an offline tokenizer and a tiny model."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from ojakv.errors import OjaKVError
from ojakv.evaluation import MethodSpec, make_sample, run_sweep, string_match_all, summarise
from ojakv.evaluation.report import write_reports
from ojakv.evaluation.tasks import TASKS
from tiny import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", num_layers=2, num_heads=2, num_kv_heads=1, head_dim=64, vocab_size=800,
                      max_context=4096)


def _tokens(tokenizer, text):
    return len(tokenizer(text, add_special_tokens=False).input_ids)


@pytest.mark.parametrize("task", sorted(TASKS))
@pytest.mark.parametrize("length", [512, 2048])
def test_samples_are_deterministic_token_exact_and_hold_their_answer(tokenizer, task, length):
    sample = make_sample(task, tokenizer, length, index=1, seed=3)
    assert sample == make_sample(task, tokenizer, length, index=1, seed=3)
    assert make_sample(task, tokenizer, length, index=2, seed=3).answers != sample.answers
    total = sum(_tokens(tokenizer, text) for text in (sample.context, sample.turn, sample.question))
    assert abs(total - length) <= 0.02 * length
    for answer in sample.answers:
        assert answer in sample.context + sample.turn and answer not in sample.question


@pytest.mark.parametrize("kind", ["noise", "code", "numbers"])
def test_a_context_shift_puts_the_key_in_a_next_turn_of_another_kind(tokenizer, kind):
    sample = make_sample(f"shift_{kind}", tokenizer, 1024, index=2)
    key = sample.answers[0]
    assert key in sample.turn and key not in sample.context
    first = _tokens(tokenizer, sample.context)
    assert abs(first - 512) <= 2  # the first document: half the sample, essays
    marker = {"noise": "The grass is green.", "code": "def ", "numbers": "row 1:"}[kind]
    assert marker in sample.turn and marker not in sample.context
    at = sample.turn.index(key) / len(sample.turn)
    assert abs(at - 0.5) < 0.1  # sample 2's depth, inside the turn


def test_a_context_with_several_needles_asks_for_each_of_them(tokenizer):
    sample = make_sample("niah_multikey_1", tokenizer, 1024, index=0)
    assert len(sample.queries) == 4 and len({q.answers[0] for q in sample.queries}) == 4
    for query in sample.queries:  # each question names its own key, whose value only the context holds
        assert query.answers[0] in sample.context and query.answers[0] not in query.question
    assert len(make_sample("niah_multiquery", tokenizer, 1024, index=0).queries) == 1  # asks for all at once
    assert len(make_sample("passkey", tokenizer, 1024, index=0).queries) == 1


def test_needle_depth_follows_the_sample_index(tokenizer):
    for index, depth in enumerate((0.1, 0.3, 0.5, 0.7, 0.9)):
        sample = make_sample("niah_single_1", tokenizer, 2048, index=index)
        at = sample.context.index(sample.answers[0])
        assert abs(at / len(sample.context) - depth) < 0.03


def test_string_match_all_on_hand_made_cases():
    assert string_match_all("The key is 12345.", ["12345"]) == 1.0
    assert string_match_all("no idea", ["12345"]) == 0.0
    assert string_match_all("alpha and BETA", ["alpha", "beta", "gamma", "delta"]) == 0.5


def test_method_specs_parse_typed_knobs_and_refuse_bad_ones():
    spec = MethodSpec.parse("ojakv:key_mode=post_rope,rank=16")
    assert spec.name == "ojakv" and dict(spec.knobs) == {"key_mode": "post_rope", "rank": 16}
    with pytest.raises(OjaKVError, match="has no knob"):
        MethodSpec.parse("full:rank=3")
    with pytest.raises(OjaKVError, match="knob rank needs a whole number, got 'many'"):
        MethodSpec.parse("ojakv:rank=many")
    with pytest.raises(OjaKVError, match="knob kernel needs a whole number, got '4.5'"):
        MethodSpec.parse("snapkv:kernel=4.5")
    with pytest.raises(OjaKVError, match="knob rank_ratio needs a number, got 'half'"):
        MethodSpec.parse("ojakv:rank_ratio=half")
    assert dict(MethodSpec.parse("streaming-llm:rerotate=False").knobs) == {"rerotate": False}
    assert dict(MethodSpec.parse("streaming-llm:rerotate=true").knobs) == {"rerotate": True}
    with pytest.raises(OjaKVError, match="knob rerotate needs true or false, got 'maybe'"):
        MethodSpec.parse("streaming-llm:rerotate=maybe")
    with pytest.raises(OjaKVError, match="unknown method"):
        MethodSpec.parse("zip")


@pytest.mark.parametrize("policy", ["positional", "residual"])
def test_ojakv_meets_held_bytes_budgets_within_two_hundredths(model, tokenizer, tmp_path, policy):
    spec = MethodSpec.parse(f"ojakv:init=prompt,policy={policy}")
    # float32 here: a transform-coded body (what a budget gives ojakv) holds at most about 0.25 of the full cache
    run_sweep(model, tokenizer, [spec], tasks=["passkey"], lengths=[2048], samples=1, budgets=[0.25, 0.15, 0.1],
              placements=["after"], out_dir=tmp_path, max_new_tokens=4, progress=False)
    rows = summarise(tmp_path / "samples.jsonl")
    assert [r["budget"] for r in rows] == [0.25, 0.15, 0.1]
    for row in rows:
        assert abs(row["held_ratio"] - row["budget"]) <= 0.02 and row["note"] == ""


def test_sweep_resumes_and_redoes_a_cut_record(model, tokenizer, tmp_path):
    specs = [MethodSpec.parse("full"), MethodSpec.parse("ojakv:init=prompt")]
    kwargs = dict(tasks=["passkey", "ppl"], lengths=[256], samples=2, budgets=[None],
                  placements=["after", "inside"], out_dir=tmp_path, max_new_tokens=2, progress=False)
    path = run_sweep(model, tokenizer, specs, **kwargs)
    lines = path.read_text().splitlines()
    assert len(lines) == 2 * (2 * 2 + 2)  # methods x (passkey x placements + ppl) x samples
    run_sweep(model, tokenizer, specs, **kwargs)
    assert path.read_text().splitlines() == lines  # nothing redone
    path.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])  # an interrupted last write
    run_sweep(model, tokenizer, specs, **kwargs)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == len(lines) and path.read_text().endswith("\n")
    rows = write_reports(tmp_path)
    assert (tmp_path / "summary.csv").read_text().splitlines()[0] == \
        "method,budget,task,length,placement,n,accuracy,ci_low,ci_high,held_ratio,vs_full,vs_full_p,vs_best," \
        "vs_best_p,layout,note"
    layouts = {r["method"]: r["layout"] for r in rows}
    assert layouts["full"] == "" and "body low-rank (model dtype)" in layouts["ojakv:init=prompt"]
    ppl = [r for r in rows if r["task"] == "ppl"]
    assert len(ppl) == 2 and all(r["accuracy"] > 1.0 for r in ppl)  # perplexities of a random model
    assert (tmp_path / "summary.md").exists()


SHARED_CHECK = ["full", "snapkv", "ojakv-pf", "h2o", "ojakv", "ojakv:prefill_attention=compressed"]  # ojakv at a budget: full


@pytest.mark.parametrize("placement", ["after", "inside"])
def test_the_shared_prefill_gives_the_records_of_one_prefill_per_method(model, tokenizer, tmp_path, placement):
    specs = [MethodSpec.parse(text) for text in SHARED_CHECK]
    runs = {}
    for share in (True, False):
        out = tmp_path / str(share)
        run_sweep(model, tokenizer, specs, tasks=["passkey", "niah_multikey_1", "shift_code"], lengths=[400], samples=1,
                  budgets=[0.5], placements=[placement], out_dir=out, max_new_tokens=3, progress=False,
                  share_prefill=share)
        records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
        runs[share] = {(r["method"], r["task"], r["query"]): r for r in records}
    assert set(runs[True]) == set(runs[False])
    assert len([key for key in runs[True] if key[1] == "niah_multikey_1"]) == 4 * len(SHARED_CHECK)
    for key, shared in runs[True].items():
        direct = runs[False][key]
        assert (shared["completion"], shared["held_bytes"]) == (direct["completion"], direct["held_bytes"]), key
        assert shared["prefill"] == ("own" if key[0].startswith("ojakv:") else "derived") and direct["prefill"] == "own"


def test_a_next_turn_fed_in_chunks_answers_as_the_whole_prompt_does(model, tokenizer, tmp_path):
    """The full cache's record of a context-shift sample (context prefilled, the turn fed 32 tokens a call, then
    the question) is the greedy completion of the whole text in one prompt; and the turn is refused inside."""
    import torch

    out = run_sweep(model, tokenizer, [MethodSpec.parse("full")], tasks=["shift_numbers"], lengths=[400],
                    samples=1, budgets=[None], placements=["after", "inside"], out_dir=tmp_path, max_new_tokens=6,
                    progress=False)
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert record["placement"] == "after"
    sample = make_sample("shift_numbers", tokenizer, 400, index=0)
    ids = [tokenizer(text, add_special_tokens=False).input_ids for text in (sample.context, sample.turn, sample.question)]
    prompt = torch.tensor([ids[0] + ids[1] + ids[2]])
    with torch.no_grad():
        whole = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6,
                               do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert record["completion"] == tokenizer.decode(whole[0, prompt.shape[1]:], skip_special_tokens=True)


def test_intervals_and_paired_comparisons_in_the_summary(tmp_path):
    records = [{"method": m, "budget": b, "task": "passkey", "length": 64, "placement": "after", "index": i,
                "query": 0, "score": float(score), "held_ratio": ratio}
               for m, b, ratio, scores in (("full", None, 1.0, [1] * 20), ("a", 0.5, 0.5, [1] * 18 + [0] * 2),
                                           ("b", 0.5, 0.5, [1] * 5 + [0] * 15))
               for i, score in enumerate(scores)]
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    rows = {r["method"]: r for r in write_reports(tmp_path)}
    assert rows["full"]["ci_low"] == pytest.approx(0.8389, abs=1e-4) and rows["full"]["ci_high"] == 1.0
    assert rows["a"]["vs_full_p"] == 0.5 and rows["a"]["vs_best"] == 0.0  # 2 losses of 20: inside the noise
    assert rows["b"]["vs_best"] == -0.65 and rows["b"]["vs_best_p"] < 0.001  # 13 losses, no win
    table = (tmp_path / "summary.md").read_text()
    assert "≈ (-0.10, p=0.50)" in table and "-0.65 (p=0.000)" in table and "0.25 [0.11, 0.47]" in table
    assert "| a | 0.5 | 0.900 | 0.500 | 20 |" in table  # the headline: passkey is solved by the full cache


def test_the_headline_leaves_out_tasks_the_full_cache_does_not_solve():
    from ojakv.evaluation.report import headline_table

    row = lambda method, budget, task, accuracy: {"method": method, "budget": budget, "task": task, "length": 64,
                                                  "placement": "after", "n": 10, "accuracy": accuracy,
                                                  "held_ratio": 0.5 if budget else 1.0}
    rows = [row("full", "", "passkey", 1.0), row("full", "", "cwe", 0.1), row("a", 0.5, "passkey", 0.6),
            row("a", 0.5, "cwe", 0.9)]
    table = headline_table(rows)
    assert "not solved by the full cache, so left out: cwe (0.10)" in table
    assert "| a | 0.5 | 0.600 | 0.500 | 10 |" in table


def test_bench_reports_medians_and_ratios_to_full(model, tokenizer):
    from ojakv.evaluation.bench import bench_table, run_bench

    specs = [MethodSpec.parse("full"), MethodSpec.parse("ojakv:init=prompt")]
    records = run_bench(model, tokenizer, specs, [512], repeats=2, decode_tokens=4, progress=False)
    assert [r["method"] for r in records] == ["full", "ojakv:init=prompt"]
    full, compressed = records
    # At 512 tokens: 64 anchors (0.125) + half-rank body (0.44) + float32 bases and Oja statistics (0.125).
    assert full["held_bytes_vs_full"] == 1.0 and 0.65 < compressed["held_bytes_vs_full"] < 0.8
    assert full["held_bytes"] == full["full_bytes"] == 2 * 2 * (512 + 4) * 64 * 4  # K and V, 2 layers, float32
    for key in ("prefill_s", "decode_ms_per_token", "held_bytes", "peak_bytes"):  # medians of two runs, then ratios
        assert compressed[f"{key}_vs_full"] == pytest.approx(compressed[key] / full[key])
    assert full["prefill_s"] > 0 and full["decode_ms_per_token"] > 0  # both phases were timed
    assert "decode_ms_per_token_vs_full" in bench_table(records)


def test_cpu_peak_memory_keeps_the_highest_resident_set_sampled_above_the_start(monkeypatch):
    from ojakv.evaluation import bench

    resident, sampled_high = [100], threading.Event()

    def fake_rss():
        if resident[0] == 500:
            sampled_high.set()
        return resident[0]

    monkeypatch.setattr(bench, "_rss", fake_rss)
    with bench.PeakMemory(torch.device("cpu")) as peak:
        resident[0] = 500  # a block allocates ...
        assert sampled_high.wait(timeout=60)  # (the timeout only turns a stopped sampler into a failure)
        resident[0] = 150  # ... and frees most of it before the block ends
    assert peak.peak == 400


def test_cpu_peak_memory_sees_what_a_block_allocates_even_after_an_earlier_block_freed_as_much(monkeypatch):
    from ojakv.evaluation import bench

    size, real_rss = 64 * 2**20, bench._rss
    for _ in range(2):  # the second block runs where the first one's memory was freed
        allocated = threading.Event()
        with bench.PeakMemory(torch.device("cpu")) as peak:
            base = peak.base
            monkeypatch.setattr(bench, "_rss", lambda: _signal_at(real_rss(), base + 0.9 * size, allocated))
            block = torch.ones(size // 4)  # float32, every page written
            seen = allocated.wait(timeout=60)  # the sampler read the grown resident set (or never will)
            del block
            monkeypatch.setattr(bench, "_rss", real_rss)
        assert seen and peak.peak >= 0.9 * size


def _signal_at(value: int, threshold: float, event: threading.Event) -> int:
    if value >= threshold:
        event.set()
    return value


def test_needle_grid_draws_a_heatmap(model, tokenizer, tmp_path):
    run_sweep(model, tokenizer, [MethodSpec.parse("full")], tasks=["needle"], lengths=[256, 384], samples=3,
              budgets=[None], placements=["after"], out_dir=tmp_path, max_new_tokens=2, progress=False)
    write_reports(tmp_path)
    depths = sorted({json.loads(line)["meta"]["depths"][0] for line in (tmp_path / "samples.jsonl").read_text().splitlines()})
    assert depths == [0.0, 0.1, 0.2]
    assert (tmp_path / "needle_grid_full_None_after.png").stat().st_size > 1000


def test_an_unreachable_budget_is_reported_and_the_sweep_goes_on(model, tokenizer, tmp_path):
    """Cross-layer sharing cannot go below what a 2-layer model's values alone hold: that row says so."""
    spec = MethodSpec.parse("pod")
    run_sweep(model, tokenizer, [spec, MethodSpec.parse("ojakv:init=prompt")], tasks=["passkey"], lengths=[512],
              samples=1, budgets=[0.25], placements=["after"], out_dir=tmp_path, max_new_tokens=2, progress=False)
    rows = write_reports(tmp_path)
    by_method = {r["method"]: r for r in rows}
    assert by_method["pod"]["n"] == 0 and "budget" in by_method["pod"]["note"]
    assert by_method["ojakv:init=prompt"]["n"] == 1


# Knobs that spare a tiny model the offline calibration / grouping files (made from a real model's essays).
NO_FILES = {"staticpca": "init=prompt", "staticpca-h": "init=prompt", "eigen": "init=prompt,key_basis=keys",
            "pod": "delta=0.0"}
# On this 2-layer model at 512 tokens: methods whose bit widths or group sizes cannot come down to 0.6.
FLOORS_ABOVE = {"pod"}  # values stay per layer: 2 layers hold at least 0.75
# A few bit widths, or coefficient rows padded to 16 ranks: they may hold well under the budget, never over it.
# ojakv-tc, and ojakv at a budget: a transform-coded body, 8 bits per coefficient at most.
DISCRETE = {"kivi", "turboquant", "ojakv+quant", "ojakv-tc", "ojakv"}


@pytest.mark.parametrize("method", sorted(set(__import__("ojakv").methods()) - {"full"}))
def test_every_method_runs_in_a_budgeted_sweep_and_in_the_bench(model, tokenizer, tmp_path, method):
    from ojakv.evaluation.bench import run_bench
    from ojakv.methods import get_method

    spec = MethodSpec.parse(f"{method}:{NO_FILES[method]}" if method in NO_FILES else method)
    sized = MethodSpec.parse(method if method == "pod" else spec.label)  # a budget sets pod's delta itself
    run_sweep(model, tokenizer, [sized], tasks=["passkey"], lengths=[512], samples=1, budgets=[0.6],
              placements=["after"], out_dir=tmp_path, max_new_tokens=2, progress=False)
    (record,) = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    if method in FLOORS_ABOVE:
        assert "the least it holds is" in record["unreachable"]
    else:
        assert record["score"] in (0.0, 1.0) and len(record["completion"]) > 0
        assert record["held_ratio"] <= 0.62
        if method not in DISCRETE:
            assert abs(record["held_ratio"] - 0.6) <= 0.02, record["held_ratio"]
        assert set(get_method(method).size_knobs) <= set(record["knobs"])
    (bench,) = run_bench(model, tokenizer, [spec], [512], repeats=1, decode_tokens=2, progress=False)
    assert bench["method"] == spec.label and bench["held_bytes"] > 0 and bench["decode_ms_per_token"] > 0


def test_the_bench_runs_each_method_in_the_configuration_a_budget_gives_it(model, tokenizer):
    from ojakv.evaluation.bench import bench_table, run_bench

    specs = [MethodSpec.parse("full"), MethodSpec.parse("ojakv"), MethodSpec.parse("snapkv")]
    records = run_bench(model, tokenizer, specs, [512], budgets=[0.5, 0.3], repeats=1, decode_tokens=2,
                        progress=False)
    cells = [(r["method"], r["budget"]) for r in records]
    assert cells == [("full", None), ("ojakv", 0.5), ("ojakv", 0.3), ("snapkv", 0.5), ("snapkv", 0.3)]
    held = {cell: r["held_bytes_vs_full"] for cell, r in zip(cells, records)}
    assert held[("full", None)] == 1.0
    for (method, budget), ratio in held.items():  # each budgeted cache holds what its budget allows
        if budget is not None:
            assert ratio <= budget + 0.005, (method, budget, ratio)
    # snapkv's capacity follows the budget; ojakv's coded body at 8 bits a coefficient is float32's 0.25 at most
    assert abs(held[("snapkv", 0.5)] - 0.5) < 0.02 and abs(held[("snapkv", 0.3)] - 0.3) < 0.02
    assert held[("ojakv", 0.3)] > 0.2
    (unbudgeted,) = run_bench(model, tokenizer, [specs[1]], [512], repeats=1, decode_tokens=2, progress=False)
    assert unbudgeted["budget"] is None and unbudgeted["held_bytes"] > records[1]["held_bytes"]
    assert "| ojakv | 0.300 | 512 |" in bench_table(records)
    (kivi,) = run_bench(model, tokenizer, [MethodSpec.parse("kivi")], [512], budgets=[0.05], repeats=1,
                        decode_tokens=2, progress=False)
    assert "the least it holds is" in kivi["unreachable"] and "decode_ms_per_token" not in kivi
    assert "| kivi | 0.050 | 512 | unreachable |" in bench_table([kivi])
