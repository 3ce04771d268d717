"""Where ojakv keeps converted models and calibration artefacts."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs


def cache_dir() -> Path:
    """The user cache folder (override with OJAKV_CACHE_DIR); created on first use."""
    root = os.environ.get("OJAKV_CACHE_DIR") or platformdirs.user_cache_dir("ojakv")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path
