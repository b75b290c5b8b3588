"""`bench run`: apply edits and measure them."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.cli.common import add_run_arguments, csv_list, given_options, options_from_args
from bench.core.errors import BenchError
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


# What --resume may be given with: the run's own options come from its config.json
RESUME_OPTIONS = ("resume", "limit")


def check_resume_arguments(args: argparse.Namespace) -> None:
    """`--resume RUN` names a run directory and takes no option that would change the run
    (editor, hyperparameters, tasks, model, protocol, mode, ...): they are refused in one line,
    never silently ignored. `--limit` extends the run (docs/run-format.md)."""
    if not args.resume.strip():
        raise BenchError("--resume needs a run directory, got ''")
    command_line = getattr(args, "command_line", None)
    if command_line is None:
        return
    extra = [opt for dest, opt in given_options(command_line, "run").items() if dest not in RESUME_OPTIONS]
    if extra:
        raise BenchError(f"--resume continues a run with the options in its config.json and takes only "
                         f"--limit (to extend it); drop {', '.join(extra)} or start a new run")


def main(args: argparse.Namespace) -> int:
    from bench.runner import execute, resume  # late: the harness imports torch; the parser does not

    if args.resume is not None:
        check_resume_arguments(args)
        # An explicit --limit with --resume extends the run to that many cases per task.
        resume(Path(args.resume), limit=args.limit if getattr(args, "limit_given", False) else "keep")
        return 0
    opts = options_from_args(args, regression=args.regression, mode=args.mode)
    execute(opts, argv=sys.argv[1:])
    return 0
