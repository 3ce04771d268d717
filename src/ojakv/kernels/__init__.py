"""Fast paths that attend from stored codes without decoding the context into float tensors first.

Each fast path has a plain PyTorch reference (the store's ``view`` and a matmul) that every test compares it with.
``use_kernels(False)`` (or ``OJAKV_KERNELS=0`` in the environment) turns every fast path off, e.g. to time or
test the reference; a fast path whose library is missing (numba) is skipped the same way.
"""

from __future__ import annotations

import contextlib
import os

_enabled = os.environ.get("OJAKV_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


def kernels_enabled() -> bool:
    return _enabled


@contextlib.contextmanager
def use_kernels(enabled: bool):
    """Within the block, fast paths are on (True) or off (False); the setting before is restored after."""
    global _enabled
    before, _enabled = _enabled, enabled
    try:
        yield
    finally:
        _enabled = before
