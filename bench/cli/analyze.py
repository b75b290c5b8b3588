"""`bench analyze`: analyses of trained editors. `bench analyze directions`: the edit directions of
learned editors' checkpoints per task, with and without instructions (bench/directions.py,
docs/directions.md)."""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.cli.common import (DATA_DIR_HELP, Parser, add_model_arguments, add_seed_argument, csv_list, seed_list,
                              task_options)
from bench.core.defaults import EQUAL_STEPS
from bench.core.hparams import parse_hparam_args
from bench.core.io import check_writable_dir

DEFAULT_OUTPUT = "runs/directions"
DEFAULT_SKETCH = 32  # bench.directions.DEFAULT_SKETCH (not imported: it loads torch)


def holdout_list(value: str) -> list[str]:
    """`none` (the multi-task checkpoint: nothing held out) or held-out task names."""
    return [] if value.strip() == "none" else csv_list(value)


def register(sub) -> None:
    p = sub.add_parser("analyze", help="analyses of trained editors (directions: edit directions per task)")
    analyses = p.add_subparsers(dest="analysis", required=True, parser_class=Parser)
    d = analyses.add_parser(
        "directions", help="PCA of learned editors' edit directions per task, with and without instructions")
    d.add_argument("--editors", type=csv_list, default=["instructedit", "mend"], metavar="E[,E]",
                   help="learned editors whose checkpoints are analysed (default instructedit,mend)")
    d.add_argument("--tasks", type=csv_list, default=["counterfact", "zsre", "recast"], metavar="T,T[,T]",
                   help="tasks whose edits are analysed (default counterfact,zsre,recast)")
    d.add_argument("--holdout", type=holdout_list, default=["zsre"], metavar="T|none",
                   help="the checkpoints' held-out task, as the matrix trained them (default zsre; none: the "
                        "multi-task checkpoint)")
    d.add_argument("--n", type=int, default=50, help="edits per task, the first of its eval split (default 50)")
    d.add_argument("--sketch", type=int, default=DEFAULT_SKETCH, metavar="K",
                   help=f"random sketch of each edited weight's update to K x K numbers (default {DEFAULT_SKETCH}; "
                        "0: the whole flattened update)")
    d.add_argument("--hparam", action="append", default=[], metavar="KEY=VALUE",
                   help="override one hyperparameter of every editor, as given to bench holdout-matrix (by "
                        "default " + ", ".join(f"{k}={v}" for k, v in EQUAL_STEPS.items())
                        + ", the matrix's: its checkpoints are found in the cache)")
    add_model_arguments(d)
    add_seed_argument(d)
    d.add_argument("--seeds", type=seed_list, default=None, metavar="S[,S]",
                   help="analyse the checkpoints of each of these training seeds (as bench holdout-matrix "
                        "--seeds trained them; replaces --seed), each into OUTPUT_DIR/seed-S, then seeds.json and "
                        "seeds.csv: every number's mean, spread and per-seed values. A seed whose folder holds "
                        "the same analysis is not redone")
    d.add_argument("--data-dir", default=None, help=DATA_DIR_HELP)
    d.add_argument("--task-option", action="append", default=[], metavar="TASK.KEY=VALUE",
                   help="override one option of a task card (repeatable)")
    d.add_argument("--train", action="store_true",
                   help="train a checkpoint that is not in the cache (default: an error naming it)")
    d.add_argument("--output-dir", default=DEFAULT_OUTPUT,
                   help=f"where directions.json, directions.csv, summary.csv and directions.svg go "
                        f"(with --seeds: its seed-S folders, seeds.json and seeds.csv; default {DEFAULT_OUTPUT})")
    d.set_defaults(func=main_directions)


def main_directions(args: argparse.Namespace) -> int:
    # late: the analysis imports torch, scikit-learn and the editors; the parser above does not
    from bench.directions import DirectionsPlan, check_plan, run_directions, run_directions_seeds
    from bench.session import RunOptions

    base = RunOptions(model=args.model, device=args.device, dtype=args.dtype, seed=args.seed,
                      data_dir=args.data_dir, task_options=task_options(args.task_option))
    plan = DirectionsPlan(editors=args.editors, tasks=args.tasks, holdout=args.holdout, n=args.n,
                          output_dir=Path(args.output_dir), base=base,
                          hparams={**EQUAL_STEPS, **parse_hparam_args(args.hparam)}, sketch=args.sketch,
                          train=args.train)
    check_plan(plan)
    base.check()  # unknown tasks, task options: before the model loads
    check_writable_dir(plan.output_dir, "--output-dir")  # before the model loads and the work is done
    if args.seeds is None:
        run_directions(plan)
    else:
        run_directions_seeds(plan, args.seeds)
    return 0
