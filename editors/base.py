"""The editor contract.

An editor is one class:

    class MyEditor(Editor):
        name = "my-editor"
        Hparams = MyHparams             # a dataclass; every field overridable with --hparam k=v
        kinds = ("weights",)            # what its edits change: weights, modules, context

        def apply(self, model, tokenizer, case) -> EditHandle: ...

An edit is a *view* of the model. `apply` changes the model, or what the model is given, and
returns a handle (`EditHandle`, made before the change) that says what changed and whose
`restore()` puts the model back exactly as it was: the same state_dict bit for bit, no hook, no
added module, no changed attribute left behind. Three kinds, mixed as an editor needs:

* weights written in place (FT, ROME, MEMIT, MEND): the handle names the parameters;
* modules added or replaced, forward hooks (LoRA adapters, codebooks, side memories): the handle
  snapshots the module tree and may declare the lowest block whose output it changes;
* a context in front of every prompt (in-context editing, IKE): the handle carries the text.

Every evaluation path (teacher-forced probes, CounterFact's probability comparisons, generation
in the wild, fluency, the lm-eval regression, sequential checkpoints, sharded runs) reads the
edited model through the handle's view (`view_case`, `view_text`, `reusable_blocks`).

Optional, in the order a run calls them:

* `default_hparams(config)`: defaults per model shape (the transformers config);
* `check(config)`: validate the hyperparameters for this model before its weights are loaded
  (the default checks types, finiteness, declared bounds and layer ranges: bench.core.hparams);
* `prepare(lm, ctx)`: once per run, before the first edit (caches; a learned editor loads its
  checkpoint or trains; an in-context editor indexes its demonstrations);
* `train(lm, ctx) -> dict`: learned editors (`learns = True`) train on `ctx.training` and return
  the checkpoint's metadata; `prepare` calls it when no checkpoint is cached;
* `apply_many(model, tokenizer, cases)` with `edits_per_call`: compute several independent edits
  together (one handle per case, each applied alone);
* `apply_batch(model, tokenizer, cases) -> EditHandle` (sequential mode, `--edit-batch B`): edits
  that stay, all of `cases` in one handle; editors that edit in batches (MEMIT) override it and
  set `batch_edits = True`, the default applies the cases one after another. An editor whose
  view is a context gives, with each handle, the whole context of every edit so far;
* `sequential_state()` / `load_sequential_state(state)`: what an editor carries from one
  sequential edit to the next besides the model's weights (AlphaEdit: the keys of earlier edits;
  an adapter's weights; an in-context editor's memory), saved at every checkpoint so that a
  resumed run continues exactly. Tensors, or JSON-serialisable values;
* `reattach(model, tokenizer) -> EditHandle | None`: a resumed sequential run, after
  `load_sequential_state`: put back the modules, hooks or context of the edits the state holds
  (the run writes saved weights back itself); None for editors that only write weights.

Editors never load data or wrap prompts themselves: the run hands them what they need in the
`EditContext` (training splits and their data hashes, the instruction wrapper).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from bench.core.cases import EditCase, PromptAnswer
from bench.core.distributed import Shard
from bench.core.hparams import check_hparams
from bench.core.layout import text_config
from bench.core.replay import first_changed_block
from bench.core.snapshot import TreeSnapshot
from bench.core.timings import WorkAfter


KINDS = ("weights", "modules", "context")


class EditHandle:
    """What one edit changed in the model's view, and how to undo it exactly. Make the handle
    *before* changing the model: it saves what it will restore.

    An edit is one or more of three kinds (`kinds`):

    * ``weights``: parameters written in place; `changed` names every one of them and `restore`
      copies their saved values back, bit for bit;
    * ``modules``: modules added or replaced, forward hooks registered, attributes set (adapters,
      codebooks, side memories); `modules=True` takes a snapshot of the module tree
      (bench.core.snapshot) that `restore` puts back. `first_block` declares the lowest
      transformer block whose output the edit can change (the runner then reuses the recorded
      outputs of the blocks below it); None, the default, means "unknown": nothing is reused;
    * ``context``: text put in front of every prompt the model is given (in-context editing); set
      `context` (at construction or later, before the handle is returned). Every evaluation
      path reads the model through `view_case` / `view_text`.

    `restore_fn` runs first on restore (an editor's own bookkeeping, e.g. memory it keeps).
    `info` holds JSON-serialisable facts about this edit (the runner writes them to the case
    record)."""

    def __init__(self, model: nn.Module, param_names: list[str] | tuple = (), info: dict[str, Any] | None = None,
                 *, modules: bool = False, context: str = "", first_block: int | None = None,
                 restore_fn: Callable[[], None] | None = None):
        params = dict(model.named_parameters())
        missing = [n for n in param_names if n not in params]
        if missing:
            raise ValueError(f"unknown parameters {missing}")
        self.changed = list(param_names)
        self.info: dict[str, Any] = dict(info or {})
        self.context = context
        self.first_block = first_block
        self._params = {n: params[n] for n in param_names}
        self._saved = {n: p.detach().clone() for n, p in self._params.items()}
        self._tree = TreeSnapshot(model) if modules else None
        self._restore_fn = restore_fn

    @property
    def kinds(self) -> tuple[str, ...]:
        """What this edit changes, among KINDS (empty: nothing, e.g. the `none` editor)."""
        got = {"weights": bool(self.changed), "modules": self._tree is not None, "context": bool(self.context)}
        return tuple(k for k in KINDS if got[k])

    @torch.no_grad()
    def restore(self) -> None:
        if self._restore_fn is not None:
            self._restore_fn()
        if self._tree is not None:
            self._tree.restore()
        for name, param in self._params.items():
            param.copy_(self._saved[name])

    def original(self, name: str) -> torch.Tensor:
        """The value parameter `name` had before this edit."""
        return self._saved[name]

    def view_text(self, text: str) -> str:
        """`text` as the edited model is given it (the context in front)."""
        return self.context + text if self.context else text

    def view_case(self, case: EditCase) -> EditCase:
        """The case with every probe prompt (edit, rephrases, locality, portability) as the
        edited model is given it; the case itself when the edit has no context."""
        if not self.context:
            return case
        v = self.view_text
        return replace(case, prompt=v(case.prompt), rephrase_prompts=tuple(v(p) for p in case.rephrase_prompts),
                       locality=tuple(PromptAnswer(v(pa.prompt), pa.answer) for pa in case.locality),
                       portability=tuple(PromptAnswer(v(pa.prompt), pa.answer) for pa in case.portability))

    def reusable_blocks(self, layout) -> int:
        """How many of the lowest blocks compute after this edit exactly what they computed before
        it, on the same inputs (0: nothing can be reused). A context changes every input; modules
        without a declared `first_block` may change anything."""
        if self.context:
            return 0
        lowest = layout.num_layers
        if self._tree is not None:
            if self.first_block is None:
                return 0
            lowest = min(lowest, self.first_block)
        from_weights = first_changed_block(layout, self.changed)
        return 0 if from_weights is None else min(lowest, from_weights)


class CombinedHandle(EditHandle):
    """Several edits applied one after another, as one: `restore` undoes them in reverse order;
    `info["cases"]` holds each edit's own facts, in order. The view is the last handle's context
    (an editor that keeps a context across edits gives the whole of it with each handle) over
    every handle's modules and weights."""

    def __init__(self, handles: list[EditHandle], info: dict[str, Any] | None = None):
        self.handles = list(handles)
        self.changed = list(dict.fromkeys(n for h in self.handles for n in h.changed))
        self.info = {"cases": [dict(h.info) for h in self.handles], **(info or {})}
        contexts = [h.context for h in self.handles if h.context]
        self.context = contexts[-1] if contexts else ""
        self._restore_fn = None

    @property
    def kinds(self) -> tuple[str, ...]:
        got = {k for h in self.handles for k in h.kinds}
        return tuple(k for k in KINDS if k in got)

    @torch.no_grad()
    def restore(self) -> None:
        for handle in reversed(self.handles):
            handle.restore()

    def original(self, name: str) -> torch.Tensor:
        for handle in self.handles:
            if name in handle.changed:
                return handle.original(name)
        raise KeyError(name)

    def reusable_blocks(self, layout) -> int:
        if self.context:
            return 0
        return min([h.reusable_blocks(layout) for h in self.handles], default=layout.num_layers)


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
    # What the command does after training (cases to evaluate, their expected cost): a learned
    # editor's training progress gives an estimate for the whole command from it. None: nothing.
    after: WorkAfter | None = None


class Editor:
    name: ClassVar[str] = ""
    Hparams: ClassVar[type] = None  # a dataclass type
    uses_instructions: ClassVar[bool] = False  # prompts get wrapped in the task's instruction
    learns: ClassVar[bool] = False  # needs train() (or a cached checkpoint) before apply()
    batch_edits: ClassVar[bool] = False  # apply_batch computes a batch's edits together
    kinds: ClassVar[tuple[str, ...]] = ("weights",)  # what its edits change, among KINDS
    reads_train_split: ClassVar[bool] = False  # gets ctx.training without learning (IKE's demonstrations)

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

    def sequential_state(self) -> dict[str, Any]:
        """What this editor carries between sequential edits besides the model's weights (saved
        with each checkpoint): tensors or JSON-serialisable values; none by default."""
        return {}

    def load_sequential_state(self, state: dict[str, Any]) -> None:
        """Restore what `sequential_state` returned (a resumed sequential run)."""
        if state:
            raise ValueError(f"{self.name} keeps no sequential state, got {sorted(state)}")

    def reattach(self, model: nn.Module, tokenizer) -> EditHandle | None:
        """A resumed sequential run, after `load_sequential_state`: put back the modules, hooks or
        context of the edits held in the state and return their handle (restoring it removes
        them); None for editors whose edits are weights only (the run writes those back)."""
        return None
