"""Meta-training of the editor network: batches of edits drawn from several tasks, each edited
on its own; the loss is the NLL of the new target on the edit and rephrase prompts after the edit
plus the KL to the unedited model on locality prompts. Validation, early stopping, a time budget,
a progress bar, and data-parallel training across processes (bench.core.distributed).

Training can be stopped and resumed: every `checkpoint_every` steps, and at the step boundary after
a first Ctrl-C, the whole training state (network, Adam state, step, RNG states, validation
history and best network so far, each task's data order) is saved to a file (editors/mend/
checkpoint.py); `fit` resumes from that file and ends with exactly the network a run without the
interruption gives. A second Ctrl-C, or one raised inside a step, stops at once (the last saved
state stays). Either way `fit` raises bench.core.errors.Interrupted, which says what was saved."""

from __future__ import annotations

import hashlib
import math
import random
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from bench.core.cases import EditCase
from bench.core.distributed import Shard
from bench.core.errors import BenchError, Interrupted
from bench.core.timings import WorkAfter
from editors.mend.checkpoint import load_training_state, save_training_state
from editors.mend.fitstate import FitState, StopAfterStep, mean_stats
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
                 log: Callable[[str], None] = print, shard=None, after: WorkAfter | None = None):
        self.lm, self.model, self.tok = lm, lm.model, lm.tokenizer
        self.after = after  # the evaluation that follows: the progress line estimates the whole command
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

    # -- training state (stop and resume) ------------------------------------------------------

    def save_state(self, path: Path, fs: FitState, key: str) -> None:
        """Everything `fit` needs to go on from `fs` exactly as if it had never stopped."""
        tensors = {f"net/{k}": v for k, v in self.net.state_dict().items()}
        if fs.best_state is not None:
            tensors.update({f"best/{k}": v for k, v in fs.best_state.items()})
        scalars: dict = {}
        for i, entry in self.opt.state_dict()["state"].items():
            for name, value in entry.items():
                if torch.is_tensor(value):
                    tensors[f"opt/{i}/{name}"] = value
                else:
                    scalars.setdefault(str(i), {})[name] = value
        tensors["rng/torch"] = torch.random.get_rng_state()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            tensors.update({f"rng/cuda/{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        where = {t: {id(c): i for i, c in enumerate(self.train_by_task[t])} for t in self.tasks}
        state = {"key": key, "step": fs.step, "max_steps": self.hp.max_steps,
                 "elapsed_s": fs.elapsed_s, "stop_reason": fs.stop_reason, "best": fs.best,
                 "best_step": fs.best_step, "bad_rounds": fs.bad_rounds, "history": fs.history,
                 "recent": fs.recent, "rng": list(self.rng.getstate()), "rr": self._rr,
                 "sampled": self.sampled, "n_train": {t: len(self.train_by_task[t]) for t in self.tasks},
                 "orders": {t: [where[t][id(c)] for c in self._orders[t]] for t in self.tasks},
                 "opt_scalars": scalars}
        save_training_state(path, tensors, state)

    def load_state(self, path: Path, key: str) -> FitState | None:
        """Restore the state saved by save_state; None (nothing changed) when the file is
        unreadable or belongs to another training."""
        try:
            tensors, state = load_training_state(path)
        except Exception as exc:  # noqa: BLE001 - an unusable file means: start from step 0
            self.log(f"cannot resume from {path} ({type(exc).__name__}: {exc}); training from step 0")
            return None
        if state.get("key") != key or state.get("n_train") != {t: len(self.train_by_task[t]) for t in self.tasks}:
            self.log(f"{path} belongs to another training; training from step 0")
            return None
        device = self.net.edit_lrs.device
        self.net.load_state_dict({k[4:]: v.to(device) for k, v in tensors.items() if k.startswith("net/")})
        best_state = {k[5:]: v.to(device) for k, v in tensors.items() if k.startswith("best/")} or None
        opt_state: dict = {}
        for k, v in tensors.items():
            if k.startswith("opt/"):
                _, i, name = k.split("/", 2)
                opt_state.setdefault(int(i), {})[name] = v
        for i, entry in state["opt_scalars"].items():
            opt_state.setdefault(int(i), {}).update(entry)
        opt = self.opt.state_dict()
        opt["state"] = opt_state
        self.opt.load_state_dict(opt)
        torch.random.set_rng_state(tensors["rng/torch"])
        cuda = sorted(k for k in tensors if k.startswith("rng/cuda/"))
        if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([tensors[f"rng/cuda/{i}"] for i in range(len(cuda))])
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self._rr, self.sampled = state["rr"], dict(state["sampled"])
        self._orders = {t: [self.train_by_task[t][i] for i in state["orders"][t]] for t in self.tasks}
        return FitState(step=state["step"], elapsed_s=state["elapsed_s"], stop_reason=state["stop_reason"],
                        best=state["best"], best_step=state["best_step"], bad_rounds=state["bad_rounds"],
                        history=state["history"], recent=state["recent"], best_state=best_state)

    # -- the training loop ---------------------------------------------------------------------

    def fit(self, partial: Path | None = None, key: str = "") -> dict:
        """Train until max_steps, early stopping or the time budget; leave the best network in
        place. With `partial` (a file) and hp.checkpoint_every > 0, resume from that file when it
        holds the state of this training (`key`), and save the state there every
        `checkpoint_every` steps and when Ctrl-C asks to stop."""
        hp = self.hp
        main = self.shard.rank == 0
        every = hp.checkpoint_every if partial is not None else 0
        fs = FitState()
        saved_step = None
        if every and self.shard.broadcast(Path(partial).is_file()):
            resumed = self.load_state(Path(partial), key)
            if resumed is not None:
                fs, saved_step = resumed, resumed.step
                self.log(f"resuming training from {partial} at step {fs.step} of {hp.max_steps}")
        resumed_at = fs.step
        started = time.perf_counter() - fs.elapsed_s

        def save() -> None:
            nonlocal saved_step
            fs.elapsed_s = round(time.perf_counter() - started, 3)
            if main:
                self.save_state(Path(partial), fs, key)
            self.shard.barrier()
            saved_step = fs.step

        def interrupted() -> Interrupted:
            head = f"training interrupted at step {fs.step} of {hp.max_steps}"
            if saved_step is None:
                why = f"first save at step {every}" if every else "checkpoint_every=0"
                return Interrupted(f"{head}: nothing saved yet ({why}); the same command trains from step 0")
            at = f" (step {saved_step})" if saved_step != fs.step else ""
            return Interrupted(f"{head}: saved {partial}{at}; run the same command again to continue")

        ctrl_c = StopAfterStep(enabled=bool(every))
        bar = tqdm(total=hp.max_steps, initial=fs.step, desc=f"train {self.lm.spec}", unit="step",
                   dynamic_ncols=True, disable=not main)
        try:
            with ctrl_c:
                while fs.stop_reason is None:
                    over = bool(hp.time_budget_s and time.perf_counter() - started > hp.time_budget_s)
                    stop = ctrl_c.requested
                    if self.shard.world > 1:  # every process stops at the same step
                        over, stop = self.shard.broadcast((over, stop))
                    if stop:
                        save()
                        raise interrupted()
                    if fs.step >= hp.max_steps:
                        fs.stop_reason = "max_steps"
                    elif over:
                        fs.stop_reason = "time_budget"
                    else:
                        self._one_step(fs, started, bar, main)
                        if every and fs.stop_reason is None and fs.step % every == 0 \
                                and fs.step < hp.max_steps:  # the final checkpoint follows anyway
                            save()
                if self.shard.broadcast(ctrl_c.requested):  # Ctrl-C in the step that ended training
                    save()
                    raise interrupted()
        except Interrupted:
            raise
        except KeyboardInterrupt:
            raise interrupted() from None
        finally:
            bar.close()
        return self._finish(fs, started, resumed_at)

    def _finish(self, fs: FitState, started: float, resumed_at: int) -> dict:
        """Validate once more if training stopped between validations, put the best network in
        place and say how training went."""
        best, best_state, best_step = fs.best, fs.best_state, fs.best_step
        step = fs.step
        if self.val_by_task and step and (not fs.history or fs.history[-1]["step"] != step):
            val = self.shard.broadcast(self.validate())  # stopped by the time budget between validations
            val["step"] = step
            fs.history.append({"step": step, "train": mean_stats(fs.recent), "val": val})
            if val["loss"] < best["loss"]:
                best, best_step, best_state = val, step, None
        if best_state is not None:
            self.net.load_state_dict(best_state)
        elapsed = time.perf_counter() - started
        return {"steps": step, "best_step": best_step, "stop_reason": fs.stop_reason,
                "train_time_s": round(elapsed, 1),
                "s_per_step": round(elapsed / max(step, 1), 3),
                "final_validation": best if best_step else None,
                "history": fs.history, "sampled_per_task": dict(self.sampled),
                "resumed_at_step": resumed_at or None}

    def _one_step(self, fs: FitState, started: float, bar, main: bool) -> None:
        """One optimizer step, then validation (and early stopping) when it is due."""
        hp = self.hp
        t0 = time.perf_counter()
        stats = self.train_step(self.next_batch())
        # Every process holds the same network after a step: the same decision everywhere.
        if not all(bool(torch.isfinite(p).all()) for p in self.net.parameters()):
            raise BenchError(f"training diverged at step {fs.step + 1}: the editor network's weights "
                             f"are no longer finite (loss {stats['loss']:.4g}); lower edit_lr, lr or lr_lr")
        stats["s_per_step"] = time.perf_counter() - t0
        fs.step += 1
        step = fs.step
        fs.recent = (fs.recent + [stats])[-20:]
        avg = mean_stats(fs.recent)
        bar.update(1)
        line = (f"loss {avg['loss']:.3f} nll {avg['edit_nll']:.2f} acc {avg['edit_acc']:.2f} "
                f"kl {avg['loc_kl']:.3f} {avg['s_per_step']:.2f}s/step")
        if self.after is not None:
            line += "; " + self.after.note(_training_left(bar))
        bar.set_postfix_str(line)
        last = step == hp.max_steps
        if self.val_by_task and (step % hp.val_every == 0 or last):
            val = self.shard.broadcast(self.validate())  # same decisions everywhere
            val["step"] = step
            val["elapsed_s"] = round(time.perf_counter() - started, 1)
            fs.history.append({"step": step, "train": avg, "val": val})
            if main:
                bar.write(f"step {step}: val loss {val['loss']:.4f} edit acc {val['edit_acc']:.3f} "
                          f"rephrase acc {val['rephrase_acc']:.3f} loc agree {val['loc_agree']:.3f} "
                          f"| train loss {avg['loss']:.4f} {avg['s_per_step']:.2f}s/step")
            if val["loss"] < fs.best["loss"]:
                fs.best, fs.best_step, fs.bad_rounds = val, step, 0
                fs.best_state = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
            else:
                fs.bad_rounds += 1
                if hp.patience and fs.bad_rounds >= hp.patience:
                    fs.stop_reason = "early_stopping"


def _training_left(bar) -> float | None:
    """Seconds of training left at the bar's average rate this sitting (None before a step)."""
    d = bar.format_dict
    done, elapsed = d["n"] - d.get("initial", 0), d["elapsed"]
    if done <= 0 or d["total"] is None:
        return None
    return (d["total"] - d["n"]) * elapsed / done
