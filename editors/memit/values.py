"""MEMIT's target hidden states z: for each case, the output of block L (the last edited layer)
at the subject's last token plus a delta optimised so that target_new follows every rewriting
prompt, while a next-token distribution of the essence prompt (at the position `kl_position`
selects, the essence row's kl_pos) stays close (KL) and the delta stays small (weight decay, norm
clamp), as ROME optimises its value one layer lower.

All cases of a call are optimised together: one forward/backward per step for the rows of every
case still running, a separate delta, Adam state and stopping rule per case. A case's loss depends
only on its own rows and delta, so the summed loss gives each delta exactly its own gradient; a
case that stops gets no more gradient and its rows leave the batch.

Fast path (`reuse_context_prefix`): nothing at or below block L depends on a delta added at block
L's output, so the context texts (cached per run), each row's tokens before the subject (cached
per call) and block L's output on the remaining tokens (recorded once per call) are computed
once; every step then runs only the blocks above L, on the tokens from the subject on, with the
lower blocks stubbed out. The plain path runs whole sequences through the whole model.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from bench.core.kvcache import cache_arg, with_cache
from bench.core.layout import output_logits
from bench.core.replay import detached, forwards_replaced
from editors.memit.rows import CaseRows, Stop, fits, select_rows, tiled, truncate
from editors.rome.inputs import cache_fixed_tokens
from editors.rome.prefix_cache import PrefixCache
from editors.rome.tokens import pad
from editors.vocab_loss import token_nll

# What one more sub-batch per step costs, in padded tokens (a pass's fixed cost on CPU).
BUCKET_OVERHEAD = 16


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _like(out, hidden):
    """`hidden` in the structure of a block's output (a tensor, or a tuple led by it)."""
    return (hidden,) + tuple(out[1:]) if isinstance(out, tuple) else hidden


class _Inputs:
    """The batch as one path feeds it: `run(delta per row)` gives the final (normed) hidden
    states; `offset[row]` is the sequence position of a row's first fed token."""

    def __init__(self, model, layout, z_layer: int, loss_layer: int):
        self.model, self.layout, self.z_layer, self.loss_layer = model, layout, z_layer, loss_layer

    def _decode(self, **inputs) -> torch.Tensor:
        """Decoder pass; stops after the loss layer when it is not the last block."""
        layout = self.layout
        if self.loss_layer >= layout.num_layers - 1:
            return layout.decoder(**inputs).last_hidden_state
        got = {}

        def grab(_module, _args, out):
            got["h"] = _first(out)
            raise Stop

        handle = layout.blocks[self.loss_layer].register_forward_hook(grab)
        try:
            layout.decoder(**inputs)
        except Stop:
            pass
        finally:
            handle.remove()
        return layout.final_norm(got["h"]) if layout.final_norm is not None else got["h"]


def buckets(widths: list[int], overhead: int = BUCKET_OVERHEAD) -> list[list[int]]:
    """Rows (indices into `widths`) grouped into sub-batches of similar length: the split of
    the rows sorted by length that minimises padded tokens + `overhead` per sub-batch (an
    exact dynamic programme over the distinct lengths)."""
    distinct = sorted(set(widths))
    count = {w: widths.count(w) for w in distinct}
    best = [0.0] + [float("inf")] * len(distinct)  # best[j]: cost of the first j lengths
    cut = [0] * (len(distinct) + 1)
    for j in range(1, len(distinct) + 1):
        rows = 0
        for i in range(j, 0, -1):  # a sub-batch holding lengths i..j, padded to length j
            rows += count[distinct[i - 1]]
            cost = best[i - 1] + rows * distinct[j - 1] + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i - 1
    groups, j = [], len(distinct)
    while j > 0:
        lengths = set(distinct[cut[j]:j])
        groups.append([r for r, w in enumerate(widths) if w in lengths])
        j = cut[j]
    return groups[::-1]


class _FastInputs(_Inputs):
    def __init__(self, model, layout, rows: CaseRows, z_layer: int, loss_layer: int,
                 prefix: PrefixCache | None):
        super().__init__(model, layout, z_layer, loss_layer)
        device = next(model.parameters()).device
        self.prefix = prefix
        batch_prefix = tiled(prefix, rows.n_cases) if prefix is not None else None
        skip = [len(batch_prefix.ids[r]) if batch_prefix is not None else 0 for r in range(len(rows.seqs))]
        # Context text (cached) and each row's tokens before the subject (run now) as a cache;
        # `ids` are then the tokens from the subject's last token on.
        self.ids, self.mask, self.offset, extra, self.keep = cache_fixed_tokens(
            SimpleNamespace(layout=layout), rows.seqs, skip, batch_prefix, device)
        self.cache, self.pos, self.use_cache = extra[cache_arg(layout.decoder)], extra["position_ids"], extra["use_cache"]
        self.widths = [len(s.ids) - s.lookup for s in rows.seqs]
        got = {}

        def grab(_module, _args, out):
            got["out"] = detached(out)
            raise Stop

        handle = layout.blocks[z_layer].register_forward_hook(grab)
        try:
            with torch.no_grad():
                layout.decoder(input_ids=self.ids, attention_mask=self.mask, position_ids=self.pos,
                               use_cache=self.use_cache, **with_cache(layout.decoder, self.cache))
        except Stop:
            pass
        finally:
            handle.remove()
            truncate(self.cache, self.keep)
        self.out = got["out"]  # block L's output on the fed tokens, as the block returns it
        self.base = _first(self.out)
        self.z_init = self.base[[rows.bare(c) for c in range(rows.n_cases)], 0].float()
        self._regroup()

    def _regroup(self) -> None:
        """Sub-batches of rows of similar length, each with its own copy of their cache rows."""
        self.groups = []
        for members in buckets(self.widths):
            index = torch.tensor(members, device=self.ids.device)
            w = max(self.widths[r] for r in members)
            cache = None
            if self.cache is not None:
                cache = copy.deepcopy(self.cache)
                select_rows(cache, index)
            self.groups.append(SimpleNamespace(
                index=index, width=w, ids=self.ids[index, :w], pos=self.pos[index, :w],
                mask=self.mask[index, : self.keep + w], base=self.base[index, :w], cache=cache))
        self.order = torch.argsort(torch.cat([g.index for g in self.groups]))

    def run(self, delta_rows: torch.Tensor) -> torch.Tensor:
        width = self.ids.shape[1]
        hidden = []
        for g in self.groups:
            # Every fed row starts at its subject's last token: the delta goes at position 0.
            first = g.base[:, :1] + delta_rows[g.index][:, None].to(g.base.dtype)
            out = _like(self.out, torch.cat([first, g.base[:, 1:]], 1))
            # Only block L's stub output reaches the blocks above; the stubs below are never read.
            stubs = [(self.layout.blocks[i], lambda *a, _o=out, **k: _o) for i in range(self.z_layer + 1)]
            try:
                with forwards_replaced(stubs):
                    h = self._decode(input_ids=g.ids, attention_mask=g.mask, position_ids=g.pos,
                                     use_cache=self.use_cache, **with_cache(self.layout.decoder, g.cache))
            finally:
                truncate(g.cache, self.keep)
            hidden.append(F.pad(h, (0, 0, 0, width - g.width)))
        return torch.cat(hidden)[self.order]

    def select(self, index: torch.Tensor) -> None:
        self.ids, self.mask, self.pos = self.ids[index], self.mask[index], self.pos[index]
        self.base = self.base[index]
        self.widths = [self.widths[i] for i in index.tolist()]
        select_rows(self.cache, index)
        self._regroup()


class _PlainInputs(_Inputs):
    def __init__(self, model, layout, rows: CaseRows, z_layer: int, loss_layer: int):
        super().__init__(model, layout, z_layer, loss_layer)
        device = next(model.parameters()).device
        self.prefix = None
        self.ids, self.mask = pad([s.ids for s in rows.seqs], 0, device)
        self.offset = [0] * len(rows.seqs)
        self.lookup = torch.tensor([s.lookup for s in rows.seqs], device=device)
        got = {}

        def grab(_module, _args, out):
            got["h"] = _first(out).detach()
            raise Stop

        handle = layout.blocks[z_layer].register_forward_hook(grab)
        try:
            with torch.no_grad():
                layout.decoder(input_ids=self.ids, attention_mask=self.mask, use_cache=False)
        except Stop:
            pass
        finally:
            handle.remove()
        bare = [rows.bare(c) for c in range(rows.n_cases)]
        self.z_init = got["h"][bare, self.lookup[bare]].float()

    def run(self, delta_rows: torch.Tensor) -> torch.Tensor:
        at = torch.zeros(self.ids.shape[0], self.ids.shape[1], 1, device=self.ids.device)
        at[torch.arange(len(self.lookup)), self.lookup] = 1.0

        def add(_module, _args, out):
            h = _first(out)
            return _like(out, h + at.to(h.dtype) * delta_rows[:, None].to(h.dtype))

        handle = self.layout.blocks[self.z_layer].register_forward_hook(add)
        try:
            return self._decode(input_ids=self.ids, attention_mask=self.mask, use_cache=False)
        finally:
            handle.remove()

    def select(self, index: torch.Tensor) -> None:
        self.ids, self.mask, self.lookup = self.ids[index], self.mask[index], self.lookup[index]


class _LossIndex:
    """Where the loss reads the hidden states of the rows now in the batch."""

    def __init__(self, rows: CaseRows, current: list[int], offset: list[int], device):
        nll = []  # (batch row, column, label, 1 / target length)
        ess = []  # (batch row, column, case)
        rewrite = []  # (batch row, case)
        for p, r in enumerate(current):
            s, c = rows.seqs[r], rows.case_of(r)
            if rows.is_essence(r):
                ess.append((p, s.kl_pos - offset[r], c))
                continue
            rewrite.append((p, c))
            for j in range(s.tgt_len):
                nll.append((p, s.tgt_start + j - 1 - offset[r], s.labels[j], 1.0 / s.tgt_len))

        def cols(items, k, dtype=torch.long):
            return torch.tensor([i[k] for i in items], device=device, dtype=dtype)

        self.n_rows = len(current)
        self.nll_row, self.nll_col, self.labels = cols(nll, 0), cols(nll, 1), cols(nll, 2)
        self.weights = cols(nll, 3, torch.float32)
        self.ess_row, self.ess_col, self.ess_case = cols(ess, 0), cols(ess, 1), cols(ess, 2)
        self.rw_row, self.rw_case = cols(rewrite, 0), cols(rewrite, 1)
        self.row_case = torch.tensor([rows.case_of(r) for r in current], device=device)


def _stop(hp, step: int, active: list[bool], infos: list[dict], loss: torch.Tensor, nll: torch.Tensor,
          kl: torch.Tensor, prob: torch.Tensor) -> list[int]:
    """Record each active case's loss terms in `infos` and mark the cases whose stop rule fires
    inactive; returns those."""
    stopped = []
    for c, (lv, nv, kv, pv) in enumerate(zip(loss.tolist(), nll.tolist(), kl.tolist(), prob.tolist())):
        if not active[c]:
            continue
        infos[c] = {"loss": lv, "nll": nv, "kl": kv, "target_prob": pv}
        if hp.v_stop_rule == "loss":
            # ROME's loop: stop on the total loss; the last iteration only evaluates.
            stop = lv < hp.v_stop_threshold or step == hp.v_num_grad_steps - 1
        else:
            stop = nv < hp.v_stop_threshold
        if stop:
            active[c] = False
            stopped.append(c)
    return stopped


def optimise_z(model, layout, hp, rows: CaseRows, z_layer: int,
               prefix: PrefixCache | None) -> tuple[torch.Tensor, list[dict]]:
    """(z per case (n_cases, hidden), each case's facts: steps, final loss terms, target
    probability, norms). The model is left as it was."""
    device = next(model.parameters()).device
    n = rows.n_cases
    loss_layer = hp.v_loss_layer if hp.v_loss_layer >= 0 else layout.num_layers + hp.v_loss_layer
    loss_layer = max(loss_layer, z_layer)
    if hp.reuse_context_prefix:
        inputs = _FastInputs(model, layout, rows, z_layer, loss_layer,
                             prefix if fits(prefix, rows) else None)
    else:
        inputs = _PlainInputs(model, layout, rows, z_layer, loss_layer)
    z_init = inputs.z_init
    init_sq = z_init.norm(dim=1) ** 2
    max_norm = hp.clamp_norm_factor * z_init.norm(dim=1)
    n_prompts = torch.full((n,), float(rows.per_case - 1), device=device)

    deltas = [torch.zeros(layout.hidden_size, device=device, requires_grad=True) for _ in range(n)]
    opt = torch.optim.Adam(deltas, lr=hp.v_lr)
    active = [True] * n
    steps = [0] * n
    infos: list[dict] = [{} for _ in range(n)]
    current = list(range(len(rows.seqs)))
    index = _LossIndex(rows, current, inputs.offset, device)
    kl_init = None
    with torch.enable_grad():
        for step in range(hp.v_num_grad_steps):
            opt.zero_grad(set_to_none=True)
            stacked = torch.stack(deltas)
            hidden = inputs.run(stacked[index.row_case])
            nll_pos = token_nll(model, hidden[index.nll_row, index.nll_col], index.labels)
            per_prompt = torch.zeros(index.n_rows, device=device).index_add(
                0, index.nll_row, nll_pos * index.weights)
            nll = torch.zeros(n, device=device).index_add(
                0, index.rw_case, per_prompt[index.rw_row]) / n_prompts
            prob = torch.zeros(n, device=device).index_add(
                0, index.rw_case, torch.exp(-per_prompt[index.rw_row]).detach()) / n_prompts
            logp = torch.log_softmax(output_logits(model, hidden[index.ess_row, index.ess_col]).float(), -1)
            if kl_init is None:  # the first step runs every case with a zero delta
                kl_init = logp.detach().clone()
            ref = kl_init[index.ess_case]
            kl = torch.zeros(n, device=device).index_add(
                0, index.ess_case, (logp.exp() * (logp - ref)).sum(-1))
            wd = hp.v_weight_decay * stacked.norm(dim=1) / init_sq
            loss = nll + hp.kl_factor * kl + wd

            stopped = _stop(hp, step, active, infos, loss, nll, hp.kl_factor * kl, prob)
            if not any(active):
                break
            loss[torch.tensor(active, device=device)].sum().backward()
            for c in range(n):
                if active[c]:
                    steps[c] += 1
                else:
                    deltas[c].grad = None  # Adam skips it: the case has stopped
            opt.step()
            with torch.no_grad():
                for c in range(n):
                    norm = deltas[c].norm()
                    if active[c] and norm > max_norm[c]:
                        deltas[c].mul_(max_norm[c] / norm)
            if stopped:  # drop the stopped cases' rows from the batch
                current = [r for r in current if active[rows.case_of(r)]]
                keep = torch.tensor([p for p, r in enumerate(index.row_case.tolist()) if active[r]],
                                    device=device)
                inputs.select(keep)
                index = _LossIndex(rows, current, inputs.offset, device)
    z_delta = torch.stack([d.detach() for d in deltas])
    for c in range(n):
        infos[c].update(steps=steps[c], prefix_reused=inputs.prefix is not None,
                        delta_norm=z_delta[c].norm().item(), z_norm=z_init[c].norm().item())
    return z_init + z_delta, infos
