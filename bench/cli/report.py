"""`bench report`: render leaderboards (HTML, Markdown, JSON, CSV) from run directories."""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.core.errors import BenchError
from bench.core.io import check_writable_dir
from bench.core.runfiles import RunDir, completeness


def register(sub) -> None:
    p = sub.add_parser("report", help="render an HTML/Markdown leaderboard from run directories")
    p.add_argument("run_dirs", nargs="*", metavar="RUN_DIR")
    p.add_argument("--matrix", default=None, metavar="MATRIX_JSON",
                   help="the matrix.json of `bench holdout-matrix`: its runs are included and the page "
                        "opens with the leave-one-task-out matrix (docs/holdout.md)")
    p.add_argument("-o", "--output", default=None, help="output directory (e.g. leaderboards/NAME); needed with "
                                                         "run directories or --matrix")
    p.add_argument("--index", default=None, metavar="DIR",
                   help="write DIR/index.html: every leaderboard below DIR (a folder with a leaderboard.json) "
                        "linked, all their runs in one table with filters, the across-models views "
                        "(after the report, when run directories are given too)")
    p.add_argument("--baseline", default=None, metavar="LABEL",
                   help="the run the others are compared with: a run label, a run directory name or an "
                        "editor name (an editor with several runs in one group is an error listing them); "
                        "'none' turns the comparison off (default: an FT run; with several, the complete one "
                        "with default hyperparameters, else the first given, and a line says which)")
    p.add_argument("--format", choices=["html", "md", "all"], default="html")
    p.add_argument("--title", default=None)
    p.add_argument("--no-case-text", action="store_true",
                   help="drill-down pages without the data records' texts (for publishing)")
    p.set_defaults(func=main)


def rebuild_summary(path: Path, config: dict, cases: list[dict]) -> dict:
    """The summary.json a run stopped before writing one (SIGKILL) would have written, made from
    its config.json and finished cases as the runner makes it (bench.runner.summarize_run, and
    for a sequential run its last checkpoint), stamped `complete` (bench.core.runfiles) and
    `rebuilt`. Nothing is written to the run directory."""
    from bench.runner import summarize_run  # late: the harness imports torch; only a stopped run needs it

    try:
        summary = summarize_run(config, cases)
        if summary["config"]["mode"] == "sequential":
            from bench.sequential import sequential_summary  # late: as bench.runner

            checkpoints = RunDir(path).read_checkpoints()
            planned = sum(int(t["n_cases"]) for t in config["tasks"])
            if not checkpoints or checkpoints[-1]["n_edits"] != planned:  # as the runner does
                summary["tasks"] = checkpoints[-1]["summary"] if checkpoints else {}
            summary["sequential"] = sequential_summary(config, checkpoints, planned)
    except (KeyError, TypeError, ValueError) as exc:
        raise BenchError(f"{path}: no summary.json, and config.json lacks what rebuilding it needs "
                         f"({type(exc).__name__}: {exc}); continue the run with `bench run --resume {path}`") from None
    summary.update(completeness(summary))
    summary["rebuilt"] = "by bench report from cases.jsonl: the run was stopped before it wrote summary.json"
    state = "complete" if summary["complete"] else \
        f"incomplete ({summary['finished_cases']} of {summary['planned_cases']} cases)"
    print(f"report: {path.name}: no summary.json (the run was stopped): rebuilt from cases.jsonl, {state}")
    return summary


def main(args: argparse.Namespace) -> int:
    if not args.run_dirs and not args.matrix and not args.index:
        raise BenchError("give run directories or --matrix MATRIX_JSON")  # or --index DIR (see --help)
    if (args.run_dirs or args.matrix) and not args.output:
        raise BenchError("give the output directory: -o DIR")
    if args.index:
        check_writable_dir(args.index, "leaderboards folder (--index)")
    if not args.output:
        from reports.index import build_index  # late: jinja2, not needed for --help

        print(f"report: {build_index(Path(args.index))}")
        return 0
    check_writable_dir(args.output, "report output directory (-o)")  # a file, /proc: before reading runs
    from reports import build_report  # late: pandas and jinja2, not needed for --help

    out = build_report([Path(p) for p in args.run_dirs], Path(args.output), baseline=args.baseline,
                       fmt=args.format, title=args.title, case_text=not args.no_case_text,
                       matrix=Path(args.matrix) if args.matrix else None,
                       rebuild_summary=rebuild_summary, log=lambda line: print(f"report: {line}"))
    print(f"report: {out}")
    if args.index:
        from reports.index import build_index  # late: as above

        print(f"report: {build_index(Path(args.index))}")
    return 0
