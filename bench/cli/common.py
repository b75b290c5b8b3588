"""What the subcommands share: one-line argument errors, the run arguments, and turning them
into RunOptions. Building the arguments imports nothing heavy (bench.cli's start-up); the run
set-up (bench.session, torch) is imported when the options are made."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from bench.core.defaults import (DEFAULT_EVAL_EVERY, DEFAULT_LIMIT, DEFAULT_LM_LIMIT, DEFAULT_LOCALITY_PROBES,
                                 DEFAULT_MODEL, PROTOCOLS, SEED_MAX)
from bench.core.prompts import PROMPT_FORMATS
from bench.core.errors import BenchError
from bench.core.hparams import parse_hparam_args

if TYPE_CHECKING:
    from bench.session import RunOptions

# --data-dir, resolved as README "Data" says (tasks.registry.resolve_data_dir)
DATA_DIR_HELP = ("data directory (default: $BENCH_DATA, else ../shared/data of the current "
                 "directory if it exists); a task whose files are not there uses its cached "
                 "published copy, else the built-in sample (bench data list shows which)")


def one_line(text: str) -> str:
    """`text` as one printable line: a character that would break the line or not print (a
    newline, a control or line-separator character, an undecodable byte of the command line)
    written as its escape, e.g. a name given as $'a\\nb' is shown as a\\nb."""
    return "".join(ch if ch.isprintable() or ch == " " else ascii(ch)[1:-1] for ch in str(text))


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + message
        self.exit(2, f"{self.prog}: error: {one_line(message)}\n")


class MarkGiven(argparse.Action):
    """Stores the value and records that the option was given (`<dest>_given`)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        setattr(namespace, f"{self.dest}_given", True)


def csv_list(value: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list of names")
    return items


def seed_list(value: str) -> list[int]:
    """--seeds: comma-separated non-negative integers (argparse names the option on error)."""
    try:
        seeds = [int(v) for v in csv_list(value)]
    except (ValueError, argparse.ArgumentTypeError):
        seeds = [-1]
    if any(s < 0 for s in seeds):
        raise argparse.ArgumentTypeError(f"expected comma-separated non-negative integers, got {value!r}")
    return seeds


def limit(value: str) -> int | None:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError("must be >= 0 (0 means all cases)")
    return None if n == 0 else n


MAX_THREADS = 4096


def threads(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
    if not 1 <= n <= MAX_THREADS:
        raise argparse.ArgumentTypeError(f"must be between 1 and {MAX_THREADS}, got {value}")
    return n


def seed(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
    if not 0 <= n <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"must be between 0 and {SEED_MAX}, got {value}")
    return n


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"a model preset (bench list models; default {DEFAULT_MODEL}), a local "
                        "checkpoint directory, a .gguf file or a hub id")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")


def add_seed_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=seed, default=0,
                   help="random seed: which instruction wraps each case, torch's generator "
                        "(edits, learned editors' training and validation split), the sampled "
                        "regression corpus (default 0; editors' own seeds are hparams)")


def add_editor_arguments(p: argparse.ArgumentParser, default_editor: str = "ft") -> None:
    p.add_argument("--editor", default=default_editor,
                   help=f"editor name (bench list editors); default {default_editor}")
    p.add_argument("--holdout", type=csv_list, default=[], metavar="T[,T]",
                   help="tasks excluded from training and evaluated as held out")
    add_model_arguments(p)
    add_seed_argument(p)
    p.add_argument("--data-dir", default=None, help=DATA_DIR_HELP)
    p.add_argument("--hparam", action="append", default=[], metavar="KEY=VALUE",
                   help="override one editor hyperparameter (repeatable)")
    p.add_argument("--hparams-file", default=None, metavar="FILE|PRESET",
                   help="YAML mapping of hyperparameters, or the name of a preset shipped for the "
                        "editor (editors/presets/<editor>/)")
    p.add_argument("--task-option", action="append", default=[], metavar="TASK.KEY=VALUE",
                   help="override one option of a task card (repeatable), e.g. "
                        "zsre.strip_locality_prefix=true; bench list tasks shows them")


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    add_editor_arguments(p)
    p.add_argument("--task", type=csv_list, default=[], metavar="T[,T]",
                   help="tasks to evaluate (default: every task whose data is found)")
    p.add_argument("--limit", type=limit, default=DEFAULT_LIMIT, action=MarkGiven,
                   help=f"cases per task (default {DEFAULT_LIMIT}; 0 = all)")
    p.add_argument("--instruction", dest="instruction_mode", choices=["seen", "unseen"],
                   default="seen", help="instruction description used at evaluation")
    p.add_argument("--batch-size", type=int, default=32, help="prompts per evaluation batch")
    p.add_argument("--retrain", action="store_true", help="learned editors: ignore cached checkpoints")
    p.add_argument("--protocol", type=csv_list, default=list(PROTOCOLS), metavar="P[,P]",
                   help="evaluation protocols: teacher_forced (the answer fed, token accuracy) and/or "
                        "wild (generated answers, natural stopping); default both")
    p.add_argument("--prompt-format", choices=PROMPT_FORMATS, default="plain",
                   help="evaluation prompts as given (plain) or in the model's chat template (chat)")
    p.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                   help="wild: cap of a generated answer (default per task: its longest gold answer "
                        "+ 8 tokens)")
    p.add_argument("--wild-scorer", default=None, metavar="NAME",
                   help="wild: the scorer behind the wild_* metrics: answer_first (default), "
                        "exact_match, token_f1, or judge (the default when a judge is given)")
    p.add_argument("--judge", default=None, metavar="MODEL",
                   help="wild: a local causal LM (a --model spec) judging whether answers state the target")
    p.add_argument("--judge-url", default=None, metavar="URL",
                   help="wild: an OpenAI-compatible chat-completions API base as judge "
                        "(key from $BENCH_JUDGE_API_KEY, never stored)")
    p.add_argument("--judge-model", default=None, help="wild: the model name the --judge-url serves")
    p.add_argument("--fluency", type=int, default=0, metavar="TOKENS",
                   help="wild: also measure fluency (ROME's n-gram entropy) on this many generated "
                        "tokens from the edit and rephrase prompts (default 0: off)")
    p.add_argument("--no-answer-cache", dest="answer_cache", action="store_false",
                   help="wild: generate the unedited model's answers even where the cache keeps them "
                        "from an earlier run on the same model, cases and settings (docs/wild.md)")
    p.add_argument("--lm-limit", type=limit, default=DEFAULT_LM_LIMIT,
                   help=f"docs per lm-eval task (default {DEFAULT_LM_LIMIT}; 0 = all)")
    p.add_argument("--regression-corpus", default=None, metavar="FILE",
                   help="text for bench_perplexity (.jsonl with \"text\", or plain text paragraphs; "
                        "default: sampled from the unedited model)")
    p.add_argument("--edit-batch", type=int, default=1, metavar="B",
                   help="sequential mode: cases per editor call (editors that edit in batches, "
                        "memit and alphaedit, compute them together; default 1)")
    p.add_argument("--eval-every", type=int, default=DEFAULT_EVAL_EVERY, metavar="K", action=MarkGiven,
                   help=f"sequential mode: evaluate every edit made so far after every K edits and "
                        f"at the end (default {DEFAULT_EVAL_EVERY}, rounded up to a multiple of "
                        f"--edit-batch; 0 = only at the end)")
    p.add_argument("--locality-probes", type=int, default=DEFAULT_LOCALITY_PROBES, metavar="N",
                   help=f"sequential mode: locality prompts per task drawn once and scored at every "
                        f"checkpoint (default {DEFAULT_LOCALITY_PROBES})")
    p.add_argument("--retention-sample", type=int, default=0, metavar="N",
                   help="sequential mode: score a fixed, seeded sample of N earlier edits at each "
                        "checkpoint but the last, which scores every edit (default 0: every edit "
                        "at every checkpoint)")
    p.add_argument("--output-dir", default="runs", help="where run directories go (default runs/)")
    p.add_argument("--name", default=None, help="run directory name prefix")


def given_options(argv: list[str], command: str) -> dict[str, str]:
    """{dest: option} of the options of subcommand `command` that `argv` (a whole `bench`
    command line) gives, however written (abbreviated, --opt=value, equal to the default): the
    parser is built afresh with every default replaced by a marker, so only a given option
    changes its value."""
    from bench.cli import build_parser  # late: bench.cli imports this module

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    marker = object()
    options = [a for a in sub._actions if a.option_strings and a.dest != "help"]
    for action in options:  # an append action extends its default: None stays None until given
        action.default = None if isinstance(action, argparse._AppendAction) else marker
    namespace = parser.parse_args(argv)
    return {a.dest: max(a.option_strings, key=len) for a in options
            if getattr(namespace, a.dest, marker) is not marker and getattr(namespace, a.dest) is not None}


def task_options(items: list[str]) -> dict[str, dict[str, str]]:
    """--task-option TASK.KEY=VALUE items as {task: {key: value}}."""
    out: dict[str, dict[str, str]] = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        task, dot, key = name.strip().partition(".")
        if not sep or not dot or not task or not key.strip():
            raise BenchError(f"--task-option expects task.key=value, got {item!r}")
        out.setdefault(task, {})[key.strip()] = value.strip()
    return out


def editor_hparams(args) -> dict:
    """--hparams-file (a file or a preset), then each --hparam on top."""
    from bench.session import hparams_source  # late: the run set-up imports torch

    hparams = hparams_source(args.editor, args.hparams_file)
    hparams.update(parse_hparam_args(args.hparam))
    return hparams


def options_from_args(args, **changes) -> RunOptions:
    from bench.session import RunOptions  # late: the run set-up imports torch

    opts = RunOptions(editor=args.editor, tasks=args.task, holdout=args.holdout, model=args.model,
                      device=args.device, dtype=args.dtype, limit=args.limit, seed=args.seed,
                      data_dir=args.data_dir, output_dir=args.output_dir, hparams=editor_hparams(args),
                      task_options=task_options(args.task_option), protocols=args.protocol,
                      prompt_format=args.prompt_format, max_new_tokens=args.max_new_tokens,
                      wild_scorer=args.wild_scorer, judge=args.judge, judge_url=args.judge_url,
                      judge_model=args.judge_model, fluency_tokens=args.fluency,
                      answer_cache=getattr(args, "answer_cache", True),
                      instruction_mode=args.instruction_mode, batch_size=args.batch_size,
                      retrain=args.retrain, run_name=args.name, lm_limit=args.lm_limit,
                      regression_corpus=args.regression_corpus, edit_batch=args.edit_batch,
                      eval_every=args.eval_every, locality_probes=args.locality_probes,
                      retention_sample=getattr(args, "retention_sample", 0))
    if not getattr(args, "eval_every_given", False) and args.edit_batch > 1:
        opts.eval_every = -(-DEFAULT_EVAL_EVERY // args.edit_batch) * args.edit_batch
    for key, value in changes.items():
        setattr(opts, key, value)
    opts.check()
    return opts


__all__ = ["Parser", "one_line", "MarkGiven", "csv_list", "limit", "seed", "threads", "add_model_arguments", "add_editor_arguments",
           "add_run_arguments", "add_seed_argument", "options_from_args", "editor_hparams", "task_options", "given_options",
           "DATA_DIR_HELP"]
