"""The `rome` editor: computes k* and v* for a case and writes the rank-one update."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from bench.core.errors import BenchError
from bench.core.layout import find_layout
from editors.base import EditContext, EditHandle, Editor, param_name
from editors.rome.contexts import context_templates
from editors.rome.hparams import RomeHparams, default_for
from editors.rome.inputs import RomeState, build_sequences
from editors.rome.keys import compute_keys
from editors.rome.layer_stats import inverse_mom2, layer_stats
from editors.rome.prefix_cache import watched_prefix_cache
from editors.rome.update import rank_one_update
from editors.rome.values import compute_value


@dataclass
class RomeEdit:
    """What ROME computes for one case, before anything is written: the update maps
    `residual_key` exactly to `value`, in the direction C^-1 `key`."""

    key: torch.Tensor  # k*: mean key over the rewriting prompts
    value: torch.Tensor  # v*
    residual_key: torch.Tensor  # the bare prompt's key, or k* (hparam residual_key)
    info: dict = field(default_factory=dict)  # steps, loss terms, timings (JSON values)


class Rome(Editor):
    """`rome`: Rank-One Model Editing (Meng et al., 2022): one rank-one update of one MLP output
    projection per edit (editors/rome/__init__.py, docs/rome.md)."""

    name = "rome"
    Hparams = RomeHparams

    def __init__(self, hparams=None):
        super().__init__(hparams)
        self._state: RomeState | None = None

    @classmethod
    def default_hparams(cls, config) -> RomeHparams:
        return default_for(config)

    def check(self, config) -> None:
        super().check(config)
        hp = self.hparams
        if len(hp.context_lengths) != len(hp.context_counts):
            raise BenchError("rome: context_lengths and context_counts must have the same length")

    # ---------------------------------------------------------------- preparation

    def prepare(self, lm, ctx: EditContext) -> None:
        self._state = self._prepare(lm.model, lm.tokenizer, lm.layout, lm.identity,
                                    ctx.cache_dir, ctx.log, ctx.notes)

    def _prepare(self, model, tokenizer, layout, identity, cache_dir, log, notes) -> RomeState:
        hp = self.hparams
        layout = layout or find_layout(model)
        self.check(model.config)
        layer = hp.layer if hp.layer >= 0 else layout.num_layers + hp.layer
        templates = context_templates(model, tokenizer, identity, list(hp.context_lengths),
                                      list(hp.context_counts), hp.seed, cache_dir)
        c_inv = None
        info = {"layer": layer, "context_templates": templates}
        if hp.mom2_adjustment:
            stats = layer_stats(model, tokenizer, layout, identity or "uncached", [layer],
                                corpus=hp.stats_corpus, n_samples=hp.mom2_n_samples,
                                dtype_name=hp.mom2_dtype, seed=hp.seed,
                                cache_dir=cache_dir if identity else None, log=log)[layer]
            c_inv = inverse_mom2(stats.mom2).to(next(model.parameters()).device)
            info.update(stats_tokens=stats.n_tokens, stats_corpus=hp.stats_corpus or
                        f"sampled from the model (seed {hp.seed})",
                        stats_cache=str(stats.path) if stats.path else None,
                        stats_loaded_from_cache=stats.loaded)
        prefix = None
        if hp.reuse_context_prefix:
            prefix = watched_prefix_cache(model, tokenizer, layout, templates,
                                          param_name(model, layout.layers[layer].mlp_out))
            if prefix is None:
                log("rome: context-prefix reuse unavailable for this model; using full sequences")
        info["context_prefix_reused"] = prefix is not None
        if notes is not None:
            notes["rome"] = info
        return RomeState(id(model), layout, tokenizer, templates, c_inv, layer, prefix)

    def _state_for(self, model, tokenizer) -> RomeState:
        if self._state is None or self._state.model_id != id(model):
            # Not prepared for this model: compute contexts and statistics in memory, uncached.
            self._state = self._prepare(model, tokenizer, None, None, None, lambda s: None, None)
        self._state.tokenizer = tokenizer
        return self._state

    # ---------------------------------------------------------------- one edit

    def compute(self, model: nn.Module, tokenizer, case) -> RomeEdit:
        """k*, v* and the residual key for `case`; the model is left as it was."""
        st = self._state_for(model, tokenizer)
        t0 = time.perf_counter()
        rewrite, essence = build_sequences(tokenizer, case, st.templates, self.hparams.kl_position)
        keys = compute_keys(model, st, rewrite, essence)
        key = keys.mean(0)  # k*: the update direction is C^-1 k*
        t1 = time.perf_counter()
        value, info = compute_value(model, st, self.hparams, rewrite, essence)
        t2 = time.perf_counter()
        residual_key = keys[0] if self.hparams.residual_key == "prompt" else key
        info.update(key_s=round(t1 - t0, 4), value_s=round(t2 - t1, 4))
        return RomeEdit(key.detach(), value.detach(), residual_key.detach(), info)

    def write(self, model: nn.Module, edit: RomeEdit) -> EditHandle:
        """Apply a computed edit; the handle restores the projection and carries edit.info."""
        st = self._state
        module = st.layout.layers[st.layer].mlp_out
        handle = EditHandle(model, [param_name(model, module)], info=edit.info)
        t0 = time.perf_counter()
        rank_one_update(module, edit.key, edit.value, st.c_inv, edit.residual_key)
        handle.info["update_s"] = round(time.perf_counter() - t0, 4)
        return handle

    def apply(self, model: nn.Module, tokenizer, case) -> EditHandle:
        return self.write(model, self.compute(model, tokenizer, case))
