"""`bench model`: load a model and check it (layout, tied embeddings, a greedy sample)."""

from __future__ import annotations

import argparse

from bench.cli.common import add_model_arguments
from bench.core.models import check_sanity, embeddings_tied, load_model

PROMPT = "The Eiffel Tower is located in the city of"


def register(sub) -> None:
    p = sub.add_parser("model", help="load a model and check it (tied embeddings, a greedy sample)")
    add_model_arguments(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    lm = load_model(args.model, device=args.device, dtype=args.dtype)
    print(f"model: {lm.spec}  weights sha256: {lm.source_hash[:16]}  device: {lm.device}  dtype: {lm.dtype}")
    print(f"layers: {lm.layout.num_layers}  hidden: {lm.layout.hidden_size}  "
          f"MLP out: {lm.layout.layers[0].mlp_out_name}  tied embeddings: {embeddings_tied(lm.model)}")
    print(f"{PROMPT!r} -> {check_sanity(lm, PROMPT)!r}")
    return 0
