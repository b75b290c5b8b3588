"""The reference settings benchmarks/speed.py times: the shipped presets of FT and ROME with
their layers scaled to the model, the optimisation switches, a written-out copy of the reference
framework's FT computation, and building, preparing and warming up an editor."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from _common import prepare
from bench.core.layout import find_layout
from bench.core.models import LoadedModel, load_model
from bench.core.probes import encode_probe
from bench.core.tiny import tiny_model
from bench.session import build_editor, hparams_source
from editors.base import EditHandle, param_name
from editors.ft import FineTune

PRESET = {"ft": "easyedit-ft-m", "rome": "easyedit"}  # the reference settings, shipped presets
PRESET_DEPTH = 30  # the presets' layer numbers are SmolLM2-135M's (30 layers)
TINY = "tiny-llama"


def scaled(layer: int, n_layers: int) -> int:
    """A preset layer (of 30) at the same relative depth of a model with `n_layers`."""
    if n_layers == PRESET_DEPTH:
        return layer
    return max(0, min(n_layers - 1, round(layer / PRESET_DEPTH * n_layers)))


def context_spec(n_contexts: int) -> tuple[list[int], list[int]]:
    """(lengths, counts) for `n_contexts` context prompts, half of length 5 and half of 10."""
    if n_contexts <= 0:
        return [], []
    return [5, 10], [n_contexts // 2, n_contexts - n_contexts // 2]


def reference_overrides(name: str, n_layers: int, optimised: bool, n_contexts: int | None = None,
                        steps: int | None = None, parallel_edits: int = 1) -> dict:
    """The preset of `name` with its layers scaled to the model and the optimisation switches
    set; `n_contexts` (ROME) and `steps` replace the preset's where given."""
    hp = hparams_source(name, PRESET[name])
    if "layer" in hp:
        hp["layer"] = scaled(hp["layer"], n_layers)
    if hp.get("layers"):
        hp["layers"] = [scaled(i, n_layers) for i in hp["layers"]]
    if name == "ft":
        hp.update(frozen_prefix=optimised, fused_vocab_loss=optimised, parallel_edits=parallel_edits)
        if steps is not None:
            hp["steps"] = steps
    else:
        hp["reuse_context_prefix"] = optimised
        if n_contexts is not None:
            hp["context_lengths"], hp["context_counts"] = context_spec(n_contexts)
        if steps is not None:
            hp["v_num_grad_steps"] = steps
    return hp


class ReferenceLikeFT(FineTune):
    """The reference framework's FT computation, written out here for timing only: every step
    runs the whole model on prompt + target with logits at every position, and the loss is the
    mean NLL of the target tokens (the same loss, optimizer and stopping rule as FineTune with
    objective target_masked, so the same steps and, up to float rounding, the same edit). It
    measures on this machine, now, what the reference figure measured then."""

    def apply(self, model, tokenizer, case) -> EditHandle:
        hp = self.hparams
        layout = find_layout(model)
        layers = self._layers(layout.num_layers)
        weights = [layout.layers[i].mlp_out.weight for i in layers]
        handle = EditHandle(model, [param_name(model, layout.layers[i].mlp_out) for i in layers])
        prompt_ids, target_ids = encode_probe(tokenizer, case.prompt, case.target_new)
        ids = torch.tensor([prompt_ids + target_ids], device=weights[0].device)
        labels = ids[0, 1:]
        mask = torch.zeros(labels.shape, device=ids.device)
        mask[len(prompt_ids) - 1:] = 1.0
        for w in weights:
            w.requires_grad_(True)
        opt = torch.optim.Adam(weights, lr=hp.lr, weight_decay=hp.weight_decay)
        steps = 0
        try:
            with torch.enable_grad():
                for _ in range(hp.steps):
                    opt.zero_grad(set_to_none=True)
                    logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
                    nll = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
                    loss = (nll * mask).sum() / mask.sum()
                    if loss.item() < hp.min_loss:
                        break
                    loss.backward()
                    opt.step()
                    steps += 1
        finally:
            for w in weights:
                w.requires_grad_(False)
                w.grad = None
        handle.info["steps"] = steps
        return handle

    def apply_many(self, model, tokenizer, cases):
        # FineTune's batched optimisation is not the reference's: one case at a time.
        for case in cases:
            yield self.apply(model, tokenizer, case)


def make_editor(name: str, lm: LoadedModel, overrides: dict, cache: Path | None = None,
                reference: bool = False, data_dir: Path | None = None):
    """The editor built and checked by bench.session.build_editor, prepared as a run prepares
    it; returns (editor, context, seconds spent in prepare)."""
    editor = build_editor(name, overrides, lm.model.config, lm.spec)
    if reference:
        editor = ReferenceLikeFT(editor.hparams)
    ctx, prepare_s = prepare(editor, lm, data_dir, cache=cache)
    return editor, ctx, prepare_s


def warm_up(name: str, lm: LoadedModel, cache: Path | None, optimised: bool, cases,
            n_contexts: int | None = None, parallel_edits: int = 1) -> None:
    """One short call (2 steps) so the first timed edit pays no first-call costs."""
    hp = reference_overrides(name, lm.layout.num_layers, optimised, n_contexts, steps=2,
                             parallel_edits=parallel_edits)
    editor, _, _ = make_editor(name, lm, hp, cache)
    for handle in editor.apply_many(lm.model, lm.tokenizer, cases[:parallel_edits]):
        handle.restore()


def load_lm(spec: str, device: str,
            dtype: str) -> tuple[LoadedModel, Path | None, tempfile.TemporaryDirectory | None]:
    """The model and the cache directory its editors prepare into (None: the harness's cache; a
    throwaway one for the random tiny model, so it leaves nothing in the shared cache)."""
    if spec == TINY:
        tmp = tempfile.TemporaryDirectory(prefix="speed-tiny-")
        return tiny_model("llama"), Path(tmp.name), tmp
    return load_model(spec, device=device, dtype=dtype), None, None


def phase_keys(info: dict) -> list[str]:
    """The timing entries of an edit's info (ROME: key_s, value_s, update_s)."""
    return [k for k, v in info.items() if k.endswith("_s") and isinstance(v, (int, float))]
