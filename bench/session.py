"""Run set-up, shared by `bench run`, `bench regress` and `bench train`: check the options, find
the data (fetched on first use; one line when there is no data directory), plan the tasks, build
and check the editor against the model's config before any weights load, load the model, hand the
editor its context (training data, instruction wrapper, cache). The run's config.json is
bench.runconfig's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from bench.core.answer_cache import FILE as ANSWERS_FILE, AnswerCache
from bench.core.cases import EditCase, SkippedRecord
from bench.core.distributed import Shard
from bench.core.errors import BenchError
from bench.core.hparams import load_hparams_file, override_hparams
from bench.core.io import cache_dir
from bench.core.generation import StopRules
from bench.core.judge import HTTPJudge, LocalJudge
from bench.core.prompts import check_prompt_format
from bench.core import timings
from bench.core.timings import WorkAfter
from bench.core.wild import WildSettings, default_max_new_tokens
from bench.core.models import LoadedModel, load_config, load_model, resolve_device, resolve_dtype
from bench.core.presets import preset_overrides
from bench.options import RunOptions
from editors import get_editor_class, presets
from editors.base import EditContext, Editor, TrainingData
from tasks.instructions import instruct
from tasks import sources
from tasks.registry import (NOT_NAMED, data_file_hashes, get_card, has_train_split, list_cards, load_split,
                            provide, resolve_data_dir, trainable)

# --------------------------------------------------------------------------------------------
# Data and tasks
# --------------------------------------------------------------------------------------------


def find_data(arg: str | None, log: Callable[[str], None]) -> Path | None:
    """The data directory (--data-dir, $BENCH_DATA, ../shared/data), or None: each task then
    comes from the cache of its published copy, else the built-in sample (`gather_tasks` says
    which in one line)."""
    data_dir, _ = resolve_data_dir(arg)
    return data_dir


def _without_data_dir(found: dict[str, dict], left_out: dict[str, str]) -> str:
    """The one line that says what a run without a data directory uses instead."""
    sample = [n for n, s in found.items() if s["data"] == "built-in sample"]
    real = [n for n, s in found.items() if s["data"] == "real"]
    notes = list(dict.fromkeys(s["note"] for s in found.values() if s.get("note") and s["note"] != NOT_NAMED))
    offline = sources.offline()
    why = (f" and the hub is offline ({offline} is set)" if offline
           else f" and nothing could be fetched ({notes[0]})" if notes else "")
    parts = [f"no data directory (--data-dir, $BENCH_DATA, ../shared/data){why}"]
    if not offline and (left_out or any(s.get("note") == NOT_NAMED for s in found.values())):
        parts.append(NOT_NAMED)
    if sample:
        parts.append(f"using the built-in sample records for {', '.join(sample)} "
                     f"(numbers are not comparable)")
    if real:
        parts.append(f"published data from the cache for {', '.join(real)}")
    if left_out:
        parts.append(f"left out for want of data: {', '.join(left_out)}")
    return "; ".join(parts) + ("; `bench data fetch` gets the published data" if sample or left_out else "")


def gather_tasks(opts: RunOptions, data_dir: Path | None,
                 log: Callable[[str], None]) -> dict[str, dict]:
    """The run's tasks (those named with --task and --holdout, else every task) with where their
    data comes from (tasks.registry.task_source); a named task is fetched on first use when the
    hub is reachable, any other only used when found without the network (data directory, cache,
    built-in sample), so what a run evaluates never depends on whether the network answers. A
    named task whose data cannot be had is an error; any other is left out with one line saying
    why and how to supply it; without a data directory a single line says what the run uses
    instead. A file whose sha256 differs from its card's pin is always an error."""
    explicit = list(dict.fromkeys(list(opts.tasks) + list(opts.holdout)))
    names = explicit if opts.tasks else list(dict.fromkeys(list(list_cards()) + explicit))
    found, left_out = {}, {}
    for name in names:
        try:
            found[name] = provide(name, data_dir, fetch=name in explicit)
        except sources.DigestMismatch:
            raise
        except BenchError as exc:
            if name in explicit:
                raise
            left_out[name] = str(exc)
    if data_dir is None:
        log(_without_data_dir(found, left_out))
    else:
        for reason in left_out.values():
            log(f"left out: {reason}")
    return found


@dataclass
class PlannedTask:
    name: str
    holdout: bool
    metrics: list[str]
    cases: list[EditCase]
    skipped: list[SkippedRecord]
    data_files: dict[str, str]
    split_cases: list[EditCase] = field(default_factory=list)  # the whole eval split (before --limit)
    source: dict = field(default_factory=dict)  # where its data comes from (registry.task_source)

    @property
    def counterfact(self) -> bool:
        """Whether CounterFact's probability comparisons are scored for this task."""
        return "counterfact" in self.metrics


def plan_tasks(opts: RunOptions, data_dir: Path | None,
               log: Callable[[str], None] = lambda line: None) -> list[PlannedTask]:
    """Resolve task names (their data fetched on first use: gather_tasks), load their eval
    splits and apply --limit."""
    found = gather_tasks(opts, data_dir, log)
    names = list(found)
    explicit = set(opts.tasks) | set(opts.holdout)
    planned = []
    for name in names:
        card = get_card(name)
        holdout = name in opts.holdout
        split = load_split(name, "eval", data_dir, holdout=holdout, options=opts.task_options.get(name))
        cases = split.cases if opts.limit is None else split.cases[: opts.limit]
        if not cases:
            if name in explicit:
                raise BenchError(f"task {name!r} has no usable eval cases in its data")
            continue  # chosen by default because its files exist, but they hold no eval case
        planned.append(PlannedTask(name=name, holdout=holdout, metrics=list(card.metrics),
                                   cases=cases, skipped=split.skipped,
                                   data_files=data_file_hashes(name, data_dir, split="eval"),
                                   split_cases=split.cases, source=found[name]))
    if not planned:
        raise BenchError("no task with eval cases found; name one with --task (see bench list tasks)")
    return planned


def training_data(data_dir: Path | None, holdout: list[str],
                  task_options: dict[str, dict] | None = None) -> TrainingData:
    """What a learned editor trains on: every task with a train split whose data is found,
    except the held-out ones; splits are loaded when the editor asks for them. A task whose
    card options are overridden names them beside its file hashes (they change the cases)."""
    task_options = task_options or {}
    tasks = [name for name in list_cards() if name not in holdout and trainable(name, data_dir)]
    hashes = {t: data_file_hashes(t, data_dir, split="train") for t in tasks}
    for t in tasks:
        if task_options.get(t):
            hashes[t] = {**hashes[t], "options": json.dumps(task_options[t], sort_keys=True)}
    return TrainingData(tasks=tasks, holdout=list(holdout), hashes=hashes,
                        load=lambda name: load_split(name, "train", data_dir,
                                                     options=task_options.get(name)).cases)


# --------------------------------------------------------------------------------------------
# Editor and context
# --------------------------------------------------------------------------------------------


def hparams_source(editor: str, hparams_file: str | None) -> dict:
    """The mapping of a --hparams-file: a YAML path, or the name of a preset shipped for the
    editor (editors/presets/<editor>/<name>.yaml)."""
    if hparams_file is None:
        return {}
    if not hparams_file.strip():
        raise BenchError("--hparams-file is empty: give a YAML file or a preset name")
    shipped = presets(editor)
    if not Path(hparams_file).exists() and hparams_file in shipped:
        return load_hparams_file(shipped[hparams_file])
    if not Path(hparams_file).exists():
        known = f" (presets for {editor}: {', '.join(shipped)})" if shipped else ""
        raise BenchError(f"hyperparameter file not found: {hparams_file}{known}")
    return load_hparams_file(hparams_file)


def build_editor(name: str, overrides: dict, model_config, model: str | None = None) -> Editor:
    """The editor with its defaults for this model (shape-based, then the measured ones of the
    model preset `model` names, if any), the overrides applied and every value checked against
    the model (before its weights load)."""
    cls = get_editor_class(name)
    defaults = override_hparams(cls.default_hparams(model_config), preset_overrides(model, name, model_config))
    editor = cls(override_hparams(defaults, overrides))
    editor.check(model_config)
    return editor


def edit_context(opts: RunOptions, editor: Editor, data_dir: Path | None, shard: Shard,
                 log: Callable[[str], None]) -> EditContext:
    """The one EditContext builder: cache, seed, training data (learned editors: without the
    held-out tasks; editors that read train splits, e.g. IKE's demonstrations: every task's),
    instruction wrapper, this process's shard."""
    training = (training_data(data_dir, list(opts.holdout) if editor.learns else [], opts.task_options)
                if editor.learns or editor.reads_train_split else None)
    if training is not None and shard.rank == 0:
        log(training_note(training))
    return EditContext(cache_dir=cache_dir(), seed=opts.seed, retrain=opts.retrain, log=log,
                       shard=shard, training=training,
                       instruct=lambda case, mode: instruct(case, mode, opts.seed))


def training_note(data: TrainingData) -> str:
    """The one line that says which train splits an editor gets: those found without the network
    (data directory, cache, built-in sample), and those it does not get for want of local data
    (a task is fetched only when a run names it, so the mixture never depends on the network)."""
    absent = [n for n in list_cards() if n not in data.tasks and n not in data.holdout and has_train_split(n)]
    line = f"train splits: {', '.join(data.tasks) or 'none'}"
    if data.holdout:
        line += f" (held out: {', '.join(data.holdout)})"
    if absent:
        line += (f"; not found here, so not used: {', '.join(absent)} (never fetched for training: "
                 "--task NAME or bench data fetch NAME fetches one)")
    return line


def prepare_editor(editor: Editor, lm: LoadedModel, ctx: EditContext) -> None:
    """editor.prepare on every process: learned editors under a launcher train together (or
    all load); anything else is prepared (cached) on the first process, then found in the cache
    by the others."""
    shard = ctx.shard
    if editor.learns and shard.world > 1:
        editor.prepare(lm, ctx)
        return
    if shard.rank == 0:
        editor.prepare(lm, ctx)
    shard.barrier()
    if shard.rank != 0:
        editor.prepare(lm, ctx)


@dataclass
class Setup:
    opts: RunOptions
    data_dir: Path | None
    planned: list[PlannedTask]
    editor: Editor
    lm: LoadedModel
    ctx: EditContext
    shard: Shard
    judge: object | None = None  # the wild protocol's judge (bench.core.judge), if any
    wild: dict[str, WildSettings | None] = field(default_factory=dict)  # per task
    answers: AnswerCache | None = None  # the unedited model's answers kept across runs, if used


def make_judge(opts: RunOptions, device: str):
    """The judge the options ask for: a local causal LM (its own unedited copy, even when it is
    the edited model's spec) or an OpenAI-compatible endpoint; None without one."""
    if opts.judge:
        return LocalJudge(load_model(opts.judge, device=device, dtype=opts.dtype), opts.judge)
    if opts.judge_url:
        return HTTPJudge(opts.judge_url, opts.judge_model)
    return None


def wild_settings(setup: Setup, task: PlannedTask) -> WildSettings | None:
    """How a task is evaluated in the wild (None when the run does not): the cap of a generated
    answer (--max-new-tokens, else derived from the longest gold answer of the task's eval
    split, so that it does not depend on --limit), the task card's stop strings, the primary
    scorer, the prompt format, the judge, fluency."""
    opts = setup.opts
    if "wild" not in opts.protocols:
        return None
    cap = opts.max_new_tokens or default_max_new_tokens(setup.lm.tokenizer, task.split_cases or task.cases)
    rules = StopRules(max_new_tokens=cap, stop_strings=get_card(task.name).stop_strings)
    scorer = opts.wild_scorer or ("judge" if setup.judge is not None else "answer_first")
    return WildSettings(rules=rules, scorer=scorer, prompt_format=opts.prompt_format,
                        judge=setup.judge, fluency_tokens=opts.fluency_tokens, answers=setup.answers)


def set_up(opts: RunOptions, log: Callable[[str], None] = print, plan: bool = True,
           shard: Shard | None = None) -> Setup:
    """Everything before the first case: every input is checked before the model loads."""
    opts.check()
    data_dir = find_data(opts.data_dir, log)
    planned = plan_tasks(opts, data_dir, log) if plan else []
    if not plan:  # training: its tasks' data is fetched on first use too
        gather_tasks(opts, data_dir, log)
    shard = shard or Shard.current(opts.device)
    if shard.world > 1 and opts.regression:
        raise BenchError("lm-eval regression runs in one process; drop --regression or the launcher")
    device = shard.device_for(opts.device)
    resolve_dtype(opts.dtype, resolve_device(device))  # bad --device / --dtype: fail before loading
    if opts.judge_url:  # an endpoint that does not answer: one line, before anything loads
        HTTPJudge(opts.judge_url, opts.judge_model).check()
    editor = build_editor(opts.editor, opts.hparams, load_config(opts.model), opts.model)
    lm = load_model(opts.model, device=device, dtype=opts.dtype)
    check_prompt_format(lm.tokenizer, opts.prompt_format)
    ctx = edit_context(opts, editor, data_dir, shard, log)
    if plan and editor.learns:  # training first: its progress line estimates the whole command
        ctx.after = WorkAfter(cases=sum(len(t.cases) for t in planned),
                              s_per_case=timings.recorded(ctx.cache_dir, run_timing_key(opts, lm)))
    prepare_editor(editor, lm, ctx)
    setup = Setup(opts, data_dir, planned, editor, lm, ctx, shard)
    if "wild" in opts.protocols:
        setup.judge = make_judge(opts, device)
        if opts.answer_cache:
            setup.answers = AnswerCache(cache_dir() / ANSWERS_FILE, warn=log)
        setup.wild = {t.name: wild_settings(setup, t) for t in planned}
    return setup


def run_timing_key(opts: RunOptions, lm: LoadedModel) -> str:
    """The key under which runs like this one keep their seconds per case (bench.core.timings)."""
    return timings.timing_key(lm.identity, opts.editor, list(opts.tasks), list(opts.protocols), opts.mode,
                              lm.device.type)


def evaluation_case(setup: Setup, case: EditCase) -> EditCase:
    """The case as the editor sees it: wrapped in its task's instruction for editors that use
    instructions (the run's seen or unseen description), as it is otherwise."""
    if not setup.editor.uses_instructions:
        return case
    return setup.ctx.instruct(case, setup.opts.instruction_mode)
