"""The `wise` editor: WISE's side memory on the model, one edit at a time (docs/wise.md)."""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn
from transformers.activations import ACT2FN

from bench.core.cases import EditCase
from bench.core.errors import BenchError
from bench.core.layout import ModelLayout, find_layout, text_config, weight_out_in
from bench.core.probes import encode_probe
from editors.base import EditContext, EditHandle, Editor
from editors.wise.hparams import WiseHparams, check_wise_hparams, default_layer
from editors.wise.inputs import build_batch, context_prefixes, pick_irrelevant
from editors.wise.memory import SideMemory, WiseState
from editors.wise.router import MEMORY_NAMES, Router
from editors.wise.train import train_edit

MODULE_NAME = "wise_memory"  # the side memory's name inside the MLP that holds the projection


def hidden_activation(config) -> Any:
    """The model's MLP activation function, from its config (EasyEdit's `hidden_act` or
    `activation_function`; Gemma's `hidden_activation`); None when the config names none."""
    tc = text_config(config)
    for key in ("hidden_act", "hidden_activation", "activation_function"):
        name = getattr(tc, key, None)
        if isinstance(name, str) and name in ACT2FN:
            return ACT2FN[name]
    return None


class _Attached:
    """The side memory this editor put on `model`."""

    def __init__(self, model: nn.Module, module: SideMemory, mlp: nn.Module, prefixes: list[str]):
        self.model, self.module, self.mlp, self.prefixes = model, module, mlp, prefixes

    @property
    def state(self) -> WiseState:
        return self.module.state

    @property
    def router(self) -> Router:
        return self.module.router

    def attached(self, model: nn.Module) -> bool:
        return self.model is model and getattr(self.mlp, MODULE_NAME, None) is self.module


class Wise(Editor):
    """WISE (Wang et al., NeurIPS 2024): a side copy of one MLP output projection holds the
    edits, in randomly masked shards merged with TIES, and an activation router picks the main
    or the side memory per input; the base weights never change."""

    name = "wise"
    Hparams = WiseHparams
    kinds = ("modules",)
    reads_train_split = True  # irrelevant inputs: the train split's locality prompts

    def __init__(self, hparams=None):
        super().__init__(hparams)
        self._memory: _Attached | None = None
        self._pending: tuple[dict, dict] | None = None  # loaded sequential state, until reattach
        self._prefixes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # context texts per model
        self._training = None
        self._pools: dict[str, list[str] | None] = {}

    @classmethod
    def default_hparams(cls, config) -> WiseHparams:
        return WiseHparams(layer=default_layer(text_config(config).num_hidden_layers))

    def check(self, config) -> None:
        check_wise_hparams(self.hparams, text_config(config).num_hidden_layers, where=self.name)

    def prepare(self, lm, ctx: EditContext) -> None:
        self._training, self._pools = ctx.training, {}
        training = ctx.training
        ctx.notes["wise"] = {"irrelevant": self.hparams.irrelevant,
                             "irrelevant_tasks": list(training.tasks) if training else []}

    def _layer(self, layout: ModelLayout) -> int:
        hp = self.hparams
        return default_layer(layout.num_layers) if hp.layer is None else hp.layer

    # ---------------------------------------------------------------------------------------
    # Irrelevant inputs and context texts
    # ---------------------------------------------------------------------------------------

    def _pool(self, task: str) -> list[str] | None:
        """The locality prompts (with their answers) of `task`'s train split; None without one."""
        if self.hparams.irrelevant != "train_split":
            return None
        if task not in self._pools:
            training = self._training
            if training is None or task not in training.tasks:
                self._pools[task] = None
            else:
                texts = {f"{pa.prompt} {pa.answer}" for c in training.load(task) for pa in c.locality}
                self._pools[task] = sorted(texts) or None
        return self._pools[task]

    def _context(self, model, tokenizer) -> list[str]:
        """The context texts, generated once per model while it is unedited."""
        if model not in self._prefixes:
            self._prefixes[model] = context_prefixes(model, tokenizer, list(self.hparams.context_lengths))
        return self._prefixes[model]

    # ---------------------------------------------------------------------------------------
    # Putting the side memory on the model and taking it off
    # ---------------------------------------------------------------------------------------

    def _install(self, model, layout: ModelLayout, layer: int, prefixes: list[str]) -> _Attached:
        """A side memory at `layer`'s MLP output projection: the module, the projection's routing
        hook and the decoder's pre-hook (attention mask, cache position)."""
        bm = layout.layers[layer]
        if hasattr(bm.mlp, MODULE_NAME):
            raise BenchError(f"{self.name}: block {layer} already holds a side memory")
        weight = weight_out_in(bm.mlp_out)
        state = WiseState(tuple(weight.shape), weight.device)
        act = hidden_activation(model.config) if self.hparams.score == "activated" else None
        if self.hparams.score == "activated" and act is None:
            raise BenchError(f"{self.name}: score=activated needs the model's hidden activation in its config")
        router = Router(state, self.hparams, act)
        module = SideMemory(state, router, layer)
        bm.mlp.add_module(MODULE_NAME, module)
        bm.mlp_out.register_forward_hook(router.projection_hook)
        layout.decoder.register_forward_pre_hook(router.decoder_hook, with_kwargs=True)
        self._memory = _Attached(model, module, bm.mlp, list(prefixes))
        return self._memory

    def _forgetter(self):
        """(restore_fn for the handle of an install, a function telling it the memory installed):
        restoring that handle forgets that memory (not a later one on another model)."""
        installed: list[_Attached] = []

        def forget() -> None:
            if installed and self._memory is installed[0]:
                self._memory = None
        return forget, installed.append

    def _attached(self, model) -> _Attached | None:
        memory = self._memory
        return memory if memory is not None and memory.attached(model) else None

    # ---------------------------------------------------------------------------------------
    # Edits
    # ---------------------------------------------------------------------------------------

    def apply(self, model, tokenizer, case: EditCase) -> EditHandle:
        """One edit: the side memory installed by the first edit (single mode: every edit), later
        edits (sequential mode) written into the one already on the model."""
        layout = find_layout(model)
        memory = self._attached(model)
        if memory is None:
            self.check(model.config)
            layer = self._layer(layout)
            prefixes = self._context(model, tokenizer)
            forget, installed = self._forgetter()
            handle = EditHandle(model, [], modules=True, first_block=layer, restore_fn=forget)
            try:
                memory = self._install(model, layout, layer, prefixes)
                installed(memory)
            except BaseException:
                handle.restore()
                raise
            mask = memory.state.next_mask(self.hparams)
        else:
            state = memory.state
            mask = state.next_mask(self.hparams)
            snap = state.snapshot(mask)
            handle = EditHandle(model, [], modules=True, first_block=memory.module.layer,
                                restore_fn=lambda: state.restore(snap))
        try:
            handle.info.update(self._edit(model, tokenizer, layout, memory, case, mask))
        except BaseException:
            handle.restore()
            raise
        return handle

    def _edit(self, model, tokenizer, layout: ModelLayout, memory: _Attached, case: EditCase,
              mask: torch.Tensor) -> dict[str, Any]:
        hp, state = self.hparams, memory.state
        layer = memory.module.layer
        if state.count % hp.save_freq == 0:
            state.open_shard(mask)
        irrelevant, source = pick_irrelevant(case, self._pool(case.task), hp.irrelevant_count, hp.seed)
        device = state.device
        batch = build_batch(tokenizer, memory.prefixes, case, irrelevant, device)
        main = weight_out_in(layout.layers[layer].mlp_out).detach()
        trained = train_edit(model, layout, layer, memory.router, batch, state.shard, state.mask, main, hp)
        with torch.no_grad():
            state.shard[state.mask] = trained.delta[state.mask]
        state.record(trained.inside)
        shard = state.shards - 1
        events = state.finish_edit(hp)
        return {"layer": layer, "shard": shard, "edits": state.count, "steps": trained.steps,
                "loss": round(trained.nll + trained.act_loss, 6), "nll": round(trained.nll, 6),
                "act_loss": round(trained.act_loss, 6),
                "loss_start": None if trained.loss_start is None else round(trained.loss_start, 6),
                "act_score": round(trained.inside, 6),
                "irrelevant_score": None if trained.outside is None else round(trained.outside, 6),
                "irrelevant": source, **events, **self._router_reading(model, tokenizer, memory, case)}

    @torch.no_grad()
    def _router_reading(self, model, tokenizer, memory: _Attached, case: EditCase) -> dict[str, Any]:
        """What the router does with the bare edit prompt after the edit, at its last token (where
        the first target token is predicted): its scores, the threshold, the memory chosen."""
        prompt_ids, _ = encode_probe(tokenizer, case.prompt, case.target_new)
        device = memory.state.device
        router = memory.router
        router.trace = []
        try:
            model.base_model(input_ids=torch.tensor([prompt_ids], device=device), use_cache=False)
            seen = router.trace[-1]
        finally:
            router.trace = None
        score_m, score_s = seen["merged"][0, -1].item(), seen["shard"][0, -1].item()
        return {"router_score": round(max(score_m, score_s), 6), "threshold": round(seen["threshold"], 6),
                "routed": MEMORY_NAMES[int(seen["choice"][0, -1])]}

    # ---------------------------------------------------------------------------------------
    # Sequential state: the side memory's tensors and counters, the context texts
    # ---------------------------------------------------------------------------------------

    def sequential_state(self) -> dict[str, Any]:
        """The side memory's tensors (`shard`, `mask`, `merged`, `used`, `stored.<i>`) and, as
        JSON, its counters and router statistics, its layer and the context texts; {} while no
        side memory is on the model."""
        memory = self._memory
        if memory is None:
            return {}
        return {**memory.state.tensors(),
                "wise": {**memory.state.values(), "layer": memory.module.layer, "prefixes": list(memory.prefixes)}}

    def load_sequential_state(self, state: dict[str, Any]) -> None:
        if not state:
            self._pending = None
            return
        values = state.get("wise")
        tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        bad = [k for k in state if k != "wise" and k not in tensors]
        if not isinstance(values, dict) or bad or "shard" not in tensors:
            raise ValueError(f"{self.name}: not a WISE side memory state: {sorted(state)[:5]}")
        self._pending = (tensors, values)

    def reattach(self, model, tokenizer) -> EditHandle | None:
        """The loaded side memory back on the model, as it was saved; None when the state held none."""
        if self._pending is None:
            return None
        tensors, values = self._pending
        layout = find_layout(model)
        layer = values.get("layer")
        if not isinstance(layer, int) or not 0 <= layer < layout.num_layers:
            raise BenchError(f"{self.name}: the saved side memory's layer {layer} is not in this model")
        forget, installed = self._forgetter()
        handle = EditHandle(model, [], {"reattached": True, "layer": layer}, modules=True, first_block=layer,
                            restore_fn=forget)
        try:
            memory = self._install(model, layout, layer, list(values["prefixes"]))
            installed(memory)
            memory.state.load(tensors, values)
        except (ValueError, KeyError, TypeError) as exc:
            handle.restore()
            raise BenchError(f"{self.name}: the saved side memory is incomplete or does not fit this model: "
                             f"{exc!s}") from None
        except BaseException:
            handle.restore()
            raise
        handle.info["edits"] = memory.state.count
        self._pending = None
        return handle
