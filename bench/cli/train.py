"""`bench train`: train a learned editor (MEND, InstructEdit) and store its checkpoint."""

from __future__ import annotations

import argparse

from bench.cli.common import add_editor_arguments, editor_hparams, task_options
from bench.core.errors import BenchError
from editors import get_editor_class


def register(sub) -> None:
    p = sub.add_parser("train", help="train a learned editor (mend, instructedit) and cache it",
                       description="Train a learned editor and cache its checkpoint. The training "
                       "state is saved every checkpoint_every steps (--hparam checkpoint_every=N, "
                       "default 50) and on Ctrl-C; the same command resumes from it.")
    add_editor_arguments(p, default_editor="mend")
    p.add_argument("--max-steps", type=int, default=None, help="training steps (hparam max_steps)")
    p.add_argument("--time-budget", type=float, default=None, metavar="S",
                   help="stop training after S seconds (hparam time_budget_s)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from bench.session import RunOptions, set_up  # late: the harness imports torch; the parser does not

    if not get_editor_class(args.editor).learns:
        raise BenchError(f"editor {args.editor!r} does not learn; nothing to train")
    hparams = editor_hparams(args)
    if args.max_steps is not None:
        hparams["max_steps"] = args.max_steps
    if args.time_budget is not None:
        hparams["time_budget_s"] = args.time_budget
    opts = RunOptions(editor=args.editor, holdout=args.holdout, model=args.model, device=args.device,
                      dtype=args.dtype, seed=args.seed, data_dir=args.data_dir, hparams=hparams,
                      task_options=task_options(args.task_option), retrain=True)
    # Under torchrun / `accelerate launch`, every process trains on its slice of each batch.
    setup = set_up(opts, plan=False)
    if setup.shard.rank != 0:
        return 0
    notes = setup.ctx.notes
    print(f"checkpoint: {notes.get('checkpoint')}")
    print(f"trained on: {', '.join(notes.get('train_tasks') or [])}  steps: {notes.get('train_steps')}  "
          f"time: {notes.get('train_time_s')} s")
    val = notes.get("final_validation") or {}
    if val:
        print("validation: " + "  ".join(f"{k} {v:.4f}" for k, v in sorted(val.items())
                                         if isinstance(v, float)))
    return 0
