"""Helpers for the vLLM plugin's end-to-end tests (imported by them; tests/vllm is on sys.path)."""

from __future__ import annotations

import gc
from contextlib import contextmanager


@contextmanager
def engine(model_folder: str, settings: dict | None, **extra):
    """A ``vllm.LLM`` for one format (None: vLLM's default backend), shut down on exit."""
    from ojakv.vllm_plugin.measure import make_llm

    llm = make_llm(model_folder, settings, max_model_len=extra.pop("max_model_len", 4096), **extra)
    try:
        yield llm
    finally:
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception:  # already gone
            pass
        del llm
        gc.collect()
