"""The validation curve of a learned editor (mend, instructedit): train it for N steps on a set of
training tasks, validating every K steps, and print what the trainer recorded at each validation
(editors/mend/trainer.py, MetaTrainer.fit; the checkpoint JSON keeps it as `history`). Where the
curve flattens is the number of steps worth training (docs/holdout.md, "Choosing the steps").

    python benchmarks/validation_curve.py --editor mend --holdout zsre --steps 500 --val-every 25
    python benchmarks/validation_curve.py --editor instructedit --train-tasks counterfact,recast \
        --steps 500 --val-every 25 --json curve-instructedit.json

Training tasks: `--holdout T[,T]` (every task with train data but those, as `bench run --holdout`
and `bench holdout-matrix` train) or `--train-tasks A,B` (exactly these; each needs train data).
Early stopping and the time budget are off (patience=0, time_budget_s=0, as in the matrix), so
the curve covers all N steps; `--hparam` sets anything else. The network is prepared as a run
prepares it: a checkpoint with the same key is loaded from the cache instead of trained (and its
recorded curve printed), and the one trained here is cached, so `bench holdout-matrix --hparam
max_steps=N --hparam val_every=K` finds it for the same training tasks.

Columns (validation cases: `val_cases` held out of the training splits, split across tasks): the
loss c_edit * edit NLL + c_loc * locality KL (what the best network is chosen by), edit accuracy
(token accuracy of the new target after the edit prompt), rephrase accuracy, locality agreement
(argmax unchanged by the edit), edit NLL, locality KL; then the training loss (mean of the last
20 steps) and the seconds since training started.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from _common import add_data_argument, find_data_dir, fmt, log, machine, machine_line, prepare, run_main, set_threads
from bench.core.defaults import DEFAULT_MODEL
from bench.core.errors import BenchError
from bench.core.hparams import hparams_to_dict, parse_hparam_args
from bench.core.models import load_config, load_model
from bench.session import build_editor
from tasks.registry import get_card, list_cards, trainable

# The full N steps, as the leave-one-task-out matrix trains (bench.holdout.EQUAL_STEPS)
NO_STOPPING = {"patience": 0, "time_budget_s": 0}
VAL_COLUMNS = ("loss", "edit_acc", "rephrase_acc", "loc_agree", "edit_nll", "loc_kl")


def csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def holdout_for(train_tasks: list[str], data_dir) -> list[str]:
    """The held-out list that leaves exactly `train_tasks` to train on."""
    for name in train_tasks:
        get_card(name)  # unknown task
        if not trainable(name, data_dir):
            raise BenchError(f"task {name!r} has no train split or no train data here")
    return [name for name in list_cards() if name not in train_tasks]


def curve_table(history: list[dict]) -> list[str]:
    """The recorded validations as a Markdown table, one row per validation."""
    head = ["step", "val loss", "edit acc", "rephrase acc", "loc agree", "edit NLL", "loc KL", "train loss",
            "elapsed s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---:"] * len(head)) + "|"]
    for h in history:
        val, train = h.get("val") or {}, h.get("train") or {}
        cells = [str(h["step"])] + [fmt(val.get(k), 4 if k in ("loss", "loc_kl") else 3) for k in VAL_COLUMNS]
        cells += [fmt(train.get("loss"), 4), fmt(val.get("elapsed_s"), 1)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--editor", default="mend", help="a learned editor: mend (default) or instructedit")
    which = ap.add_mutually_exclusive_group(required=True)
    which.add_argument("--holdout", type=csv, metavar="T[,T]",
                       help="train on every task with train data but these")
    which.add_argument("--train-tasks", type=csv, metavar="A,B", help="train on exactly these tasks")
    ap.add_argument("--steps", type=int, default=250, help="training steps N (hparam max_steps; default 250)")
    ap.add_argument("--val-every", type=int, default=25, help="validate every K steps (hparam val_every; default 25)")
    ap.add_argument("--hparam", action="append", default=[], metavar="KEY=VALUE",
                    help="override one more hyperparameter (repeatable), e.g. val_cases=64")
    ap.add_argument("--model", default=DEFAULT_MODEL, help="model spec or checkpoint directory")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", default=None, metavar="DIR",
                    help="cache directory for the checkpoint (default: the harness's, $BENCH_CACHE)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1; 0 = torch's choice)")
    ap.add_argument("--json", default=None, help="write the curve (and the checkpoint's facts) here")
    add_data_argument(ap)
    args = ap.parse_args()
    set_threads(args.threads)
    if args.steps < 1 or args.val_every < 1:
        raise BenchError("--steps and --val-every must be at least 1")
    data_dir = find_data_dir(args.data_dir)
    holdout = holdout_for(args.train_tasks, data_dir) if args.train_tasks else args.holdout
    for name in holdout:
        get_card(name)
    overrides = {**NO_STOPPING, **parse_hparam_args(args.hparam), "max_steps": args.steps,
                 "val_every": args.val_every}
    editor = build_editor(args.editor, overrides, load_config(args.model), args.model)  # checked before loading
    if not editor.learns:
        raise BenchError(f"editor {args.editor!r} does not learn: no training, no validation curve")
    lm = load_model(args.model, device=args.device, dtype=args.dtype)
    ctx, prepare_s = prepare(editor, lm, data_dir, holdout, args.seed,
                             Path(args.cache) if args.cache else None)
    meta = editor.checkpoint_meta or {}
    history = meta.get("history") or []
    if not history:
        raise BenchError("the checkpoint records no validation (val_cases=0?)")
    m = machine()
    print(machine_line(m) + f"; load average {m['load']}")
    print(f"{args.editor} on {lm.spec}: trained on {', '.join(meta.get('train_tasks') or [])} "
          f"(held out: {', '.join(meta.get('holdout_tasks') or []) or 'none'}); {meta.get('steps')} steps, "
          f"{meta.get('s_per_step')} s/step, best validation at step {meta.get('best_step')}; "
          f"checkpoint {ctx.notes.get('checkpoint_source')} ({Path(ctx.notes.get('checkpoint', '')).name})")
    print("\n".join(curve_table(history)))
    if args.json:
        Path(args.json).write_text(json.dumps({
            "editor": args.editor, "model": lm.spec, "argv": sys.argv[1:], "machine": m,
            "hparams": hparams_to_dict(editor.hparams), "train_tasks": meta.get("train_tasks"),
            "holdout_tasks": meta.get("holdout_tasks"), "steps": meta.get("steps"),
            "best_step": meta.get("best_step"), "s_per_step": meta.get("s_per_step"),
            "train_time_s": meta.get("train_time_s"), "checkpoint_source": ctx.notes.get("checkpoint_source"),
            "prepare_s": round(prepare_s, 1), "history": history}, indent=2, default=str))
        log(f"wrote {args.json}")


if __name__ == "__main__":
    run_main(main)
