"""The editor contract.

An editor is one class:

    class MyEditor(Editor):
        name = "my-editor"
        Hparams = MyHparams             # a dataclass; every field overridable with --hparam k=v

        def apply(self, model, tokenizer, case) -> EditHandle: ...

and, optionally, `default_hparams(config)` (defaults per model shape), `prepare(lm, ctx)`
(caches, loading or training a learned editor), `train(lm, train_cases, ctx)`, and
`apply_many` with `edits_per_call` (compute several independent edits together).
`apply` returns a handle whose `restore()` puts back every weight it changed, bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator

import torch
from torch import nn

from bench.cases import EditCase
from bench.distributed import Shard
from bench.errors import BenchError


class EditHandle:
    """Restores the weights an edit changed. `changed` names the changed parameters, all of
    them: the runner's post-edit evaluation reuses the outputs of the blocks below them."""

    def __init__(self, model: nn.Module, param_names: list[str]):
        params = dict(model.named_parameters())
        missing = [n for n in param_names if n not in params]
        if missing:
            raise ValueError(f"unknown parameters {missing}")
        self.changed = list(param_names)
        self._params = {n: params[n] for n in param_names}
        self._saved = {n: p.detach().clone() for n, p in self._params.items()}

    @torch.no_grad()
    def restore(self) -> None:
        for name, param in self._params.items():
            param.copy_(self._saved[name])


def param_name(model: nn.Module, module: nn.Module, attr: str = "weight") -> str:
    """The qualified name of `module.<attr>` inside `model`."""
    target = getattr(module, attr)
    for name, p in model.named_parameters():
        if p is target:
            return name
    raise ValueError("parameter not found in model")


@dataclass
class EditContext:
    """What a run hands an editor besides the model: where to cache, the seed, a logger."""

    cache_dir: Path
    seed: int = 0
    data_dir: Path | None = None
    train_tasks: list[str] = field(default_factory=list)
    holdout_tasks: list[str] = field(default_factory=list)
    retrain: bool = False
    log: Callable[[str], None] = print
    # Facts the editor wants recorded in the run's config.json (e.g. tokens used for statistics).
    notes: dict[str, Any] = field(default_factory=dict)
    # This process's place in a multi-process launch; learned editors train data-parallel
    # across the processes. The default is a lone process (every collective a no-op).
    shard: Shard = field(default_factory=Shard)


class Editor:
    name: ClassVar[str] = ""
    Hparams: ClassVar[type] = None  # a dataclass type
    uses_instructions: ClassVar[bool] = False  # prompts get wrapped in the task's instruction
    learns: ClassVar[bool] = False  # needs train() (or a cached checkpoint) before apply()

    def __init__(self, hparams=None):
        self.hparams = hparams if hparams is not None else self.Hparams()

    @classmethod
    def default_hparams(cls, config) -> Any:
        """Defaults for a model with this (transformers) config; override per model shape."""
        return cls.Hparams()

    def prepare(self, lm, ctx: EditContext) -> None:
        """Called once before the first edit of a run (load caches, train or load a checkpoint)."""

    def apply(self, model: nn.Module, tokenizer, case: EditCase) -> EditHandle:
        raise NotImplementedError

    @property
    def edits_per_call(self) -> int:
        """How many cases the runner hands `apply_many` at once."""
        return 1

    def apply_many(self, model: nn.Module, tokenizer, cases: list[EditCase]) -> Iterator[EditHandle]:
        """Independent edits, one at a time: yields a handle per case, in order, with that case's
        edit (alone) applied; the caller evaluates and restores it before asking for the next.
        Override to compute the edits together (FT optimises them as one batch). A BenchError
        fails the whole call; the runner then retries the cases one by one."""
        for case in cases:
            yield self.apply(model, tokenizer, case)


# --------------------------------------------------------------------------------------------
# Hyperparameters: defaults <- YAML file <- --hparam key=value
# --------------------------------------------------------------------------------------------


def _coerce(value: str, typ, field_name: str):
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        non_none = [a for a in args if a is not type(None)]
        if value.lower() in ("none", "null"):
            return None
        return _coerce(value, non_none[0], field_name)
    if origin in (list, tuple):
        inner = args[0] if args else str
        items = [v for v in value.strip("[]").split(",") if v.strip()]
        out = [_coerce(v.strip(), inner, field_name) for v in items]
        return out if origin is list else tuple(out)
    if typ is bool:
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise BenchError(f"hyperparameter {field_name}: expected true/false, got {value!r}")
    if typ in (int, float):
        try:
            return typ(float(value)) if typ is int and "e" in value.lower() else typ(value)
        except ValueError:
            raise BenchError(f"hyperparameter {field_name}: expected {typ.__name__}, got {value!r}") from None
    return value


def _check_type(value, typ, field_name: str):
    """Values from YAML are already typed; accept them when they fit, coerce strings."""
    if isinstance(value, str) and typ is not str:
        return _coerce(value, typ, field_name)
    origin = typing.get_origin(typ)
    if value is not None and (origin is typing.Union or str(origin) == "<class 'types.UnionType'>"):
        non_none = [a for a in typing.get_args(typ) if a is not type(None)]
        return _check_type(value, non_none[0], field_name)  # Optional[X]: check against X
    if origin in (list, tuple) and isinstance(value, (int, float)):
        value = [value]
    if origin in (list, tuple) and isinstance(value, (list, tuple)):
        inner = typing.get_args(typ)[0] if typing.get_args(typ) else str
        return [_check_type(v, inner, field_name) for v in value]
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def override_hparams(hparams, overrides: dict[str, Any]):
    """A copy of the dataclass `hparams` with `overrides` applied; unknown keys are errors."""
    hints = typing.get_type_hints(type(hparams))
    names = {f.name for f in dataclasses.fields(hparams)}
    changes = {}
    for key, value in overrides.items():
        if key not in names:
            raise BenchError(f"unknown hyperparameter {key!r} for {type(hparams).__name__}; "
                             f"known: {', '.join(sorted(names))}")
        changes[key] = _check_type(value, hints[key], key)
    return dataclasses.replace(hparams, **changes)


def parse_hparam_args(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise BenchError(f"--hparam expects key=value, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def load_hparams_file(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise BenchError(f"hyperparameter file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise BenchError(f"hyperparameter file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise BenchError(f"hyperparameter file {path} must hold a mapping of name: value")
    return data


def hparams_to_dict(hparams) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(hparams), default=str))
