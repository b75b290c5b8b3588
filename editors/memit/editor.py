"""The `memit` editor: z optimised per case at the last edited layer, then each edited layer's
MLP output projection updated in turn so that the cases' keys map to their share of the
remaining residual."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from bench.core.cases import EditCase
from bench.core.errors import BenchError
from bench.core.layout import ModelLayout, find_layout, find_post_mlp_norms, weight_out_in
from editors.base import EditContext, EditHandle, Editor, param_name
from editors.memit.hparams import BatchEditHparams, MemitHparams, default_for
from editors.memit.keys import read_layers, template_weights, through_post_norm
from editors.memit.rows import CaseRows
from editors.memit.solve import memit_update, scaled_inverse
from editors.memit.values import optimise_z
from editors.rome.contexts import context_templates
from editors.rome.layer_stats import KeyStats, layer_stats
from editors.rome.prefix_cache import PrefixCache, current_prefix_cache, watched_prefix_cache


@dataclass
class MemitState:
    """What `prepare` computes once per run for one model."""

    model_id: int
    layout: ModelLayout
    tokenizer: object
    templates: list[str]
    layers: list[int]
    names: list[str]  # the edited projections' weight names, in layer order
    stats: dict[int, KeyStats]
    weights: list[float]  # each template's weight in a case's mean key
    prefix: PrefixCache | None = None
    solver: dict[int, torch.Tensor] = field(default_factory=dict)  # per layer: the method's d x d matrix
    post_norms: dict[int, nn.Module] = field(default_factory=dict)  # edited layers whose MLP output is normed


class BatchHandle(EditHandle):
    """An EditHandle that also runs `undo` callbacks on restore (an editor's sequential state)."""

    def __init__(self, model: nn.Module, param_names: list[str], info: dict | None = None):
        super().__init__(model, param_names, info)
        self.undo: list[Callable[[], None]] = []

    @torch.no_grad()
    def restore(self) -> None:
        super().restore()
        for fn in reversed(self.undo):
            fn()


class Memit(Editor):
    """`memit`: Mass-Editing Memory in a Transformer (Meng et al., ICLR 2023): several MLP output
    projections updated together, for all cases of a call (editors/memit/__init__.py,
    docs/memit.md)."""

    name = "memit"
    Hparams = MemitHparams
    batch_edits = True

    def __init__(self, hparams=None):
        super().__init__(hparams)
        self._state: MemitState | None = None

    @classmethod
    def default_hparams(cls, config) -> BatchEditHparams:
        return default_for(cls.Hparams, config)

    def check(self, config) -> None:
        super().check(config)
        hp = self.hparams
        if not hp.layers:
            raise BenchError(f"{self.name}: hyperparameter layers must name at least one layer")
        if any(b <= a for a, b in zip(hp.layers, hp.layers[1:])):
            raise BenchError(f"{self.name}: hyperparameter layers must be strictly increasing, got {hp.layers}")
        if len(hp.context_lengths) != len(hp.context_counts):
            raise BenchError(f"{self.name}: context_lengths and context_counts must have the same length")

    @property
    def edits_per_call(self) -> int:
        return max(1, self.hparams.parallel_edits)

    # ---------------------------------------------------------------- preparation

    def prepare(self, lm, ctx: EditContext) -> None:
        self._state = self._prepare(lm.model, lm.tokenizer, lm.layout, lm.identity, ctx.cache_dir,
                                    ctx.log, ctx.notes)

    def _prepare(self, model, tokenizer, layout, identity, cache_dir, log, notes) -> MemitState:
        hp = self.hparams
        layout = layout or find_layout(model)
        self.check(model.config)
        layers = list(hp.layers)
        templates = context_templates(model, tokenizer, identity, list(hp.context_lengths),
                                      list(hp.context_counts), hp.seed, cache_dir)
        cache = cache_dir if identity else None
        stats = layer_stats(model, tokenizer, layout, identity or "uncached", layers,
                            corpus=hp.stats_corpus, n_samples=hp.mom2_n_samples,
                            dtype_name=hp.mom2_dtype, seed=hp.seed, cache_dir=cache, log=log)
        names = [param_name(model, layout.layers[i].mlp_out) for i in layers]
        info = {"layers": layers, "context_templates": templates,
                "stats_tokens": min(s.n_tokens for s in stats.values()),
                "stats_corpus": hp.stats_corpus or f"sampled from the model (seed {hp.seed})",
                "stats_cache": [str(s.path) if s.path else None for s in stats.values()],
                "stats_loaded_from_cache": all(s.loaded for s in stats.values())}
        prefix = None
        if hp.reuse_context_prefix:
            prefix = watched_prefix_cache(model, tokenizer, layout, templates, names)
            if prefix is None:
                log(f"{self.name}: context-prefix reuse unavailable for this model; using full sequences")
        info["context_prefix_reused"] = prefix is not None
        norms = find_post_mlp_norms(model, layout)
        post_norms = {i: norms[i] for i in layers if norms[i] is not None}
        info["post_mlp_norm"] = bool(post_norms)
        st = MemitState(id(model), layout, tokenizer, templates, layers, names, stats,
                        template_weights(list(hp.context_counts)), prefix, post_norms=post_norms)
        self._prepare_solver(st, Path(cache) if cache is not None else None, info)
        if notes is not None:
            notes[self.name] = info
        return st

    def _prepare_solver(self, st: MemitState, cache_dir: Path | None, info: dict) -> None:
        """MEMIT: (lambda C)^-1 per layer, once per run."""
        device = next(st.layout.blocks.parameters()).device
        st.solver = {layer: scaled_inverse(s.mom2, self.hparams.mom2_update_weight).to(device)
                     for layer, s in st.stats.items()}

    def _state_for(self, model, tokenizer) -> MemitState:
        if self._state is None or self._state.model_id != id(model):
            # Not prepared for this model: contexts and statistics in memory, uncached.
            self._state = self._prepare(model, tokenizer, None, None, None, lambda s: None, None)
        self._state.tokenizer = tokenizer
        return self._state

    def _prefix(self, model, st: MemitState) -> PrefixCache | None:
        """The run's context-prefix cache, recomputed if the model changed other than by
        edit + restore (sequential edits)."""
        st.prefix = current_prefix_cache(st.prefix, model, st.tokenizer, st.layout, st.templates, st.names)
        return st.prefix

    # ---------------------------------------------------------------- the method

    def _values(self, model, tokenizer, cases: list[EditCase]) -> tuple[CaseRows, torch.Tensor, list[dict], float]:
        """(rows, z per case, each case's facts, seconds); the model is left as it was."""
        st = self._state_for(model, tokenizer)
        t0 = time.perf_counter()
        rows = CaseRows.build(tokenizer, cases, st.templates, self.hparams.kl_position)
        z, infos = optimise_z(model, st.layout, self.hparams, rows, st.layers[-1], self._prefix(model, st))
        return rows, z, infos, time.perf_counter() - t0

    def _update(self, st: MemitState, layer: int, keys: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
        return memit_update(keys, resid, st.solver[layer])

    @torch.no_grad()
    def _write(self, model, st: MemitState, rows: CaseRows, z: torch.Tensor) -> dict:
        """Update every edited layer in order (each sees the layers below it already updated):
        residual (z - current hidden state at L) / layers left, written at that layer's keys."""
        keys_s = solve_s = 0.0
        per_layer = []
        for i, layer in enumerate(st.layers):
            t0 = time.perf_counter()
            norm = st.post_norms.get(layer)
            keys, cur, outs = read_layers(model, st.layout, rows, [layer], st.weights, z_layer=st.layers[-1],
                                          outputs=norm is not None)
            t1 = time.perf_counter()
            resid = (z - cur) / (len(st.layers) - i)
            if norm is not None:  # the projection's output passes a norm before the stream
                resid = through_post_norm(norm, outs[layer], resid)
            delta = self._update(st, layer, keys[layer], resid)
            w = weight_out_in(st.layout.layers[layer].mlp_out)
            w.add_(delta.to(w.dtype))
            solve_s += time.perf_counter() - t1
            keys_s += t1 - t0
            per_layer.append({"layer": layer, "residual_norm": round((z - cur).norm(dim=1).mean().item(), 4),
                              "update_norm": round(delta.norm().item(), 4)})
        return {"keys_s": keys_s, "solve_s": solve_s, "layers": per_layer}

    def _after_batch(self, model, st: MemitState, rows: CaseRows, handle: BatchHandle) -> float:
        """Sequential mode, after a batch is written: grow the editor's state (none for MEMIT);
        returns the seconds spent."""
        return 0.0

    def _edit(self, model, st: MemitState, rows: CaseRows, z: torch.Tensor) -> tuple[BatchHandle, dict]:
        handle = BatchHandle(model, st.names)  # snapshot before anything is written
        try:
            facts = self._write(model, st, rows, z)
        except BaseException:
            handle.restore()
            raise
        return handle, facts

    def apply(self, model: nn.Module, tokenizer, case: EditCase) -> EditHandle:
        return next(self.apply_many(model, tokenizer, [case]))

    def apply_many(self, model: nn.Module, tokenizer, cases: list[EditCase]) -> Iterator[EditHandle]:
        """Single mode: the cases' z optimised together, then each case's edit computed and
        applied alone (the caller restores it before asking for the next)."""
        rows, z, infos, z_s = self._values(model, tokenizer, cases)
        st = self._state
        for c in range(len(cases)):
            one = CaseRows(rows.seqs[c * rows.per_case: (c + 1) * rows.per_case], 1, rows.per_case)
            handle, facts = self._edit(model, st, one, z[c: c + 1])
            handle.info.update(infos[c])
            handle.info.update(z_s=round(z_s / len(cases), 4), z_cases=len(cases),
                               keys_s=round(facts["keys_s"], 4), solve_s=round(facts["solve_s"], 4),
                               layers=facts["layers"])
            yield handle

    def apply_batch(self, model: nn.Module, tokenizer, cases: list[EditCase]) -> EditHandle:
        """Sequential mode: every case of `cases` written together; one handle restores them all
        (and the editor's sequential state)."""
        if not cases:
            return BatchHandle(model, [], info={"cases": []})
        rows, z, infos, z_s = self._values(model, tokenizer, cases)
        st = self._state
        handle, facts = self._edit(model, st, rows, z)
        try:
            facts["keys_s"] += self._after_batch(model, st, rows, handle)
        except BaseException:
            handle.restore()
            raise
        handle.info.update(cases=infos, z_s=round(z_s, 4), keys_s=round(facts["keys_s"], 4),
                           solve_s=round(facts["solve_s"], 4), layers=facts["layers"])
        return handle
