"""additional_config={"ojakv": ...}: what is served, and one-line refusals for what is not."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm.v1")  # "vllm" alone would find this folder as a namespace package

from ojakv.errors import OjaKVError  # noqa: E402
from ojakv.vllm_plugin.settings import from_additional_config, parse  # noqa: E402


@pytest.mark.parametrize("section, method", [
    ({"method": "turboquant"}, "turboquant"),
    ({"method": "turboquant", "bits": 3, "rotation_seed": 5}, "turboquant"),
    ({"method": "turboquant", "budget": 0.25}, "turboquant"),
    ({"method": "quant", "bits": 2, "group": 16}, "quant"),
    ({"method": "ojakv", "budget": 0.25, "calibration_file": "cal.safetensors"}, "ojakv"),
    ({"method": "ojakv", "rank": 8, "key_mode": "post_rope", "n_sink": 0, "eta_decode": 0}, "ojakv"),
    ('{"method": "quant"}', "quant"),  # --additional-config passes JSON through, but a string works too
])
def test_served_settings_parse(section, method):
    assert parse(section).method == method


@pytest.mark.parametrize("section, words", [
    ({"method": "snapkv"}, "token eviction"),
    ({"method": "h2o", "heavy": 32}, "token eviction"),
    ({"method": "kivi"}, "per-channel keys"),
    ({"method": "nonsense"}, "unknown method"),
    ({}, "names no method"),
    ({"method": "turboquant", "bits": 3.5}, "3.5"),
    ({"method": "turboquant", "bits": 5}, "bits must be one of 2/3/4"),
    ({"method": "turboquant", "key_variant": "prod"}, "key_variant"),
    ({"method": "turboquant", "residual": 128}, "residual"),
    ({"method": "turboquant", "budget": 0.25, "bits": 4}, "either a budget or bits"),
    ({"method": "turboquant", "budget": 1.5}, "(0, 1]"),
    ({"method": "quant", "bits": 3}, "quant bits must be one of 2/4/8"),
    ({"method": "quant", "window": 3}, "no knob 'window'"),
    ({"method": "ojakv", "init": "prompt"}, "init 'prompt' is not served"),
    ({"method": "ojakv", "eta_decode": 0.05}, "no online Oja update"),
    ({"method": "ojakv", "n_sink": 32}, "anchors"),
    ({"method": "ojakv", "rank": 8, "budget": 0.25}, "not rank and budget"),
    ({"method": "ojakv", "body_bits": 2, "rank": 8}, "not rank and body_bits"),
    ({"method": "ojakv", "body_bits": 9}, "body_bits must be in"),
    ({"method": "ojakv", "key_mode": "sideways"}, "key_mode"),
    ({"method": "quant", "prefill_attention": "partial"}, "prefill_attention must be one of full, compressed"),
    ("not json", "not valid JSON"),
])
def test_refusals_are_one_line_naming_what_is_served(section, words):
    with pytest.raises(OjaKVError) as error:
        parse(section)
    message = str(error.value)
    assert "\n" not in message
    assert words in message
    assert "served methods: quant" in message and "turboquant" in message and "ojakv (" in message


@pytest.mark.parametrize("method", ["quant", "turboquant", "ojakv"])
def test_every_format_prefills_in_full_unless_asked_to_attend_to_its_slots(method):
    assert parse({"method": method}).prefill_attention == "full"
    compressed = parse({"method": method, "prefill_attention": "compressed"})
    assert compressed.prefill_attention == "compressed" and "prefill on compressed K/V" in compressed.describe()
    assert "prefill" not in parse({"method": method}).describe()


def test_library_twins_prefill_as_served():
    from ojakv.vllm_plugin.measure import library_equivalent

    assert library_equivalent({"method": "turboquant", "bits": 3}, 64)[0] == "turboquant"
    # the library's turboquant always prefills in full: a compressed prefill has no twin there
    assert library_equivalent({"method": "turboquant", "prefill_attention": "compressed"}, 64) is None
    for prefill in ("full", "compressed"):
        method, knobs = library_equivalent({"method": "ojakv", "budget": 0.25, "prefill_attention": prefill}, 64)
        assert method == "staticpca" and knobs["prefill_attention"] == prefill


def test_additional_config_without_the_section_is_not_ours():
    assert from_additional_config({}) is None
    assert from_additional_config({"other_plugin": {}}) is None
    assert from_additional_config({"ojakv": {"method": "quant"}}).bits == 4


def test_measure_reads_format_specs_as_the_cli_writes_them():
    from ojakv.vllm_plugin.measure import agreement, parse_format

    assert parse_format("default") is None
    assert parse_format("turboquant:bits=4+rotation_seed=2") == {"method": "turboquant", "bits": 4,
                                                                 "rotation_seed": 2}
    assert parse_format('ojakv:budget=0.25+calibration_file="c.safetensors"') == {
        "method": "ojakv", "budget": 0.25, "calibration_file": "c.safetensors"}
    assert parse_format("quant:key_mode=post_rope")["key_mode"] == "post_rope"  # bare words stay strings
    assert agreement([1, 2, 3, 4], [1, 2, 9, 4]) == 0.5 and agreement([1, 2], [1, 2]) == 1.0
