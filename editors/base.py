"""The editor contract.

An editor is one class:

    class MyEditor(Editor):
        name = "my-editor"
        Hparams = MyHparams             # a dataclass; every field overridable with --hparam k=v

        def apply(self, model, tokenizer, case) -> EditHandle: ...

`apply` changes the model in place and returns a handle whose `restore()` puts back every weight
it changed, bit for bit; the handle names those weights and carries the edit's own facts
(`info`: timings, optimisation steps, ...) that the runner writes into the case record.

Optional, in the order a run calls them:

* `default_hparams(config)`: defaults per model shape (the transformers config);
* `check(config)`: validate the hyperparameters for this model before its weights are loaded
  (the default checks types, finiteness, declared bounds and layer ranges: bench.core.hparams);
* `prepare(lm, ctx)`: once per run, before the first edit (caches; a learned editor loads its
  checkpoint or trains);
* `train(lm, ctx) -> dict`: learned editors (`learns = True`) train on `ctx.training` and return
  the checkpoint's metadata; `prepare` calls it when no checkpoint is cached;
* `apply_many(model, tokenizer, cases)` with `edits_per_call`: compute several independent edits
  together (one handle per case, each applied alone);
* `apply_batch(model, tokenizer, cases) -> EditHandle` (sequential mode, `--edit-batch B`): edits
  that stay, all of `cases` in one handle; editors that edit in batches (MEMIT) override it and
  set `batch_edits = True`, the default applies the cases one after another;
* `sequential_state()` / `load_sequential_state(state)`: what an editor carries from one
  sequential edit to the next besides the model (AlphaEdit: the keys of earlier edits), saved at
  every checkpoint so that a resumed run continues exactly.

Editors never load data or wrap prompts themselves: the run hands them what they need in the
`EditContext` (training splits and their data hashes, the instruction wrapper).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from bench.core.cases import EditCase
from bench.core.distributed import Shard
from bench.core.hparams import check_hparams
from bench.core.layout import text_config


class EditHandle:
    """Restores the weights an edit changed. `changed` names the changed parameters, all of
    them: the runner's post-edit evaluation reuses the outputs of the blocks below them. `info`
    holds JSON-serialisable facts about this edit (the runner writes them to the case record)."""

    def __init__(self, model: nn.Module, param_names: list[str], info: dict[str, Any] | None = None):
        params = dict(model.named_parameters())
        missing = [n for n in param_names if n not in params]
        if missing:
            raise ValueError(f"unknown parameters {missing}")
        self.changed = list(param_names)
        self.info: dict[str, Any] = dict(info or {})
        self._params = {n: params[n] for n in param_names}
        self._saved = {n: p.detach().clone() for n, p in self._params.items()}

    @torch.no_grad()
    def restore(self) -> None:
        for name, param in self._params.items():
            param.copy_(self._saved[name])

    def original(self, name: str) -> torch.Tensor:
        """The value parameter `name` had before this edit."""
        return self._saved[name]


class CombinedHandle(EditHandle):
    """Several edits applied one after another, as one: `restore` undoes them in reverse order;
    `info["cases"]` holds each edit's own facts, in order."""

    def __init__(self, handles: list[EditHandle], info: dict[str, Any] | None = None):
        self.handles = list(handles)
        self.changed = list(dict.fromkeys(n for h in self.handles for n in h.changed))
        self.info = {"cases": [dict(h.info) for h in self.handles], **(info or {})}

    @torch.no_grad()
    def restore(self) -> None:
        for handle in reversed(self.handles):
            handle.restore()

    def original(self, name: str) -> torch.Tensor:
        for handle in self.handles:
            if name in handle.changed:
                return handle.original(name)
        raise KeyError(name)


def param_name(model: nn.Module, module: nn.Module, attr: str = "weight") -> str:
    """The qualified name of `module.<attr>` inside `model`."""
    target = getattr(module, attr)
    for name, p in model.named_parameters():
        if p is target:
            return name
    raise ValueError("parameter not found in model")


@dataclass
class TrainingData:
    """What a learned editor trains on, handed over by the run (editors never read data files).

    `tasks`: the tasks to train on (held-out tasks and tasks without train data already left
    out); `load(task)`: that task's train split; `hashes`: {task: {data file: sha256}} for cache
    keys and provenance; `holdout`: the held-out tasks (never trained on)."""

    tasks: list[str]
    load: Callable[[str], list[EditCase]]
    hashes: dict[str, dict[str, str]] = field(default_factory=dict)
    holdout: list[str] = field(default_factory=list)


def _no_wrapping(case: EditCase, mode: str) -> EditCase:
    return case


@dataclass
class EditContext:
    """What a run hands an editor besides the model."""

    cache_dir: Path
    seed: int = 0
    retrain: bool = False  # learned editors: train even if a checkpoint is cached
    log: Callable[[str], None] = print
    # Facts the editor wants recorded in the run's config.json (e.g. tokens used for statistics).
    notes: dict[str, Any] = field(default_factory=dict)
    # This process's place in a multi-process launch; learned editors train data-parallel
    # across the processes. The default is a lone process (every collective a no-op).
    shard: Shard = field(default_factory=Shard)
    training: TrainingData | None = None
    # The case with its prompts wrapped in its task's instruction, with a "seen" or "unseen"
    # description (tasks.instructions); the identity where no task cards are known.
    instruct: Callable[[EditCase, str], EditCase] = _no_wrapping


class Editor:
    name: ClassVar[str] = ""
    Hparams: ClassVar[type] = None  # a dataclass type
    uses_instructions: ClassVar[bool] = False  # prompts get wrapped in the task's instruction
    learns: ClassVar[bool] = False  # needs train() (or a cached checkpoint) before apply()
    batch_edits: ClassVar[bool] = False  # apply_batch computes a batch's edits together

    def __init__(self, hparams=None):
        self.hparams = hparams if hparams is not None else self.Hparams()

    @classmethod
    def default_hparams(cls, config) -> Any:
        """Defaults for a model with this (transformers) config; override per model shape."""
        return cls.Hparams()

    def check(self, config) -> None:
        """Raise BenchError if the hyperparameters cannot work on a model with this config."""
        check_hparams(self.hparams, text_config(config).num_hidden_layers, where=self.name)

    def prepare(self, lm, ctx: EditContext) -> None:
        """Called once before the first edit of a run (load caches, train or load a checkpoint)."""

    def train(self, lm, ctx: EditContext) -> dict:
        """Learned editors: train on ctx.training, return the checkpoint's metadata."""
        raise NotImplementedError(f"{self.name} does not learn")

    def apply(self, model: nn.Module, tokenizer, case: EditCase) -> EditHandle:
        raise NotImplementedError

    @property
    def edits_per_call(self) -> int:
        """How many cases the runner hands `apply_many` at once."""
        return 1

    def apply_many(self, model: nn.Module, tokenizer, cases: list[EditCase]) -> Iterator[EditHandle]:
        """Independent edits, one at a time: yields a handle per case, in order, with that case's
        edit (alone) applied; the caller evaluates and restores it before asking for the next.
        Override to compute the edits together (FT optimises them as one batch). A BenchError
        fails the whole call; the runner then retries the cases one by one."""
        for case in cases:
            yield self.apply(model, tokenizer, case)

    def apply_batch(self, model: nn.Module, tokenizer, cases: list[EditCase]) -> EditHandle:
        """Edits that stay (sequential mode): every case of `cases` applied, one handle for all of
        them. Editors that edit in batches (MEMIT, AlphaEdit) compute the cases together and set
        `batch_edits`; by default each case is applied in turn, on the model the previous ones
        changed, and `info["cases"]` holds each case's own facts. If a case fails, the cases
        before it are undone and the error raised."""
        handles: list[EditHandle] = []
        try:
            for case in cases:
                handles.append(self.apply(model, tokenizer, case))
        except BaseException:
            for handle in reversed(handles):
                handle.restore()
            raise
        return CombinedHandle(handles)

    def sequential_state(self) -> dict[str, torch.Tensor]:
        """Tensors this editor carries between sequential edits besides the model (saved with each
        checkpoint); none by default."""
        return {}

    def load_sequential_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what `sequential_state` returned (a resumed sequential run)."""
        if state:
            raise ValueError(f"{self.name} keeps no sequential state, got {sorted(state)}")
