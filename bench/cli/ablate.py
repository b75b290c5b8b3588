"""`bench ablate`: the protocol's switches one at a time, for one editor on one task (the paper's
controlled analysis; bench/ablation.py)."""

from __future__ import annotations

import argparse
import sys

from bench.cli.common import add_run_arguments, csv_list, options_from_args
from bench.core.errors import BenchError
from bench.core.io import read_json
from bench.core.prompts import PROMPT_FORMATS


def register(sub) -> None:
    p = sub.add_parser("ablate", help="which evaluation assumption inflates which number (one editor, one task)")
    add_run_arguments(p)
    p.add_argument("--formats", type=csv_list, default=list(PROMPT_FORMATS), metavar="F[,F]",
                   help="prompt formats to compare (default plain,chat)")
    p.set_defaults(func=main, resume_hint="bench ablate does not resume it: run the command again")


def main(args: argparse.Namespace) -> int:
    opts = options_from_args(args, protocols=["teacher_forced", "wild"])
    if len(opts.tasks) != 1:
        raise BenchError("bench ablate needs exactly one task (--task NAME)")
    bad = [f for f in args.formats if f not in PROMPT_FORMATS]
    if bad:
        raise BenchError(f"--formats: unknown prompt format {bad[0]!r}; use plain and/or chat")
    formats = tuple(args.formats)
    # late: the harness imports torch; the parser above does not
    from bench.ablation import AblationHook, format_matrix
    from bench.runner import execute

    def hooks(setup, run):
        return [AblationHook(setup.lm, setup.wild[setup.planned[0].name], formats, run)]

    path = execute(opts, argv=sys.argv[1:], label=f"ablate-{opts.editor}-{opts.tasks[0]}", hooks=hooks)
    block = read_json(path / "summary.json").get("ablation") or {}
    print(f"post-edit scores in percent ({opts.editor} on {opts.tasks[0]}), each switch away from "
          "teacher forcing:")
    print(format_matrix(block) if block else "no case was edited")
    return 0
