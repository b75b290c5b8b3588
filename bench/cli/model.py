"""`bench model [NAME]`: load a model and check it (layout, tied embeddings, a greedy sample; for
a preset, also what its file declares: shape, tied embeddings, chat template)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from bench.cli.common import add_model_arguments
from bench.core.errors import BenchError
from bench.core.presets import ModelPreset, find_preset

if TYPE_CHECKING:
    from bench.core.models import LoadedModel

PROMPT = "The Eiffel Tower is located in the city of"


def register(sub) -> None:
    p = sub.add_parser("model", help="load a model and check it (tied embeddings, a greedy sample)")
    p.add_argument("name", nargs="?", default=None,
                   help="a model preset (bench list models) or any --model spec; overrides --model")
    add_model_arguments(p)
    p.set_defaults(func=main)


def preset_problems(preset: ModelPreset, lm: LoadedModel) -> list[str]:
    """What the loaded model contradicts in its preset file (empty: all as declared)."""
    from bench.core.models import embeddings_tied  # late: torch, transformers

    problems = preset.expect.mismatches(lm.model.config)
    if embeddings_tied(lm.model) != preset.expect.tied_embeddings:
        problems.append(f"tied_embeddings: expected {preset.expect.tied_embeddings}, "
                        f"got {embeddings_tied(lm.model)}")
    has_template = bool(getattr(lm.tokenizer, "chat_template", None))
    if has_template != preset.chat_template:
        problems.append(f"chat_template: expected {preset.chat_template}, got {has_template}")
    return problems


def main(args: argparse.Namespace) -> int:
    from bench.core.models import (check_sanity, dtype_warning, embeddings_tied, load_model,  # late: torch
                                   resolve_device, resolve_dtype)

    spec = args.model if args.name is None else args.name
    if not spec.strip():
        raise BenchError("the model name is empty: give a preset (bench list models), a checkpoint "
                         "directory, a .gguf file or a hub id")
    resolve_dtype(args.dtype, resolve_device(args.device))  # a bad --device / --dtype before loading
    lm = load_model(spec, device=args.device, dtype=args.dtype)
    print(f"model: {lm.spec}  weights sha256: {lm.source_hash[:16]}  device: {lm.device}  dtype: {lm.dtype}")
    vocab = lm.layout.lm_head.weight.shape[0] if lm.layout.lm_head is not None else "?"
    print(f"layers: {lm.layout.num_layers}  hidden: {lm.layout.hidden_size}  "
          f"MLP out: {lm.layout.layers[0].mlp_out_name}  tied embeddings: {embeddings_tied(lm.model)}")
    print(f"vocabulary: {vocab}  MLP in: {len(lm.layout.layers[0].mlp_in)} projection(s) "
          f"{lm.layout.hidden_size}->{lm.layout.intermediate_size}  final norm: "
          f"{type(lm.layout.final_norm).__name__ if lm.layout.final_norm is not None else 'none'}")
    print(f"{PROMPT!r} -> {check_sanity(lm, PROMPT)!r}")
    preset = find_preset(spec)
    if preset is None:
        return 0
    problems = preset_problems(preset, lm)
    warning = dtype_warning(preset, lm.dtype)
    print(f"preset {preset.name}: {'chat model' if preset.chat else 'base model'}, chat template "
          f"{'yes' if preset.chat_template else 'no'}; editor defaults: "
          + ("; ".join(f"{e} " + ", ".join(f"{k}={v}" for k, v in hp.items())
                       for e, hp in preset.editors.items()) or "shape-based only"))
    if warning:
        print(f"dtype: {warning}")
    for problem in problems:
        print(f"MISMATCH with {preset.path.name}: {problem}")
    print(f"preset check: {'ok' if not problems else f'{len(problems)} mismatch(es)'}")
    return 1 if problems else 0
