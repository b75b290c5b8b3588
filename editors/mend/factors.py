"""What a meta-learned editor reads from the model for an edit.

* `select_targets`  - which weights are edited (MLP projections of chosen blocks), with their
                      storage layout (GPT-2's Conv1D keeps weights as (in, out));
* `encode_batch`    - right-padded prompt + answer sequences and where each answer token is read;
* `factor_pass`     - one forward and one backward pass that return, per edited weight, the
                      rank-one factors of its fine-tuning gradient: the layer inputs u_t and the
                      loss gradients at its outputs d_t, so that dL/dW = sum_t d_t u_t^T in
                      (out, in) terms. No weight gradient is formed;
* `LowRankEdits`    - per-row low-rank weight changes applied during a forward pass;
* `rerun_blocks`    - the blocks from the first edited one, rerun on inputs captured earlier.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bench.core.errors import BenchError
from bench.core.layout import is_transposed, output_logits
from bench.core.probes import encode_probe


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


def base_hidden(model: nn.Module, batch: ProbeBatch) -> torch.Tensor:
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
        hidden = base_hidden(model, batch)
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
            logp = logprobs_at_answers(model, base_hidden(model, batch), batch)
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
