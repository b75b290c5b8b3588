"""`bench holdout-matrix`: leave-one-task-out evaluation of learned editors (bench/holdout.py,
docs/holdout.md)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.cli.common import (DATA_DIR_HELP, add_model_arguments, add_seed_argument, csv_list, limit, seed_list,
                              task_options)
from bench.core.defaults import DEFAULT_LIMIT, EQUAL_STEPS, PROTOCOLS
from bench.core.errors import BenchError
from bench.core.io import check_writable_dir
from bench.core.hparams import parse_hparam_args

DEFAULT_OUTPUT = "runs/holdout-matrix"


def register(sub) -> None:
    p = sub.add_parser("holdout-matrix",
                       help="leave-one-task-out: train each editor on all tasks but one, evaluate on it")
    p.add_argument("--editors", type=csv_list, default=["instructedit", "mend"], metavar="E,E[,E]",
                   help="learned editors; the matrix shows the first minus each other "
                        "(default instructedit,mend)")
    p.add_argument("--tasks", type=csv_list, default=["counterfact", "zsre", "recast"], metavar="T,T[,T]",
                   help="tasks held out in turn; every other task with train data is trained on "
                        "(default counterfact,zsre,recast)")
    p.add_argument("--columns", type=csv_list, default=None, metavar="T[,T]",
                   help="make only these held-out tasks' runs now (to split the matrix across processes "
                        "sharing --output-dir; `none`: the --multitask column); writes no matrix.json: "
                        "run again without it to assemble")
    p.add_argument("--multitask", action="store_true",
                   help="add a column where no task is held out: every editor trained on every task with "
                        "train data and evaluated on each (InstructEdit's multi-task setting)")
    p.add_argument("--seeds", type=seed_list, default=None, metavar="S,S[,S]",
                   help="train and evaluate every cell once per seed (one checkpoint per seed); cells show "
                        "the mean over seeds, the per-seed values, and differences whose interval "
                        "resamples seeds and cases (instead of --seed)")
    p.add_argument("--limit", type=limit, default=DEFAULT_LIMIT,
                   help=f"eval cases per task (default {DEFAULT_LIMIT}; 0 = all)")
    p.add_argument("--hparam", action="append", default=[], metavar="KEY=VALUE",
                   help="override one hyperparameter of every editor (repeatable); by default "
                        + ", ".join(f"{k}={v}" for k, v in EQUAL_STEPS.items())
                        + " so every editor trains exactly max_steps steps")
    add_model_arguments(p)
    add_seed_argument(p)
    p.add_argument("--data-dir", default=None, help=DATA_DIR_HELP)
    p.add_argument("--task-option", action="append", default=[], metavar="TASK.KEY=VALUE",
                   help="override one option of a task card (repeatable)")
    p.add_argument("--protocol", type=csv_list, default=list(PROTOCOLS), metavar="P[,P]",
                   help="evaluation protocols: teacher_forced and/or wild (default both)")
    p.add_argument("--batch-size", type=int, default=32, help="prompts per evaluation batch")
    p.add_argument("--output-dir", default=DEFAULT_OUTPUT,
                   help=f"where the run directories and matrix.json go (default {DEFAULT_OUTPUT})")
    p.set_defaults(func=main, resume_hint="continue with the same bench holdout-matrix command "
                                          "(finished runs are reused, unfinished ones resumed)")


def main(args: argparse.Namespace) -> int:
    # late: the harness imports torch; the parser above does not
    from bench.holdout import MatrixPlan, check_inputs, print_matrix, run_matrix
    from bench.session import RunOptions

    check_inputs(args.editors, args.tasks, args.columns, args.multitask, args.seeds)
    if args.seeds is not None and args.seed != 0:
        raise BenchError("give --seed or --seeds, not both")
    check_writable_dir(args.output_dir, "--output-dir")  # a file, /proc, read-only: before any training
    base = RunOptions(model=args.model, device=args.device, dtype=args.dtype, limit=args.limit,
                      seed=args.seed, data_dir=args.data_dir, task_options=task_options(args.task_option),
                      protocols=args.protocol, batch_size=args.batch_size)
    plan = MatrixPlan(editors=args.editors, tasks=args.tasks, output_dir=Path(args.output_dir), base=base,
                      hparams={**EQUAL_STEPS, **parse_hparam_args(args.hparam)}, columns=args.columns,
                      multitask=args.multitask, seeds=args.seeds)
    doc = run_matrix(plan, argv=sys.argv[1:])
    if not plan.partial:
        print_matrix(doc, plan.output_dir)
    return 0
