"""Which transformers is installed, which range ojakv supports, and the names that differ across that range.

transformers 5.24 renamed the models' cache keyword from ``past_key_values`` to ``cache`` (the old name still
works with a FutureWarning until it is removed). Everything in ojakv that passes a cache to a model, or reads one
from a forward call's arguments, goes through ``cache_keyword`` / ``cache_argument`` here, so the next rename is a
one-line change.
"""

from __future__ import annotations

import functools
import inspect

import transformers
from packaging.version import Version

# The range the test suite runs at both ends (CI: the lowest and the newest release in it). Keep in step with
# pyproject.toml's dependency and constraints.txt.
LOWEST_SUPPORTED = "5.16.1"
BELOW = "5.26"
SUPPORTED_RANGE = f">={LOWEST_SUPPORTED},<{BELOW}"
INSTALLED = transformers.__version__
_CACHE_NAMES = ("cache", "past_key_values")  # newest first


def is_supported(version: str = INSTALLED) -> bool:
    return Version(LOWEST_SUPPORTED) <= Version(version) < Version(BELOW)


def describe_installed() -> str:
    """One phrase for error messages: the installed version and the range ojakv was tested with."""
    note = "" if is_supported() else ", outside it"
    return f"transformers {INSTALLED} is installed; ojakv supports {SUPPORTED_RANGE}{note}"


@functools.lru_cache(maxsize=None)
def cache_keyword(model_class: type | None = None) -> str:
    """The keyword the installed transformers' causal LMs take their cache by (``cache`` from 5.24 on).

    Read from the signature of ``model_class.forward`` (a LlamaForCausalLM by default), so it follows what the
    installed version really accepts rather than a version number.
    """
    if model_class is None:
        from transformers import LlamaForCausalLM as model_class
    parameters = inspect.signature(model_class.forward).parameters
    for name in _CACHE_NAMES:
        if name in parameters:
            return name
    raise RuntimeError(f"{model_class.__name__}.forward takes no cache keyword ({', '.join(_CACHE_NAMES)}): "
                       f"{describe_installed()}")


def cache_kwargs(model, cache) -> dict:
    """``{keyword: cache}`` for ``model(...)`` or ``model.generate(...)`` under the installed transformers."""
    return {cache_keyword(type(model)): cache}


def cache_argument(kwargs: dict):
    """The cache a forward call was given, whichever keyword it came by (None if none)."""
    for name in _CACHE_NAMES:
        cache = kwargs.get(name)
        if cache is not None:
            return cache
    return None
