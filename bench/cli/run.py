"""`bench run`: apply edits and measure them."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.cli.common import add_run_arguments, csv_list, options_from_args
from bench.core.defaults import RUN_MODES


def register(sub) -> None:
    p = sub.add_parser("run", help="apply edits and measure them")
    add_run_arguments(p)
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue a killed run")
    p.add_argument("--regression", type=csv_list, default=[], metavar="TASKS",
                   help="lm-eval regression on these tasks (e.g. fact_retention,bench_perplexity,"
                        "hellaswag; docs/regression.md)")
    p.add_argument("--mode", choices=RUN_MODES, default="single",
                   help="single (default): each case edited alone, measured, restored; sequential: "
                        "every edit applied in order and kept, every edit made so far (and the "
                        "--regression suite) measured at checkpoints (--eval-every)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from bench.runner import execute, resume  # late: the harness imports torch; the parser does not

    if args.resume:
        # An explicit --limit with --resume extends the run to that many cases per task.
        resume(Path(args.resume), limit=args.limit if getattr(args, "limit_given", False) else "keep")
        return 0
    opts = options_from_args(args, regression=args.regression, mode=args.mode)
    execute(opts, argv=sys.argv[1:])
    return 0
