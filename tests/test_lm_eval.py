"""The lm-evaluation-harness adapter: same scores as lm-eval's HFLM without compression, different scores with it,
and the shipped offline tasks running end to end."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from ojakv.errors import OjaKVError  # noqa: E402
from ojakv.lm_eval import with_task_path  # noqa: E402
from ojakv.lm_eval_adapter import OjaKVLM, split_model_args  # noqa: E402
from ojakv.lm_eval_tasks import TASKS_DIR  # noqa: E402
from ojakv.models import gguf_path  # noqa
from tiny import tiny_model  # noqa: E402

CONTEXT = "The grass is green and the sky is blue. " * 14  # ~150 tokens: more than the anchors keep exact


@pytest.fixture(scope="module")
def small(tokenizer):
    return tiny_model("llama", vocab_size=len(tokenizer), max_context=1024, seed=4)


def _requests(kind, arguments):
    return [Instance(request_type=kind, doc={}, arguments=args, idx=i) for i, args in enumerate(arguments)]


LOGLIKELIHOOD = [(CONTEXT + "Question: what colour is the grass?\nAnswer:", " green"),
                 (CONTEXT + "Question: what colour is the sky?\nAnswer:", " blue like the sea"),
                 ("Short context:", " a short answer")]


def _adapter(model, tokenizer, **args):
    return OjaKVLM(pretrained=model, tokenizer=tokenizer, batch_size=2, **args)


@pytest.mark.parametrize("args", [dict(method="full"), dict(method="ojakv", rank_ratio=1.0, eta_decode=0)])
def test_adapter_scores_equal_hflm_at_no_compression(small, tokenizer, args):
    plain = HFLM(pretrained=small, tokenizer=tokenizer, batch_size=2)
    adapter = _adapter(small, tokenizer, **args)
    expected = plain.loglikelihood(_requests("loglikelihood", LOGLIKELIHOOD))
    actual = adapter.loglikelihood(_requests("loglikelihood", LOGLIKELIHOOD))
    for (want, want_greedy), (got, got_greedy) in zip(expected, actual):
        assert got == pytest.approx(want, abs=1e-3) and got_greedy == want_greedy
    rolling = _requests("loglikelihood_rolling", [(CONTEXT,)])
    assert adapter.loglikelihood_rolling(rolling)[0] == pytest.approx(plain.loglikelihood_rolling(rolling)[0], abs=1e-3)


def test_adapter_scores_differ_when_compressing(small, tokenizer):
    exact = _adapter(small, tokenizer, method="full").loglikelihood(_requests("loglikelihood", LOGLIKELIHOOD))
    for args in (dict(method="ojakv", rank_ratio=0.25, n_sink=4, n_recent=8), dict(method="snapkv", capacity=32)):
        compressed = _adapter(small, tokenizer, **args).loglikelihood(_requests("loglikelihood", LOGLIKELIHOOD))
        assert abs(compressed[0][0] - exact[0][0]) > 1e-3, args  # the long context is compressed
        assert compressed[2][0] == pytest.approx(exact[2][0], abs=1e-4)  # a context shorter than any budget is not


def test_every_request_gets_a_fresh_cache(small, tokenizer, monkeypatch):
    adapter = _adapter(small, tokenizer, method="ojakv", rank_ratio=0.5)
    made = []
    original = adapter.make_cache
    monkeypatch.setattr(adapter, "make_cache", lambda: made.append(original()) or made[-1])
    adapter.loglikelihood(_requests("loglikelihood", LOGLIKELIHOOD))
    adapter.generate_until(_requests("generate_until", [(CONTEXT, {"until": ["\n"], "max_gen_toks": 4})] * 3))
    assert len(made) == len(LOGLIKELIHOOD) + 2  # one per scored request, one per generation batch of 2
    assert len({id(cache) for cache in made}) == len(made)
    assert made[-2].get_seq_length() > 150  # generation went through the compressed cache


def test_generation_equals_hflm_at_no_compression(small, tokenizer):
    requests = [(CONTEXT + "Tell me a colour:", {"until": ["\n"], "max_gen_toks": 6, "do_sample": False}),
                ("A shorter prompt:", {"until": ["\n"], "max_gen_toks": 6, "do_sample": False})]
    plain = HFLM(pretrained=small, tokenizer=tokenizer, batch_size=2).generate_until(_requests("generate_until", requests))
    adapter = _adapter(small, tokenizer, method="ojakv", rank_ratio=1.0, eta_decode=0)
    assert adapter.generate_until(_requests("generate_until", requests)) == plain


def test_model_args_are_parsed_with_the_methods_own_types():
    args = {"rank_ratio": 1, "eta_decode": 0, "update_interval": "16", "batch_size": 4}
    knobs, hf_args = split_model_args("ojakv", args)
    assert knobs == {"rank_ratio": 1.0, "eta_decode": 0.0, "update_interval": 16} and hf_args == {"batch_size": 4}
    assert type(knobs["rank_ratio"]) is float and type(knobs["update_interval"]) is int
    with pytest.raises(OjaKVError, match="no argument rank_ration.*rank_ratio"):
        split_model_args("ojakv", {"rank_ration": 0.5})
    with pytest.raises(OjaKVError, match="rank_ratio"):
        split_model_args("ojakv", {"rank_ratio": 2.0})


def test_registered_for_lm_eval_and_wrapper_adds_the_task_folder():
    assert get_model("ojakv") is OjaKVLM
    assert with_task_path(["--model", "ojakv", "--tasks", "ojakv_local"])[-2:] == ["--include_path", str(TASKS_DIR)]
    assert with_task_path(["run", "--include_path", "mine", "--tasks", "x"])[2] == f"mine:{TASKS_DIR}"
    assert with_task_path(["--help"]) == ["--help"]


# Each shipped task's headline metric: a choice, a generated answer, a rolling log-likelihood.
LOCAL_METRICS = {"ojakv_recall": "acc,none", "ojakv_passkey": "exact_match,first_number",
                 "ojakv_rolling": "word_perplexity,none"}


def _local_run(lm) -> tuple[dict, dict]:
    """Each local task's metric, and what the model answered per document: each choice's log-likelihood
    (recall), the generated text (passkey), the document's log-likelihood (rolling)."""
    run = simple_evaluate(model=lm, tasks=["ojakv_local"], limit=2, log_samples=True,
                          task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False))
    metrics = {task: run["results"][task][metric] for task, metric in LOCAL_METRICS.items()}
    answers = {task: [doc["resps"] for doc in run["samples"][task]] for task in LOCAL_METRICS}
    answers["ojakv_recall"] = [choice[0][0] for doc in answers["ojakv_recall"] for choice in doc]
    answers["ojakv_rolling"] = [doc[0][0] for doc in answers["ojakv_rolling"]]
    return metrics, answers


def test_local_tasks_run_through_the_adapter(small, tokenizer):
    plain, plain_answers = _local_run(HFLM(pretrained=small, tokenizer=tokenizer, batch_size=2))
    full, full_answers = _local_run(_adapter(small, tokenizer, method="full"))
    assert full == pytest.approx(plain, rel=1e-4)  # every task type scores as lm-eval's own HFLM does ...
    assert full_answers["ojakv_passkey"] == plain_answers["ojakv_passkey"]  # ... from the same answers
    for task in ("ojakv_recall", "ojakv_rolling"):
        assert full_answers[task] == pytest.approx(plain_answers[task], abs=1e-3), task
    compressed, _ = _local_run(_adapter(small, tokenizer, method="ojakv", rank_ratio=0.25, n_sink=4, n_recent=8))
    assert torch.isfinite(torch.tensor(compressed["ojakv_rolling"]))
    assert compressed["ojakv_rolling"] != pytest.approx(full["ojakv_rolling"], rel=1e-3)  # the cache compressed


@pytest.mark.model
def test_embedded_model_runs_the_local_tasks():
    try:
        gguf_path("smollm2-135m")
    except OjaKVError as missing:  # the message says how to install it
        pytest.skip(str(missing))
    results = simple_evaluate(model="ojakv", model_args="pretrained=embedded,method=ojakv,rank_ratio=0.5",
                              tasks=["ojakv_passkey"], limit=2, batch_size=2, device="cpu",
                              task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False))["results"]
    assert results["ojakv_passkey"]["exact_match,first_number"] == 1.0  # 450-token pass keys survive half rank
