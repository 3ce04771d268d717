"""The no-generation fidelity measure: zero at every method's no-compression setting, positive when compressing."""

from __future__ import annotations

import pytest

from ojakv.evaluation import MethodSpec
from ojakv.evaluation.fidelity import Reference, Text, fidelity_table, measure, run_fidelity
from ojakv.methods import registered

from test_methods import COMPRESSING, NO_COMPRESSION


@pytest.fixture(scope="module")
def reference(tiny):
    import torch

    ids = torch.randint(3, tiny.config.vocab_size, (140,), generator=torch.Generator().manual_seed(31)).tolist()
    return Reference(tiny, Text("random", ids[:120], ids[120:]))


def _spec(method: str, knobs: dict) -> MethodSpec:
    return MethodSpec.parse(method + (":" + ",".join(f"{k}={v}" for k, v in knobs.items()) if knobs else ""))


@pytest.mark.parametrize("method", sorted(registered()))
def test_no_compression_moves_no_attention_output_and_no_distribution(tiny, reference, method):
    record = measure(tiny, _spec(method, NO_COMPRESSION[method]), None, reference)
    assert max(record["layer_errors"].values()) <= 1e-5 and abs(record["kl"]) <= 1e-6, record


@pytest.mark.parametrize("method", ["ojakv", "snapkv", "kivi", "streaming-llm"])
def test_compression_shows_as_error_and_divergence(tiny, reference, method):
    knobs = {**COMPRESSING[method], **({"group": 16} if method == "kivi" else {})}
    record = measure(tiny, _spec(method, knobs), None, reference)
    assert record["mean_error"] > 1e-3 and record["kl"] > 1e-6 and record["held_ratio"] < 1.0


def test_a_sweep_reports_every_method_and_budget(tiny, reference):
    records = run_fidelity(tiny, [MethodSpec.parse("full"), MethodSpec.parse("snapkv")], [0.5, 0.3],
                           [reference.text], progress=False)
    assert [(r["method"], r["budget"]) for r in records] == [("full", None), ("snapkv", 0.5), ("snapkv", 0.3)]
    low, high = records[2], records[1]
    assert low["held_ratio"] < high["held_ratio"] and low["kl"] >= high["kl"] * 0.5
    assert "| snapkv | 0.3 | 1 |" in fidelity_table(records)
