"""The `bench` command line. Every user error is one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.errors import BenchError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + message
        self.exit(2, f"{self.prog}: error: {message}\n")


class _MarkGiven(argparse.Action):
    """Stores the value and records that the option was given (`<dest>_given`)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        setattr(namespace, f"{self.dest}_given", True)


def _csv(value: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list of names")
    return items


def _limit(value: str) -> int | None:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError("must be >= 0 (0 means all cases)")
    return None if n == 0 else n


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    from bench.defaults import DEFAULT_LIMIT, DEFAULT_LM_LIMIT, DEFAULT_MODEL

    p.add_argument("--editor", default="ft", help="editor name (bench list editors); default ft")
    p.add_argument("--task", type=_csv, default=[], metavar="T[,T]",
                   help="tasks to evaluate (default: every task whose data is found)")
    p.add_argument("--holdout", type=_csv, default=[], metavar="T[,T]",
                   help="tasks excluded from training and evaluated as held out")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"{DEFAULT_MODEL}, a local checkpoint directory, a .gguf file or a hub id")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    p.add_argument("--limit", type=_limit, default=DEFAULT_LIMIT, action=_MarkGiven,
                   help=f"cases per task (default {DEFAULT_LIMIT}; 0 = all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None, help="data directory (default $BENCH_DATA)")
    p.add_argument("--hparam", action="append", default=[], metavar="KEY=VALUE",
                   help="override one editor hyperparameter (repeatable)")
    p.add_argument("--hparams-file", default=None, help="YAML mapping of hyperparameters")
    p.add_argument("--instruction", dest="instruction_mode", choices=["seen", "unseen"],
                   default="seen", help="instruction description used at evaluation")
    p.add_argument("--batch-size", type=int, default=32, help="prompts per evaluation batch")
    p.add_argument("--retrain", action="store_true", help="learned editors: ignore cached checkpoints")
    p.add_argument("--regression", type=_csv, default=[], metavar="TASKS",
                   help="after the cases, lm-eval regression on these tasks (e.g. "
                        "fact_retention,bench_perplexity,hellaswag; docs/regression.md)")
    p.add_argument("--regression-mode", choices=["single", "sequential"], default="single",
                   help="single: each edit alone (suite on a sample); sequential: all edits at once")
    p.add_argument("--lm-limit", type=_limit, default=DEFAULT_LM_LIMIT,
                   help=f"docs per lm-eval task (default {DEFAULT_LM_LIMIT}; 0 = all)")
    p.add_argument("--regression-corpus", default=None, metavar="FILE",
                   help="text for bench_perplexity (.jsonl with \"text\" or blank-line separated; "
                        "default: sampled from the unedited model)")


def _options_from_args(args):
    from bench.runner import RunOptions
    from editors.base import load_hparams_file, parse_hparam_args

    hparams = load_hparams_file(args.hparams_file)
    hparams.update(parse_hparam_args(args.hparam))
    if args.batch_size < 1:
        raise BenchError("--batch-size must be at least 1")
    return RunOptions(editor=args.editor, tasks=args.task, holdout=args.holdout, model=args.model,
                      device=args.device, dtype=args.dtype, limit=args.limit, seed=args.seed,
                      data_dir=args.data_dir, output_dir=args.output_dir, hparams=hparams,
                      instruction_mode=args.instruction_mode, batch_size=args.batch_size,
                      retrain=args.retrain, run_name=args.name, regression=args.regression,
                      regression_mode=args.regression_mode, lm_limit=args.lm_limit,
                      regression_corpus=args.regression_corpus)


def cmd_run(args) -> int:
    from bench.runner import execute, resume
    from editors import get_editor_class

    if args.resume:
        # An explicit --limit with --resume extends the run to that many cases per task.
        resume(Path(args.resume), limit=args.limit if getattr(args, "limit_given", False) else "keep")
        return 0
    opts = _options_from_args(args)
    get_editor_class(opts.editor)  # unknown editor: fail before loading anything
    execute(opts, argv=sys.argv[1:])
    return 0


def cmd_train(args) -> int:
    """Train a learned editor (MEND, InstructEdit) and store its checkpoint in the cache."""
    from bench.models import cache_dir, load_model
    from bench.runner import build_editor
    from editors import get_editor_class
    from editors.base import EditContext, load_hparams_file, parse_hparam_args
    from tasks.registry import get_card, list_cards, resolve_data_dir

    cls = get_editor_class(args.editor)
    if not cls.learns:
        raise BenchError(f"editor {args.editor!r} does not learn; nothing to train")
    hparams = load_hparams_file(args.hparams_file)
    hparams.update(parse_hparam_args(args.hparam))
    if args.max_steps is not None:
        hparams["max_steps"] = args.max_steps
    if args.time_budget is not None:
        hparams["time_budget_s"] = args.time_budget
    for name in args.holdout:
        get_card(name)
    data_dir, builtin = resolve_data_dir(args.data_dir)
    if builtin:
        print("NOTE: no data directory found; training on the small built-in sample records.",
              file=sys.stderr)
    from bench.runner import RunOptions

    opts = RunOptions(editor=args.editor, holdout=args.holdout, model=args.model, device=args.device,
                      dtype=args.dtype, seed=args.seed, hparams=hparams)
    from bench.distributed import Shard

    # Under torchrun / `accelerate launch`, every process trains on its slice of each batch.
    shard = Shard.current(args.device)
    lm = load_model(args.model, device=shard.device_for(args.device), dtype=args.dtype)
    editor = build_editor(opts, lm.model.config)
    ctx = EditContext(cache_dir=cache_dir(), seed=args.seed, data_dir=data_dir,
                      train_tasks=[n for n in list_cards() if n not in args.holdout],
                      holdout_tasks=list(args.holdout), retrain=True, shard=shard)
    editor.prepare(lm, ctx)
    if shard.rank != 0:
        return 0
    notes = ctx.notes
    print(f"checkpoint: {notes.get('checkpoint')}")
    print(f"trained on: {', '.join(notes.get('train_tasks') or [])}  steps: {notes.get('train_steps')}  "
          f"time: {notes.get('train_time_s')} s")
    val = notes.get("final_validation") or {}
    if val:
        print("validation: " + "  ".join(f"{k} {v:.4f}" for k, v in sorted(val.items())
                                         if isinstance(v, float)))
    return 0


def cmd_regress(args) -> int:
    """lm-eval scores before and after editing (bench/regression.py, docs/regression.md)."""
    from bench.regression import DEFAULT_SUITE, RegressionOptions, execute_regress, set_offline_defaults
    from editors import get_editor_class

    set_offline_defaults()
    opts = _options_from_args(args)
    get_editor_class(opts.editor)  # unknown editor: fail before loading anything
    reg = RegressionOptions(lm_tasks=args.lm_tasks or opts.regression or list(DEFAULT_SUITE),
                            mode=args.mode or opts.regression_mode, lm_limit=opts.lm_limit,
                            sample=args.sample, corpus=opts.regression_corpus,
                            batch_size=opts.batch_size, seed=opts.seed)
    execute_regress(opts, reg, argv=sys.argv[1:])
    return 0


def cmd_list(args) -> int:
    if args.what == "editors":
        from editors import available_editors, get_editor_class

        for name, origin in sorted(available_editors().items()):
            try:
                cls = get_editor_class(name)
                text = (cls.__doc__ or sys.modules[cls.__module__].__doc__ or "").strip()
                paragraph = " ".join(text.split("\n\n")[0].split())
                doc = [paragraph.split(". ")[0].rstrip(".")[:90]] if paragraph else []
                flags = ", ".join(f for f, on in (("learns", cls.learns),
                                                  ("instructions", cls.uses_instructions)) if on)
                print(f"{name:14s} {origin:10s} {flags:22s} {doc[0] if doc else ''}")
            except BenchError as exc:
                print(f"{name:14s} {origin:10s} (cannot load: {exc})")
        return 0
    from tasks.registry import list_cards, resolve_data_dir, task_status

    data_dir, builtin = resolve_data_dir(args.data_dir)
    print(f"data directory: {data_dir if data_dir else 'none found; built-in sample'}")
    header = f"{'task':12s} {'data':8s} {'train':>7s} {'eval':>7s} {'skipped':>8s} {'seen':>5s} {'unseen':>6s}  source"
    print(header)
    for name in list_cards():
        st = task_status(name, data_dir)
        counts = st.get("counts", {})
        fmt = lambda v: "-" if v is None else str(v)  # noqa: E731
        skipped = sum(v or 0 for v in (st.get("skipped") or {}).values())
        instr = st.get("instructions", {})
        source = st.get("source", "")
        if isinstance(source, dict):
            source = ", ".join(str(v) for v in source.values())
        elif isinstance(source, (list, tuple)):
            source = ", ".join(str(v) for v in source)
        print(f"{name:12s} {'found' if st['found'] else 'MISSING':8s} {fmt(counts.get('train')):>7s} "
              f"{fmt(counts.get('eval')):>7s} {skipped:>8d} {instr.get('seen', 0):>5d} "
              f"{instr.get('unseen', 0):>6d}  {source}")
        for key in ("missing", "error"):
            if st.get(key):
                print(f"{'':12s} {key}: {st[key]}")
    return 0


def cmd_models(args) -> int:
    from bench.models import check_sanity, embeddings_tied, load_model

    lm = load_model(args.model, device=args.device, dtype=args.dtype)
    prompt = "The Eiffel Tower is located in the city of"
    print(f"model: {lm.spec}  weights sha256: {lm.source_hash[:16]}  device: {lm.device}  dtype: {lm.dtype}")
    print(f"layers: {lm.layout.num_layers}  hidden: {lm.layout.hidden_size}  "
          f"MLP out: {lm.layout.layers[0].mlp_out_name}  tied embeddings: {embeddings_tied(lm.model)}")
    print(f"{prompt!r} -> {check_sanity(lm, prompt)!r}")
    return 0


def cmd_report(args) -> int:
    from reports.report import build_report

    out = build_report([Path(p) for p in args.run_dirs], Path(args.output), baseline=args.baseline,
                       fmt=args.format, title=args.title, case_text=not args.no_case_text)
    print(f"report: {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="bench", description="instructedit-bench: evaluate knowledge editors")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="CPU threads for torch (default: torch's choice; 1 is much faster "
                             "when several jobs share the cores)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="apply edits and measure them")
    add_run_arguments(run)
    run.add_argument("--output-dir", default="runs", help="where run directories go (default runs/)")
    run.add_argument("--name", default=None, help="run directory name prefix")
    run.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue a killed run")
    run.set_defaults(func=cmd_run)

    train = sub.add_parser("train", help="train a learned editor (mend, instructedit) and cache it")
    train.add_argument("--editor", default="mend", help="learned editor to train (default mend)")
    train.add_argument("--holdout", type=_csv, default=[], metavar="T[,T]",
                       help="tasks kept out of training")
    train.add_argument("--model", default="smollm2-135m")
    train.add_argument("--device", default="auto")
    train.add_argument("--dtype", default="auto")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--data-dir", default=None, help="data directory (default $BENCH_DATA)")
    train.add_argument("--hparam", action="append", default=[], metavar="KEY=VALUE",
                       help="override one editor hyperparameter (repeatable)")
    train.add_argument("--hparams-file", default=None, help="YAML mapping of hyperparameters")
    train.add_argument("--max-steps", type=int, default=None, help="training steps (hparam max_steps)")
    train.add_argument("--time-budget", type=float, default=None, metavar="S",
                       help="stop training after S seconds (hparam time_budget_s)")
    train.set_defaults(func=cmd_train)

    regress = sub.add_parser("regress", help="general-capability regression (lm-eval) before/after edits")
    add_run_arguments(regress)
    regress.add_argument("--lm-tasks", type=_csv, default=None, metavar="T[,T]",
                         help="lm-eval tasks (default fact_retention,bench_perplexity)")
    regress.add_argument("--mode", choices=["single", "sequential"], default=None,
                         help="single (default): each edit alone, suite on --sample of them; "
                              "sequential: suite once on the model holding all edits")
    regress.add_argument("--sample", type=int, default=3, help="edits evaluated in single mode (default 3)")
    regress.add_argument("--output-dir", default="runs", help="where run directories go (default runs/)")
    regress.add_argument("--name", default=None, help="run directory name prefix")
    regress.set_defaults(func=cmd_regress)

    lst = sub.add_parser("list", help="list tasks or editors")
    lst.add_argument("what", choices=["tasks", "editors"])
    lst.add_argument("--data-dir", default=None)
    lst.set_defaults(func=cmd_list)

    rep = sub.add_parser("report", help="render an HTML/Markdown leaderboard from run directories")
    rep.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    rep.add_argument("-o", "--output", required=True, help="output directory (e.g. leaderboards/NAME)")
    rep.add_argument("--baseline", default="ft", help="editor the others are compared with (default ft)")
    rep.add_argument("--format", choices=["html", "md", "all"], default="html")
    rep.add_argument("--title", default=None)
    rep.add_argument("--no-case-text", action="store_true",
                     help="drill-down pages without the data records' texts (for publishing)")
    rep.set_defaults(func=cmd_report)

    models = sub.add_parser("model", help="load a model and check it (tied embeddings, a greedy sample)")
    models.add_argument("--model", default="smollm2-135m")
    models.add_argument("--device", default="auto")
    models.add_argument("--dtype", default="auto")
    models.set_defaults(func=cmd_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.threads is not None:
            if args.threads < 1:
                raise BenchError("--threads must be at least 1")
            import torch

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


if __name__ == "__main__":
    entry()
