"""ojakv inside vLLM: compressed keys and values in vLLM's paged KV pool.

Installed with ``pip install "ojakv[vllm]"``, vLLM finds two entry points (``pyproject.toml``):

- ``vllm.general_plugins`` → :func:`register`: registers :class:`backend.OjaKVAttentionBackend` as vLLM's
  ``CUSTOM`` attention backend (loaded in every vLLM process; it only names a class path).
- ``vllm.platform_plugins`` → :func:`platform`: on vLLM's CPU build, a subclass of vLLM's CPU platform that
  behaves exactly as the CPU platform except that it honours ``attention_backend="CUSTOM"`` (the CPU platform
  falls back to its own backend for anything else) and checks the plugin's settings when the config is built.
  On other platforms it declines, and their own platform (which honours CUSTOM) is used.

A run opts in with ``attention_backend="CUSTOM"`` and ``additional_config={"ojakv": {"method": ..., ...}}``
(``vllm serve ... --attention-backend CUSTOM --additional-config '{"ojakv": {...}}'``); see
docs/serving-vllm.md. Nothing in this package imports vLLM when ojakv is imported: vLLM is imported only by
the entry points' functions and the modules they name.
"""

from __future__ import annotations

BACKEND_PATH = "ojakv.vllm_plugin.backend.OjaKVAttentionBackend"
PLATFORM_PATH = "ojakv.vllm_plugin.platform.OjaKVCpuPlatform"


def register() -> None:
    """``vllm.general_plugins`` entry point: make ojakv's backend vLLM's CUSTOM attention backend."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CUSTOM, BACKEND_PATH)


def platform() -> str | None:
    """``vllm.platform_plugins`` entry point: ojakv's CPU platform where vLLM would use its plain CPU platform,
    else None (vLLM then picks the platform it would have picked)."""
    from vllm.platforms import cpu_platform_plugin

    if cpu_platform_plugin() == "vllm.platforms.cpu.CpuPlatform":
        return PLATFORM_PATH
    return None
