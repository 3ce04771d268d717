"""Fast paths that attend from stored codes without decoding the context into float tensors first.

Each fast path has a plain PyTorch reference (the store's ``view`` and a matmul) that every test compares it with.
``use_kernels(False)`` (or ``OJAKV_KERNELS=0`` in the environment) turns every fast path off, e.g. to time or
test the reference; a fast path whose library is missing (numba) is skipped the same way.
"""

from __future__ import annotations

import contextlib
import functools
import os

_enabled = os.environ.get("OJAKV_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


def kernels_enabled() -> bool:
    return _enabled


@functools.lru_cache(maxsize=1)
def _coded_cpu():
    """``ojakv.kernels.coded_cpu``, or None without numba: tried once, not at every decode step."""
    try:
        from . import coded_cpu
    except ImportError:
        return None
    return coded_cpu


def coded_rows_kernels(bits, table, starts):
    """The CPU kernels for a transform-coded store (``coded_cpu.CodedRowsKernels``), or None where numba is
    missing."""
    module = _coded_cpu()
    return None if module is None else module.CodedRowsKernels(bits, table, starts)


@contextlib.contextmanager
def use_kernels(enabled: bool):
    """Within the block, fast paths are on (True) or off (False); the setting before is restored after."""
    global _enabled
    before, _enabled = _enabled, enabled
    try:
        yield
    finally:
        _enabled = before
