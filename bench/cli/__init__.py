"""The `bench` command line: one small module per subcommand, each only calling the harness.
Every user error is one line on stderr and exit code 2.

Start-up stays light: building the parser imports no torch, transformers or data library (a
subcommand module imports at its top only what its arguments need; the harness it calls is
imported inside its `main`), so `bench --help`, `bench list ...`, `bench data list` and
`bench report` answer in about a second (tests/test_cli.py checks the imports)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from bench.cli import ablate, analyze, data, holdout_matrix, listing, model, regress, report, run, train
from bench.cli.common import Parser, one_line, threads
from bench.cli.signals import SigtermAsInterrupt
from bench.core.errors import BenchError, Interrupted
from bench.core.runfiles import CONFIG, locked_runs

SUBCOMMANDS = (run, train, regress, ablate, holdout_matrix, analyze, listing, data, report, model)


def build_parser() -> Parser:
    parser = Parser(prog="bench", description="instructedit-bench: evaluate knowledge editors")
    parser.add_argument("--threads", type=threads, default=None, metavar="N",
                        help="CPU threads for the model's computations (default: one per core; 1 "
                             "is much faster when several jobs share the cores)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for module in SUBCOMMANDS:
        module.register(sub)
    return parser


RESUME_HINT = "continue with: bench run --resume {run}"  # a subcommand sets its own `resume_hint`


def interrupted_message(args, runs: list[Path], saved: str | None = None) -> str:
    """What Ctrl-C leaves behind: first what the interrupted computation itself saved (`saved`:
    bench.core.errors.Interrupted's note, e.g. a learned editor's training state), then the run
    directories this command wrote (`runs`) and how to continue each, or that there is nothing
    to resume. A directory without config.json cannot be resumed."""
    lines = [f"bench: {saved}"] if saved else []
    runs = [r for r in dict.fromkeys(runs) if (r / CONFIG).is_file()]
    if not runs and not saved:
        lines.append("bench: interrupted before a run directory was written: nothing to resume")
    hint = getattr(args, "resume_hint", None) or RESUME_HINT
    lines += [f"bench: interrupted: finished cases are saved in {r}; {hint.format(run=r)}" for r in runs]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    for arg in argv:  # Python hands an undecodable byte over as a lone surrogate (\udcff)
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            print(f"bench: error: argument '{one_line(arg)}' is not UTF-8 text: bench reads its command "
                  "line as UTF-8 (rename the file, or set a UTF-8 locale)", file=sys.stderr)
            return 2
    args = build_parser().parse_args(argv)
    args.command_line = argv  # which options were given (bench.cli.common.given_options)
    already_locked = len(locked_runs())
    stop = SigtermAsInterrupt()  # SIGTERM stops a command as Ctrl-C does (finished work is saved)
    try:
        if args.threads is not None:
            if args.threads < 1:
                raise BenchError("--threads must be at least 1")
            import torch  # late: only when asked for; the parser and the listings need no torch

            torch.set_num_threads(args.threads)
        return args.func(args)
    except BenchError as exc:
        print(f"bench: error: {one_line(exc)}", file=sys.stderr)  # user text may hold a newline
        return 2
    except KeyboardInterrupt as exc:
        saved = exc.note if isinstance(exc, Interrupted) else None
        print(interrupted_message(args, locked_runs()[already_locked:], saved), file=sys.stderr)
        return stop.exit_code  # 130, or 143 after SIGTERM
    finally:
        stop.restore()


def entry() -> None:
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:  # `bench list editors | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        code = 0
    sys.exit(code)
