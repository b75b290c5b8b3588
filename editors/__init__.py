"""Editor registry: built-in editors plus third-party ones registered through the
`instructedit_bench.editors` entry-point group (see README, "Adding an editor"), and the
hyperparameter presets shipped with the package (`editors/presets/<editor>/<name>.yaml`).

The registry imports no editor and no torch: `Editor`, `EditHandle` and the other names of
editors.base load on first use (`from editors import Editor` works as before), and what
`bench list editors` shows of a built-in editor is written down in BUILTIN_INFO."""

from __future__ import annotations

import importlib
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from bench.core.errors import BenchError

if TYPE_CHECKING:
    from editors.base import KINDS, CombinedHandle, EditContext, EditHandle, Editor, TrainingData

# editors.base's names, loaded when first asked for (it imports torch): see __getattr__
_FROM_BASE = ("KINDS", "CombinedHandle", "EditContext", "EditHandle", "Editor", "TrainingData")

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
    "ike": "editors.ike:IKE",
    "lora": "editors.lora:LoRA",
    "wise": "editors.wise:Wise",
    "grace": "editors.grace:Grace",
}


class EditorInfo(NamedTuple):
    """What `bench list editors` shows of an editor: its class attributes `kinds`, `learns`,
    `uses_instructions` and `reads_train_split`, and a one-line summary."""
    kinds: tuple[str, ...]
    learns: bool = False
    instructions: bool = False
    train_split: bool = False
    summary: str = ""

    @classmethod
    def of(cls, editor: type[Editor], summary: str = "") -> EditorInfo:
        return cls(tuple(editor.kinds), bool(editor.learns), bool(editor.uses_instructions),
                   bool(getattr(editor, "reads_train_split", False)), summary)


# Every built-in editor as `bench list editors` shows it without importing it (editors import
# torch). The attributes must equal the class's (tests/test_cli.py checks them): a new built-in
# gets its line here too, else the listing imports its class.
BUILTIN_INFO = {
    "none": EditorInfo((), summary="no edit: the unedited baseline"),
    "ft": EditorInfo(("weights",), summary="constrained fine-tuning of MLP output projections (FT-L, FT-M)"),
    "mend": EditorInfo(("weights",), learns=True,
                       summary="Model Editor Networks with Gradient Decomposition (Mitchell et al., 2022)"),
    "instructedit": EditorInfo(("weights",), learns=True, instructions=True,
                               summary="MEND trained on instruction-wrapped edits (Zhang et al., 2024)"),
    "rome": EditorInfo(("weights",), summary="Rank-One Model Editing (Meng et al., 2022)"),
    "memit": EditorInfo(("weights",), summary="Mass-Editing Memory in a Transformer (Meng et al., 2023)"),
    "alphaedit": EditorInfo(("weights",), summary="MEMIT projected onto the null space of preserved keys "
                                                   "(Fang et al., 2025)"),
    "ike": EditorInfo(("context",), train_split=True,
                      summary="In-Context Knowledge Editing: demonstrations and the new fact in "
                              "front of the prompt (Zheng et al., 2023)"),
    "lora": EditorInfo(("modules",), summary="a LoRA adapter trained per edit (EasyEdit's baseline)"),
    "wise": EditorInfo(("modules",), train_split=True,
                       summary="WISE: a routed side memory at one MLP projection, sharded and TIES-merged "
                               "(Wang et al., 2024)"),
    "grace": EditorInfo(("modules",), summary="a codebook of keys, values and deferral radii at one layer "
                                                "(Hartvigsen et al., 2023)"),
}


def __getattr__(name: str):
    """editors.base and its names, imported on first use (`import editors; editors.base.Editor`
    and `from editors import Editor` work as when the registry imported it)."""
    if name == "base" or name in _FROM_BASE:
        import editors.base  # late: torch, only when an editor is really used

        base = sys.modules["editors.base"]  # (`from editors import base` would come back here)
        value = base if name == "base" else getattr(base, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
            from editors.base import Editor  # late: torch (the entry point has imported it already)

            if not (isinstance(cls, type) and issubclass(cls, Editor)):
                raise BenchError(f"entry point {name!r} ({ep.value}) is not an Editor subclass")
            return cls
    raise BenchError(f"unknown editor {name!r}; available: {', '.join(sorted(available_editors()))}")


def presets(editor: str) -> dict[str, Path]:
    """The hyperparameter presets shipped for `editor`: name -> YAML file."""
    folder = PRESETS_DIR / editor
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))} if folder.is_dir() else {}


def describe_editor(name: str) -> EditorInfo:
    """What `bench list editors` shows of `name`: a built-in's line of BUILTIN_INFO (nothing is
    imported), else its class's attributes and first sentence (a third-party editor is imported).
    BenchError when it cannot be loaded."""
    if name in BUILTIN and name in BUILTIN_INFO:
        return BUILTIN_INFO[name]
    cls = get_editor_class(name)
    return EditorInfo.of(cls, summary=first_sentence(cls))


def first_sentence(cls) -> str:
    """The first sentence of a class's docstring (else its module's), at most 90 characters."""
    text = (cls.__doc__ or sys.modules[cls.__module__].__doc__ or "").strip()
    paragraph = " ".join(text.split("\n\n")[0].split())
    return paragraph.split(". ")[0].rstrip(".")[:90] if paragraph else ""


__all__ = ["Editor", "EditHandle", "CombinedHandle", "KINDS", "EditContext", "TrainingData", "get_editor_class",
           "available_editors", "presets", "BUILTIN", "BUILTIN_INFO", "EditorInfo", "describe_editor",
           "PRESETS_DIR"]
