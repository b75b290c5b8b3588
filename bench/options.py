"""What defines a run: RunOptions (stored in config.json so that `--resume` rebuilds the run)
and their checks that need no data, model or editor; `options_from_config` reads them back."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from bench.core.defaults import (DEFAULT_EVAL_EVERY, DEFAULT_LIMIT, DEFAULT_LM_LIMIT, DEFAULT_LOCALITY_PROBES,
                                 DEFAULT_MODEL, MAX_GENERATED, PROTOCOLS, RUN_MODES, SEED_MAX)
from bench.core.errors import BenchError
from bench.core.io import cache_dir
from bench.core.models import resolve_device
from bench.core.prompts import PROMPT_FORMATS
from bench.core.runfiles import check_stored_options
from bench.core.scorers import get_scorer
from bench.regression import RegressionOptions, check_regression
from editors import get_editor_class
from tasks.card import merge_options
from tasks.instructions import MODES as INSTRUCTION_MODES
from tasks.registry import get_card


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
    answer_cache: bool = True  # wild: the unedited model's answers kept across runs (bench.core.answer_cache)

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
                                              ("--fluency", self.fluency_tokens != 0),
                                              ("--no-answer-cache", not self.answer_cache)) if given]
        if wild_only and "wild" not in self.protocols:
            raise BenchError(f"{', '.join(wild_only)} only {_apply(wild_only)} to generated answers, which only "
                             "--protocol wild makes; add wild to --protocol or drop them")
        regression_only = [flag for flag, given in (("--regression-corpus", self.regression_corpus is not None),
                                                    ("--lm-limit", self.lm_limit != DEFAULT_LM_LIMIT)) if given]
        if regression_only and not self.regression:
            raise BenchError(f"{', '.join(regression_only)} only {_apply(regression_only)} to the lm-eval regression "
                             "(--regression TASKS, bench regress); add it or drop them")

    def regression_options(self) -> RegressionOptions:
        return RegressionOptions(lm_tasks=list(self.regression), mode=self.mode,
                                 lm_limit=self.lm_limit, sample=self.regression_sample,
                                 corpus=self.regression_corpus, batch_size=self.batch_size,
                                 seed=self.seed)


def _apply(flags: list[str]) -> str:
    """The verb for one flag or several."""
    return "applies" if len(flags) == 1 else "apply"


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
