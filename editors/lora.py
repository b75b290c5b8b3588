"""`lora`: the edit as a LoRA adapter, trained on the case's target and injected with `peft`.

EasyEdit's LoRA baseline (`easyeditor/models/lora/`): low-rank adapters on the attention query
and value projections of every block (rank 8, alpha 32, dropout 0.1), trained with Adam
(lr 5e-3, 70 steps) on the teacher-forced NLL of the target tokens after the prompt. Here the
adapters are put into the model object itself (`peft.inject_adapter_in_model`: each targeted
projection is replaced by a `peft` LoRA layer wrapping it), so every evaluation path reads the
edited model as it is; only the adapter weights train, the base weights never change. The handle
snapshots the module tree before the injection and `restore()` takes the adapters out again.

Targets are roles, not module names (`target_modules`): `q`, `k`, `v` (attention inputs),
`attn_out`, `mlp_in`, `mlp_out`. The MLP roles come from `find_layout`; the attention roles from
one short probe of block 0 (`attention_roles`), so fused projections (GPT-2's `c_attn`, GPT-NeoX's
`query_key_value`) carry every role they compute. Sequential editing keeps training the one
adapter (docs/lora.md).
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import cast_adapter_dtype

from bench.core.cases import EditCase
from bench.core.errors import BenchError
from bench.core.hparams import check_hparams, param
from bench.core.layout import ModelLayout, _linear_dims, find_layout, is_transposed, text_config
from bench.core.replay import first_changed_block
from editors.base import EditHandle, Editor
from editors.ft import FineTune, FTHparams
from editors.vocab_loss import token_nll

ROLES = ("q", "k", "v", "attn_out", "mlp_in", "mlp_out")
ATTENTION_ROLES = ("q", "k", "v", "attn_out")
ADAPTER = "edit"  # the peft adapter name


@dataclass
class LoRAHparams:
    """rank, alpha, dropout: the adapters (scale alpha / rank; dropout on the adapter input while
    training, EasyEdit's 8, 32, 0.1); steps, lr, weight_decay: Adam on the adapter weights
    (EasyEdit's Llama setting: 70, 5e-3, 0); layers: the adapted blocks (empty = every block, as
    EasyEdit); target_modules: the projections adapted in each, as roles (ROLES; EasyEdit's
    q_proj and v_proj); min_loss: stop once the mean target NLL falls below it (EasyEdit's code
    has this rule, at 1e-3, commented out: 0 turns it off); seed: the adapters' initialisation
    and the dropout masks."""

    rank: int = param(8, ge=1, le=65536)
    alpha: float = param(32.0, gt=0)
    dropout: float = param(0.1, ge=0, lt=1)
    steps: int = param(70, ge=0, le=100000)
    lr: float = param(5e-3, gt=0)
    weight_decay: float = param(0.0, ge=0)
    layers: list[int] = param([], layer="index")
    target_modules: list[str] = param(["q", "v"], choices=ROLES)
    min_loss: float = param(1e-2, ge=0)
    seed: int = param(0, ge=0, le=4294967295)


# --------------------------------------------------------------------------------------------
# Target modules: roles found from the model's structure
# --------------------------------------------------------------------------------------------


class _ProbeDone(Exception):
    """Raised after block 0 to cut a probe's forward pass short."""


@torch.no_grad()
def _probe_block0(model, layout: ModelLayout, modules: dict, perturbed: str | None = None):
    """One forward pass of two tokens, cut after block 0: (names in call order, each module's
    output); with `perturbed`, that module's output at position 0 is shifted first."""
    order, outputs, hooks = [], {}, []

    def hook_for(name):
        def hook(_module, _args, out):
            order.append(name)
            if name == perturbed:
                gen = torch.Generator().manual_seed(0)
                shift = torch.randn(out.shape[-1], generator=gen).to(out.device, out.dtype)
                out = out.clone()
                out[:, 0] += shift * (out[:, 0].abs().mean() + 1)
            outputs[name] = out.detach()
            return out
        return hook

    def stop(*_):
        raise _ProbeDone

    hooks = [m.register_forward_hook(hook_for(n)) for n, m in modules.items()]
    hooks.append(layout.blocks[0].register_forward_hook(stop))
    device = next(model.parameters()).device
    try:
        layout.decoder(input_ids=torch.tensor([[1, 2]], device=device), use_cache=False)
    except _ProbeDone:
        pass
    finally:
        for h in hooks:
            h.remove()
    return order, outputs


def attention_roles(model, layout: ModelLayout) -> dict[str, list[str]]:
    """Role -> names (relative to a block) of the attention projections of block 0 carrying it.

    The candidates are the block's linear maps other than its MLP projections. The output
    projection is the last one called. Each other one is classified by shifting its output at
    position 0 (of two) and watching the output projection: a value changes position 0 itself; a key changes only
    position 1 (which attends to position 0); a query at position 0 changes nothing (causal
    attention over one position is the identity of its value). A fused projection computes
    several roles: a lone input projection carries q, k and v; a missing q is computed with k,
    a missing k with v."""
    mlp = {id(m) for m in [*layout.layers[0].mlp_in, layout.layers[0].mlp_out]}
    modules = {n: m for n, m in layout.blocks[0].named_modules() if _linear_dims(m) and id(m) not in mlp}
    order, base = _probe_block0(model, layout, modules)
    called = list(dict.fromkeys(order))
    if len(called) < 2:
        raise BenchError(f"cannot find the attention projections of {type(model).__name__} block 0")
    out, inputs = called[-1], called[:-1]
    found: dict[str, list[str]] = {"q": [], "k": [], "v": [], "attn_out": [out]}
    for name in inputs:
        _, shifted = _probe_block0(model, layout, modules, perturbed=name)
        diff = (shifted[out].float() - base[out].float()).abs()
        tol = 1e-3 * (base[out].float().abs().max().item() + 1e-6)
        role = "v" if diff[:, 0].max() > tol else ("k" if diff[:, 1].max() > tol else "q")
        found[role].append(name)
    if not found["v"]:
        raise BenchError(f"cannot find the attention value projection of {type(model).__name__}")
    if len(inputs) == 1:
        found["q"] = found["k"] = found["v"]
    found["k"] = found["k"] or found["v"]
    found["q"] = found["q"] or found["k"]
    return found


def target_names(model, layout: ModelLayout, roles: list[str], layers: list[int]) -> list[str]:
    """Qualified names of the modules the adapters go on: each role in each of `layers`."""
    relative = attention_roles(model, layout) if set(roles) & set(ATTENTION_ROLES) else {}
    qualified = {id(m): n for n, m in model.named_modules()}
    names = []
    for i in layers:
        block = f"{layout.blocks_name}.{i}"
        for role in roles:
            if role == "mlp_in":
                names += [qualified[id(m)] for m in layout.layers[i].mlp_in]
            elif role == "mlp_out":
                names.append(layout.layers[i].mlp_out_name)
            else:
                names += [f"{block}.{rel}" for rel in relative[role]]
    names = list(dict.fromkeys(names))
    for name in names:
        if _linear_dims(model.get_submodule(name)) is None:
            raise BenchError(f"{name} is not a linear projection: blocks differ from block 0")
    return names


# --------------------------------------------------------------------------------------------
# The adapter on the model
# --------------------------------------------------------------------------------------------


@dataclass
class _Adapter:
    """The adapter this editor put on `model`: its LoRA layers by module name."""

    model: torch.nn.Module
    layers: dict[str, LoraLayer]
    first_block: int | None
    blocks_name: str

    def attached(self, model) -> bool:
        return self.model is model and all(_submodule(model, n) is m for n, m in self.layers.items())

    def params(self) -> list[torch.nn.Parameter]:
        return [p for m in self.layers.values() for d in (m.lora_A, m.lora_B) for p in d[ADAPTER].parameters()]

    def targets(self) -> dict[str, list]:
        """The adapted modules as facts for the case record: names inside a block, block indices."""
        split = [n[len(self.blocks_name) + 1:].split(".", 1) for n in self.layers]
        return {"targets": sorted({rest for _, rest in split}), "layers": sorted({int(i) for i, _ in split})}

    def set_training(self, mode: bool | None) -> None:
        """Train or eval mode for the adapter's own modules (its dropout), never the base layer's;
        None: the base layer's mode (eval, where the model is)."""
        for layer in self.layers.values():
            base = layer.get_base_layer()
            flag = base.training if mode is None else mode
            layer.training = flag
            for child in layer.children():
                if child is not base:
                    child.train(flag)


def _weights_restorer(params: list[torch.nn.Parameter]):
    """A function putting `params` back to their present values."""
    saved = [(p, p.detach().clone()) for p in params]

    @torch.no_grad()
    def restore() -> None:
        for p, value in saved:
            p.copy_(value)
    return restore


def _submodule(model, name: str):
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


@contextmanager
def _seeded(model, seed: int):
    """The global RNG seeded with `seed` inside, as it was outside."""
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


# FT-M's loss (editors/ft.py, objective target_masked): the teacher-forced target after the
# prompt, the NLL read at every target token. Its `_example` gives the ids fed and the
# (position, target token) pairs read.
_FT_M = FineTune(FTHparams(objective="target_masked"))


# --------------------------------------------------------------------------------------------
# The editor
# --------------------------------------------------------------------------------------------


class LoRA(Editor):
    """A LoRA adapter per edit (single mode), or one adapter trained on every edit in turn
    (sequential mode): its weights are the editor's sequential state."""

    name = "lora"
    Hparams = LoRAHparams
    kinds = ("modules",)
    batch_edits = True  # apply_batch trains the adapter on the batch's cases together

    def __init__(self, hparams=None):
        super().__init__(hparams)
        self._adapter: _Adapter | None = None
        self._pending: dict[str, torch.Tensor] | None = None  # loaded state, until reattach

    def check(self, config) -> None:
        check_hparams(self.hparams, text_config(config).num_hidden_layers, where=self.name)
        if not self.hparams.target_modules:
            raise BenchError(f"{self.name}: hyperparameter target_modules must name at least one of "
                             f"{', '.join(ROLES)}")

    def apply(self, model, tokenizer, case: EditCase) -> EditHandle:
        handle = self._edit(model, tokenizer, [case])
        handle.info.update(handle.info.pop("cases")[0])
        return handle

    def apply_batch(self, model, tokenizer, cases: list[EditCase]) -> EditHandle:
        """The cases' mean loss trains the adapter (the one already on the model, else a new one);
        `info["cases"]` holds each case's final loss."""
        return self._edit(model, tokenizer, cases)

    def _edit(self, model, tokenizer, cases: list[EditCase]) -> EditHandle:
        adapter = self._adapter if self._adapter is not None and self._adapter.attached(model) else None
        if adapter is None:
            self.check(model.config)
            hp, layout = self.hparams, find_layout(model)
            names = target_names(model, layout, hp.target_modules, hp.layers or list(range(layout.num_layers)))
            handle = EditHandle(model, [], modules=True, first_block=first_changed_block(layout, names),
                                restore_fn=self._forget)
            try:
                adapter = self._inject(model, layout, names, hp.rank)
            except BaseException:
                handle.restore()
                raise
        else:  # sequential: the adapter of the earlier edits trains on
            handle = EditHandle(model, [], modules=True, first_block=adapter.first_block,
                                restore_fn=_weights_restorer(adapter.params()))
        try:
            handle.info.update(self._train(model, tokenizer, cases, adapter))
        except BaseException:
            handle.restore()
            raise
        return handle

    def _forget(self) -> None:
        self._adapter = None

    def _inject(self, model, layout: ModelLayout, names: list[str], rank: int) -> _Adapter:
        """LoRA layers on the modules `names` of `model`, in place, in eval mode (float32
        weights whatever the model's dtype)."""
        hp = self.hparams
        config = LoraConfig(r=rank, lora_alpha=hp.alpha, lora_dropout=hp.dropout, target_modules=names,
                            fan_in_fan_out=is_transposed(model.get_submodule(names[0])), bias="none")
        with _seeded(model, hp.seed), warnings.catch_warnings():
            # peft sets fan_in_fan_out per module (GPT-2's Conv1D stores its weight transposed).
            warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
            inject_adapter_in_model(config, model, adapter_name=ADAPTER)
        cast_adapter_dtype(model, ADAPTER)  # float32 adapters on a bfloat16 model, as get_peft_model does
        layers = {n: model.get_submodule(n) for n in names}
        if not all(isinstance(m, LoraLayer) for m in layers.values()):
            raise BenchError(f"peft did not put a LoRA layer on every one of {names}")
        self._adapter = _Adapter(model, layers, first_changed_block(layout, names), layout.blocks_name)
        self._adapter.set_training(None)
        return self._adapter

    def _train(self, model, tokenizer, cases: list[EditCase], adapter: _Adapter) -> dict:
        """Adam on the adapter weights against the cases' mean target NLL; the facts of the run."""
        hp = self.hparams
        device = next(model.parameters()).device
        examples = [_FT_M._example(tokenizer, c) for c in cases]
        n, width = len(examples), max(len(ids) for ids, _ in examples)
        ids = torch.zeros((n, width), dtype=torch.long, device=device)
        mask = torch.zeros((n, width), dtype=torch.long, device=device)
        for b, (fed, _) in enumerate(examples):
            ids[b, :len(fed)] = torch.tensor(fed, device=device)
            mask[b, :len(fed)] = 1  # right padding: real tokens keep their unbatched positions
        rows, cols, targets = torch.tensor(
            [(b, pos, tok) for b, (_, reads) in enumerate(examples) for pos, tok in reads], device=device).T
        counts = torch.bincount(rows, minlength=n).float()

        def per_case_loss() -> torch.Tensor:
            hidden = model.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            nll = token_nll(model, hidden[rows, cols], targets).float()
            return torch.zeros(n, device=device).index_add(0, rows, nll) / counts

        params = adapter.params()
        opt = torch.optim.Adam(params, lr=hp.lr, weight_decay=hp.weight_decay)
        steps, first = 0, None
        adapter.set_training(True)
        try:
            with _seeded(model, hp.seed), torch.enable_grad():
                for _ in range(hp.steps):
                    opt.zero_grad(set_to_none=True)
                    loss = per_case_loss().mean()
                    first = loss.item() if first is None else first
                    if hp.min_loss > 0 and loss.item() < hp.min_loss:
                        break
                    loss.backward()
                    opt.step()
                    steps += 1
        finally:
            adapter.set_training(None)
            for p in params:
                p.grad = None
        with torch.no_grad():
            final = per_case_loss().tolist()
        return {"steps": steps, "loss_start": None if first is None else round(first, 6),
                "loss": round(sum(final) / n, 6), "adapter_params": sum(p.numel() for p in params),
                **adapter.targets(), "cases": [{"loss": round(v, 6)} for v in final]}

    # ----------------------------------------------------------------------------------------
    # Sequential state: the adapter's weights
    # ----------------------------------------------------------------------------------------

    def sequential_state(self) -> dict[str, torch.Tensor]:
        """The adapter's weights by peft's state-dict names (`<module>.lora_A.weight`, ...); none
        while no adapter is on the model."""
        if self._adapter is None:
            return {}
        state = get_peft_model_state_dict(self._adapter.model, adapter_name=ADAPTER)
        return {k: v.detach().clone() for k, v in state.items()}

    def load_sequential_state(self, state: dict) -> None:
        bad = [k for k in state if not k.endswith((".lora_A.weight", ".lora_B.weight"))
               or not isinstance(state[k], torch.Tensor)]
        if bad:
            raise ValueError(f"{self.name}: not LoRA adapter weights: {sorted(bad)[:3]}")
        self._pending = dict(state) or None

    def reattach(self, model, tokenizer) -> EditHandle | None:
        """The loaded adapter back on the model, with its weights; None when the state held none."""
        if self._pending is None:
            return None
        state, layout = self._pending, find_layout(model)
        names = sorted({k.rsplit(".lora_", 1)[0] for k in state})
        if len(state) != 2 * len(names):
            raise BenchError(f"{self.name}: the saved adapter lacks a lora_A or lora_B weight")
        ranks = {state[f"{n}.lora_A.weight"].shape[0] for n in names}
        if ranks != {self.hparams.rank}:
            raise BenchError(f"{self.name}: the saved adapter (rank {sorted(ranks)}) does not match "
                             f"rank {self.hparams.rank}; resume with the run's own hyperparameters")
        missing = [n for n in names if _submodule(model, n) is None]
        if missing:
            raise BenchError(f"{self.name}: the saved adapter's modules are not in this model: {missing[:3]}")
        handle = EditHandle(model, [], modules=True, first_block=first_changed_block(layout, names),
                            restore_fn=self._forget)
        try:
            adapter = self._inject(model, layout, names, self.hparams.rank)
            result = set_peft_model_state_dict(model, state, adapter_name=ADAPTER)
            if result.unexpected_keys:
                raise BenchError(f"{self.name}: saved adapter weights fit no module: {result.unexpected_keys[:3]}")
        except BaseException:
            handle.restore()
            raise
        handle.info.update({"reattached": True, "adapter_params": sum(p.numel() for p in adapter.params()),
                            **adapter.targets()})
        self._pending = None
        return handle
