"""Editor hyperparameters: parsing, typing and validation.

An editor's hyperparameters are one dataclass. Values arrive as strings (`--hparam key=value`) or
typed (a YAML file); `override_hparams` applies them to the defaults with each value coerced to
its field's type, and `check_hparams` validates the result before any model is loaded: every
float finite, numbers within their declared bounds, strings among their choices, layer indices
inside the model, lists that must name something not empty. Bounds are declared next to the
field with `param`; counts that set how long a run works (steps, batch sizes) get an upper bound
too, generous but finite, so that a typo such as `steps=1e30` is refused instead of running
without end:

    @dataclass
    class MyHparams:
        steps: int = param(25, ge=0, le=100_000)
        lr: float = param(5e-4, gt=0)
        layers: list[int] | None = param(None, layer="index", nonempty=True)
        objective: str = param("prompt_last", choices=("prompt_last", "target_masked"))
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bench.core.errors import BenchError
from bench.core.io import YAML_MAX_BYTES, finite, load_yaml, read_text

_KEY = "bench_constraint"


@dataclass(frozen=True)
class Constraint:
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple | None = None
    layer: str | None = None  # "index": 0 <= i < L; "signed": -L <= i < L (negative from the end)
    allow_nonfinite: bool = False
    nonempty: bool = False  # a list value must hold at least one item (None stays allowed)


def param(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING,
          ge: float | None = None, gt: float | None = None, le: float | None = None,
          lt: float | None = None, choices: tuple | None = None, layer: str | None = None,
          allow_nonfinite: bool = False, nonempty: bool = False) -> Any:
    """A dataclass field with declared bounds (mutable defaults are copied per instance)."""
    if layer not in (None, "index", "signed"):
        raise ValueError(f"layer must be 'index' or 'signed', not {layer!r}")
    meta = {_KEY: Constraint(ge, gt, le, lt, tuple(choices) if choices else None, layer,
                             allow_nonfinite, nonempty)}
    if isinstance(default, (list, dict, set)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata=meta)
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------------------------
# Coercion
# --------------------------------------------------------------------------------------------


def _is_union(typ) -> bool:
    return typing.get_origin(typ) in (typing.Union, types.UnionType)


def coerce(value: Any, typ, name: str, label: str | None = None) -> Any:
    """`value` (a string from the command line, or a YAML value) as type `typ`; BenchError
    saying what was expected otherwise, about `label` (default "hyperparameter <name>")."""
    label = label or f"hyperparameter {name}"
    if _is_union(typ):
        options = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null")):
            if len(options) < len(typing.get_args(typ)):
                return None
            raise BenchError(f"{label}: a value is required, got {value!r}")
        return coerce(value, options[0], name, label)
    origin = typing.get_origin(typ)
    if origin in (list, tuple):
        inner = (typing.get_args(typ) or (str,))[0]
        if isinstance(value, str):
            items = [v.strip() for v in value.strip().strip("[]").split(",") if v.strip()]
        elif isinstance(value, (list, tuple)):
            items = list(value)
        else:
            items = [value]  # a single number from YAML
        out = [coerce(v, inner, name, label) for v in items]
        return out if origin is list else tuple(out)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.strip().lower() in ("0", "false", "no", "off"):
            return False
        raise BenchError(f"{label}: expected true/false, got {value!r}")
    if typ is int:
        if isinstance(value, bool):
            raise BenchError(f"{label}: expected int, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            text = value.strip()
            try:
                return int(text)
            except ValueError:
                pass
            try:
                number = float(text)  # 1e3
            except ValueError:
                number = None
            if number is not None and math.isfinite(number) and number.is_integer():
                return int(number)
        raise BenchError(f"{label}: expected int, got {value!r}")
    if typ is float:
        if isinstance(value, bool):
            raise BenchError(f"{label}: expected float, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise BenchError(f"{label}: expected float, got {value!r}")
    if typ is str:
        if isinstance(value, (dict, list, tuple)) or value is None:
            raise BenchError(f"{label}: expected text, got {value!r}")
        return str(value)
    return value


def override_hparams(hparams, overrides: dict[str, Any]):
    """A copy of the dataclass `hparams` with `overrides` applied and typed; unknown keys are
    errors that list the known ones."""
    hints = typing.get_type_hints(type(hparams))
    names = [f.name for f in dataclasses.fields(hparams)]
    changes = {}
    for key, value in overrides.items():
        if key not in names:
            raise BenchError(f"unknown hyperparameter {key!r} for {type(hparams).__name__}; "
                             f"known: {', '.join(sorted(names))}")
        changes[key] = coerce(value, hints[key], key)
    return dataclasses.replace(hparams, **changes)


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _bounds_text(c: Constraint) -> str:
    parts = [f"{op} {v}" if isinstance(v, int) else f"{op} {v:g}"
             for op, v in ((">=", c.ge), (">", c.gt), ("<=", c.le), ("<", c.lt)) if v is not None]
    return " and ".join(parts)


def _check_value(where: str, name: str, value: Any, c: Constraint | None, n_layers: int | None) -> None:
    if isinstance(value, (list, tuple)) and not value and c is not None and c.nonempty:
        raise BenchError(f"{where}: hyperparameter {name} must name at least one value, got an empty list")
    if isinstance(value, (list, tuple)):
        for v in value:
            _check_value(where, name, v, c, n_layers)
        return
    if isinstance(value, float) and not math.isfinite(value) and not (c and c.allow_nonfinite):
        raise BenchError(f"{where}: hyperparameter {name} must be a finite number, got {value!r}")
    if c is None or value is None:
        return
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        low_ok = (c.ge is None or value >= c.ge) and (c.gt is None or value > c.gt)
        high_ok = (c.le is None or value <= c.le) and (c.lt is None or value < c.lt)
        if not (low_ok and high_ok):
            raise BenchError(f"{where}: hyperparameter {name} must be {_bounds_text(c)}, got {value!r}")
        if c.layer and n_layers is not None:
            low = -n_layers if c.layer == "signed" else 0
            if not (isinstance(value, int) and low <= value < n_layers):
                raise BenchError(f"{where}: hyperparameter {name}: layer {value} is out of range for "
                                 f"a model with {n_layers} layers ({low} .. {n_layers - 1})")
    if c.choices is not None and value not in c.choices:
        raise BenchError(f"{where}: hyperparameter {name} must be one of "
                         f"{', '.join(map(str, c.choices))}, got {value!r}")


def check_hparams(hparams, n_layers: int | None = None, where: str = "") -> None:
    """BenchError on the first value that breaks its field's type, finiteness, bounds, choices or
    (with `n_layers`) layer range."""
    where = where or type(hparams).__name__
    hints = typing.get_type_hints(type(hparams))
    for f in dataclasses.fields(hparams):
        value = getattr(hparams, f.name)
        if value is not None and not _is_union(hints[f.name]) and not _fits(value, hints[f.name]):
            raise BenchError(f"{where}: hyperparameter {f.name} has the wrong type: {value!r}")
        _check_value(where, f.name, value, f.metadata.get(_KEY), n_layers)


def _fits(value: Any, typ) -> bool:
    origin = typing.get_origin(typ)
    if origin in (list, tuple):
        inner = (typing.get_args(typ) or (object,))[0]
        return isinstance(value, (list, tuple)) and all(_fits(v, inner) for v in value)
    if typ is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if typ is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(typ, type):
        return isinstance(value, typ)
    return True


# --------------------------------------------------------------------------------------------
# Sources: --hparam key=value and YAML files
# --------------------------------------------------------------------------------------------


def parse_hparam_args(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise BenchError(f"--hparam expects key=value, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def load_hparams_file(path: str | Path | None) -> dict[str, Any]:
    """The mapping in a YAML file of hyperparameters ({} for None)."""
    if not path:
        return {}
    text = read_text(Path(path), "hyperparameter file", max_bytes=YAML_MAX_BYTES)  # not a FIFO (a hang)
    try:
        data = load_yaml(text)  # safe_load with limits: an alias bomb or deep nesting is refused
    except yaml.YAMLError as exc:
        raise BenchError(f"hyperparameter file {path} is not valid YAML: "
                         f"{str(exc).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise BenchError(f"hyperparameter file {path} must hold a mapping of name: value")
    return data


def hparams_to_dict(hparams) -> dict:
    """The hyperparameters as plain JSON values (what config.json and checkpoints record)."""
    return finite(dataclasses.asdict(hparams))
