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


def _base_hidden(model: nn.Module, batch: ProbeBatch) -> torch.Tensor:
    out = model.base_model(input_ids=batch.ids, attention_mask=batch.mask, use_cache=False)
    return out.last_hidden_state


def logprobs_at_answers(model: nn.Module, hidden: torch.Tensor, batch: ProbeBatch) -> torch.Tensor:
    picked = hidden[batch.rows, batch.cols]
    return torch.log_softmax(output_logits(model, picked).float(), dim=-1)


def answer_logprobs(model: nn.Module, batch: ProbeBatch, params: dict | None = None) -> torch.Tensor:
    """log-softmax over the vocabulary at every answer position, (K, V); `params` (names inside
    model.base_model -> tensors) replace the base model's weights for this call only."""
    if params:
        hidden = torch.func.functional_call(
            model.base_model, params, args=(),
            kwargs={"input_ids": batch.ids, "attention_mask": batch.mask, "use_cache": False},
            strict=False).last_hidden_state
    else:
        hidden = _base_hidden(model, batch)
    return logprobs_at_answers(model, hidden, batch)


def per_sequence_mean(values: torch.Tensor, batch: ProbeBatch, n_seq: int) -> torch.Tensor:
    """Mean of per-token values within each sequence, (n_seq,)."""
    sums = torch.zeros(n_seq, device=values.device, dtype=values.dtype).index_add(0, batch.rows, values)
    counts = torch.zeros(n_seq, device=values.device, dtype=values.dtype).index_add(
        0, batch.rows, torch.ones_like(values))
    return sums / counts.clamp_min(1)


# --------------------------------------------------------------------------------------------
# Gradient factors
# --------------------------------------------------------------------------------------------


Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # weight name -> (u (N, in), d (N, out))


@dataclass
class FactorPass:
    """What one forward/backward pass over a batch of probes yields."""

    factors: list[Factors]  # per edit row (the first n_edits rows of the batch)
    logprobs: torch.Tensor  # (K, V) pre-edit log-probabilities at every answer position, detached
    block_inputs: list[tuple[tuple, dict]] | None  # (args, kwargs) each block >= first got


def factor_pass(model: nn.Module, batch: ProbeBatch, targets: list[EditTarget], n_edits: int,
                capture_from: int | None = None, blocks: nn.ModuleList | None = None) -> FactorPass:
    """Rank-one factors of d NLL / dW for the first `n_edits` rows of `batch`, each row's loss
    being the mean NLL of its answer tokens (teacher forced); rows do not interact, so one pass
    over the sum of the row losses gives every row its own gradient.

    A forward hook on each edited projection records its input u (B, T, in) and adds a zero
    "probe" tensor to its output; the gradient of the loss with respect to the probe is d
    (B, T, out), and dL_row/dW (out, in) = d_row^T u_row. Positions that cannot reach the loss (a
    row's last token, padding) are dropped. The other rows (rephrase, locality probes) only
    contribute their pre-edit log-probabilities and, with `capture_from`, the inputs of blocks
    capture_from.. (to rerun only those blocks after the edit)."""
    device = batch.ids.device
    inputs: dict[str, torch.Tensor] = {}
    probes: dict[str, torch.Tensor] = {}
    captured: list[tuple[tuple, dict]] = []
    handles = []

    def make_hook(name):
        def hook(module, args, output):
            inputs[name] = args[0].detach()
            probe = torch.zeros_like(output, requires_grad=True)
            probes[name] = probe
            return output + probe
        return hook

    def capture_hook(module, args, kwargs):
        captured.append((tuple(a.detach() if torch.is_tensor(a) else a for a in args), dict(kwargs)))

    try:
        for t in targets:
            handles.append(t.module.register_forward_hook(make_hook(t.name)))
        if capture_from is not None:
            for block in list(blocks)[capture_from:]:
                handles.append(block.register_forward_pre_hook(capture_hook, with_kwargs=True))
        with torch.enable_grad():
            logp = logprobs_at_answers(model, _base_hidden(model, batch), batch)
            tok_nll = -logp.gather(1, batch.targets[:, None])[:, 0]
            row_nll = per_sequence_mean(tok_nll, batch, len(batch.lengths))
            loss = row_nll[:n_edits].sum()
            grads = torch.autograd.grad(loss, [probes[t.name] for t in targets], allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    factors: list[Factors] = []
    for row in range(n_edits):
        n = batch.lengths[row] - 1  # positions 0 .. n-1 can influence the answer tokens
        f = {}
        for t, g in zip(targets, grads):
            u = inputs[t.name][row, :n].float()
            d = torch.zeros(n, t.out_dim, device=device) if g is None else g[row, :n].float()
            f[t.name] = (u, d)
        factors.append(f)
    return FactorPass(factors=factors, logprobs=logp.detach(),
                      block_inputs=captured if capture_from is not None else None)


def edit_factors(model: nn.Module, tokenizer, targets: list[EditTarget], prompt: str,
                 answer: str) -> Factors:
    """Factors (u, d) of the gradient of the mean NLL of `answer` after `prompt`, per weight."""
    device = next(model.parameters()).device
    batch = encode_batch(tokenizer, [(prompt, answer)], device)
    return factor_pass(model, batch, targets, 1).factors[0]


class LowRankEdits:
    """Applies per-row low-rank weight changes during a forward pass, without writing weights:
    a forward hook on each edited projection adds x @ dW^T to its output, computed as
    (x @ U^T) @ D with dW = D^T U (U: (R, N, in), D: (R, N, out), one pair per batch row), which
    is what the projection with weight W + dW would output."""

    def __init__(self, targets: list[EditTarget], per_row: dict[str, tuple[torch.Tensor, torch.Tensor]]):
        self.targets, self.per_row, self.handles = targets, per_row, []

    def __enter__(self):
        for t in self.targets:
            u, d = self.per_row[t.name]

            def hook(module, args, output, u=u, d=d):
                x = args[0]
                return output + torch.bmm(torch.bmm(x.float(), u.transpose(1, 2)), d).to(output.dtype)
            self.handles.append(t.module.register_forward_hook(hook))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []


def rerun_blocks(model: nn.Module, layout, first: int, block_inputs: list[tuple[tuple, dict]]) -> torch.Tensor:
    """Final hidden states from blocks first.. onwards, given the inputs they saw in a previous
    pass (hidden states replaced in turn by each block's output), then the final norm."""
    blocks = list(layout.blocks)[first:]
    if len(block_inputs) != len(blocks):
        raise RuntimeError("captured block inputs do not match the blocks")
    hidden = None
    for block, (args, kwargs) in zip(blocks, block_inputs):
        if hidden is not None:
            if args:
                args = (hidden,) + tuple(args[1:])
            else:
                kwargs = dict(kwargs, hidden_states=hidden)
        out = block(*args, **kwargs)
        hidden = out[0] if isinstance(out, (tuple, list)) else out
    if layout.final_norm is not None:
        hidden = layout.final_norm(hidden)
    return hidden


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
    def update(self, x: torch.Tensor, gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """Fold the rows of `x` into the statistics. With `gather` (data-parallel training: a
        function returning every process's tensor stacked in rank order) the batch statistics of
        all processes are folded in, so every copy keeps the same statistics."""
        x = x.detach().double()
        dim = self.mean.shape[0]
        n_b = x.shape[0]
        mean_b = x.mean(0) if n_b else torch.zeros(dim, dtype=torch.float64, device=x.device)
        m2_b = ((x - mean_b) ** 2).sum(0)
        parts = torch.cat([torch.tensor([float(n_b)], dtype=torch.float64, device=x.device), mean_b, m2_b])
        for row in (gather(parts[None]) if gather is not None else parts[None]):
            self._fold(row[0], row[1:1 + dim], row[1 + dim:])

    def _fold(self, n_b: torch.Tensor, mean_b: torch.Tensor, m2_b: torch.Tensor) -> None:
        if n_b.item() == 0:
            return
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

    def forward(self, u: torch.Tensor, d: torch.Tensor, cond: int):
        x = self.norm(torch.cat([u, d], dim=-1))
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

    @torch.no_grad()
    def update_norms(self, targets: list[EditTarget], factors: list[Factors],
                     gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """Fold the factors of a batch of edits (all of them, before any is normalised) into the
        input statistics of each shape's network."""
        rows: dict[str, list[torch.Tensor]] = {}
        for per_edit in factors:
            for t in targets:
                u, d = per_edit[t.name]
                rows.setdefault(t.shape_key, []).append(torch.cat([u, d], dim=-1))
        for key in sorted(self.nets):
            if key in rows or gather is not None:  # every process must join every gather
                x = torch.cat(rows[key]) if key in rows else torch.zeros(0, self.nets[key].norm.mean.shape[0])
                self.nets[key].norm.update(x, gather)

    def edit_factors_out(self, targets: list[EditTarget], factors: Factors) -> Factors:
        """name -> (U, D) with dW (out, in) = D^T U: U = -lr_w u~, D = d~."""
        out = {}
        for i, t in enumerate(targets):
            u, d = factors[t.name]
            u2, d2 = self.nets[t.shape_key](u, d, t.cond)
            out[t.name] = (-self.edit_lrs[i] * u2, d2)
        return out

    def deltas(self, targets: list[EditTarget], factors: Factors) -> dict[str, torch.Tensor]:
        """name -> dW in (out, in) terms."""
        return {n: d.T @ u for n, (u, d) in self.edit_factors_out(targets, factors).items()}


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
                 log: Callable[[str], None] = print, shard=None):
        from bench.distributed import Shard

        self.lm, self.model, self.tok = lm, lm.model, lm.tokenizer
        # Data-parallel training: every process draws the same global batch, works on its own
        # slice of it, and the gradients are summed across processes (bench.distributed).
        self.shard = shard or Shard()
        if hp.batch_size % self.shard.world:
            raise BenchError(f"batch_size {hp.batch_size} must be a multiple of the number of "
                             f"processes ({self.shard.world}) for data-parallel training")
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
        self.layout = lm.layout
        self.first_block = min(self._block_index(t) for t in targets)
        self.fast = False  # rerun only blocks >= first_block after the edit (checked below)
        self.fast = self._check_fast_path()
        log(f"post-edit passes: {'blocks %d.. only' % self.first_block if self.fast else 'full model'}")

    def _block_index(self, t: EditTarget) -> int:
        for i, block in enumerate(self.layout.blocks):
            if any(m is t.module for m in block.modules()):
                return i
        raise BenchError(f"edited weight {t.name} is not inside a transformer block")

    def _check_fast_path(self) -> bool:
        """Rerunning the blocks from the first edited one on captured inputs must reproduce the
        full forward pass; otherwise every post-edit pass runs the full model."""
        case = self.prepare_case(self.train_by_task[self.tasks[0]][0])
        probes = [(case.prompt, case.target_new)] + [(p, case.target_new) for p in case.rephrase_prompts]
        probes += [(pa.prompt, pa.answer) for pa in case.locality]
        batch = encode_batch(self.tok, probes, self.lm.device)
        try:
            fp = factor_pass(self.model, batch, self.targets, 1, capture_from=self.first_block,
                             blocks=self.layout.blocks)
            with torch.no_grad():
                hidden = rerun_blocks(self.model, self.layout, self.first_block, fp.block_inputs)
                again = logprobs_at_answers(self.model, hidden, batch)
            diff = (again - fp.logprobs).abs().max().item()
        except Exception as exc:  # noqa: BLE001 - any failure means: use the full model
            self.log(f"block rerun unavailable ({type(exc).__name__}: {exc}); using full passes")
            return False
        if diff > 1e-3:
            self.log(f"block rerun differs from the full pass by {diff:.2e}; using full passes")
            return False
        return True

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

    def step_losses(self, cases: list[EditCase], update_stats: bool) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(edit NLL, locality KL, stats) over a batch of independent single edits,
        differentiable w.r.t. the network. Each case is edited on its own (row-wise low-rank
        weight changes); the losses are averaged over the cases' probes."""
        cases = [self.prepare_case(c) for c in cases]
        n = len(cases)
        probes = [(c.prompt, c.target_new) for c in cases]
        owner, kind = list(range(n)), ["edit"] * n
        for e, c in enumerate(cases):
            for p in c.rephrase_prompts:
                probes.append((p, c.target_new))
                owner.append(e)
                kind.append("rephrase")
        for e, c in enumerate(cases):
            for pa in c.locality:
                probes.append((pa.prompt, pa.answer))
                owner.append(e)
                kind.append("loc")
        device = self.lm.device
        batch = encode_batch(self.tok, probes, device)
        fp = factor_pass(self.model, batch, self.targets, n,
                         capture_from=self.first_block if self.fast else None, blocks=self.layout.blocks)
        if update_stats:
            self.net.update_norms(self.targets, fp.factors,
                                  self.shard.gather if self.shard.world > 1 else None)
        per_case = [self.net.edit_factors_out(self.targets, f) for f in fp.factors]
        owner_t = torch.tensor(owner, device=device)
        per_row = {}
        for t in self.targets:
            width = max(pc[t.name][0].shape[0] for pc in per_case)
            us = torch.stack([F.pad(pc[t.name][0], (0, 0, 0, width - pc[t.name][0].shape[0])) for pc in per_case])
            ds = torch.stack([F.pad(pc[t.name][1], (0, 0, 0, width - pc[t.name][1].shape[0])) for pc in per_case])
            per_row[t.name] = (us.index_select(0, owner_t), ds.index_select(0, owner_t))
        with LowRankEdits(self.targets, per_row):
            if self.fast:
                hidden = rerun_blocks(self.model, self.layout, self.first_block, fp.block_inputs)
            else:
                hidden = _base_hidden(self.model, batch)
        post = logprobs_at_answers(self.model, hidden, batch)
        row_kind = [kind[r] for r in batch.seq_of_token]
        is_loc = torch.tensor([k == "loc" for k in row_kind], device=device)
        tok_nll = -post.gather(1, batch.targets[:, None])[:, 0]
        hits = (post.argmax(-1) == batch.targets).float()
        n_rows = len(probes)
        row_nll = per_sequence_mean(tok_nll, batch, n_rows)
        row_acc = per_sequence_mean(hits, batch, n_rows)
        edit_rows = torch.tensor([k != "loc" for k in kind], device=device)
        l_edit = row_nll[edit_rows].mean()
        reph = [i for i, k in enumerate(kind) if k == "rephrase"]
        stats = {"edit_acc": row_acc[:n].mean().item(),
                 "rephrase_acc": row_acc[reph].mean().item() if reph else float("nan")}
        if bool(is_loc.any()):
            pre_loc, post_loc = fp.logprobs[is_loc], post[is_loc]
            kl = (pre_loc.exp() * (pre_loc - post_loc)).sum(-1).mean()
            stats["loc_agree"] = (post_loc.argmax(-1) == pre_loc.argmax(-1)).float().mean().item()
        else:
            kl = torch.zeros((), device=device)
            stats["loc_agree"] = float("nan")
        stats["edit_nll"], stats["loc_kl"] = l_edit.item(), kl.item()
        self.last_counts = (int(edit_rows.sum()), int(is_loc.sum()))  # rows behind the two means
        return l_edit, kl, stats

    def train_step(self, cases: list[EditCase]) -> dict:
        """One optimizer step on the global batch `cases` (this process's slice of it when
        several processes train together)."""
        self.net.train()
        self.opt.zero_grad(set_to_none=True)
        world = self.shard.world
        l_edit, l_loc, stats = self.step_losses(cases[self.shard.rank::world], update_stats=True)
        loss = self.hp.c_edit * l_edit + self.hp.c_loc * l_loc
        if world == 1:
            loss.backward()
        else:
            # Weight this process's means by its share of the batch's rows and sum the gradients:
            # exactly the gradient of the whole batch's loss.
            local = torch.tensor([self.last_counts], dtype=torch.float64)
            n_edit, n_loc = self.shard.gather(local).sum(0).tolist()
            share = self.hp.c_edit * l_edit * (local[0, 0].item() / max(n_edit, 1))
            if n_loc:
                share = share + self.hp.c_loc * l_loc * (local[0, 1].item() / n_loc)
            share.backward()
            params = list(self.net.parameters())
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                              for p in params])
            self.shard.sum_(flat)
            for p, g in zip(params, flat.split([p.numel() for p in params])):
                p.grad = g.view_as(p).clone()
        if self.hp.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.hp.grad_clip)
        self.opt.step()
        stats["loss"] = loss.item()
        return stats

    @torch.no_grad()
    def validate(self) -> dict:
        self.net.eval()
        cases = [c for task in sorted(self.val_by_task) for c in self.val_by_task[task]]
        rows, size = [], max(1, self.hp.batch_size)
        for start in range(0, len(cases), size):
            chunk = cases[start:start + size]
            l_edit, l_loc, stats = self.step_losses(chunk, update_stats=False)
            stats["loss"] = self.hp.c_edit * l_edit.item() + self.hp.c_loc * l_loc.item()
            rows.append((len(chunk), stats))
        total = sum(k for k, _ in rows)
        return {key: sum(k * st[key] for k, st in rows if not math.isnan(st[key])) /
                max(1, sum(k for k, st in rows if not math.isnan(st[key])))
                for key in rows[0][1]} if total else {}

    def fit(self) -> dict:
        from tqdm import tqdm

        hp = self.hp
        started = time.perf_counter()
        best = {"loss": float("inf")}
        best_state, best_step, bad_rounds = None, 0, 0
        history, recent = [], []
        step, stop_reason = 0, "max_steps"
        main = self.shard.rank == 0
        bar = tqdm(total=hp.max_steps, desc=f"train {self.lm.spec}", unit="step", dynamic_ncols=True,
                   disable=not main)
        try:
            while step < hp.max_steps:
                over = bool(hp.time_budget_s and time.perf_counter() - started > hp.time_budget_s)
                if self.shard.world > 1:
                    over = self.shard.broadcast(over)  # every process stops at the same step
                if over:
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
                    val = self.shard.broadcast(self.validate())  # same decisions everywhere
                    val["step"] = step
                    val["elapsed_s"] = round(time.perf_counter() - started, 1)
                    history.append({"step": step, "train": avg, "val": val})
                    if main:
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
            val = self.shard.broadcast(self.validate())  # stopped by the time budget between validations
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
