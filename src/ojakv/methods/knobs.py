"""A method's knobs, from text or from Python, through one pipeline: each knob's kind comes from its config
dataclass's annotation; ``parse_value`` turns text (CLI flags, method specs, lm-eval arguments) into a value of
that kind, and ``check_value`` refuses a value of another kind (``Method.make_config`` runs it for every knob given,
before the config's own ``validate`` compares values)."""

from __future__ import annotations

import dataclasses
import math
import numbers

from ..errors import OjaKVError

_BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def knob(default, help: str):
    """A config field with a help string (shown by ``ojakv methods`` and the CLI)."""
    return dataclasses.field(default=default, metadata={"help": help})


def kind(field: dataclasses.Field) -> str:
    """``bool``, ``float``, ``int`` or ``str``: what the knob's annotation says it holds (``str`` if unannotated)."""
    annotation = str(field.type)
    return next((name for name in ("bool", "float", "int") if name in annotation), "str")


def _field(config_class: type, name: str) -> dataclasses.Field | None:
    return {f.name: f for f in dataclasses.fields(config_class)}.get(name)


def parse_value(config_class: type, name: str, text: str, label: str | None = None):
    """A knob value from text, of the knob's kind; errors name the knob as ``label`` (default ``knob NAME``; the
    CLI passes its flag)."""
    field = _field(config_class, name)
    wanted = kind(field) if field is not None else "str"
    label = label or f"knob {name}"
    if wanted == "bool":
        if text.strip().lower() not in _BOOLEANS:
            raise OjaKVError(f"{label} needs true or false, got {text!r}")
        return _BOOLEANS[text.strip().lower()]
    try:
        return {"float": float, "int": int}.get(wanted, str)(text)
    except ValueError:
        raise OjaKVError(f"{label} needs {'a number' if wanted == 'float' else 'a whole number'}, got {text!r}") \
            from None


def check_value(method: str, field: dataclasses.Field, value) -> None:
    """Refuse a Python value of another kind than the knob's (None only where the knob allows it)."""
    if value is None:
        if "None" not in str(field.type):
            raise OjaKVError(f"{method} knob {field.name} cannot be None: leave it out for its default "
                             f"({field.default!r})")
        return
    number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    expected, ok = {
        "bool": ("True or False", isinstance(value, bool)),
        "float": ("a finite number", number and math.isfinite(value)),
        "int": ("a whole number", number and isinstance(value, numbers.Integral)),
        "str": ("a string", isinstance(value, str)),
    }[kind(field)]
    if not ok:
        example = f" (default {field.default!r})" if field.default is not None else ""
        raise OjaKVError(f"{method} knob {field.name} takes {expected}, got {value!r}{example}")
