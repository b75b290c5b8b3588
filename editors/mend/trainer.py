"""Meta-training of the editor network: batches of edits drawn from several tasks, each edited
on its own; the loss is the NLL of the new target on the edit and rephrase prompts after the edit
plus the KL to the unedited model on locality prompts. Validation, early stopping, a time budget,
a progress bar, and data-parallel training across processes (bench.core.distributed)."""

from __future__ import annotations

import hashlib
import math
import random
import time
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from bench.core.cases import EditCase
from bench.core.distributed import Shard
from bench.core.errors import BenchError
from editors.mend.factors import (EditTarget, LowRankEdits, base_hidden, encode_batch, factor_pass,
                                  logprobs_at_answers, per_sequence_mean, rerun_blocks)
from editors.mend.networks import EditorNetwork


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

    def step_losses(self, cases: list[EditCase], update_stats: bool
                    ) -> tuple[torch.Tensor, torch.Tensor, dict, tuple[int, int]]:
        """(edit NLL, locality KL, stats, (edit rows, locality rows)) over a batch of independent
        single edits, differentiable w.r.t. the network. Each case is edited on its own (row-wise
        low-rank weight changes); the losses are averaged over the cases' probes (the counts are
        the rows behind the two means)."""
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
                hidden = base_hidden(self.model, batch)
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
        return l_edit, kl, stats, (int(edit_rows.sum()), int(is_loc.sum()))

    def train_step(self, cases: list[EditCase]) -> dict:
        """One optimizer step on the global batch `cases` (this process's slice of it when
        several processes train together)."""
        self.net.train()
        self.opt.zero_grad(set_to_none=True)
        world = self.shard.world
        l_edit, l_loc, stats, counts = self.step_losses(cases[self.shard.rank::world], update_stats=True)
        loss = self.hp.c_edit * l_edit + self.hp.c_loc * l_loc
        if world == 1:
            loss.backward()
        else:
            # Weight this process's means by its share of the batch's rows and sum the gradients:
            # exactly the gradient of the whole batch's loss.
            local = torch.tensor([counts], dtype=torch.float64)
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
            l_edit, l_loc, stats, _ = self.step_losses(chunk, update_stats=False)
            stats["loss"] = self.hp.c_edit * l_edit.item() + self.hp.c_loc * l_loc.item()
            rows.append((len(chunk), stats))
        total = sum(k for k, _ in rows)
        return {key: sum(k * st[key] for k, st in rows if not math.isnan(st[key])) /
                max(1, sum(k for k, st in rows if not math.isnan(st[key])))
                for key in rows[0][1]} if total else {}

    def fit(self) -> dict:
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
