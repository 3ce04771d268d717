"""Numerical safety (low-precision models, degenerate inputs, long decode runs, determinism) and bad inputs at the
public entry points (Python API and CLI): one clear message naming the fix, no traceback, nothing half-written."""

from __future__ import annotations

import pytest
import torch

import ojakv
from ojakv.errors import OjaKVError
from tiny import tiny_model
from ojakv.subspace import orthogonality_error

from helpers import feed, greedy_scores, padded_batch

SMALL = dict(n_sink=4, n_recent=8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_models_keep_float32_bases_and_finite_outputs(dtype):
    model = tiny_model("llama", num_layers=2, head_dim=16, max_context=1024, dtype=dtype)
    ids, mask = padded_batch(model.config.vocab_size, (80, 64), seed=1)
    cache = ojakv.make_cache(model, "ojakv", update_interval=4, **SMALL)
    assert torch.isfinite(greedy_scores(model, ids, mask, cache, steps=12).float()).all()
    for layer in cache.layers:
        assert layer.u_k.dtype == torch.float32 and layer.k_coef.view.dtype == dtype
        assert orthogonality_error(layer.u_k) <= 1e-5 and orthogonality_error(layer.u_v) <= 1e-5


def _drive(cache, keys, values, start):
    b, _, q, _ = keys.shape
    feed(cache, keys, values, torch.arange(start, start + q).expand(b, q))


@pytest.mark.parametrize("key_mode", ["pre_rope", "post_rope"])
@pytest.mark.parametrize("features", ["zeros", "constant"])
def test_degenerate_features_never_produce_nan(tiny, key_mode, features):
    cache = ojakv.make_cache(tiny, "ojakv", key_mode=key_mode, update_interval=2, **SMALL)
    make = torch.zeros if features == "zeros" else (lambda *shape: torch.full(shape, 0.7))
    _drive(cache, make(1, 2, 40, 16), make(1, 2, 40, 16), 0)
    for t in range(40, 50):
        _drive(cache, make(1, 2, 1, 16), make(1, 2, 1, 16), t)
    for layer in cache.layers:
        keys, values = layer._materialize()
        assert torch.isfinite(keys).all() and torch.isfinite(values).all()
        assert orthogonality_error(layer.u_k) <= 1e-5 and orthogonality_error(layer.u_v) <= 1e-5


def test_long_decode_with_updates_every_8_tokens_stays_orthonormal_and_finite(tiny):
    gen = torch.Generator().manual_seed(0)
    cache = ojakv.make_cache(tiny, "ojakv", update_interval=8, eta_decode=0.3, **SMALL)
    _drive(cache, torch.randn(1, 2, 64, 16, generator=gen), torch.randn(1, 2, 64, 16, generator=gen), 0)
    drift = torch.randn(16, 16, generator=gen) * 0.01
    for t in range(64, 64 + 4096):
        key = torch.randn(1, 2, 1, 16, generator=gen) @ (torch.eye(16) + drift * (t / 512))
        _drive(cache, key, torch.randn(1, 2, 1, 16, generator=gen), t)
    for layer in cache.layers:
        assert orthogonality_error(layer.u_k) <= 1e-5 and orthogonality_error(layer.u_v) <= 1e-5
        keys, values = layer._materialize()
        assert keys.shape[2] == 64 + 4096 and torch.isfinite(keys).all() and torch.isfinite(values).all()


@pytest.mark.parametrize("method", ["ojakv", "snapkv"])
def test_same_inputs_give_identical_outputs(tiny, method):
    ids, mask = padded_batch(tiny.config.vocab_size, (90, 70), seed=2)
    knobs = dict(capacity=40, window=8) if method == "snapkv" else SMALL
    first = greedy_scores(tiny, ids, mask, ojakv.make_cache(tiny, method, **knobs), steps=10)
    second = greedy_scores(tiny, ids, mask, ojakv.make_cache(tiny, method, **knobs), steps=10)
    assert torch.equal(first, second)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["ojakv", "ojakv:post_rope", "snapkv", "kivi"])
def test_cpu_and_cuda_agree(tiny, method):
    import copy

    name, _, key_mode = method.partition(":")
    knobs = dict(capacity=40, window=8) if name == "snapkv" else dict(group=16, residual=16) if name == "kivi" \
        else dict(SMALL, update_interval=4, **({"key_mode": key_mode} if key_mode else {}))
    ids, mask = padded_batch(tiny.config.vocab_size, (90, 70), seed=3)
    on_cpu = greedy_scores(tiny, ids, mask, ojakv.make_cache(tiny, name, **knobs), steps=10)
    gpu_model = copy.deepcopy(tiny).cuda()
    on_gpu = greedy_scores(gpu_model, ids.cuda(), mask.cuda(), ojakv.make_cache(gpu_model, name, **knobs), steps=10)
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, atol=1e-3, rtol=1e-3)


# --- bad inputs at the public entry points: one OjaKVError naming the fix, never a raw TypeError ------------------


@pytest.mark.parametrize("model", ["gpt2", None, 3])
def test_make_cache_refuses_what_is_not_a_model(model):
    with pytest.raises(OjaKVError, match="expected a Hugging Face causal language model"):
        ojakv.make_cache(model, "ojakv")


@pytest.mark.parametrize("name", [123, None, ["smollm2-135m"]])
def test_load_model_refuses_what_is_not_a_name(name):
    with pytest.raises(OjaKVError, match="load_model takes a model name, folder or hub id"):
        ojakv.load_model(name)


def test_unsupported_family_is_named():
    from transformers import AutoModelForCausalLM, GPT2Config

    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(OjaKVError, match="model type 'gpt2' is not supported: use a model of type llama"):
        ojakv.make_cache(gpt2, "snapkv")
    with pytest.raises(OjaKVError, match="not supported"):
        ojakv.compress(gpt2, "ojakv").__enter__()
    assert "generate" not in vars(gpt2)


@pytest.mark.parametrize("method, knobs, message", [
    ("ojakv", dict(rank_ratio="0.5"), "rank_ratio takes a finite number, got '0.5'"),
    ("ojakv", dict(rank_ratio=float("nan")), "rank_ratio takes a finite number"),
    ("ojakv", dict(rank=4.5), "rank takes a whole number, got 4.5"),
    ("ojakv", dict(rank=True), "rank takes a whole number, got True"),
    ("ojakv", dict(n_sink="4"), "n_sink takes a whole number, got '4' \\(default 32\\)"),
    ("ojakv", dict(key_mode=None), "key_mode cannot be None"),
    ("ojakv", dict(key_mode=1), "key_mode takes a string"),
    ("snapkv", dict(capacity=2.5), "capacity takes a whole number"),
    ("pyramidkv", dict(beta=float("nan")), "beta takes a finite number"),
    ("streaming-llm", dict(window="8"), "window takes a whole number"),
    ("kivi", dict(bits=2.0), "bits takes a whole number"),
    ("streaming-llm", dict(rerotate="False"), "rerotate takes True or False, got 'False'"),
])
def test_knobs_of_the_wrong_type_are_named(tiny, method, knobs, message):
    with pytest.raises(OjaKVError, match=message):
        ojakv.make_cache(tiny, method, **knobs)
    with pytest.raises(OjaKVError, match=message):
        ojakv.compress(tiny, method, **knobs).__enter__()


@pytest.mark.parametrize("method, knobs, message", [
    ("ojakv", dict(rank=17), "rank 17 exceeds this model's head_dim 16"),
    ("ojakv", dict(rank_ratio=0), "rank_ratio must be in \\(0, 1\\]"),
    ("ojakv", dict(energy=1.5), "energy must be in \\(0, 1\\]"),
    ("ojakv", dict(rank=4, energy=0.9), "give one of rank_ratio, rank or energy"),
    ("ojakv", dict(n_recent=-1), "n_recent must be >= 0"),
    ("ojakv", dict(update_interval=0), "update_interval must be >= 1"),
    ("ojakv", dict(eta_decode=2.0), "eta_decode must be in \\[0, 1\\]"),
    ("ojakv", dict(init="weights", key_mode="post_rope"), "use key_mode='pre_rope'"),
    ("snapkv", dict(capacity=0), "1 <= window <= capacity"),
    ("snapkv", dict(capacity=8, window=16), "1 <= window <= capacity"),
    ("snapkv", dict(kernel=4), "kernel must be a positive odd number"),
    ("snapkv", dict(pooling="mean"), "pooling must be avg or max"),
    ("pyramidkv", dict(beta=0.5), "beta must be >= 1"),
    ("h2o", dict(recent=0), "heavy >= 0 and recent >= 1"),
    ("h2o-prefill", dict(capacity=4, recent=8), "1 <= recent <= capacity"),
    ("streaming-llm", dict(n_sink=-1), "n_sink >= 0 and window >= 1"),
    ("kivi", dict(bits=3), "bits must be one of 2, 4, 8"),
    ("kivi", dict(group=6), "group must be a positive multiple of 4"),
    ("kivi", dict(group=32), "must divide the model's head_dim \\(16\\)"),
    ("kivi", dict(group=16, residual=24), "residual must be a multiple of group"),
    ("snapkv", dict(rank=4), "method 'snapkv' has no knob rank"),
])
def test_out_of_range_knobs_name_the_fix(tiny, method, knobs, message):
    with pytest.raises(OjaKVError, match=message):
        ojakv.make_cache(tiny, method, **knobs)


@pytest.mark.parametrize("content, message", [
    (b"this is not a safetensors file", "is not a readable calibration file .*run `ojakv calibrate`"),
    (b"", "is not a readable calibration file"),
    ("truncated", "is not a readable calibration file"),
    ("foreign", "calibration format None, expected"),
    (None, "does not exist: run `ojakv calibrate --out"),
])
def test_bad_calibration_files_name_the_fix(tiny, tmp_path, content, message):
    from safetensors.torch import save_file

    path = tmp_path / "calibration.safetensors"
    if content == "truncated":
        save_file({"x": torch.zeros(4096)}, str(path), metadata={"format": "2"})
        path.write_bytes(path.read_bytes()[:2000])
    elif content == "foreign":
        save_file({"x": torch.zeros(3)}, str(path))
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(OjaKVError, match=message):
        ojakv.make_cache(tiny, "ojakv", init="calibration", calibration_file=str(path))


def test_budgets_outside_zero_one_are_refused(tiny):
    from ojakv.methods import knobs_for_budget

    for budget in (0.0, 1.5, float("nan")):
        with pytest.raises(OjaKVError, match="a budget is a fraction of the full cache"):
            knobs_for_budget("snapkv", {}, tiny, 100, 10, budget)


@pytest.mark.parametrize("argv, needles", [
    (["eval", "--out", "{file}", "--lengths", "128"], ["--out", "is a file: give a folder"]),
    (["eval", "--out", "{dir}/e", "--max-new-tokens", "0"], ["--max-new-tokens must be >= 1"]),
    (["eval", "--out", "{dir}/e", "--methods", "ojakv:rank_ratio=2"], ["rank_ratio must be in (0, 1]"]),
    (["eval", "--out", "{dir}/e", "--budgets", "0.5,x"], ["--budgets takes comma-separated numbers"]),
    (["bench", "--device", "tpu"], ["--device must be cpu or cuda"]),
    (["bench", "--lengths", "-5"], ["--lengths must be at least 64 tokens"]),
    (["bench", "--json", "{dir}"], ["--json", "is a folder: give a file name"]),
    (["bench", "--plot", "{dir}"], ["--plot", "is a folder"]),
    (["bench", "--repeats", "0"], ["--repeats >= 1"]),
    (["bench", "--budgets", "0.25,1.5"], ["budgets are fractions of the full cache in (0, 1]"]),
    (["fidelity", "--out", "{dir}/f", "--budgets", "0"], ["budgets are fractions of the full cache in (0, 1]"]),
    (["calibrate", "--chunk-tokens", "0"], ["--chunk-tokens and --max-tokens above 32"]),
    (["calibrate", "--max-tokens", "10"], ["--chunk-tokens and --max-tokens above 32"]),
    (["calibrate", "--out", "{dir}"], ["--out", "is a folder"]),
    (["calibrate", "--text-file", "{binary}"], ["cannot read", "as UTF-8 text"]),
    (["generate", "--prompt", "hi", "--json", "{dir}"], ["--json", "is a folder"]),
    (["generate", "--prompt-file", "{dir}"], ["cannot read", "IsADirectoryError"]),
    (["generate", "--prompt", "hi", "--method", "snapkv", "--kernel", "4.5"], ["--kernel needs a whole number"]),
    (["generate", "--prompt", "hi", "--rank-ratio", "half"], ["--rank-ratio needs a number"]),
    (["generate", "--prompt", "hi", "--method", "streaming-llm", "--rerotate", "maybe"],
     ["--rerotate needs true or false"]),
    (["generate", "--prompt", "hi", "--method", "kivi", "--bits", "3"], ["bits must be one of 2, 4, 8"]),
    (["generate", "--prompt", "hi", "--method", "snapkv", "--capacity", "4", "--window", "8"],
     ["1 <= window <= capacity"]),
    (["generate", "--prompt", "hi", "--key-mode", "sideways"], ["key_mode must be one of pre_rope, post_rope"]),
])
def test_cli_refuses_bad_input_before_loading_the_model_and_writes_nothing(capsys, tmp_path, monkeypatch, argv,
                                                                           needles):
    from ojakv import models
    from test_cli import _assert_one_line_error, _run

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was refused")

    monkeypatch.setattr(models, "load_model", no_model)
    (tmp_path / "file").write_text("x")
    (tmp_path / "binary").write_bytes(b"\xff\xfe\x00")
    before = sorted(tmp_path.rglob("*"))
    places = dict(dir=tmp_path, file=tmp_path / "file", binary=tmp_path / "binary")
    code, _, err = _run(capsys, *[arg.format(**places) for arg in argv])
    _assert_one_line_error(code, err, *needles)
    assert sorted(tmp_path.rglob("*")) == before  # nothing half-written


def test_cli_refuses_cuda_without_a_cuda_device(capsys):
    from test_cli import _assert_one_line_error, _run

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    _assert_one_line_error(*_run(capsys, "bench", "--device", "cuda")[::2], "sees no CUDA device; use --device cpu")


def test_cli_names_what_the_model_cannot_do(capsys, monkeypatch, tokenizer):
    from ojakv import models
    from test_cli import _assert_one_line_error, _run

    small = tiny_model("llama", vocab_size=len(tokenizer), max_context=2048)
    monkeypatch.setattr(models, "load_model", lambda *args, **kwargs: (small, tokenizer))
    _assert_one_line_error(*_run(capsys, "bench", "--lengths", "100000")[::2], "exceed the model's context of 2048")
    _assert_one_line_error(*_run(capsys, "generate", "--passkey", "4000")[::2], "exceed the model's context of 2048")
    # A budget under what the method's fixed parts hold is refused at the prompt, naming the floor.
    _assert_one_line_error(*_run(capsys, "generate", "--passkey", "300", "--max-new-tokens", "2", "--budget",
                                 "0.05")[::2], "ojakv cannot hold 0.05 of the full cache", "the least it holds is")
