"""What a cache resolved to, in words: the terms each layer reports (``CacheLayer.layout``), merged over layers
(or over the samples of an eval cell) and written as one line.

A method name alone is not enough: ``ojakv`` without a budget is a low-rank body whose bases move while
decoding; with a budget it is a transform-coded body on fixed bases whose bits, rank and anchors follow the
prompt. The line says which.
"""

from __future__ import annotations

from statistics import mean

Terms = dict[str, "float | str"]

RESOLVED_AT_PREFILL: Terms = {"layout": "resolved at prefill (a budget is sized to the prompt)"}


def merge_terms(parts: list[Terms]) -> Terms:
    """One set of terms for several layers or samples: numbers averaged (layers allocate bits from their own
    spectra, so they differ), words kept once each, in first-seen order."""
    merged: dict[str, list] = {}
    for part in parts:
        for name, value in part.items():
            merged.setdefault(name, []).append(value)
    return {name: _merge_values(values) for name, values in merged.items()}


def _merge_values(values: list):
    if all(isinstance(value, (int, float)) for value in values):
        return round(mean(values), 2)
    return " / ".join(dict.fromkeys(str(value) for value in values))


def describe(terms: Terms) -> str:
    """The terms as one line: ``body transform-coded, bits per coordinate 2.3, rank 41.5, ...``."""
    return ", ".join(_term(name, value) for name, value in terms.items())


def _term(name: str, value) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return value if name == "layout" else f"{name} {value}"
