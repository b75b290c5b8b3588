"""Shared machinery of the meta-learned gradient editors (`mend`, `instructedit`).

Pieces, in the order an edit uses them:

* `select_targets`   - which weights are edited (MLP projections of chosen blocks), with their
                       storage layout (GPT-2's Conv1D keeps weights as (in, out));
* `edit_factors`     - one forward and one backward pass on the edit example that return, per
                       edited weight, the rank-one factors of its fine-tuning gradient: the layer
                       inputs u_t and the loss gradients at its outputs d_t, so that
                       dL/dW = sum_t d_t u_t^T in (out, in) terms. No weight gradient is formed;
* `EditorNetwork`    - one small network per weight shape that maps normalised (u, d) to new
                       factors, plus one learned step size per weight: dW = -lr_w sum_t d~_t u~_t^T;
* `MetaTrainer`      - trains the networks on batches of edits (NLL of the new target on the edit
                       and rephrase prompts after the edit, KL to the unedited model on locality
                       prompts), with validation, early stopping, a time budget and a progress bar;
* checkpoints        - safetensors (tensors) + JSON (everything else); loading never unpickles.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from bench.cases import EditCase
from bench.errors import BenchError
from bench.metrics import encode_probe
from bench.models import is_transposed, output_logits

CHECKPOINT_FORMAT = "instructedit-bench/meta-editor/v1"


# --------------------------------------------------------------------------------------------
# Edited weights
# --------------------------------------------------------------------------------------------


@dataclass
class EditTarget:
    name: str  # qualified parameter name in the model
    base_name: str  # the same parameter's name inside model.base_model (for functional_call)
    module: nn.Module
    transposed: bool  # weight stored (in, out) (GPT-2 Conv1D)
    out_dim: int
    in_dim: int
    cond: int = 0  # index of this weight among the edited weights of the same shape

    @property
    def shape_key(self) -> str:
        return f"out{self.out_dim}_in{self.in_dim}"


def select_targets(model: nn.Module, layout, layers: list[int], modules: list[str]) -> list[EditTarget]:
    """The edited weights: for each block in `layers`, its `mlp_in` projections and/or `mlp_out`."""
    bad = [i for i in layers if not 0 <= i < layout.num_layers]
    if bad:
        raise BenchError(f"layers {bad} out of range for a model with {layout.num_layers} layers")
    unknown = [m for m in modules if m not in ("mlp_in", "mlp_out")]
    if unknown or not modules:
        raise BenchError(f"modules must be a non-empty list of mlp_in, mlp_out; got {modules}")
    by_id = {id(p): n for n, p in model.named_parameters()}
    base_by_id = {id(p): n for n, p in model.base_model.named_parameters()}
    out: list[EditTarget] = []
    for i in layers:
        block = layout.layers[i]
        mods = []
        if "mlp_in" in modules:
            mods += list(block.mlp_in)
        if "mlp_out" in modules:
            mods.append(block.mlp_out)
        for mod in mods:
            w = mod.weight
            transposed = is_transposed(mod)
            out_dim, in_dim = (w.shape[1], w.shape[0]) if transposed else (w.shape[0], w.shape[1])
            if id(w) not in base_by_id:
                raise BenchError("edited weight is not inside model.base_model")
            out.append(EditTarget(name=by_id[id(w)], base_name=base_by_id[id(w)], module=mod,
                                  transposed=transposed, out_dim=out_dim, in_dim=in_dim))
    counts: dict[str, int] = {}
    for t in out:
        t.cond = counts.get(t.shape_key, 0)
        counts[t.shape_key] = t.cond + 1
    return out


# --------------------------------------------------------------------------------------------
# Batches of teacher-forced probes
# --------------------------------------------------------------------------------------------


@dataclass
class ProbeBatch:
    """Right-padded prompt+answer sequences and where each answer token is predicted."""

    ids: torch.Tensor  # (B, T)
    mask: torch.Tensor  # (B, T)
    rows: torch.Tensor  # (K,) sequence of each answer token
    cols: torch.Tensor  # (K,) position that predicts it
    targets: torch.Tensor  # (K,) the answer token
    seq_of_token: list[int]  # python copy of rows
    lengths: list[int]  # real length of each sequence


def encode_batch(tokenizer, probes: list[tuple[str, str]], device) -> ProbeBatch:
    encoded = [encode_probe(tokenizer, p, a) for p, a in probes]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    width = max(len(p) + len(a) for p, a in encoded)
    ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    rows, cols, targets, lengths = [], [], [], []
    for i, (p_ids, a_ids) in enumerate(encoded):
        seq = p_ids + a_ids
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        lengths.append(len(seq))
        for j, tok in enumerate(a_ids):
            rows.append(i)
            cols.append(len(p_ids) - 1 + j)
            targets.append(tok)
    return ProbeBatch(ids=ids.to(device), mask=mask.to(device),
                      rows=torch.tensor(rows, device=device), cols=torch.tensor(cols, device=device),
                      targets=torch.tensor(targets, device=device), seq_of_token=rows,
                      lengths=lengths)


def answer_logprobs(model: nn.Module, batch: ProbeBatch, params: dict | None = None) -> torch.Tensor:
    """log-softmax over the vocabulary at every answer position, (K, V); `params` (names inside
    model.base_model -> tensors) replace the base model's weights for this call only."""
    base = model.base_model
    kwargs = {"input_ids": batch.ids, "attention_mask": batch.mask}
    if params:
        hidden = torch.func.functional_call(base, params, args=(), kwargs=kwargs, strict=False)
    else:
        hidden = base(**kwargs)
    hidden = hidden.last_hidden_state
    picked = hidden[batch.rows, batch.cols]
    return torch.log_softmax(output_logits(model, picked).float(), dim=-1)


def per_sequence_mean(values: torch.Tensor, batch: ProbeBatch, n_seq: int) -> torch.Tensor:
    """Mean of per-token values within each sequence, (n_seq,)."""
    sums = torch.zeros(n_seq, device=values.device, dtype=values.dtype).index_add(0, batch.rows, values)
    counts = torch.zeros(n_seq, device=values.device, dtype=values.dtype).index_add(
        0, batch.rows, torch.ones_like(values))
    return sums / counts.clamp_min(1)


# --------------------------------------------------------------------------------------------
# Gradient factors
# --------------------------------------------------------------------------------------------


def edit_factors(model: nn.Module, tokenizer, targets: list[EditTarget], prompt: str,
                 answer: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Rank-one factors of d NLL(answer | prompt) / dW for every target weight.

    The loss is the mean NLL of the answer tokens, teacher forced. A forward hook on each edited
    projection records its input u (T, in) and adds a zero "probe" tensor to its output; the
    gradient of the loss with respect to that probe is d (T, out). Positions that cannot reach the
    loss (the last token) are dropped. Returns name -> (u, d), both float32 and detached, with
    dL/dW (out, in) = d^T u."""
    device = next(model.parameters()).device
    batch = encode_batch(tokenizer, [(prompt, answer)], device)
    n = batch.lengths[0] - 1  # positions 0 .. n-1 can influence the answer tokens
    inputs: dict[str, torch.Tensor] = {}
    probes: dict[str, torch.Tensor] = {}
    handles = []

    def make_hook(name):
        def hook(module, args, output):
            inputs[name] = args[0].detach()
            probe = torch.zeros_like(output, requires_grad=True)
            probes[name] = probe
            return output + probe
        return hook

    try:
        for t in targets:
            handles.append(t.module.register_forward_hook(make_hook(t.name)))
        with torch.enable_grad():
            logp = answer_logprobs(model, batch)
            loss = -logp.gather(1, batch.targets[:, None]).mean()
            names = [t.name for t in targets]
            grads = torch.autograd.grad(loss, [probes[nm] for nm in names], allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for t, g in zip(targets, grads):
        u = inputs[t.name][0, :n].float()
        d = torch.zeros(n, t.out_dim, device=device) if g is None else g[0, :n].float()
        out[t.name] = (u, d)
    return out


# --------------------------------------------------------------------------------------------
# The editor network
# --------------------------------------------------------------------------------------------


class RunningNorm(nn.Module):
    """Per-dimension standardisation with statistics accumulated (Welford) while training."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(dim, dtype=torch.float64))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = x.detach().double()
        n_b = x.shape[0]
        if n_b == 0:
            return
        mean_b = x.mean(0)
        m2_b = ((x - mean_b) ** 2).sum(0)
        n_a = self.count.clone()
        total = n_a + n_b
        delta = mean_b - self.mean
        self.mean += delta * (n_b / total)
        self.m2 += m2_b + delta ** 2 * (n_a * n_b / total)
        self.count.fill_(total)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.count.item() < 2:
            return x
        std = (self.m2 / (self.count - 1)).clamp_min(0).sqrt().float()
        return (x - self.mean.float()) / (std + 1e-7)


class LowRankResidual(nn.Module):
    """x + act(scale_c * (B A x + b) + shift_c): a rank-r linear map with a residual connection.
    B starts at zero, so the layer starts as the identity; scale/shift are per conditioning index
    (which of the weights sharing this network is being edited)."""

    def __init__(self, dim: int, rank: int, n_cond: int, relu: bool):
        super().__init__()
        self.a = nn.Parameter(torch.randn(rank, dim) / math.sqrt(dim))
        self.b = nn.Parameter(torch.zeros(dim, rank))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.cond_scale = nn.Parameter(torch.ones(n_cond, dim))
        self.cond_shift = nn.Parameter(torch.zeros(n_cond, dim))
        self.relu = relu

    def forward(self, x: torch.Tensor, cond: int) -> torch.Tensor:
        h = (x @ self.a.T) @ self.b.T + self.bias
        h = h * self.cond_scale[cond] + self.cond_shift[cond]
        if self.relu:
            h = F.relu(h)
        return x + h


class FactorNet(nn.Module):
    """Maps the concatenated, normalised factors [u, d] of one weight shape to [u~, d~]."""

    def __init__(self, in_dim: int, out_dim: int, rank: int, n_hidden: int, n_cond: int):
        super().__init__()
        dim = in_dim + out_dim
        self.in_dim, self.out_dim = in_dim, out_dim
        self.norm = RunningNorm(dim)
        rank = max(1, min(rank, dim))
        self.layers = nn.ModuleList([LowRankResidual(dim, rank, n_cond, relu=i < n_hidden)
                                     for i in range(n_hidden + 1)])

    def forward(self, u: torch.Tensor, d: torch.Tensor, cond: int, update_stats: bool = False):
        x = torch.cat([u, d], dim=-1)
        if update_stats:
            self.norm.update(x)
        x = self.norm(x)
        for layer in self.layers:
            x = layer(x, cond)
        return x[:, : self.in_dim], x[:, self.in_dim:]


class EditorNetwork(nn.Module):
    """One FactorNet per weight shape, shared by the weights of that shape, and one learned step
    size per edited weight."""

    def __init__(self, targets: list[EditTarget], rank: int, n_hidden: int, edit_lr: float):
        super().__init__()
        self.target_names = [t.name for t in targets]
        shapes: dict[str, tuple[int, int, int]] = {}
        for t in targets:
            _, _, n = shapes.get(t.shape_key, (t.in_dim, t.out_dim, 0))
            shapes[t.shape_key] = (t.in_dim, t.out_dim, n + 1)
        self.nets = nn.ModuleDict({k: FactorNet(i, o, rank, n_hidden, n)
                                   for k, (i, o, n) in sorted(shapes.items())})
        self.edit_lrs = nn.Parameter(torch.full((len(targets),), float(edit_lr)))

    def deltas(self, targets: list[EditTarget], factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
               update_stats: bool = False) -> dict[str, torch.Tensor]:
        """name -> dW in (out, in) terms."""
        out = {}
        for i, t in enumerate(targets):
            u, d = factors[t.name]
            u2, d2 = self.nets[t.shape_key](u, d, t.cond, update_stats=update_stats)
            out[t.name] = -self.edit_lrs[i] * (d2.T @ u2)
        return out


def stored_delta(t: EditTarget, delta_out_in: torch.Tensor) -> torch.Tensor:
    """dW in the weight's storage layout."""
    return delta_out_in.T if t.transposed else delta_out_in


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def split_train_val(cases: list[EditCase], n_val: int, salt: str) -> tuple[list[EditCase], list[EditCase]]:
    """A deterministic held-out part of a task's training split (by hash of case id)."""
    order = sorted(cases, key=lambda c: hashlib.sha256(f"{salt}:{c.case_id}".encode()).hexdigest())
    n_val = min(n_val, max(0, len(cases) - 1))
    val_ids = {c.case_id for c in order[:n_val]}
    return [c for c in cases if c.case_id not in val_ids], [c for c in cases if c.case_id in val_ids]


class MetaTrainer:
    """Trains an EditorNetwork on edits drawn from several tasks (balanced across tasks).

    `prepare_case` turns a raw training case into the one the network sees (InstructEdit wraps
    the edit and rephrase prompts in the task's instruction here; locality is never wrapped)."""

    def __init__(self, lm, network: EditorNetwork, targets: list[EditTarget], hp,
                 train_by_task: dict[str, list[EditCase]], val_by_task: dict[str, list[EditCase]],
                 holdout: list[str], seed: int, prepare_case: Callable[[EditCase], EditCase],
                 log: Callable[[str], None] = print):
        self.lm, self.model, self.tok = lm, lm.model, lm.tokenizer
        self.net, self.targets, self.hp = network, targets, hp
        self.holdout = set(holdout)
        leaked = self.holdout & (set(train_by_task) | set(val_by_task))
        if leaked:
            raise BenchError(f"held-out tasks {sorted(leaked)} cannot be used for training")
        empty = [t for t, cs in train_by_task.items() if not cs]
        if empty or not train_by_task:
            raise BenchError(f"no training cases for {empty or 'any task'}")
        self.train_by_task, self.val_by_task = train_by_task, val_by_task
        self.tasks = sorted(train_by_task)
        self.seed, self.prepare_case, self.log = seed, prepare_case, log
        self.rng = random.Random(seed)
        self._orders = {t: [] for t in self.tasks}
        self.sampled = {t: 0 for t in self.tasks}
        self._rr = 0
        lr_params = [network.edit_lrs]
        net_params = [p for n, p in network.named_parameters() if n != "edit_lrs"]
        self.opt = torch.optim.Adam([{"params": net_params, "lr": hp.lr},
                                     {"params": lr_params, "lr": hp.lr_lr}])
        self.base_params = {t.base_name: t.module.weight for t in targets}

    # -- sampling ------------------------------------------------------------------------------

    def _next_task(self) -> str:
        if self.hp.mixture == "round_robin":
            task = self.tasks[self._rr % len(self.tasks)]
            self._rr += 1
            return task
        if self.hp.mixture == "uniform":
            return self.rng.choice(self.tasks)
        raise BenchError(f"mixture must be round_robin or uniform, got {self.hp.mixture!r}")

    def _draw(self, task: str) -> EditCase:
        if not self._orders[task]:
            order = list(self.train_by_task[task])
            self.rng.shuffle(order)
            self._orders[task] = order
        return self._orders[task].pop()

    def next_batch(self) -> list[EditCase]:
        batch = []
        for _ in range(self.hp.batch_size):
            task = self._next_task()
            case = self._draw(task)
            if case.task in self.holdout or task in self.holdout:
                raise AssertionError(f"held-out task {case.task} in a training batch")
            self.sampled[task] += 1
            batch.append(case)
        return batch

    # -- one edit ------------------------------------------------------------------------------

    def edit_losses(self, case: EditCase, update_stats: bool) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(edit NLL, locality KL, stats) for one case, differentiable w.r.t. the network."""
        case = self.prepare_case(case)
        device = self.lm.device
        factors = edit_factors(self.model, self.tok, self.targets, case.prompt, case.target_new)
        deltas = self.net.deltas(self.targets, factors, update_stats=update_stats)
        params = {t.base_name: t.module.weight + stored_delta(t, deltas[t.name]).to(t.module.weight.dtype)
                  for t in self.targets}
        edit_probes = [(case.prompt, case.target_new)] + [(p, case.target_new) for p in case.rephrase_prompts]
        loc_probes = [(pa.prompt, pa.answer) for pa in case.locality]
        batch = encode_batch(self.tok, edit_probes + loc_probes, device)
        n_edit = len(edit_probes)
        is_edit = batch.rows < n_edit
        if loc_probes:
            loc_batch = encode_batch(self.tok, loc_probes, device)
            with torch.no_grad():
                pre_loc = answer_logprobs(self.model, loc_batch)
        post = answer_logprobs(self.model, batch, params)
        tok_lp = post.gather(1, batch.targets[:, None])[:, 0]
        seq_nll = per_sequence_mean(-tok_lp, batch, len(edit_probes) + len(loc_probes))[:n_edit]
        l_edit = seq_nll.mean()
        hits = (post.argmax(-1) == batch.targets).float()
        seq_acc = per_sequence_mean(hits, batch, len(edit_probes) + len(loc_probes))
        stats = {"edit_acc": seq_acc[0].item(),
                 "rephrase_acc": seq_acc[1:n_edit].mean().item() if n_edit > 1 else float("nan")}
        if loc_probes:
            post_loc = post[~is_edit]
            kl = (pre_loc.exp() * (pre_loc - post_loc)).sum(-1).mean()
            agree = (post_loc.argmax(-1) == pre_loc.argmax(-1)).float().mean().item()
            stats["loc_agree"] = agree
        else:
            kl = torch.zeros((), device=device)
            stats["loc_agree"] = float("nan")
        stats["edit_nll"], stats["loc_kl"] = l_edit.item(), kl.item()
        return l_edit, kl, stats

    def train_step(self, cases: list[EditCase]) -> dict:
        self.net.train()
        self.opt.zero_grad(set_to_none=True)
        rows = []
        for case in cases:
            l_edit, l_loc, stats = self.edit_losses(case, update_stats=True)
            loss = (self.hp.c_edit * l_edit + self.hp.c_loc * l_loc) / len(cases)
            loss.backward()
            stats["loss"] = loss.item() * len(cases)
            rows.append(stats)
        if self.hp.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.hp.grad_clip)
        self.opt.step()
        return _mean_stats(rows)

    @torch.no_grad()
    def validate(self) -> dict:
        self.net.eval()
        rows = []
        for task in sorted(self.val_by_task):
            for case in self.val_by_task[task]:
                with torch.enable_grad():  # edit_factors needs autograd; the network does not
                    l_edit, l_loc, stats = self.edit_losses(case, update_stats=False)
                stats["loss"] = self.hp.c_edit * l_edit.item() + self.hp.c_loc * l_loc.item()
                rows.append(stats)
        return _mean_stats(rows)

    def fit(self) -> dict:
        from tqdm import tqdm

        hp = self.hp
        started = time.perf_counter()
        best = {"loss": float("inf")}
        best_state, best_step, bad_rounds = None, 0, 0
        history, recent = [], []
        step, stop_reason = 0, "max_steps"
        bar = tqdm(total=hp.max_steps, desc=f"train {self.lm.spec}", unit="step", dynamic_ncols=True)
        try:
            while step < hp.max_steps:
                if hp.time_budget_s and time.perf_counter() - started > hp.time_budget_s:
                    stop_reason = "time_budget"
                    break
                t0 = time.perf_counter()
                stats = self.train_step(self.next_batch())
                stats["s_per_step"] = time.perf_counter() - t0
                step += 1
                recent.append(stats)
                recent = recent[-20:]
                avg = _mean_stats(recent)
                bar.update(1)
                bar.set_postfix_str(f"loss {avg['loss']:.3f} nll {avg['edit_nll']:.2f} "
                                    f"acc {avg['edit_acc']:.2f} kl {avg['loc_kl']:.3f} "
                                    f"{avg['s_per_step']:.2f}s/step")
                last = step == hp.max_steps
                if self.val_by_task and (step % hp.val_every == 0 or last):
                    val = self.validate()
                    val["step"] = step
                    val["elapsed_s"] = round(time.perf_counter() - started, 1)
                    history.append({"step": step, "train": avg, "val": val})
                    bar.write(f"step {step}: val loss {val['loss']:.4f} edit acc {val['edit_acc']:.3f} "
                              f"rephrase acc {val['rephrase_acc']:.3f} loc agree {val['loc_agree']:.3f} "
                              f"| train loss {avg['loss']:.4f} {avg['s_per_step']:.2f}s/step")
                    if val["loss"] < best["loss"]:
                        best, best_step, bad_rounds = val, step, 0
                        best_state = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
                    else:
                        bad_rounds += 1
                        if hp.patience and bad_rounds >= hp.patience:
                            stop_reason = "early_stopping"
                            break
        finally:
            bar.close()
        if self.val_by_task and step and (not history or history[-1]["step"] != step):
            val = self.validate()  # stopped by the time budget between validations
            val["step"] = step
            history.append({"step": step, "train": _mean_stats(recent), "val": val})
            if val["loss"] < best["loss"]:
                best, best_step, best_state = val, step, None
        if best_state is not None:
            self.net.load_state_dict(best_state)
        elapsed = time.perf_counter() - started
        return {"steps": step, "best_step": best_step, "stop_reason": stop_reason,
                "train_time_s": round(elapsed, 1),
                "s_per_step": round(elapsed / max(step, 1), 3),
                "final_validation": best if best_step else None,
                "history": history, "sampled_per_task": dict(self.sampled)}


def _mean_stats(rows: list[dict]) -> dict:
    out = {}
    for key in rows[0]:
        vals = [r[key] for r in rows if not (isinstance(r[key], float) and math.isnan(r[key]))]
        out[key] = float(sum(vals) / len(vals)) if vals else float("nan")
    return out


# --------------------------------------------------------------------------------------------
# Checkpoints and the cache key
# --------------------------------------------------------------------------------------------


def cache_key(identity: str, editor: str, hparams: dict, tasks: list[str], seed: int,
              data_hashes: dict | None = None) -> str:
    blob = json.dumps({"format": CHECKPOINT_FORMAT, "model": identity, "editor": editor,
                       "hparams": hparams, "tasks": sorted(tasks), "seed": seed,
                       "data": data_hashes or {}}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def save_checkpoint(stem: Path, network: EditorNetwork, meta: dict) -> tuple[Path, Path]:
    """`<stem>.safetensors` (tensors) and `<stem>.json` (meta); written atomically."""
    from safetensors.torch import save_file

    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in network.state_dict().items()}
    meta = dict(meta, format=CHECKPOINT_FORMAT, tensor_names=sorted(tensors))
    st_path, js_path = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    tmp_st = st_path.with_name(f"{st_path.name}.{os.getpid()}.tmp")
    tmp_js = js_path.with_name(f"{js_path.name}.{os.getpid()}.tmp")
    save_file(tensors, str(tmp_st), metadata={"format": CHECKPOINT_FORMAT})
    tmp_js.write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
    os.replace(tmp_st, st_path)
    os.replace(tmp_js, js_path)
    return st_path, js_path


def load_checkpoint(stem: Path, network: EditorNetwork) -> dict:
    """Fill `network` from `<stem>.safetensors`; return the JSON meta. No pickle involved."""
    from safetensors.torch import load_file

    stem = Path(stem)
    st_path, js_path = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    if not st_path.is_file() or not js_path.is_file():
        raise BenchError(f"checkpoint not found: {st_path} and {js_path} are both needed")
    meta = json.loads(js_path.read_text())
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise BenchError(f"{js_path}: not a {CHECKPOINT_FORMAT} checkpoint")
    tensors = load_file(str(st_path))
    own = network.state_dict()
    if set(tensors) != set(own) or any(tensors[k].shape != own[k].shape for k in own):
        raise BenchError(f"checkpoint {st_path} does not fit this model / these hyperparameters "
                         "(different edited weights or network shape)")
    device = network.edit_lrs.device
    network.load_state_dict({k: v.to(device) for k, v in tensors.items()})
    return meta


def hparams_dict(hparams) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(hparams), default=str))


__all__ = ["EditTarget", "select_targets", "edit_factors", "EditorNetwork", "MetaTrainer",
           "save_checkpoint", "load_checkpoint", "cache_key", "split_train_val", "stored_delta",
           "encode_batch", "answer_logprobs"]
