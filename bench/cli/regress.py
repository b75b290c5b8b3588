"""`bench regress`: general-capability regression (lm-eval) before and after edits; a run whose
lm-eval suite defaults to the offline one (bench/regression, docs/regression.md)."""

from __future__ import annotations

import argparse
import sys

from bench.cli.common import add_run_arguments, csv_list, options_from_args
from bench.core.defaults import RUN_MODES

# bench.regression's DEFAULT_SUITE and DEFAULT_SAMPLE, copied: importing bench.regression loads
# torch, which the parser must not (tests/test_cli.py checks that the copies are equal).
DEFAULT_SUITE = ("fact_retention", "bench_perplexity")
DEFAULT_SAMPLE = 3


def register(sub) -> None:
    p = sub.add_parser("regress", help="general-capability regression (lm-eval) before/after edits")
    add_run_arguments(p)
    p.add_argument("--lm-tasks", type=csv_list, default=list(DEFAULT_SUITE), metavar="T[,T]",
                   help=f"lm-eval tasks (default {','.join(DEFAULT_SUITE)})")
    p.add_argument("--mode", choices=RUN_MODES, default="single",
                   help="single (default): each edit alone, suite after --sample of them; "
                        "sequential: suite once on the model holding all edits")
    p.add_argument("--sample", type=int, default=DEFAULT_SAMPLE,
                   help=f"edits evaluated in single mode (default {DEFAULT_SAMPLE})")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    # late: the harness imports torch; the parser above does not
    from bench.regression import set_offline_defaults
    from bench.runner import execute

    set_offline_defaults()
    opts = options_from_args(args, regression=args.lm_tasks, mode=args.mode,
                             regression_sample=args.sample)
    tasks = "+".join(opts.tasks) if opts.tasks else "all"
    execute(opts, argv=sys.argv[1:], label=f"regress-{opts.editor}-{opts.mode}-{tasks}")
    return 0
