"""The `grace` editor: one codebook adaptor wrapping one MLP output projection (docs/grace.md).

Single mode: the first edit wraps the projection (the handle, made before, snapshots the module
tree; restore takes the adaptor out again). Sequential mode: the adaptor stays and every edit
places its key by the rules and trains its entry's value; each later edit's handle
(`CodebookHandle`) undoes its own codebook change. The codebook is the editor's sequential
state."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from bench.core.cases import EditCase
from bench.core.errors import BenchError
from bench.core.hparams import check_hparams
from bench.core.layout import ModelLayout, _linear_dims, find_layout, text_config
from editors.base import EditHandle, Editor
from editors.frozen_prefix import frozen_prefix
from editors.ft import FineTune, FTHparams
from editors.grace.adaptor import GraceAdaptor
from editors.grace.codebook import Change, Codebook
from editors.grace.hparams import GraceHparams, default_layer
from editors.vocab_loss import token_nll

# FT-M's teacher-forced target examples (editors/ft.py): the prompt and the target but its last
# token fed, the NLL read at every target token. The reference's loss is the same (its labels
# mask the prompt); its key position, the last prompt token, is the first position read.
_FT_M = FineTune(FTHparams(objective="target_masked"))


@dataclass
class _Attached:
    """The adaptor this editor put on `model`, where, and the layout its training runs on (the
    block's MLP output projection is the adaptor: frozen_prefix's stub calls it)."""

    model: torch.nn.Module
    adaptor: GraceAdaptor
    slot: str  # qualified name of the wrapped projection
    block: int
    layout: ModelLayout

    def attached(self, model) -> bool:
        try:
            return self.model is model and model.get_submodule(self.slot) is self.adaptor
        except AttributeError:
            return False


class CodebookHandle(EditHandle):
    """The handle of an edit made on an adaptor already in place (sequential mode): it changed
    the adaptor's codebook and nothing else of the module tree, and its restore is the
    codebook's undo record. No snapshot of the tree is taken (about 0.9 MB per edit on
    SmolLM2-135M, kept for every edit of a sequential run); the handle of the edit that
    installed the adaptor holds the snapshot that takes it out again."""

    def __init__(self, model, block: int, restore_fn: Callable[[], None]):
        super().__init__(model, [], first_block=block, restore_fn=restore_fn)

    @property
    def kinds(self) -> tuple[str, ...]:
        return ("modules",)

    def reusable_blocks(self, layout) -> int:
        return min(layout.num_layers, self.first_block)


class Grace(Editor):
    """General Retrieval Adaptors for Continual Editing (Hartvigsen et al., 2023): a codebook of
    keys, values and deferral radii at one layer; base weights never change."""

    name = "grace"
    Hparams = GraceHparams
    kinds = ("modules",)

    def __init__(self, hparams=None):
        super().__init__(hparams)
        self._att: _Attached | None = None
        self._pending: dict | None = None  # loaded sequential state, until reattach

    @classmethod
    def default_hparams(cls, config) -> GraceHparams:
        return GraceHparams(layer=default_layer(text_config(config).num_hidden_layers))

    def _block(self, model) -> int:
        """The wrapped block, after checking every hyperparameter against this model."""
        n_layers = text_config(model.config).num_hidden_layers
        check_hparams(self.hparams, n_layers, where=self.name)
        return self.hparams.layer if self.hparams.layer is not None else default_layer(n_layers)

    # ----------------------------------------------------------------------------------------
    # The adaptor on the model
    # ----------------------------------------------------------------------------------------

    def _install(self, model, layout: ModelLayout, block: int, codebook: Codebook | None) -> _Attached:
        """Wrap block `block`'s MLP output projection in an adaptor holding `codebook` (an empty
        one for None)."""
        bm = layout.layers[block]
        dims = _linear_dims(bm.mlp_out)
        if dims is None:
            raise BenchError(f"{self.name}: {bm.mlp_out_name} is not a linear projection")
        device = next(bm.mlp_out.parameters()).device
        if codebook is None:
            codebook = Codebook(dims[0], dims[1], device)
        elif (codebook.key_dim, codebook.value_dim) != dims:
            raise BenchError(f"{self.name}: the saved codebook ({codebook.key_dim} -> {codebook.value_dim}) "
                             f"does not fit {bm.mlp_out_name} ({dims[0]} -> {dims[1]})")
        adaptor = GraceAdaptor(bm.mlp_out, block, codebook)
        adaptor.train(bm.mlp_out.training)
        parent, _, attr = bm.mlp_out_name.rpartition(".")
        setattr(model.get_submodule(parent), attr, adaptor)
        layers = [replace(b, mlp_out=adaptor) if k == block else b for k, b in enumerate(layout.layers)]
        self._att = _Attached(model, adaptor, bm.mlp_out_name, block, replace(layout, layers=layers))
        return self._att

    def _forget(self, att: _Attached) -> None:
        if self._att is att:
            self._att = None

    def _attached(self, model) -> _Attached | None:
        return self._att if self._att is not None and self._att.attached(model) else None

    # ----------------------------------------------------------------------------------------
    # One edit
    # ----------------------------------------------------------------------------------------

    def apply(self, model, tokenizer, case: EditCase) -> EditHandle:
        """The case's key placed in the codebook (the adaptor installed first if this model has
        none of this editor's) and its entry's value trained; the handle undoes both."""
        undo: list[Callable[[], None]] = []

        def restore_fn() -> None:
            for step in reversed(undo):
                step()

        att = self._attached(model)
        if att is None:
            block = self._block(model)
            layout = find_layout(model)
            handle = EditHandle(model, [], modules=True, first_block=block, restore_fn=restore_fn)
            try:
                att = self._install(model, layout, block, None)
            except BaseException:
                handle.restore()
                raise
            undo.append(lambda: self._forget(att))
        else:
            handle = CodebookHandle(model, att.block, restore_fn)
        try:
            handle.info.update(self._edit(model, tokenizer, case, att, undo))
        except BaseException:
            handle.restore()
            raise
        return handle

    def _edit(self, model, tokenizer, case: EditCase, att: _Attached, undo: list) -> dict:
        """Read the key (one pass, which frozen_prefix keeps for the training steps), place it by
        the rules (its undo appended to `undo` at once), train the entry's value; the facts."""
        hp, book = self.hparams, att.adaptor.codebook
        fed, reads = _FT_M._example(tokenizer, case)
        device = next(model.parameters()).device
        ids = torch.tensor([fed], device=device)
        positions = torch.tensor([p for p, _ in reads], device=device)
        targets = torch.tensor([t for _, t in reads], device=device)
        key_pos = reads[0][0]  # the edit prompt's last token
        captured: dict[str, torch.Tensor] = {}

        def capture(_module, args):
            captured.setdefault("x", args[0].detach())

        hook = att.adaptor.register_forward_pre_hook(capture)
        try:
            with frozen_prefix(model, att.layout, att.block, input_ids=ids):
                hook.remove()
                key = captured["x"][0, key_pos]
                change = book.update(key, tuple(targets.tolist()), hp.eps, hp.eps_expand,
                                     init=lambda i: self._initial_value(att.adaptor, key, i))
                undo.append(lambda: book.undo(change))
                trained = self._train(model, att.adaptor, change.entry, ids, positions, targets)
        finally:
            hook.remove()
        return self._info(book, change, att.block, trained)

    def _initial_value(self, adaptor: GraceAdaptor, key: torch.Tensor, entry: int) -> torch.Tensor:
        """A fresh value for entry `entry`: uniform in [0, 1) drawn with seed + entry (`cold`), or
        the projection's own output at the key (`warm`)."""
        if self.hparams.val_init == "warm":
            with torch.no_grad():
                weight = next(adaptor.layer.parameters())
                return adaptor.layer(key[None].to(weight.dtype))[0].float()
        gen = torch.Generator().manual_seed(self.hparams.seed + entry)
        return torch.rand(adaptor.codebook.value_dim, generator=gen)

    def _train(self, model, adaptor: GraceAdaptor, entry: int, ids, positions, targets) -> dict:
        """Adam on entry `entry`'s value against the mean target NLL (inside frozen_prefix: only
        the blocks from the adaptor's up run); the value is written into the codebook."""
        hp = self.hparams
        value = adaptor.codebook.values[entry].clone().requires_grad_(True)
        opt = torch.optim.Adam([value], lr=hp.lr)

        def loss() -> torch.Tensor:
            hidden = model.base_model(input_ids=ids).last_hidden_state
            return token_nll(model, hidden[0, positions], targets).float().mean()

        steps, first = 0, None
        adaptor.trainee = (entry, value)
        try:
            with torch.enable_grad():
                for _ in range(hp.steps):
                    opt.zero_grad(set_to_none=True)
                    current = loss()
                    first = current.item() if first is None else first
                    if hp.min_loss > 0 and current.item() < hp.min_loss:
                        break
                    current.backward()
                    opt.step()
                    steps += 1
            with torch.no_grad():
                final = loss().item()
        finally:
            adaptor.trainee = None
        adaptor.codebook.set_value(entry, value.detach())
        return {"steps": steps, "loss_start": None if first is None else round(first, 6), "loss": round(final, 6)}

    @staticmethod
    def _info(book: Codebook, change: Change, block: int, trained: dict) -> dict:
        return {"action": change.action, "codebook_size": book.size, "entry": change.entry,
                "distance": None if change.distance is None else round(change.distance, 6),
                "radius": round(float(book.radii[change.entry]), 6), **trained, "layer": block}

    # ----------------------------------------------------------------------------------------
    # Sequential state: the codebook
    # ----------------------------------------------------------------------------------------

    def sequential_state(self) -> dict:
        """keys, values, radii (tensors) and `codebook` (JSON: the block, each entry's answer as
        token ids); none while no adaptor is on a model."""
        if self._att is None:
            return {}
        book = self._att.adaptor.codebook
        return {**book.tensors(), "codebook": {"layer": self._att.block, "labels": [list(x) for x in book.labels]}}

    def load_sequential_state(self, state: dict) -> None:
        if not state:
            self._pending = None
            return
        tensors = ("keys", "values", "radii")
        meta = state.get("codebook")
        if set(state) != {*tensors, "codebook"} or not all(isinstance(state[k], torch.Tensor) for k in tensors) \
                or not isinstance(meta, dict) or not {"layer", "labels"} <= set(meta):
            raise ValueError(f"{self.name}: not a GRACE codebook: {sorted(state)}")
        self._pending = dict(state)

    def reattach(self, model, tokenizer) -> EditHandle | None:
        """The loaded codebook back on the model, in a new adaptor; None when the state held none."""
        if self._pending is None:
            return None
        state, block = self._pending, self._block(model)
        if state["codebook"]["layer"] != block:
            raise BenchError(f"{self.name}: the saved codebook sits at block {state['codebook']['layer']}, the "
                             f"hyperparameters say {block}; resume with the run's own hyperparameters")
        layout = find_layout(model)
        device = next(layout.layers[block].mlp_out.parameters()).device
        try:
            book = Codebook.from_tensors(state["keys"], state["values"], state["radii"],
                                         state["codebook"]["labels"], device)
        except ValueError as exc:
            raise BenchError(f"{self.name}: {exc}") from None
        forget: list[_Attached] = []
        handle = EditHandle(model, [], modules=True, first_block=block,
                            restore_fn=lambda: [self._forget(a) for a in forget])
        try:
            forget.append(self._install(model, layout, block, book))
        except BaseException:
            handle.restore()
            raise
        handle.info.update({"reattached": True, "codebook_size": book.size, "layer": block})
        self._pending = None
        return handle
