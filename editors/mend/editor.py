"""`mend`: Model Editor Networks with Gradient Decomposition (Mitchell et al., 2022).

The fine-tuning gradient of an edit's loss with respect to a projection weight is a sum of
rank-one terms d_t u_t^T (the gradient at the layer's output times its input, one per token). MEND
trains a small network per weight shape that rewrites each pair (u_t, d_t) into (u~_t, d~_t); the
edit is dW = -lr_w * sum_t d~_t u~_t^T with a learned step size per weight. Editing costs one
forward and one backward pass plus the tiny network. The network is trained once per model and
set of training tasks (`bench train --editor mend`, or automatically by `bench run`) and cached
under $BENCH_CACHE/editors. See docs/mend.md.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.core.cases import EditCase
from bench.core.errors import BenchError
from bench.core.hparams import hparams_to_dict, override_hparams, param
from bench.core.layout import text_config
from editors.base import EditContext, EditHandle, Editor
from editors.mend.checkpoint import cache_key, load_checkpoint, partial_path, read_meta, save_checkpoint
from editors.mend.factors import edit_factors, select_targets
from editors.mend.networks import EditorNetwork, stored_delta
from editors.mend.trainer import MetaTrainer, split_train_val


@dataclass
class MendHparams:
    """layers: blocks whose MLP weights are edited (None: the last three); modules: mlp_in
    and/or mlp_out projections of those blocks; rank, n_hidden: the low-rank residual network
    (n_hidden ReLU layers + one linear layer, each rank `rank`); edit_lr: initial per-weight step
    size; lr / lr_lr: Adam learning rates of the networks / of the step sizes; c_edit, c_loc:
    weights of the edit NLL and the locality KL; batch_size: edits per training step; max_steps,
    time_budget_s: training stops at whichever comes first (0 = no time limit); val_cases:
    validation edits (held out of the training splits, split evenly across tasks), checked every
    val_every steps, stopping after `patience` checks without improvement (0 = never);
    mixture: round_robin or uniform over training tasks; grad_clip: max gradient norm;
    checkpoint: load this checkpoint (path without suffix) instead of the cache (never trains;
    the training hyperparameters are then the checkpoint's, and another value given for one of
    them is refused);
    checkpoint_every: save the training state every N steps (and on Ctrl-C) beside the final
    checkpoint, so that the same command resumes an interrupted training (0 = never)."""

    layers: list[int] | None = param(None, layer="index", nonempty=True)
    modules: list[str] = param(["mlp_in", "mlp_out"], choices=("mlp_in", "mlp_out"), nonempty=True)
    rank: int = param(256, ge=1, le=65_536)
    n_hidden: int = param(1, ge=0, le=64)
    edit_lr: float = param(1e-4, gt=0)
    lr: float = param(1e-4, gt=0)
    lr_lr: float = param(1e-4, ge=0)
    c_edit: float = param(0.1, ge=0)
    c_loc: float = param(1.0, ge=0)
    batch_size: int = param(4, ge=1, le=4096)
    max_steps: int = param(250, ge=0, le=1_000_000)
    # No wall-clock limit by default: a limit makes the trained network depend on the machine's
    # speed and load (a busy machine stops earlier), so the same command would give other numbers.
    time_budget_s: float = param(0.0, ge=0, le=10_000_000)
    val_cases: int = param(32, ge=0, le=1_000_000)
    val_every: int = param(50, ge=1, le=1_000_000)
    patience: int = param(4, ge=0, le=1_000_000)
    mixture: str = param("round_robin", choices=("round_robin", "uniform"))
    grad_clip: float = param(100.0, ge=0)
    checkpoint: str | None = None
    checkpoint_every: int = param(50, ge=0, le=1_000_000)


# Hyperparameters that do not change what training produces (left out of the cache key).
NOT_TRAINING = ("checkpoint", "checkpoint_every")


class Mend(Editor):
    name = "mend"
    Hparams = MendHparams
    learns = True
    uses_instructions = False

    def __init__(self, hparams=None):
        super().__init__(hparams)
        self.network: EditorNetwork | None = None
        self.targets = None
        self._model = None
        self.checkpoint_meta: dict | None = None

    @classmethod
    def default_hparams(cls, config) -> MendHparams:
        n = text_config(config).num_hidden_layers
        return MendHparams(layers=list(range(max(0, n - 3), n)))

    def check(self, config) -> None:
        super().check(config)
        if not self.hparams.modules:
            raise BenchError(f"{self.name}: hyperparameter modules must name mlp_in and/or mlp_out")
        if self.hparams.checkpoint:  # read and checked before the model loads
            meta = read_meta(Path(self.hparams.checkpoint))
            self.hparams = self._as_trained(meta, self.default_hparams(config))
            super().check(config)

    def _as_trained(self, meta: dict, defaults) -> MendHparams:
        """The hyperparameters with a checkpoint given (`checkpoint=`): its network is used as it
        was trained (the step sizes that `edit_lr` only starts are learned, and `lr`, `c_edit`,
        ... only shaped training), so a training hyperparameter set to another value than the
        checkpoint's cannot apply: refused, one line. One left at its default takes the
        checkpoint's value, so that config.json records what the network was trained with."""
        trained = meta.get("hparams") or {}
        mine, default = hparams_to_dict(self.hparams), hparams_to_dict(defaults)
        adopt, clash = {}, []
        for key, value in trained.items():
            if key in NOT_TRAINING or key not in mine or mine[key] == value:
                continue
            if mine[key] == default.get(key):
                adopt[key] = value
            else:
                clash.append(f"{key}={mine[key]} (trained with {value})")
        if clash:
            raise BenchError(f"{self.name}: checkpoint {self.hparams.checkpoint} was trained with other "
                             f"hyperparameters: {', '.join(clash)}; a loaded network is used as "
                             "trained: drop these values, or train a new network without checkpoint=")
        try:
            return override_hparams(self.hparams, adopt)
        except BenchError as exc:
            raise BenchError(f"{self.name}: checkpoint {self.hparams.checkpoint}: {exc}") from None

    # -- set-up --------------------------------------------------------------------------------

    def setup(self, lm) -> None:
        """Targets and a freshly initialised network for this model (seeded by the caller)."""
        hp = self.hparams
        n = lm.layout.num_layers
        layers = hp.layers if hp.layers is not None else list(range(max(0, n - 3), n))
        self.targets = select_targets(lm.model, lm.layout, layers, list(hp.modules))
        self.network = EditorNetwork(self.targets, hp.rank, hp.n_hidden, hp.edit_lr).to(lm.device)
        self._model = lm.model

    def training_case(self, case: EditCase, ctx: EditContext) -> EditCase:
        """What the network is trained on for `case` (MEND: the case as it is)."""
        return case

    def training_hparams(self) -> dict:
        """The hyperparameters that shape what training produces (the cache key's part)."""
        return {k: v for k, v in hparams_to_dict(self.hparams).items() if k not in NOT_TRAINING}

    def key_for(self, lm, ctx: EditContext) -> str:
        data = ctx.training
        return cache_key(lm.identity, self.name, self.training_hparams(), data.tasks, ctx.seed,
                         {t: data.hashes.get(t, {}) for t in data.tasks})

    def checkpoint_stem(self, lm, ctx: EditContext) -> Path:
        return Path(ctx.cache_dir) / "editors" / f"{self.name}-{self.key_for(lm, ctx)[:20]}"

    # -- prepare: load or train ----------------------------------------------------------------

    def prepare(self, lm, ctx: EditContext) -> None:
        torch.manual_seed(ctx.seed)
        self.setup(lm)
        hp = self.hparams
        if hp.checkpoint:
            meta = load_checkpoint(Path(hp.checkpoint), self.network)
            self._check_meta(meta, lm)
            self._note(ctx, Path(hp.checkpoint), meta, "explicit")
            return
        data = ctx.training
        if data is None or not data.tasks:
            holdout = ", ".join(data.holdout) if data else "none"
            raise BenchError(f"{self.name}: no training task with a train split and data "
                             f"(held out: {holdout or 'none'})")
        stem = self.checkpoint_stem(lm, ctx)
        cached = not ctx.retrain and stem.with_suffix(".safetensors").is_file() and stem.with_suffix(".json").is_file()
        cached = ctx.shard.broadcast(cached)  # all processes load, or all train together
        if cached:
            meta = load_checkpoint(stem, self.network)
            self._check_meta(meta, lm)
            ctx.log(f"{self.name}: loaded trained editor {stem}.safetensors "
                    f"({meta['steps']} steps on {', '.join(meta['train_tasks'])})")
            self._note(ctx, stem, meta, "cache")
            return
        ctx.log(f"{self.name}: training the editor network on {', '.join(data.tasks)} "
                f"(held out: {', '.join(data.holdout) or 'none'}); checkpoint {stem}")
        # Training in progress is saved beside the final checkpoint (same key) and resumed from
        # there by the same command, --retrain or not: it gives the same network.
        partial = partial_path(stem) if hp.checkpoint_every else None
        meta = self.train(lm, ctx, partial=partial)
        meta["cache_key"] = self.key_for(lm, ctx)
        if ctx.shard.world > 1:
            meta["data_parallel_processes"] = ctx.shard.world
        if ctx.shard.rank == 0:  # the copies are identical: one writes
            save_checkpoint(stem, self.network, meta)
            if partial is not None:
                partial.unlink(missing_ok=True)
        ctx.shard.barrier()
        self.checkpoint_meta = meta
        ctx.log(f"{self.name}: trained {meta['steps']} steps in {meta['train_time_s']} s "
                f"({meta['stop_reason']}); saved {stem}.safetensors")
        self._note(ctx, stem, meta, "trained")

    def _check_meta(self, meta: dict, lm) -> None:
        if meta.get("editor") != self.name:
            raise BenchError(f"checkpoint is for editor {meta.get('editor')!r}, not {self.name!r}")
        if meta.get("model", {}).get("identity") != lm.identity:
            raise BenchError(f"checkpoint was trained on {meta.get('model', {}).get('identity')}, "
                             f"not on {lm.identity}")
        self.checkpoint_meta = meta

    def _note(self, ctx: EditContext, stem: Path, meta: dict, source: str) -> None:
        ctx.notes.update({
            "checkpoint": str(stem) + ".safetensors", "checkpoint_source": source,
            "train_tasks": meta.get("train_tasks"), "holdout_tasks": meta.get("holdout_tasks"),
            "train_time_s": meta.get("train_time_s"), "train_steps": meta.get("steps"),
            "train_stop_reason": meta.get("stop_reason"),
            "per_task": meta.get("per_task"), "final_validation": meta.get("final_validation"),
        })

    # -- training ------------------------------------------------------------------------------

    def train(self, lm, ctx: EditContext, partial: Path | None = None) -> dict:
        """Train the network (in place) on ctx.training and return the checkpoint meta. With
        `partial`, the training state is saved to that file as it goes and resumed from it."""
        if self.network is None:
            torch.manual_seed(ctx.seed)
            self.setup(lm)
        hp, data = self.hparams, ctx.training
        tasks = list(data.tasks)
        leaked = sorted(set(tasks) & set(data.holdout))
        if leaked:
            raise BenchError(f"{self.name}: held-out tasks {leaked} cannot be training tasks")
        per_task_val = math.ceil(hp.val_cases / len(tasks)) if hp.val_cases else 0
        train_by_task, val_by_task, counts = {}, {}, {}
        for name in tasks:
            cases = data.load(name)
            bad = [c.case_id for c in cases if c.task != name]
            if bad:
                raise BenchError(f"{self.name}: cases of other tasks in {name}'s train split: {bad[:3]}")
            tr, va = split_train_val(cases, per_task_val, salt=f"meta-val:{ctx.seed}")
            train_by_task[name], counts[name] = tr, {"train": len(tr), "val": len(va)}
            if va:
                val_by_task[name] = va

        prepared: dict[str, EditCase] = {}

        def prepare_case(case: EditCase) -> EditCase:
            key = f"{case.task}/{case.case_id}"
            if key not in prepared:
                prepared[key] = self.training_case(case, ctx)
            return prepared[key]

        random_state = torch.random.get_rng_state()
        torch.manual_seed(ctx.seed)
        trainer = MetaTrainer(lm, self.network, self.targets, hp, train_by_task, val_by_task,
                              holdout=list(data.holdout), seed=ctx.seed,
                              prepare_case=prepare_case, log=ctx.log, shard=ctx.shard, after=ctx.after)
        started = time.time()
        try:
            info = trainer.fit(partial, key=self.key_for(lm, ctx))
        finally:
            torch.random.set_rng_state(random_state)
        for name in tasks:
            counts[name]["sampled"] = info["sampled_per_task"].get(name, 0)
        meta = {
            "editor": self.name, "uses_instructions": self.uses_instructions,
            "hparams": hparams_to_dict(hp),
            "model": {"spec": lm.spec, "identity": lm.identity, "source_hash": lm.source_hash},
            "edited_weights": [t.name for t in self.targets],
            "train_tasks": tasks, "holdout_tasks": list(data.holdout),
            "mixture": hp.mixture, "per_task": counts, "seed": ctx.seed,
            "steps": info["steps"], "best_step": info["best_step"],
            "stop_reason": info["stop_reason"], "train_time_s": info["train_time_s"],
            "s_per_step": info["s_per_step"], "final_validation": info["final_validation"],
            "history": info["history"], "started": started,
            "resumed_at_step": info["resumed_at_step"],
            "torch": torch.__version__,
        }
        self.checkpoint_meta = meta
        return meta

    # -- editing -------------------------------------------------------------------------------

    def apply(self, model, tokenizer, case: EditCase) -> EditHandle:
        if self.network is None:
            raise BenchError(f"{self.name}: prepare() must load or train the editor before apply()")
        if model is not self._model:
            raise BenchError(f"{self.name}: apply() got a different model from the one prepared")
        self.network.eval()
        factors = edit_factors(model, tokenizer, self.targets, case.prompt, case.target_new)
        with torch.no_grad():
            deltas = self.network.deltas(self.targets, factors)
        handle = EditHandle(model, [t.name for t in self.targets])
        with torch.no_grad():
            for t in self.targets:
                w = t.module.weight
                w.add_(stored_delta(t, deltas[t.name]).to(w.dtype))
        return handle
