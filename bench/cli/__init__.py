"""The `bench` command line: one small module per subcommand, each only calling the harness.
Every user error is one line on stderr and exit code 2."""

from __future__ import annotations

import sys

import torch

from bench.cli import ablate, data, holdout_matrix, listing, model, regress, report, run, train
from bench.cli.common import Parser
from bench.core.errors import BenchError

SUBCOMMANDS = (run, train, regress, ablate, holdout_matrix, listing, data, report, model)


def build_parser() -> Parser:
    parser = Parser(prog="bench", description="instructedit-bench: evaluate knowledge editors")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="CPU threads for torch (default: torch's choice; 1 is much faster "
                             "when several jobs share the cores)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for module in SUBCOMMANDS:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.threads is not None:
            if args.threads < 1:
                raise BenchError("--threads must be at least 1")
            torch.set_num_threads(args.threads)
        return args.func(args)
    except BenchError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench: interrupted (finished cases are saved; continue with --resume)", file=sys.stderr)
        return 130


def entry() -> None:
    sys.exit(main())
