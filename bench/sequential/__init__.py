"""Sequential (lifelong) editing: the run's cases applied in their planned order and never
restored, `--edit-batch` cases per editor call (`Editor.apply_batch`), and at checkpoints (every
`--eval-every` edits and at the end) every edit made so far evaluated on the model that holds
them all:

* retention - reliability, generality, portability (and CounterFact's efficacy / paraphrase) of
  every earlier edit, not only the latest, teacher forced and in the wild;
* locality - on a fixed set of locality prompts per task (`--locality-probes`), drawn once per
  run with the seed and read on the unedited model first, so that the curve compares one set;
* whatever the hooks measure (the lm-eval regression suite with --regression).

"pre" is always the unedited model: every case's pre-edit record and the probes' readings are
taken before the first edit.

Crash safety: the pre-edit records (sequential/pre.jsonl) and the probes
(sequential/locality_probes.json) are written before the first edit; at each checkpoint the
changed tensors of the model and the editor's own state (`Editor.sequential_state`) are saved
(sequential/state.safetensors, replaced atomically, with the applied case order), then the
checkpoint's evaluation is appended to checkpoints.jsonl. A resumed run loads that state, drops
the case records of edits made after it (lost with the process, so made again), evaluates the
checkpoint if its record is missing, and goes on: nothing is applied twice and no finished
checkpoint is lost. The edits are seeded per position, so a resumed run ends in the state an
uninterrupted one reaches.

A numerically broken batch (a NaN or inf in the weights it changed; a NaN, inf or float32-
overflowing activation or logit after its edit prompts: bench.evaluation.broken_edit) is undone
at once: its handle is
restored (weights, modules, the editor's own sequential state), each of its cases fails with the
reason, and the run goes on from the model as it was before the batch.
"""

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

# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def _key(record: dict) -> tuple[str, str]:
    return record["task"], record["case_id"]


def _is_checkpoint(n: int, total: int, every: int) -> bool:
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


def run_sequential(setup, run: RunDir, items: list[tuple[object, EditCase]], jobs: list[Job],
                   hooks: list[RunHook], protocol: Protocol, write: Callable[[object, dict], None],
                   progress, log: Callable[[str], None] = print) -> tuple[list[dict], list[dict]]:
    """Run (or resume) the sequential protocol over `items` (planned task, evaluation case) with
    their `jobs`; `write(task, record)` stores a case record; returns (case records, checkpoint
    records). The model is back to its unedited weights when this returns or raises."""
    opts, lm, editor = setup.opts, setup.lm, setup.editor
    model, tok = lm.model, lm.tokenizer
    keys = [(task.name, case.case_id) for task, case in items]
    total, every = len(items), opts.eval_every

    # What a killed run left: the state of its last checkpoint, and what came before it.
    state = run.read_state()
    n_done = 0
    if state is not None:
        n_done = int(state[1]["n_edits"])
        if [tuple(k) for k in state[1]["order"]] != keys[:n_done]:
            raise BenchError(f"{run.path}: the planned cases differ from the edits its saved state holds; "
                             "start a new run")
    records = run.read_cases(repair=True)
    kept = [r for r in records if _key(r) in set(keys[:n_done])]
    if len(kept) != len(records):  # edits made after the last checkpoint were lost with the process
        log(f"dropping {len(records) - len(kept)} case records made after the last checkpoint (edit {n_done})")
        run.write_cases(kept)
        records = kept
    checkpoints = [c for c in run.read_checkpoints(repair=True) if c["n_edits"] <= n_done]
    pre = {_key(r): r for r in run.read_pre(repair=True)}

    # 1. Pre-edit records of every case, on the unedited model, written chunk by chunk.
    missing = [i for i, k in enumerate(keys) if k not in pre]
    if missing and n_done:
        raise BenchError(f"{run.path}: pre-edit records are missing although edits were made; start a new run")
    if missing:
        progress(f"pre-edit evaluation of {len(missing)} cases")
    for start in range(0, len(missing), PRE_CHUNK):
        chunk = missing[start:start + PRE_CHUNK]
        states = [EvalState(forced=evaluate_forced(lm, jobs[i], protocol, opts.batch_size)) for i in chunk]
        evaluate_wild(lm, [jobs[i] for i in chunk], states)
        for i, st in zip(chunk, states):
            rec = case_record(jobs[i], tok, st)
            if st.forced is not None:  # what the last checkpoint compares each case's locality with
                rec["pre_locality_ids"] = [r.pred_ids for r in st.forced.locality]
            run.append_pre(rec)
            pre[keys[i]] = rec

    # 2. The fixed locality probes and their unedited readings.
    jobs_by_task = {task.name: job for (task, _), job in zip(items, jobs)}
    stored = run.read_probes()
    if stored is None:
        if n_done:
            raise BenchError(f"{run.path}: the locality probes are missing although edits were made; start a new run")
        probes = draw_locality_probes([(t.name, c) for t, c in items], opts.locality_probes, opts.seed)
        progress(f"reading {len(probes)} locality probes")
        readings = read_probes(lm, probes, jobs_by_task, protocol, opts.batch_size)
        run.write_probes({"per_task": opts.locality_probes, "seed": opts.seed,
                          "probes": [{**asdict(p), "pre": r} for p, r in zip(probes, readings)]})
    else:
        probes = [LocalityProbe(**{k: p[k] for k in LocalityProbe.__dataclass_fields__}) for p in stored["probes"]]
        readings = [p["pre"] for p in stored["probes"]]

    for hook in hooks:
        hook.before_cases([case for _, case in items])

    params = dict(model.named_parameters())
    originals: dict[str, torch.Tensor] = {}  # unedited values of every tensor an edit changed
    views: list[EditHandle] = []  # handles of edits that are more than weights (modules, context)
    errors = {_key(r): r.get("error") for r in records}

    def current_view() -> EditHandle | None:
        return CombinedHandle(views) if views else None

    def save_state(n: int) -> None:
        tensors = {f"model.{name}": params[name] for name in originals}
        own = editor.sequential_state()
        tensors.update({f"editor.{k}": v for k, v in own.items() if isinstance(v, torch.Tensor)})
        plain = {k: v for k, v in own.items() if not isinstance(v, torch.Tensor)}
        run.write_state(tensors, {"n_edits": n, "order": [list(k) for k in keys[:n]], "editor": editor.name,
                                  **({"editor_state": plain} if plain else {})})

    def evaluate_checkpoint(n: int) -> None:
        t0 = time.perf_counter()
        progress(f"checkpoint at {n} edits")
        final = n == total  # the last checkpoint also scores each case's own locality prompts
        every = [i for i in range(n) if not errors.get(keys[i])]
        applied = every if final else retention_sample(every, opts.retention_sample, opts.seed, total)
        kept_jobs = [jobs[i] for i in applied]
        view = current_view()
        results = retention(lm, kept_jobs, protocol, opts.batch_size,
                            pre=[pre[keys[i]] for i in applied] if final else None, view=view)
        now = read_probes(lm, probes, jobs_by_task, protocol, opts.batch_size, earlier=readings, view=view)
        record = {
            "n_edits": n, "n_applied": len(every),
            **({"retention_sample": {"size": len(applied), "seed": opts.seed}} if applied != every else {}),
            "cases": [{"task": keys[i][0], "case_id": keys[i][1], **res} for i, res in zip(applied, results)],
            "probes": [{"task": p.task, "case_id": p.case_id, "index": p.index, "pre": probe_scores(r, None),
                        "post": probe_scores(r, x), **({"generation": x["generation"]["text"]} if "generation" in x else {})}
                       for p, r, x in zip(probes, readings, now)],
            "weight_change": {name: round(float((params[name].float() - w.float()).norm() / w.float().norm()), 6)
                              for name, w in originals.items()},
        }
        record["summary"] = checkpoint_summary(sorted({k[0] for k in keys}, key=[k[0] for k in keys].index), pre, record)
        for hook in hooks:
            block = hook.at_checkpoint(n, [jobs[i].case for i in every], view)
            if block is not None:
                record[hook.name] = block
        record["time"] = {"eval_s": round(time.perf_counter() - t0, 2)}
        run.append_checkpoint(record)
        checkpoints.append(record)

    try:
        # 3. Back to where the last checkpoint left the model (and the editor).
        if state is not None:
            tensors = state[0]
            with torch.no_grad():
                for name, value in tensors.items():
                    if name.startswith("model."):
                        param = params[name[len("model."):]]
                        originals[name[len("model."):]] = param.detach().clone()
                        param.copy_(value.to(param.device, param.dtype))
            editor.load_sequential_state({**{k[len("editor."):]: v for k, v in tensors.items() if k.startswith("editor.")},
                                          **state[1].get("editor_state", {})})
            back = editor.reattach(model, tok)  # modules, hooks or context of the saved edits
            if back is not None:
                views.append(back)
            if _is_checkpoint(n_done, total, every) and n_done not in {c["n_edits"] for c in checkpoints}:
                evaluate_checkpoint(n_done)

        # 4. The edits, batch by batch, with checkpoints between them.
        for start in range(n_done, total, opts.edit_batch):
            idx = list(range(start, min(start + opts.edit_batch, total)))
            progress(f"editing ({items[idx[0]][0].name})")
            torch.manual_seed(opts.seed + start)  # per position: a resumed run edits as an uninterrupted one
            t0 = time.perf_counter()
            handle, errs = _apply(editor, model, tok, [jobs[i].case for i in idx])
            edit_s = time.perf_counter() - t0
            if handle is not None:
                prompts = [jobs[i].case.prompt for i, e in zip(idx, errs) if e is None]
                broken = _broken_batch(lm, handle, views, prompts)
                if broken is not None:  # undone (weights, modules, the editor's own state): its cases fail
                    handle.restore()
                    handle, errs = None, [e or broken for e in errs]
            infos = [{} for _ in idx]
            batch_info = {}
            if handle is not None:
                for name in handle.changed:
                    if name not in originals:
                        originals[name] = handle.original(name).detach().clone()
                per_case = handle.info.get("cases")
                ok = [k for k, e in enumerate(errs) if e is None]
                if isinstance(per_case, list) and len(per_case) == len(ok):
                    for k, info in zip(ok, per_case):
                        infos[k] = info
                elif ok:
                    infos[ok[0]] = dict(handle.info)
                batch_info = {k: v for k, v in handle.info.items() if k != "cases"}
                if set(handle.kinds) - {"weights"}:
                    views.append(handle)  # undone at the end; its view is read at checkpoints
            del handle  # a weights-only edit is never restored alone: drop its saved weights
            for k, i in enumerate(idx):
                record = {k: v for k, v in pre[keys[i]].items() if k not in PRE_ONLY}
                record.update(error=errs[k], order=i)
                if infos[k] or (k == 0 and batch_info):
                    record["edit"] = {**infos[k], **({"batch": batch_info} if k == 0 and batch_info else {})}
                record["time"] = {"edit_s": round(edit_s / len(idx), 4), "edits_together": len(idx)}
                errors[keys[i]] = errs[k]
                write(items[i][0], record)
                records.append(record)
            n = idx[-1] + 1
            if _is_checkpoint(n, total, every):
                save_state(n)
                evaluate_checkpoint(n)
    finally:
        for view in reversed(views):  # modules, hooks and contexts first, then the weights
            view.restore()
        with torch.no_grad():
            for name, value in originals.items():
                params[name].copy_(value)

    # Every case record gets its scores at the last checkpoint (the model with every edit): the
    # record then reads as a single-mode one, with "post" after all N edits.
    if checkpoints and checkpoints[-1]["n_edits"] == total:
        final = {(c["task"], c["case_id"]): c for c in checkpoints[-1]["cases"]}
        for record in records:
            got = final.get(_key(record))
            if got is None:
                continue
            record["post"] = got["post"]
            if "wild" in got and "wild" in record:
                record["wild"]["generations"]["post"] = got["wild"]["generations"]
                record["wild"]["verdicts"]["post"] = got["wild"]["verdicts"]
        run.write_cases(records)
    return records, checkpoints


def sequential_summary(config: dict, checkpoints: list[dict], planned: int) -> dict:
    """summary.json's `sequential` block: the run's shape and, per checkpoint, each task's
    metrics (post-edit mean, interval, n) and the relative weight change."""
    seq = config.get("sequential", {})
    return {"edit_batch": seq.get("edit_batch"), "eval_every": seq.get("eval_every"),
            "locality_probes": seq.get("locality_probes"), "planned_edits": planned,
            "n_edits": checkpoints[-1]["n_edits"] if checkpoints else 0,
            "retention_sample": seq.get("retention_sample", 0),
            "checkpoints": [{"n_edits": c["n_edits"], "n_applied": c["n_applied"],
                             **({"retention_sample": c["retention_sample"]} if "retention_sample" in c else {}),
                             "tasks": {t: {m: {k: s[k] for k in ("pre", "post", "ci", "n")} for m, s in ms.items()}
                                       for t, ms in c["summary"].items()},
                             "weight_change": c["weight_change"], "eval_s": c["time"]["eval_s"],
                             **({"regression": c["regression"]} if "regression" in c else {})}
                            for c in checkpoints]}
