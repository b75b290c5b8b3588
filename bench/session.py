"""Run set-up, shared by `bench run`, `bench regress` and `bench train`: check the options, find
the data (fetched on first use; one line when there is no data directory), plan the tasks, build
and check the editor against the model's config before any weights load, load the model, hand the
editor its context (training data, instruction wrapper, cache). The run's config.json is
bench.runconfig's.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from bench.core.cases import EditCase, SkippedRecord
from bench.core.defaults import (DEFAULT_EVAL_EVERY, DEFAULT_LIMIT, DEFAULT_LM_LIMIT, DEFAULT_LOCALITY_PROBES,
                                 DEFAULT_MODEL, MAX_GENERATED, PROTOCOLS, RUN_MODES, SEED_MAX)
from bench.core.distributed import Shard
from bench.core.errors import BenchError
from bench.core.hparams import load_hparams_file, override_hparams
from bench.core.io import cache_dir
from bench.core.runfiles import check_stored_options
from bench.core.generation import StopRules
from bench.core.judge import HTTPJudge, LocalJudge
from bench.core.prompts import PROMPT_FORMATS, check_prompt_format
from bench.core import timings
from bench.core.timings import WorkAfter
from bench.core.scorers import get_scorer
from bench.core.wild import WildSettings, default_max_new_tokens
from bench.core.models import LoadedModel, load_config, load_model, resolve_device, resolve_dtype
from bench.core.presets import preset_overrides
from bench.regression import RegressionOptions, check_regression
from editors import get_editor_class, presets
from editors.base import EditContext, Editor, TrainingData
from tasks.instructions import MODES as INSTRUCTION_MODES
from tasks.card import merge_options
from tasks.instructions import instruct
from tasks import sources
from tasks.registry import (NOT_NAMED, data_file_hashes, get_card, has_train_split, list_cards, load_split,
                            provide, resolve_data_dir, trainable)

@dataclass
class RunOptions:
    """Everything that defines a run; stored in config.json so `--resume` can rebuild it."""

    editor: str = "ft"
    tasks: list[str] = field(default_factory=list)  # empty: every task whose data is found
    holdout: list[str] = field(default_factory=list)
    model: str = DEFAULT_MODEL
    device: str = "auto"
    dtype: str = "auto"
    limit: int | None = DEFAULT_LIMIT  # cases per task; None = all
    seed: int = 0
    data_dir: str | None = None
    output_dir: str = "runs"
    hparams: dict = field(default_factory=dict)  # overrides from --hparam / --hparams-file
    # per task, overrides of its card's source.options (--task-option task.key=value)
    task_options: dict = field(default_factory=dict)
    instruction_mode: str = "seen"  # "seen" or "unseen" description at evaluation
    batch_size: int = 32
    retrain: bool = False
    run_name: str | None = None
    # single: each case edited alone and restored; sequential: every edit applied in order and
    # kept, each case scored on the model holding all of them, restored at the end
    mode: str = "single"
    # sequential mode: cases per editor call, edits between checkpoint evaluations (0: only at
    # the end), fixed locality probes per task scored at every checkpoint
    edit_batch: int = 1
    eval_every: int = DEFAULT_EVAL_EVERY
    locality_probes: int = DEFAULT_LOCALITY_PROBES
    # sequential mode: earlier edits scored at each checkpoint but the last (a fixed, seeded
    # sample; 0 = every one)
    retention_sample: int = 0
    # lm-eval regression (bench/regression): empty list = none
    regression: list[str] = field(default_factory=list)
    lm_limit: int | None = DEFAULT_LM_LIMIT  # docs per lm-eval task; None = all
    regression_corpus: str | None = None
    regression_sample: int = 3  # single mode: edits the suite is evaluated after
    # evaluation protocols: teacher_forced (the answer fed, token accuracy) and wild (generated
    # answers, natural stopping, bench.core.wild)
    protocols: list[str] = field(default_factory=lambda: list(PROTOCOLS))
    prompt_format: str = "plain"  # plain or chat (the model's chat template) at evaluation
    max_new_tokens: int | None = None  # wild: cap of a generated answer; None: per task, derived
    wild_scorer: str | None = None  # wild: primary scorer; None: the judge if any, else answer_first
    judge: str | None = None  # wild: a local causal LM (a --model spec) as judge
    judge_url: str | None = None  # wild: an OpenAI-compatible endpoint as judge ...
    judge_model: str | None = None  # ... and the model name it serves
    fluency_tokens: int = 0  # wild: > 0 also measures fluency on this many generated tokens

    def check(self) -> None:
        """Option errors that need no data, model or editor."""
        if not 0 <= self.seed <= SEED_MAX:
            raise BenchError(f"--seed must be between 0 and {SEED_MAX}, got {self.seed}")
        resolve_device(self.device)  # unknown or unavailable (meta, mps, cuda:7): before any data
        cache_dir()  # $BENCH_CACHE a file or not writable: one line before anything loads
        if not self.model.strip():
            raise BenchError("--model is empty: give a preset (bench list models), a checkpoint "
                             "directory, a .gguf file or a hub id")
        if self.instruction_mode not in INSTRUCTION_MODES:
            raise BenchError(f"--instruction must be seen or unseen, got {self.instruction_mode!r}")
        if self.limit is not None and self.limit < 1:
            raise BenchError(f"--limit must be positive, got {self.limit}")
        if self.batch_size < 1:
            raise BenchError("--batch-size must be at least 1")
        if self.mode not in RUN_MODES:
            raise BenchError(f"mode must be single or sequential, got {self.mode!r}")
        if self.mode == "single" and (self.edit_batch != 1 or self.eval_every != DEFAULT_EVAL_EVERY):
            raise BenchError("--edit-batch and --eval-every belong to --mode sequential")
        if self.edit_batch < 1:
            raise BenchError(f"--edit-batch must be at least 1, got {self.edit_batch}")
        if self.eval_every < 0:
            raise BenchError(f"--eval-every must be >= 0 (0: only at the end), got {self.eval_every}")
        if self.eval_every and self.eval_every % self.edit_batch:
            raise BenchError(f"--eval-every ({self.eval_every}) must be a multiple of --edit-batch "
                             f"({self.edit_batch}): checkpoints fall between editor calls")
        if self.locality_probes < 0:
            raise BenchError(f"--locality-probes must be >= 0, got {self.locality_probes}")
        if self.retention_sample < 0:
            raise BenchError(f"--retention-sample must be >= 0 (0: every edit), got {self.retention_sample}")
        if self.retention_sample and self.mode != "sequential":
            raise BenchError("--retention-sample belongs to --mode sequential")
        get_editor_class(self.editor)  # unknown editor
        for name in list(self.tasks) + list(self.holdout):
            get_card(name)  # unknown task or held-out task
        for name, options in self.task_options.items():
            merge_options(get_card(name), options)  # unknown task or option, a bad value
        if self.regression:
            check_regression(self.regression_options())
        unknown = [p for p in self.protocols if p not in PROTOCOLS]
        if unknown or not self.protocols:
            raise BenchError(f"--protocol must name teacher_forced and/or wild, got {','.join(self.protocols)!r}")
        if self.prompt_format not in PROMPT_FORMATS:
            raise BenchError(f"--prompt-format must be plain or chat, got {self.prompt_format!r}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise BenchError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.fluency_tokens < 0:
            raise BenchError(f"--fluency must be >= 0, got {self.fluency_tokens}")
        for flag, n in (("--max-new-tokens", self.max_new_tokens), ("--fluency", self.fluency_tokens)):
            if n is not None and n > MAX_GENERATED:  # a huge count generates (nearly) without end
                raise BenchError(f"{flag} must be at most {MAX_GENERATED} tokens, got {n}")
        if self.judge and self.judge_url:
            raise BenchError("give --judge (a local model) or --judge-url (an endpoint), not both")
        if self.judge_url and not self.judge_model:
            raise BenchError("--judge-url needs --judge-model (the model name the endpoint serves)")
        if self.wild_scorer is not None and self.wild_scorer != "judge":
            get_scorer(self.wild_scorer)
        if self.wild_scorer == "judge" and not (self.judge or self.judge_url):
            raise BenchError("--wild-scorer judge needs --judge MODEL or --judge-url URL")
        # a judge option the run would not use is an error, not a warning (docs/wild.md)
        if (self.judge or self.judge_url) and "wild" not in self.protocols:
            raise BenchError(f"{'--judge' if self.judge else '--judge-url'} judges generated answers, "
                             "which only --protocol wild makes; add wild to --protocol or drop it")
        if self.judge_model and not self.judge_url:
            raise BenchError("--judge-model names the model a --judge-url endpoint serves; "
                             "give --judge-url or drop --judge-model")
        # any other option that a part of the run it does not make would read: an error, not ignored
        wild_only = [flag for flag, given in (("--max-new-tokens", self.max_new_tokens is not None),
                                              ("--wild-scorer", self.wild_scorer is not None),
                                              ("--fluency", self.fluency_tokens != 0)) if given]
        if wild_only and "wild" not in self.protocols:
            raise BenchError(f"{', '.join(wild_only)} only apply to generated answers, which only "
                             "--protocol wild makes; add wild to --protocol or drop them")
        regression_only = [flag for flag, given in (("--regression-corpus", self.regression_corpus is not None),
                                                    ("--lm-limit", self.lm_limit != DEFAULT_LM_LIMIT)) if given]
        if regression_only and not self.regression:
            raise BenchError(f"{', '.join(regression_only)} only apply to the lm-eval regression "
                             "(--regression TASKS, bench regress); add it or drop them")

    def regression_options(self) -> RegressionOptions:
        return RegressionOptions(lm_tasks=list(self.regression), mode=self.mode,
                                 lm_limit=self.lm_limit, sample=self.regression_sample,
                                 corpus=self.regression_corpus, batch_size=self.batch_size,
                                 seed=self.seed)


def options_from_config(config: dict) -> RunOptions:
    """The RunOptions stored in a run's config.json; a run written by an incompatible version is
    one clear error, not a traceback. A run from before the wild protocol was teacher forced."""
    stored = config.get("options")
    if isinstance(stored, dict):
        stored = {"protocols": ["teacher_forced"], **stored}
    known = {f.name for f in dataclasses.fields(RunOptions)}
    if not isinstance(stored, dict) or set(stored) - known:
        unknown = sorted(set(stored) - known) if isinstance(stored, dict) else ["options"]
        raise BenchError(f"this run directory was written by another version of the harness "
                         f"(unknown options: {', '.join(unknown)}); start a new run")
    check_stored_options(stored, RunOptions, "config.json")  # a hand-edited file: checked as input
    return RunOptions(**stored)


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
                        judge=setup.judge, fluency_tokens=opts.fluency_tokens)


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
