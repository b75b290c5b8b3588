"""Editor registry: built-in editors plus third-party ones registered through the
`instructedit_bench.editors` entry-point group (see README, "Adding an editor"), and the
hyperparameter presets shipped with the package (`editors/presets/<editor>/<name>.yaml`)."""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from pathlib import Path

from bench.core.errors import BenchError
from editors.base import CombinedHandle, EditContext, EditHandle, Editor, TrainingData

ENTRY_POINT_GROUP = "instructedit_bench.editors"
PRESETS_DIR = Path(__file__).parent / "presets"

# name -> "module:Class"; imported by name when asked for, so listing editors imports none.
BUILTIN = {
    "none": "editors.none:NoEdit",
    "ft": "editors.ft:FineTune",
    "mend": "editors.mend:Mend",
    "instructedit": "editors.instructedit:InstructEdit",
    "rome": "editors.rome:Rome",
    "memit": "editors.memit:Memit",
    "alphaedit": "editors.memit:AlphaEdit",
}


def _load(target: str) -> type[Editor]:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def available_editors() -> dict[str, str]:
    """name -> where it comes from ('built-in' or the entry point's value)."""
    out = {name: "built-in" for name in BUILTIN}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        out.setdefault(ep.name, ep.value)
    return out


def get_editor_class(name: str) -> type[Editor]:
    if name in BUILTIN:
        return _load(BUILTIN[name])
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            cls = ep.load()
            if not (isinstance(cls, type) and issubclass(cls, Editor)):
                raise BenchError(f"entry point {name!r} ({ep.value}) is not an Editor subclass")
            return cls
    raise BenchError(f"unknown editor {name!r}; available: {', '.join(sorted(available_editors()))}")


def presets(editor: str) -> dict[str, Path]:
    """The hyperparameter presets shipped for `editor`: name -> YAML file."""
    folder = PRESETS_DIR / editor
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))} if folder.is_dir() else {}


__all__ = ["Editor", "EditHandle", "CombinedHandle", "EditContext", "TrainingData", "get_editor_class",
           "available_editors", "presets", "BUILTIN", "PRESETS_DIR"]
