"""What a cache says it resolved to (``cache.layout()``, ``describe()``, the memory table), and the warning for a
budget above what a method can use."""

from __future__ import annotations

import warnings

import pytest

import ojakv
from ojakv.layout import describe, merge_terms
from ojakv.methods import BudgetAboveCeiling

from helpers import greedy_scores, padded_batch

PROMPT = 200  # long enough that a budget leaves the tiny model's body tokens


def _run(model, cache):
    ids, mask = padded_batch(model.config.vocab_size, (PROMPT,))
    greedy_scores(model, ids, mask, cache, steps=4)
    return cache


def test_terms_of_layers_merge_numbers_as_means_and_words_once():
    merged = merge_terms([{"rank": 4, "body": "transform-coded"}, {"rank": 5, "body": "transform-coded"}])
    assert merged == {"rank": 4.5, "body": "transform-coded"}
    assert describe({"rank": 8.0, "bases": "fixed"}) == "rank 8, bases fixed"
    assert merge_terms([{"body": "a"}, {"body": "b"}]) == {"body": "a / b"}


def test_ojakv_without_a_budget_reports_the_rank_ratio_layout(tiny):
    with _run(tiny, ojakv.make_cache(tiny, "ojakv")) as cache:
        terms = cache.layout()
        table = cache.memory().table()
    assert terms["body"] == "low-rank (model dtype)" and terms["rank"] == 8  # 0.5 of head_dim 16
    assert terms["bits per coordinate"] == 16  # 8 of 16 float32 coordinates
    assert terms["bases"].startswith("move") and terms["prefill"] == "compressed"
    assert table.splitlines()[0] == f"layout: {cache.describe()}" and cache.describe().startswith("ojakv: body")


def test_a_budgeted_ojakv_reports_the_coded_body_once_it_has_seen_the_prompt(tiny):
    cache = ojakv.make_cache(tiny, "ojakv", budget=0.15, new_tokens=4)
    assert "resolved at prefill" in cache.describe()
    with _run(tiny, cache):
        terms = cache.layout()
        bits = [sum(layer.k_coef.bits) + sum(layer.v_coef.bits) for layer in cache.layers]
    assert terms["body"] == "transform-coded" and terms["bases"] == "fixed (int8)" and terms["prefill"] == "full"
    assert terms["bits per coordinate"] == pytest.approx(sum(bits) / len(bits) / (2 * 16), abs=0.01)
    assert 0 < terms["rank"] < 16 and terms["anchors"] in ("32 + 32", "4 + 4")


def test_a_method_without_layout_terms_reports_its_knobs(tiny):
    with _run(tiny, ojakv.make_cache(tiny, "snapkv", budget=0.5, new_tokens=4)) as cache:
        assert cache.layout()["capacity"] == cache.config["capacity"] and "capacity" in cache.describe()


def test_a_budget_above_the_coded_body_s_ceiling_warns_naming_it(tiny):
    # A float32 model: the coded body at its widest is well below a full float32 cache.
    with pytest.warns(BudgetAboveCeiling, match=r"ojakv can use at most 0\.\d+ of the full cache") as caught:
        _run(tiny, ojakv.make_cache(tiny, "ojakv", budget=0.9, new_tokens=4)).close()
    ceiling = float(str(caught[0].message).split("at most ")[1].split()[0])
    assert ceiling < 0.88


def test_a_budget_the_method_can_meet_does_not_warn(tiny):
    with warnings.catch_warnings():
        warnings.simplefilter("error", BudgetAboveCeiling)
        _run(tiny, ojakv.make_cache(tiny, "ojakv", budget=0.15, new_tokens=4)).close()
