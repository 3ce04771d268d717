"""Property-based differential tests: every method with a slow reference (tests/reference.py) must give the
reference's logits on random prompts, paddings, prefill chunkings, decode lengths and knobs; every registered
method must stay finite and report exactly the tensors it holds.

Volume: a few examples per method by default (the file stays well under 90 s on 2 slow cores); more on demand
with ``OJAKV_FUZZ_EXAMPLES=500 python -m pytest tests/test_fuzz.py`` or ``--fuzz-examples 500``.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import ojakv
import reference as ref
from helpers import held_tensor_bytes, kv
from ojakv.methods import registered
from tiny import tiny_model
from test_methods import COMPRESSING

DEFAULT_EXAMPLES = 10
EXAMPLES = int(os.environ.get("OJAKV_FUZZ_EXAMPLES") or DEFAULT_EXAMPLES)
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES == DEFAULT_EXAMPLES,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                       HealthCheck.function_scoped_fixture])
TOLERANCE = 1e-4  # float32 model: library (SDPA) and reference (explicit eager) differ by rounding only (~1e-7)
AMBIGUOUS = 1e-5  # a selection whose last kept and first dropped scores are closer than this is a tie
LAYERS, KV_HEADS, HEAD_DIM = 3, 2, 16  # three layers: a PoD group's third layer, PyramidKV's middle capacity


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many tiny calls: thread hand-offs cost more than they save on shared cores
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    """The tiny random model with query and key weights scaled up: at the default initialisation attention is
    nearly uniform, so every token's votes are almost equal and selections would be ties decided by rounding."""
    model = tiny_model("llama", num_layers=LAYERS, num_heads=4, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM,
                       max_context=1024)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight *= 6
            layer.self_attn.k_proj.weight *= 6
    return model


@st.composite
def scenarios(draw, max_prompt: int = 80):
    """Prompt ids with left padding, the prefill split into calls, and the decode tokens."""
    batch = draw(st.integers(1, 3))
    lengths = [draw(st.integers(4, max_prompt)) for _ in range(batch)]
    n = max(lengths)
    cuts = sorted(set(draw(st.lists(st.integers(1, n - 1), max_size=2)))) if n > 1 else []
    chunks = [b - a for a, b in zip([0, *cuts], [*cuts, n])]
    steps = draw(st.integers(1, 12))  # at least one call after the prefill: selection only shows after it
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    ids = torch.randint(3, 128, (batch, n), generator=gen)
    mask = torch.zeros(batch, n, dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, n - length :] = 1
        ids[row, : n - length] = 0
    return ids, mask, chunks, torch.randint(3, 128, (batch, steps), generator=gen)


# method -> (knob strategy given the padded prompt length, reference given knobs and the library's cache)
def _part_of(whole: int):
    """1..whole, half the time from its lower half (a small window leaves room for selected tokens)."""
    return st.integers(1, max(1, whole // 2)) | st.integers(1, whole)


def _snapkv_knobs(n, extra=None):
    return st.integers(1, n + 4).flatmap(lambda capacity: st.fixed_dictionaries({
        "capacity": st.just(capacity), "window": _part_of(capacity),
        "kernel": st.sampled_from([1, 3, 5, 7]), "pooling": st.sampled_from(["avg", "max"]), **(extra or {})}))


def _low_rank_knobs(n, anchors=True, **fixed):
    knobs = {"rank": st.integers(1, HEAD_DIM), "key_mode": st.sampled_from(["pre_rope", "post_rope"])}
    if anchors:
        knobs.update(n_sink=st.integers(0, 12), n_recent=st.integers(0, 12))
    return st.fixed_dictionaries({**knobs, **{k: st.just(v) for k, v in fixed.items()}})


def _bases(cache):
    """The library's bases as the reference uses them: float32 (a frozen transform-coded basis is held in float16,
    and the library computes with it upcast)."""
    return [(layer.u_k.float(), layer.u_v.float()) for layer in cache.layers]


def _low_rank_reference(defaults):
    def make(knobs, cache):
        anchors = {**defaults, **knobs}
        return ref.LowRankReference(LAYERS, _bases(cache), anchors["n_sink"], anchors["n_recent"],
                                    knobs.get("key_mode", "pre_rope"))
    return make


def _turboquant_knobs(n):
    return st.fixed_dictionaries({
        "bits": st.sampled_from([2, 2.5, 3, 3.5, 4]), "key_variant": st.sampled_from(["mse", "prod"]),
        "outlier_fraction": st.integers(2, HEAD_DIM - 2).map(lambda k: k / HEAD_DIM),  # exact: round(f·d) = k
        "residual": st.integers(0, 8) | st.integers(0, n + 4), "rotation_seed": st.integers(0, 3)})


def _turboquant_reference(knobs, cache):
    def stored_norms(layer, role):  # float16 norms the library kept, to settle float16 near-ties only
        norms = cache.layers[layer].key_norms if role == 0 else cache.layers[layer].value_norms
        return norms.view

    return ref.TurboQuantReference(LAYERS, HEAD_DIM, **knobs, stored_norms=stored_norms)


# PoD's grouping file for the fuzz, written once per module (tests never reach the calibration essays): per KV
# head, similarities such that δ in (0, 1] gives different groups per head, including a group whose first layer
# is not layer 0 (head 1, 0.4 < δ ≤ 0.7: layers 1 and 2 share layer 1's keys).
POD_SIMILARITY = torch.tensor([[[1.0, 1.0], [0.9, 0.4], [0.6, 0.2]],
                               [[0.9, 0.4], [1.0, 1.0], [0.3, 0.7]],
                               [[0.6, 0.2], [0.3, 0.7], [1.0, 1.0]]])[:LAYERS, :LAYERS]
POD_FILE: dict[str, str] = {}


@pytest.fixture(scope="module", autouse=True)
def _pod_grouping(model, tmp_path_factory):
    from ojakv.methods.pod import save_similarity

    path = tmp_path_factory.mktemp("pod") / "grouping.safetensors"
    POD_FILE["path"] = str(save_similarity(model, POD_SIMILARITY, path))


def _pod_knobs(n):
    """δ ≤ 0 (group all) or > 1 (none) need no file; δ in (0, 1] reads POD_SIMILARITY's file."""
    without_file = st.fixed_dictionaries({"delta": st.sampled_from([0.0, -1.0, 1.5])})
    with_file = st.floats(0.05, 1.0).map(lambda delta: {"delta": delta, "grouping": POD_FILE["path"]})
    return st.tuples(without_file | with_file, st.fixed_dictionaries({
        "n_sink": st.integers(0, 8), "window": st.integers(1, n + 4), "max_group": st.integers(0, LAYERS)})).map(
        lambda parts: {**parts[0], **parts[1]})


def _pod_reference(knobs, cache):
    similarity = POD_SIMILARITY if knobs.get("grouping") else torch.ones(LAYERS, LAYERS, KV_HEADS)
    bases = ref.pod_bases(similarity, knobs["delta"], knobs.get("max_group", 0))
    return ref.PoDReference(LAYERS, bases, knobs.get("n_sink", 4), knobs.get("window", 128))


def _snapkv_ojakv_knobs(n):
    return st.tuples(_snapkv_knobs(n), _low_rank_knobs(n, eta_decode=0.0)).map(lambda parts: {**parts[0], **parts[1]})


def _snapkv_ojakv_reference(knobs, cache):
    snapkv = (knobs[k] for k in ("capacity", "window", "kernel", "pooling"))
    selection = ref.SnapKVReference(LAYERS, KV_HEADS, *snapkv)
    return ref.SelectedLowRankReference(selection, _bases(cache), knobs["n_sink"], knobs["n_recent"],
                                        knobs["key_mode"])


def _quantized_low_rank_reference(knobs, cache):
    def stored_ranges(layer, role):  # float16 scales and minima the library kept, to settle float16 near-ties only
        rows = cache.layers[layer].k_coef if role == 0 else cache.layers[layer].v_coef
        return rows.scale.view, rows.minimum.view

    return ref.QuantizedLowRankReference(LAYERS, _bases(cache), knobs["n_sink"], knobs["n_recent"],
                                         knobs["key_mode"], knobs["coef_bits"], stored_ranges)


def _transform_coded_reference(knobs, cache):
    def coders(layer, role):  # the allocation and scales are inputs, as the bases are; the norms settle float16 ties
        rows = cache.layers[layer].k_coef if role == 0 else cache.layers[layer].v_coef
        if not hasattr(rows, "bits"):  # nothing reached the body
            return [], None, None
        return rows.bits, rows.scale, rows.gains.view

    return ref.TransformCodedLowRankReference(LAYERS, _bases(cache), knobs["n_sink"], knobs["n_recent"],
                                              knobs["key_mode"], coders)


def _transform_coded_knobs(n):
    # the prompt attends to the compressed K/V here (as the ojakv reference models it), to test the coded body
    # from the first call; ojakv-tc's own default (full prefill attention) only changes the first call.
    return st.fixed_dictionaries({
        "body_bits": st.integers(1, 8 * HEAD_DIM).map(lambda total: total / HEAD_DIM),
        "key_mode": st.sampled_from(["pre_rope", "post_rope"]), "n_sink": st.integers(0, 12),
        "n_recent": st.integers(0, 12), "prefill_attention": st.just("compressed")})


REFERENCES = {
    "snapkv": (_snapkv_knobs, lambda k, c: ref.SnapKVReference(LAYERS, KV_HEADS, **k)),
    "pyramidkv": (lambda n: _snapkv_knobs(n, {"beta": st.floats(1.0, 30.0)}),
                  lambda k, c: ref.PyramidKVReference(LAYERS, KV_HEADS, **k)),
    "h2o-prefill": (lambda n: st.integers(1, n + 4).flatmap(lambda capacity: st.fixed_dictionaries(
        {"capacity": st.just(capacity), "recent": _part_of(capacity)})),
        lambda k, c: ref.H2OPrefillReference(LAYERS, KV_HEADS, **k)),
    "h2o": (lambda n: st.fixed_dictionaries({"heavy": st.integers(0, n), "recent": st.integers(1, n)}),
            lambda k, c: ref.H2OReference(LAYERS, KV_HEADS, **k)),
    "streaming-llm": (lambda n: st.fixed_dictionaries({"n_sink": st.integers(0, 8), "window": st.integers(1, n + 4)}),
                      lambda k, c: ref.StreamingLLMReference(LAYERS, KV_HEADS, **k)),
    "kivi": (lambda n: st.sampled_from([4, 8, 16]).flatmap(lambda group: st.fixed_dictionaries({
        "bits": st.sampled_from([2, 4, 8]), "group": st.just(group),
        "residual": st.integers(1, 4).map(lambda m: m * group)})),
        lambda k, c: ref.KIVIReference(LAYERS, **k)),
    "ojakv": (lambda n: _low_rank_knobs(n, eta_decode=0.0), _low_rank_reference({"n_sink": 32, "n_recent": 32})),
    "staticpca": (lambda n: _low_rank_knobs(n, anchors=False, init="prompt"),
                  _low_rank_reference({"n_sink": 0, "n_recent": 0})),
    "staticpca-h": (lambda n: _low_rank_knobs(n, init="prompt"), _low_rank_reference({"n_sink": 32, "n_recent": 32})),
    "eigen": (lambda n: _low_rank_knobs(n, init="prompt", key_basis="keys"),
              _low_rank_reference({"n_sink": 32, "n_recent": 32})),
    "mla-latent": (lambda n: _low_rank_knobs(n, anchors=False, key_mode="pre_rope"),
                   _low_rank_reference({"n_sink": 0, "n_recent": 0})),
    # η = 0: with a moving basis every re-expression would quantize the coefficients once more
    "ojakv+quant": (lambda n: st.sampled_from([2, 4, 8]).flatmap(lambda bits: _low_rank_knobs(
        n, eta_decode=0.0, coef_bits=bits)), _quantized_low_rank_reference),
    # η = 0 keeps the bases fitted to SnapKV's survivors, so the library's final bases are the ones used throughout
    "snapkv+ojakv": (_snapkv_ojakv_knobs, _snapkv_ojakv_reference),
    "turboquant": (_turboquant_knobs, _turboquant_reference),
    "pod": (_pod_knobs, _pod_reference),
    "ojakv-tc": (_transform_coded_knobs, _transform_coded_reference),
}
# Registered methods without a reference, and why.
NO_REFERENCE = {
    "full": "it is the reference itself (tests/test_methods.py compares it with DynamicCache)",
    "ojakv-pf": "as ojakv with full prefill attention; the ojakv reference covers its storage",
}


def test_every_method_has_a_reference_or_a_reason():
    """A method registered since is still fuzzed for finiteness and memory below; this says it has no
    differential test yet (a skip, not a failure, so adding a method never breaks the suite)."""
    missing = sorted(set(registered()) - set(REFERENCES) - set(NO_REFERENCE))
    if missing:
        pytest.skip(f"no slow reference in tests/reference.py for: {', '.join(missing)}")


# Inputs on which a method is known to be wrong, kept out of the fuzz until it is fixed (each has a strict xfail
# regression below, so the fix shows up as an XPASS).
KNOWN_BUGS: dict = {}


def compare(model, method, knobs, ids, mask, chunks, decode, make_reference=None):
    cache = ojakv.make_cache(model, method, **knobs)
    library = ref.run(model, cache, ids, mask, chunks, decode)
    reference = (make_reference or REFERENCES[method][1])(knobs, cache)
    expected = ref.run(model, reference, ids, mask, chunks, decode)
    if reference.min_gap <= AMBIGUOUS:  # a tie at the cut: either choice is right, so nothing to compare
        return False
    for call, (got, want) in enumerate(zip(library, expected)):
        error = (got - want).abs().max().item()
        assert error <= TOLERANCE, f"call {call} of {chunks} + {decode.shape[1]} steps: logits differ by {error:.2e}"
    return True


@pytest.mark.parametrize("method", sorted(REFERENCES))
@FUZZ
@given(data=st.data())
def test_method_matches_its_reference(model, method, data):
    ids, mask, chunks, decode = data.draw(scenarios(), label="inputs")
    assume(not KNOWN_BUGS.get(method, lambda *inputs: False)(ids, mask, chunks))
    knobs = data.draw(REFERENCES[method][0](ids.shape[1]), label="knobs")
    assume(compare(model, method, knobs, ids, mask, chunks, decode))


def _selective_knobs(n):
    return st.tuples(_low_rank_knobs(n, eta_decode=0.0), st.fixed_dictionaries({  # the second part wins
        "select_chunk": st.integers(1, 8), "select_tokens": st.integers(1, 24)})).map(
        lambda parts: {**parts[0], **parts[1]})


def _selective_reference(knobs, cache):
    keep = max(1, knobs["select_tokens"] // knobs["select_chunk"])
    return ref.SelectiveLowRankReference(LAYERS, _bases(cache), knobs["n_sink"], knobs["n_recent"],
                                         knobs["key_mode"], knobs["select_chunk"], keep)


@FUZZ
@given(data=st.data())
def test_selective_decode_matches_its_reference(model, data):
    """``ojakv`` with ``select_tokens``: the exact low-rank attention restricted to the chunks the landmarks pick."""
    ids, mask, chunks, decode = data.draw(scenarios(), label="inputs")
    knobs = data.draw(_selective_knobs(ids.shape[1]), label="knobs")
    assume(compare(model, "ojakv", knobs, ids, mask, chunks, decode, _selective_reference))


# --- regressions: inputs on which the differential tests found bugs (fixed, or xfail until fixed) -----------


def _inputs(rows, chunks, decode):
    n = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (n - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (n - len(r)) + [1] * len(r) for r in rows])
    return ids, mask, chunks, torch.tensor(decode)


def test_h2o_scores_a_multi_token_call_causally(model):
    assert compare(model, "h2o", dict(heavy=2, recent=1), *_inputs([[47, 117, 61, 13]], [1, 3], [[91]]))


def test_h2o_evicts_padding_first(model):
    assert compare(model, "h2o", dict(heavy=1, recent=1),
            *_inputs([[117, 61, 13, 91], [7, 55, 6, 125, 61]], [1, 4], [[104], [119]]))


def test_streaming_llm_keeps_the_real_sinks_of_a_padded_prompt(model):
    assert compare(model, "streaming-llm", dict(n_sink=1, window=4),
            *_inputs([[117, 61, 13, 91], [7, 55, 6, 125, 61]], [5], [[104, 119], [9, 27]]))


def test_streaming_llm_holds_each_token_once(model):
    gen = torch.Generator().manual_seed(3)
    rows = [torch.randint(3, 128, (length,), generator=gen).tolist() for length in (30, 12)]
    assert compare(model, "streaming-llm", dict(n_sink=4, window=10), *_inputs(rows, [30], [[5, 6, 7], [8, 9, 10]]))


def test_pod_keeps_the_first_real_tokens_of_a_prompt_padded_beyond_the_first_chunk(model):
    # Row 1 has two padding columns and the first call is one column: the sinks once stopped at columns 0-1, so
    # row 1's first real token (column 2) took layer 0's key in layer 1 (fixed: every call's padding counts).
    assert compare(model, "pod", dict(delta=0.0, n_sink=1, window=1),
                   *_inputs([[47, 117, 61, 13, 91, 7], [125, 61, 104, 119]], [1, 5], [[9], [27]]))


@pytest.mark.parametrize("method", sorted(registered()))
@FUZZ
@given(data=st.data())
def test_random_inputs_stay_finite_and_memory_is_what_is_held(model, method, data):
    ids, mask, chunks, decode = data.draw(scenarios(max_prompt=100), label="inputs")
    cache = ojakv.make_cache(model, method, **COMPRESSING.get(method, {}))
    full_ids = torch.cat([ids, decode], dim=1)
    full_mask = torch.cat([mask, torch.ones_like(decode)], dim=1)
    positions = ref.positions_for(full_mask)
    end = 0
    with torch.no_grad():
        for q in [*chunks, *[1] * decode.shape[1]]:
            start, end = end, end + q
            logits = model(input_ids=full_ids[:, start:end], attention_mask=full_mask[:, :end],
                           position_ids=positions[:, start:end], **kv(cache)).logits
            real = full_mask[:, start:end].bool()
            assert torch.isfinite(logits[real]).all()
            assert cache.memory().held_bytes == held_tensor_bytes(cache)
