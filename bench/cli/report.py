"""`bench report`: render leaderboards (HTML, Markdown, JSON, CSV) from run directories."""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.core.errors import BenchError
from reports import build_report


def register(sub) -> None:
    p = sub.add_parser("report", help="render an HTML/Markdown leaderboard from run directories")
    p.add_argument("run_dirs", nargs="*", metavar="RUN_DIR")
    p.add_argument("--matrix", default=None, metavar="MATRIX_JSON",
                   help="the matrix.json of `bench holdout-matrix`: its runs are included and the page "
                        "opens with the leave-one-task-out matrix (docs/holdout.md)")
    p.add_argument("-o", "--output", required=True, help="output directory (e.g. leaderboards/NAME)")
    p.add_argument("--baseline", default="ft",
                   help="the run the others are compared with: a run directory name, a run label or an editor "
                        "name (an editor with several runs in one group is an error listing them); "
                        "'none' turns the comparison off (default ft)")
    p.add_argument("--format", choices=["html", "md", "all"], default="html")
    p.add_argument("--title", default=None)
    p.add_argument("--no-case-text", action="store_true",
                   help="drill-down pages without the data records' texts (for publishing)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    if not args.run_dirs and not args.matrix:
        raise BenchError("give run directories or --matrix MATRIX_JSON")
    out = build_report([Path(p) for p in args.run_dirs], Path(args.output), baseline=args.baseline,
                       fmt=args.format, title=args.title, case_text=not args.no_case_text,
                       matrix=Path(args.matrix) if args.matrix else None)
    print(f"report: {out}")
    return 0
