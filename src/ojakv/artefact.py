"""Per-model artefacts: safetensors files that a cache reads (OjaKV's calibration spectra, PoD's layer similarity).

Each carries a format version and the fingerprint of the model it was made for in its metadata. Without an explicit
path, the artefact lives in the user cache folder under the model's fingerprint and is made on first use; a cached
file of an older format is made again. A file that is unreadable, of another format or for another model is
refused with one message naming how to make the right one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open

from .errors import OjaKVError
from .models import fingerprint
from .paths import cache_dir


@dataclass(frozen=True)
class ArtefactKind:
    name: str  # in messages: "calibration", "pod grouping"
    format: str  # the version this code reads and writes
    folder: str  # under the user cache folder
    made: str  # how the file came about, in messages: "calibrated", "measured"
    remake: str  # what makes a right one, in messages

    def default_path(self, model) -> Path:
        return cache_dir() / self.folder / f"{fingerprint(model)}.safetensors"

    def load(self, model, path: str | os.PathLike | None, make: Callable, *, missing: str,
             no_tokenizer: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """(tensors, metadata) of the checked artefact. Without ``path``, the cached one, made first if needed by
        ``make(model, tokenizer, target)``. ``missing`` (may name ``{target}``) says what to do when an explicit
        path does not exist; ``no_tokenizer`` when one must be made but the model came without its tokenizer."""
        target = Path(path) if path is not None else self.default_path(model)
        if path is None and target.exists() and _metadata(target).get("format") != self.format:
            target.unlink()  # our own cached file, of an older format: made again below
        if not target.exists():
            if path is not None:
                raise OjaKVError(f"{self.name} file {target} does not exist: {missing.format(target=target)}")
            tokenizer = getattr(model, "ojakv_tokenizer", None)
            if tokenizer is None:
                raise OjaKVError(no_tokenizer)
            make(model, tokenizer, target)
        return self.read(model, target)

    def read(self, model, target: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        try:
            with safe_open(str(target), framework="pt") as f:
                metadata = f.metadata() or {}
                tensors = {key: f.get_tensor(key) for key in f.keys()}
        except Exception as exc:  # safetensors raises several types for a file that is not what it claims
            raise OjaKVError(f"{target} is not a readable {self.name} file ({exc}): delete it and {self.remake}")
        if metadata.get("format") != self.format:
            raise OjaKVError(f"{target} has {self.name} format {metadata.get('format')!r}, expected {self.format}: "
                             f"{self.remake}")
        expected = fingerprint(model)
        if metadata.get("fingerprint") != expected:
            raise OjaKVError(f"{target} was {self.made} for model {metadata.get('fingerprint')}, not this one "
                             f"({expected}): {self.remake} for this model")
        return tensors, metadata


def _metadata(target: Path) -> dict[str, str]:
    try:
        with safe_open(str(target), framework="pt") as f:
            return f.metadata() or {}
    except Exception:  # unreadable: ``read`` reports it
        return {}
