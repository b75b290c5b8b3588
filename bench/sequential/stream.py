"""One sequential run as an object: what a killed run left, the pre-edit records, the locality
probes, the edits batch by batch, the checkpoints, and undoing every edit at the end (the
protocol is described in bench.sequential)."""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Callable

import torch

from bench.core.cases import EditCase
from bench.core.errors import BenchError
from bench.core.runfiles import RunDir
from bench.evaluation import (EvalState, Job, Protocol, RunHook, broken_edit, case_record, evaluate_forced,
                              evaluate_wild)
from bench.sequential.checkpoint import checkpoint_summary, retention, retention_sample
from bench.sequential.locality import LocalityProbe, draw_locality_probes, probe_scores, read_probes
from editors.base import CombinedHandle, EditHandle

PRE_CHUNK = 64  # cases per pre-edit evaluation batch (each chunk is written before the next)
PRE_ONLY = ("pre_locality_ids",)  # what pre.jsonl keeps for the last checkpoint


def _key(record: dict) -> tuple[str, str]:
    return record["task"], record["case_id"]


def is_checkpoint(n: int, total: int, every: int) -> bool:
    return n == total or (every > 0 and n % every == 0)


def _apply(editor, model, tok, cases: list[EditCase]) -> tuple[EditHandle | None, list[str | None]]:
    """(handle or None, per-case error): the batch in one call; if that fails, each case on its
    own, so an error is recorded only on the case that caused it."""
    try:
        return editor.apply_batch(model, tok, cases), [None] * len(cases)
    except BenchError as exc:
        if len(cases) == 1:
            return None, [str(exc)]
    handles, errors = [], []
    for case in cases:
        try:
            handles.append(editor.apply_batch(model, tok, [case]))
            errors.append(None)
        except BenchError as exc:
            errors.append(str(exc))
    return _Handles(handles), errors


def _broken_batch(lm, handle: EditHandle, views: list[EditHandle], prompts: list[str]) -> str | None:
    """Why a batch's edit is numerically broken (bench.evaluation.broken_edit: its changed
    weights, then one pass over the batch's edit prompts, read through the view of every edit so
    far with this one), or None."""
    view = CombinedHandle(views + [handle]) if set(handle.kinds) - {"weights"} else (
        CombinedHandle(views) if views else None)
    return broken_edit(lm, handle, prompts=[view.view_text(p) if view is not None else p for p in prompts])


class _Handles(CombinedHandle):
    """Several batch handles (a failed batch retried case by case) read as one, each case's
    facts in `info["cases"]`."""

    def __init__(self, handles: list[EditHandle]):
        super().__init__(handles)
        self.info = {"cases": [c for h in handles for c in h.info.get("cases", [h.info])]}


class EditStream:
    """The state of one sequential run: its planned cases (`keys`, in order), the case and
    checkpoint records so far, the pre-edit records, the locality probes and their unedited
    readings, the unedited value of every tensor an edit changed (`originals`) and the handles of
    edits that are more than weights (`views`, read at checkpoints)."""

    def __init__(self, setup, run: RunDir, items: list[tuple[object, EditCase]], jobs: list[Job],
                 hooks: list[RunHook], protocol: Protocol, write: Callable[[object, dict], None],
                 progress, log: Callable[[str], None] = print):
        self.opts, self.lm, self.editor = setup.opts, setup.lm, setup.editor
        self.run, self.items, self.jobs, self.hooks = run, items, jobs, hooks
        self.protocol, self.write, self.progress, self.log = protocol, write, progress, log
        self.keys = [(task.name, case.case_id) for task, case in items]
        self.total, self.every = len(items), self.opts.eval_every
        self.jobs_by_task = {task.name: job for (task, _), job in zip(items, jobs)}
        self.params = dict(self.lm.model.named_parameters())
        self.originals: dict[str, torch.Tensor] = {}
        self.views: list[EditHandle] = []
        self._read_what_a_killed_run_left()

    def _read_what_a_killed_run_left(self) -> None:
        """The state of the last checkpoint, and the records that came before it."""
        run = self.run
        self.state = run.read_state()
        self.n_done = 0
        if self.state is not None:
            self.n_done = int(self.state[1]["n_edits"])
            if [tuple(k) for k in self.state[1]["order"]] != self.keys[:self.n_done]:
                raise BenchError(f"{run.path}: the planned cases differ from the edits its saved state holds; "
                                 "start a new run")
        records = run.read_cases(repair=True)
        kept = [r for r in records if _key(r) in set(self.keys[:self.n_done])]
        if len(kept) != len(records):  # edits made after the last checkpoint were lost with the process
            self.log(f"dropping {len(records) - len(kept)} case records made after the last checkpoint "
                     f"(edit {self.n_done})")
            run.write_cases(kept)
        self.records = kept
        self.checkpoints = [c for c in run.read_checkpoints(repair=True) if c["n_edits"] <= self.n_done]
        self.pre = {_key(r): r for r in run.read_pre(repair=True)}
        self.errors = {_key(r): r.get("error") for r in self.records}

    def read_pre_edit(self) -> None:
        """Pre-edit records of every case, on the unedited model, written chunk by chunk."""
        missing = [i for i, k in enumerate(self.keys) if k not in self.pre]
        if missing and self.n_done:
            raise BenchError(f"{self.run.path}: pre-edit records are missing although edits were made; "
                             "start a new run")
        if missing:
            self.progress(f"pre-edit evaluation of {len(missing)} cases")
        jobs, lm = self.jobs, self.lm
        for start in range(0, len(missing), PRE_CHUNK):
            chunk = missing[start:start + PRE_CHUNK]
            states = [EvalState(forced=evaluate_forced(lm, jobs[i], self.protocol, self.opts.batch_size))
                      for i in chunk]
            evaluate_wild(lm, [jobs[i] for i in chunk], states, unedited=True)
            for i, st in zip(chunk, states):
                rec = case_record(jobs[i], lm.tokenizer, st)
                if st.forced is not None:  # what the last checkpoint compares each case's locality with
                    rec["pre_locality_ids"] = [r.pred_ids for r in st.forced.locality]
                self.run.append_pre(rec)
                self.pre[self.keys[i]] = rec

    def read_locality_probes(self) -> None:
        """The fixed locality probes and their unedited readings (drawn and read once per run)."""
        opts, stored = self.opts, self.run.read_probes()
        if stored is None:
            if self.n_done:
                raise BenchError(f"{self.run.path}: the locality probes are missing although edits were made; "
                                 "start a new run")
            self.probes = draw_locality_probes([(t.name, c) for t, c in self.items], opts.locality_probes, opts.seed)
            self.progress(f"reading {len(self.probes)} locality probes")
            self.readings = read_probes(self.lm, self.probes, self.jobs_by_task, self.protocol, opts.batch_size)
            self.run.write_probes({"per_task": opts.locality_probes, "seed": opts.seed,
                                   "probes": [{**asdict(p), "pre": r} for p, r in zip(self.probes, self.readings)]})
        else:
            fields = LocalityProbe.__dataclass_fields__
            self.probes = [LocalityProbe(**{k: p[k] for k in fields}) for p in stored["probes"]]
            self.readings = [p["pre"] for p in stored["probes"]]

    def current_view(self) -> EditHandle | None:
        return CombinedHandle(self.views) if self.views else None

    def save_state(self, n: int) -> None:
        tensors = {f"model.{name}": self.params[name] for name in self.originals}
        own = self.editor.sequential_state()
        tensors.update({f"editor.{k}": v for k, v in own.items() if isinstance(v, torch.Tensor)})
        plain = {k: v for k, v in own.items() if not isinstance(v, torch.Tensor)}
        self.run.write_state(tensors, {"n_edits": n, "order": [list(k) for k in self.keys[:n]],
                                       "editor": self.editor.name, **({"editor_state": plain} if plain else {})})

    def evaluate_checkpoint(self, n: int) -> None:
        """Every edit so far (or the --retention-sample of them), the probes and the hooks, on the
        model that holds them all; the record is appended to checkpoints.jsonl."""
        t0 = time.perf_counter()
        self.progress(f"checkpoint at {n} edits")
        opts, keys, pre, jobs = self.opts, self.keys, self.pre, self.jobs
        final = n == self.total  # the last checkpoint also scores each case's own locality prompts
        every = [i for i in range(n) if not self.errors.get(keys[i])]
        applied = every if final else retention_sample(every, opts.retention_sample, opts.seed, self.total)
        view = self.current_view()
        results = retention(self.lm, [jobs[i] for i in applied], self.protocol, opts.batch_size,
                            pre=[pre[keys[i]] for i in applied] if final else None, view=view)
        now = read_probes(self.lm, self.probes, self.jobs_by_task, self.protocol, opts.batch_size,
                          earlier=self.readings, view=view)
        record = {
            "n_edits": n, "n_applied": len(every),
            **({"retention_sample": {"size": len(applied), "seed": opts.seed}} if applied != every else {}),
            "cases": [{"task": keys[i][0], "case_id": keys[i][1], **res} for i, res in zip(applied, results)],
            "probes": [{"task": p.task, "case_id": p.case_id, "index": p.index, "pre": probe_scores(r, None),
                        "post": probe_scores(r, x),
                        **({"generation": x["generation"]["text"]} if "generation" in x else {})}
                       for p, r, x in zip(self.probes, self.readings, now)],
            "weight_change": {name: round(float((self.params[name].float() - w.float()).norm() / w.float().norm()), 6)
                              for name, w in self.originals.items()},
        }
        tasks = sorted({k[0] for k in keys}, key=[k[0] for k in keys].index)
        record["summary"] = checkpoint_summary(tasks, pre, record)
        for hook in self.hooks:
            block = hook.at_checkpoint(n, [jobs[i].case for i in every], view)
            if block is not None:
                record[hook.name] = block
        record["time"] = {"eval_s": round(time.perf_counter() - t0, 2)}
        self.run.append_checkpoint(record)
        self.checkpoints.append(record)

    def back_to_saved_state(self) -> None:
        """Where the last checkpoint left the model (and the editor); its evaluation if missing."""
        if self.state is None:
            return
        tensors = self.state[0]
        with torch.no_grad():
            for name, value in tensors.items():
                if name.startswith("model."):
                    param = self.params[name[len("model."):]]
                    self.originals[name[len("model."):]] = param.detach().clone()
                    param.copy_(value.to(param.device, param.dtype))
        own = {k[len("editor."):]: v for k, v in tensors.items() if k.startswith("editor.")}
        self.editor.load_sequential_state({**own, **self.state[1].get("editor_state", {})})
        back = self.editor.reattach(self.lm.model, self.lm.tokenizer)  # modules, hooks or context of the saved edits
        if back is not None:
            self.views.append(back)
        n = self.n_done
        if is_checkpoint(n, self.total, self.every) and n not in {c["n_edits"] for c in self.checkpoints}:
            self.evaluate_checkpoint(n)

    def edit(self, idx: list[int]) -> int:
        """Apply the cases at positions `idx` in one editor call (undone if numerically broken)
        and write their records; returns the number of edits made so far."""
        jobs = self.jobs
        self.progress(f"editing ({self.items[idx[0]][0].name})")
        torch.manual_seed(self.opts.seed + idx[0])  # per position: a resumed run edits as an uninterrupted one
        t0 = time.perf_counter()
        handle, errs = _apply(self.editor, self.lm.model, self.lm.tokenizer, [jobs[i].case for i in idx])
        edit_s = time.perf_counter() - t0
        if handle is not None:
            prompts = [jobs[i].case.prompt for i, e in zip(idx, errs) if e is None]
            broken = _broken_batch(self.lm, handle, self.views, prompts)
            if broken is not None:  # undone (weights, modules, the editor's own state): its cases fail
                handle.restore()
                handle, errs = None, [e or broken for e in errs]
        infos, batch_info = self._keep(handle, errs, len(idx))
        del handle  # a weights-only edit is never restored alone: drop its saved weights
        for k, i in enumerate(idx):
            record = {key: v for key, v in self.pre[self.keys[i]].items() if key not in PRE_ONLY}
            record.update(error=errs[k], order=i)
            if infos[k] or (k == 0 and batch_info):
                record["edit"] = {**infos[k], **({"batch": batch_info} if k == 0 and batch_info else {})}
            record["time"] = {"edit_s": round(edit_s / len(idx), 4), "edits_together": len(idx)}
            self.errors[self.keys[i]] = errs[k]
            self.write(self.items[i][0], record)
            self.records.append(record)
        return idx[-1] + 1

    def _keep(self, handle: EditHandle | None, errs: list[str | None], size: int) -> tuple[list[dict], dict]:
        """Take over a batch's edit (its changed tensors' unedited values; its view if it is more
        than weights); returns each case's edit facts and the batch's own."""
        infos: list[dict] = [{} for _ in range(size)]
        if handle is None:
            return infos, {}
        for name in handle.changed:
            if name not in self.originals:
                self.originals[name] = handle.original(name).detach().clone()
        per_case = handle.info.get("cases")
        ok = [k for k, e in enumerate(errs) if e is None]
        if isinstance(per_case, list) and len(per_case) == len(ok):
            for k, info in zip(ok, per_case):
                infos[k] = info
        elif ok:
            infos[ok[0]] = dict(handle.info)
        if set(handle.kinds) - {"weights"}:
            self.views.append(handle)  # undone at the end; its view is read at checkpoints
        return infos, {k: v for k, v in handle.info.items() if k != "cases"}

    def undo_all(self) -> None:
        """The model back to its unedited weights: modules, hooks and contexts first, then weights."""
        for view in reversed(self.views):
            view.restore()
        with torch.no_grad():
            for name, value in self.originals.items():
                self.params[name].copy_(value)

    def write_final_records(self) -> None:
        """Rewrite cases.jsonl with every case record's scores at the last checkpoint (the model
        with every edit), so that it reads as a single-mode one with "post" after all N edits;
        nothing when the run has not reached its last checkpoint."""
        if not (self.checkpoints and self.checkpoints[-1]["n_edits"] == self.total):
            return
        final = {(c["task"], c["case_id"]): c for c in self.checkpoints[-1]["cases"]}
        for record in self.records:
            got = final.get(_key(record))
            if got is None:
                continue
            record["post"] = got["post"]
            if "wild" in got and "wild" in record:
                record["wild"]["generations"]["post"] = got["wild"]["generations"]
                record["wild"]["verdicts"]["post"] = got["wild"]["verdicts"]
        self.run.write_cases(self.records)
