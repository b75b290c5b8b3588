"""The one orchestrator behind `bench run` and `bench regress`: for each case, evaluate before the
edit, apply it, evaluate after, restore (single mode); or apply every edit in turn and evaluate
each case on the model holding all of them (sequential mode).

Results go to a run directory (bench.core.runfiles) case by case, so a killed run loses nothing
and `--resume` continues where it stopped without repeating a finished case. Hooks (the lm-eval
regression, bench.regression.hook) are called at fixed points of the loop.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import pandas as pd
import torch
from tqdm import tqdm

from bench.core.cases import EditCase
from bench.core.distributed import Shard
from bench.core.errors import BenchError
from bench.core.layout import find_layout
from bench.core.metrics import case_scores, summarize_task
from bench.core.generation import Generation
from bench.core.probes import CaseEval, evaluate_case, predictions
from bench.core.prompts import format_case
from bench.core.replay import BlockOutputs, first_changed_block
from bench.core.wild import WildSettings, fluency_texts, generate_cases, wild_result
from bench.core.runfiles import RunDir, check_run_name, new_run_dir
from bench.regression.hook import RegressionHook
from bench.session import RunOptions, Setup, evaluation_case, options_from_config, run_config, set_up


# --------------------------------------------------------------------------------------------
# The case loop
# --------------------------------------------------------------------------------------------


@dataclass
class Job:
    """One case and what to measure on it."""

    case: EditCase  # as the editor sees it (instruction-wrapped for editors that use them)
    counterfact: bool = False  # also CounterFact's probability comparisons
    wild: WildSettings | None = None  # also evaluation in the wild (generated answers)


@dataclass
class Protocol:
    """How a run evaluates: teacher forced (the answer fed), in the wild (Job.wild), or both;
    every probe prompt as the data gives it or in the model's chat template."""

    teacher_forced: bool = True
    prompt_format: str = "plain"


@dataclass
class _State:
    """What one evaluation of a job read from the model."""

    forced: CaseEval | None = None
    generations: list[Generation] | None = None
    fluency: list[Generation] | None = None
    forced_s: float = 0.0  # seconds of the teacher-forced evaluation
    wild_s: float = 0.0  # seconds of generation (this case's share of a batched one)


def _evaluate_forced(lm, job: Job, protocol: Protocol, batch_size: int) -> CaseEval | None:
    if not protocol.teacher_forced:
        return None
    case = format_case(lm.tokenizer, job.case, protocol.prompt_format)
    return evaluate_case(lm.model, lm.tokenizer, case, counterfact=job.counterfact, batch_size=batch_size)


def _evaluate_wild(lm, jobs: list[Job], states: list[_State], batch_size: int,
                   earlier: list[_State] | None = None) -> None:
    """Generations (and fluency texts) for the jobs evaluated in the wild, batched across the
    jobs that share their settings, into `states`; with the `earlier` (pre-edit) states, only
    what the edited model no longer reproduces is decoded again."""
    groups: dict[int, list[int]] = {}
    for k, job in enumerate(jobs):
        if job.wild is not None:
            groups.setdefault(id(job.wild), []).append(k)
    for ks in groups.values():
        settings = jobs[ks[0]].wild
        cases = [jobs[k].case for k in ks]
        t0 = time.perf_counter()
        gens = generate_cases(lm.model, lm.tokenizer, cases, settings, batch_size,
                              earlier=[earlier[k].generations for k in ks] if earlier else None)
        flu = (fluency_texts(lm.model, lm.tokenizer, cases, settings, batch_size,
                             earlier=[earlier[k].fluency for k in ks] if earlier else None)
               if settings.fluency_tokens else [None] * len(ks))
        share = (time.perf_counter() - t0) / len(ks)
        for k, g, f in zip(ks, gens, flu):
            states[k].generations, states[k].fluency = g, f
            states[k].wild_s += share


def case_record(job: Job, tokenizer, pre: _State) -> dict:
    """The cases.jsonl record of a case as its pre-edit evaluation leaves it; `_add_post` adds
    `post`, `edit` (the handle's facts) and the post-edit side of `wild`, or the loop `error`."""
    record = {"task": job.case.task, "case_id": job.case.case_id, "case": job.case.to_dict(),
              "pre": case_scores(pre.forced) if pre.forced is not None else {}, "error": None}
    if pre.forced is not None:
        record["predictions"] = {"pre": predictions(tokenizer, pre.forced)}
    if job.wild is not None:
        result = wild_result(job.case, pre.generations, None, job.wild,
                             (pre.fluency, None) if pre.fluency is not None else None)
        record["pre"].update(result["pre"])
        record["wild"] = result["record"]
    return record


def _add_post(record: dict, job: Job, tokenizer, pre: _State, post: _State, handle) -> None:
    record["post"] = case_scores(post.forced, pre.forced) if post.forced is not None else {}
    if post.forced is not None:
        record["predictions"]["post"] = predictions(tokenizer, post.forced)
    if job.wild is not None:
        fluency = (pre.fluency, post.fluency) if pre.fluency is not None else None
        result = wild_result(job.case, pre.generations, post.generations, job.wild, fluency)
        record["post"].update(result["post"])
        record["wild"] = result["record"]
    if handle.info:
        record["edit"] = dict(handle.info)


def run_case(lm, editor, case: EditCase, counterfact: bool, batch_size: int) -> dict:
    """Pre-edit evaluation, edit, post-edit evaluation, restore. Never leaves the model edited."""
    return next(run_cases(lm, editor, [Job(case, counterfact)], batch_size))


def run_cases(lm, editor, jobs: list[Job], batch_size: int, reuse_unchanged_blocks: bool = True,
              while_edited: Callable[[EditCase], None] | None = None,
              protocol: Protocol | None = None) -> Iterator[dict]:
    """`run_case` for several jobs whose edits the editor may compute together (`apply_many`):
    every pre-edit evaluation first (the generations of all jobs in one batch), then each edit
    in turn applied, evaluated and restored, its record yielded as soon as it is complete.
    `while_edited(case)` is called while the case's edit is applied, after its evaluation.

    The teacher-forced post-edit evaluation runs the pre-edit one's batches again; the blocks
    below the lowest one the edit changed (from the handle's parameter names) are not run again
    but replaced by their recorded outputs (identical results; `reuse_unchanged_blocks=False`
    runs them)."""
    protocol = protocol or Protocol()
    model, tok = lm.model, lm.tokenizer
    layout = find_layout(model)
    pres, kept = [], []
    for job in jobs:
        t0 = time.perf_counter()
        outputs = BlockOutputs(layout)
        with outputs.record() if reuse_unchanged_blocks else nullcontext():
            pres.append(_State(forced=_evaluate_forced(lm, job, protocol, batch_size)))
        pres[-1].forced_s = time.perf_counter() - t0
        kept.append(outputs)
    _evaluate_wild(lm, jobs, pres, batch_size)
    records = [case_record(job, tok, pre) for job, pre in zip(jobs, pres)]
    edits = editor.apply_many(model, tok, [job.case for job in jobs]) if len(jobs) > 1 else None
    for k, (job, pre, record) in enumerate(zip(jobs, pres, records)):
        t1 = time.perf_counter()
        try:
            try:
                handle = next(edits) if edits is not None else editor.apply(model, tok, job.case)
            except BenchError:
                if edits is None:
                    raise
                edits = None  # the joint call failed: go on one case at a time, so the error lands on its case
                handle = editor.apply(model, tok, job.case)
        except BenchError as exc:
            record["error"] = str(exc)
            kept[k] = None
            yield record
            continue
        t2 = time.perf_counter()
        try:
            with kept[k].replay(first_changed_block(layout, handle.changed)):
                post = _State(forced=_evaluate_forced(lm, job, protocol, batch_size))
            post.forced_s = time.perf_counter() - t2
            _evaluate_wild(lm, [job], [post], batch_size, earlier=[pre])
            _add_post(record, job, tok, pre, post, handle)
            if while_edited is not None:
                while_edited(job.case)
        finally:
            handle.restore()
            kept[k] = None  # free the recorded outputs
        # Edits computed together: the first case's edit_s carries the joint computation.
        record["time"] = {"edit_s": round(t2 - t1, 4), "eval_s": round(pre.forced_s + post.forced_s, 4)}
        if job.wild is not None:
            record["time"]["wild_s"] = round(pre.wild_s + post.wild_s, 4)
        if len(jobs) > 1:
            record["time"]["edits_together"] = len(jobs)
        yield record


def run_sequential(lm, editor, jobs: list[Job], batch_size: int,
                   all_applied: Callable[[list[EditCase]], None] | None = None,
                   protocol: Protocol | None = None) -> list[dict]:
    """Every case evaluated on the unedited model, then every edit applied in order and kept,
    then every case evaluated on the model holding all of them (`all_applied(applied cases)` is
    called at that point), then every edit restored in reverse order."""
    protocol = protocol or Protocol()
    model, tok = lm.model, lm.tokenizer
    pres = [_State(forced=_evaluate_forced(lm, job, protocol, batch_size)) for job in jobs]
    _evaluate_wild(lm, jobs, pres, batch_size)
    records = [case_record(job, tok, pre) for job, pre in zip(jobs, pres)]
    handles = []
    try:
        for job, record in zip(jobs, records):
            t0 = time.perf_counter()
            try:
                handles.append((job, editor.apply(model, tok, job.case)))
            except BenchError as exc:
                record["error"] = str(exc)
            record["time"] = {"edit_s": round(time.perf_counter() - t0, 4)}
        applied = [job for job, _ in handles]
        posts = [_State(forced=_evaluate_forced(lm, job, protocol, batch_size)) for job in applied]
        pre_of = {id(job): pre for job, pre in zip(jobs, pres)}
        _evaluate_wild(lm, applied, posts, batch_size, earlier=[pre_of[id(job)] for job in applied])
        by_job = {id(job): (post, handle) for (job, handle), post in zip(handles, posts)}
        for job, pre, record in zip(jobs, pres, records):
            if id(job) in by_job:
                post, handle = by_job[id(job)]
                _add_post(record, job, tok, pre, post, handle)
        if all_applied is not None:
            all_applied([job.case for job in applied])
    finally:
        for _, handle in reversed(handles):
            handle.restore()
    return records


# --------------------------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------------------------


def summarize_run(config: dict, records: list[dict]) -> dict:
    tasks, info = {}, {}
    for task in config["tasks"]:
        name = task["name"]
        recs = [r for r in records if r["task"] == name]
        tasks[name] = summarize_task(recs)
        info[name] = {"holdout": task["holdout"], "n_cases": len(recs),
                      "planned_cases": task["n_cases"],
                      "errors": sum(1 for r in recs if r.get("error")),
                      "skipped": task["skipped"], "skipped_reasons": task.get("skipped_reasons", {}),
                      "data": task.get("data", "real")}
        if name in (config.get("wild") or {}):
            info[name]["wild"] = _stop_counts(recs, config["wild"][name]["max_new_tokens"])
    return {"data": config.get("data", "real"),
            "config": {"model": config["model"]["spec"], "editor": config["editor"]["name"],
                       "hparams": config["editor"]["hparams"], "seed": config["seed"],
                       "mode": config.get("mode", "single"),
                       "metric_definitions": config["metric_definitions"]},
            "tasks": tasks, "task_info": info}


def _stop_counts(records: list[dict], cap: int) -> dict:
    """How the generated answers of a task stopped: a cap that cuts answers shows here."""
    stops: dict[str, int] = {}
    for r in records:
        for state in (r.get("wild") or {}).get("generations", {}).values():
            for entry in [state.get("prompt")] + [e for k in ("rephrase", "locality", "portability")
                                                   for e in state.get(k, [])]:
                if entry:
                    stops[entry["stop"]] = stops.get(entry["stop"], 0) + 1
    total = sum(stops.values())
    return {"max_new_tokens": cap, "generations": total, "stops": stops,
            "cap_hit_rate": round(stops.get("max_new_tokens", 0) / total, 4) if total else None}


def format_summary(summary: dict) -> str:
    rows = []
    for task, metrics in summary["tasks"].items():
        info = summary["task_info"][task]
        for metric, s in metrics.items():
            pre = "" if s["pre"] is None else f"{s['pre']:.1f}"
            rows.append({"task": task + (" (holdout)" if info["holdout"] else ""), "metric": metric,
                         "pre": pre, "post": f"{s['post']:.1f}",
                         "95% CI": f"[{s['ci'][0]:.1f}, {s['ci'][1]:.1f}]", "n": s["n"]})
    if not rows:
        return "no finished cases"
    table = pd.DataFrame(rows).to_string(index=False)
    notes = [f"{t}: {i['errors']} case errors, {i['skipped']} records skipped"
             for t, i in summary["task_info"].items() if i["errors"] or i["skipped"]]
    notes += [f"{t}: generated answers cut by the cap ({i['wild']['max_new_tokens']} tokens): "
              f"{i['wild']['stops'].get('max_new_tokens', 0)} of {i['wild']['generations']}"
              for t, i in summary["task_info"].items() if i.get("wild") and i["wild"]["generations"]]
    return "\n".join([table] + notes)


# --------------------------------------------------------------------------------------------
# The orchestrator
# --------------------------------------------------------------------------------------------


class RunHook:
    """What the orchestrator calls at fixed points of the case loop (every method optional to
    override). `finish` returns the block it adds to summary.json under its `name`."""

    name = ""

    def before_cases(self, todo: list[EditCase]) -> None:
        """Before the first case; the model is unedited."""

    def while_edited(self, case: EditCase) -> None:
        """Single mode: the case's edit (alone) is applied, its evaluation done."""

    def all_applied(self, applied: list[EditCase]) -> None:
        """Sequential mode: every edit that did not fail is applied."""

    def on_record(self, record: dict) -> None:
        """A finished case record, before it is written (a hook may add to it)."""

    def finish(self) -> dict | None:
        """After the last case, the model restored."""
        return None


def execute(opts: RunOptions, resume_dir: Path | None = None, argv: list[str] | None = None,
            log: Callable[[str], None] = print, rewrite_config: bool = False,
            label: str | None = None,
            hooks: Callable[[Setup, RunDir], list[RunHook]] | None = None) -> Path:
    """Run (or resume) a benchmark run; returns the run directory. The run directory is locked
    while this process writes it (a resumed one before anything loads). `hooks(setup, run)`
    gives hooks besides the regression (which --regression adds)."""
    if opts.run_name is not None:
        check_run_name(opts.run_name)
    shard = Shard.current(opts.device)
    rank = shard.rank if shard.world > 1 else None
    run = None
    try:
        if resume_dir is not None:
            run = RunDir(resume_dir)
            run.lock(rank)
        setup = set_up(opts, log, shard=shard)
        if run is None:
            label = opts.run_name or label or f"{opts.editor}-{'+'.join(t.name for t in setup.planned)}"
            path = new_run_dir(Path(opts.output_dir), label) if shard.rank == 0 else None
            run = RunDir(shard.broadcast(path))
            run.lock(rank)
        return _execute(setup, run, resume_dir, argv, log, rewrite_config, hooks)
    finally:
        if run is not None:
            run.release()


def _execute(setup: Setup, run: RunDir, resume_dir: Path | None, argv, log, rewrite_config: bool,
             extra_hooks) -> Path:
    opts, planned, shard, editor, lm = setup.opts, setup.planned, setup.shard, setup.editor, setup.lm
    config = run_config(setup, argv)
    if shard.rank == 0 and (resume_dir is None or rewrite_config):
        if rewrite_config:  # keep the original command and date; note the extension
            old = run.read_config()
            config["command"], config["argv"], config["created"] = old["command"], old["argv"], old["created"]
            config["extended"] = old.get("extended", []) + [
                {"limit": opts.limit, "at": datetime.now(timezone.utc).isoformat(timespec="seconds")}]
        run.write_config(config)
    records = run.read_cases(repair=True)
    done = {(r["task"], r["case_id"]) for r in records}
    for t in planned:
        for s in t.skipped[:3]:
            log(f"skipped {t.name} record {s.index} of {s.source}: {s.reason}")
        if len(t.skipped) > 3:
            log(f"... and {len(t.skipped) - 3} more skipped {t.name} records")
    if opts.mode == "sequential" and done:
        raise BenchError(f"{run.path} is a sequential run with finished cases; it cannot be resumed")

    torch.manual_seed(opts.seed)
    order = [(t.name, c.case_id) for t in planned for c in t.cases]
    # Case i of the planned order belongs to process i mod world: a fixed split, so a resumed
    # shard picks up exactly its own remaining cases.
    todo = [(t, evaluation_case(setup, c)) for i, (t, c) in enumerate((t, c) for t in planned for c in t.cases)
            if i % shard.world == shard.rank and (t.name, c.case_id) not in done]
    if shard.rank == 0:
        log(f"run directory: {run.path}  ({len(done)} cases already done, {len(todo)} to go"
            + (f" on this process of {shard.world})" if shard.world > 1 else ")"))
    hooks: list[RunHook] = list(extra_hooks(setup, run)) if extra_hooks else []
    if opts.regression:
        hooks.append(RegressionHook(lm, opts.regression_options(), run.path, setup.data_dir,
                                    [t.name for t in planned], [c for t in planned for c in t.cases], log=log))
    for hook in hooks:
        hook.before_cases([c for _, c in todo])

    def while_edited(case: EditCase) -> None:
        for hook in hooks:
            hook.while_edited(case)

    def all_applied(applied: list[EditCase]) -> None:
        for hook in hooks:
            hook.all_applied(applied)

    def write(task, record: dict) -> None:
        record["holdout"] = task.holdout
        for hook in hooks:
            hook.on_record(record)
        run.append_case(record, rank=shard.rank if shard.world > 1 else None)
        records.append(record)
        if record["error"]:
            tqdm.write(f"case {task.name}/{record['case_id']}: {record['error']}")

    protocol = Protocol(teacher_forced="teacher_forced" in opts.protocols, prompt_format=opts.prompt_format)

    def jobs(items) -> list[Job]:
        return [Job(case, task.counterfact, setup.wild.get(task.name)) for task, case in items]

    started = time.perf_counter()
    bar = tqdm(total=len(todo), desc=f"{editor.name}" + (f"[{shard.rank}]" if shard.world > 1 else ""),
               unit="edit", dynamic_ncols=True, position=shard.rank)
    finished = False
    summary = None
    try:
        if opts.mode == "sequential":
            bar.set_postfix_str("applying every edit")
            results = run_sequential(lm, editor, jobs(todo), opts.batch_size, all_applied=all_applied,
                                     protocol=protocol)
            for (task, _), record in zip(todo, results):
                write(task, record)
                bar.update()
        else:
            per_call = editor.edits_per_call
            for start in range(0, len(todo), per_call):
                chunk = todo[start:start + per_call]
                bar.set_postfix_str(chunk[0][0].name)
                for (task, _), record in zip(chunk, run_cases(
                        lm, editor, jobs(chunk), batch_size=opts.batch_size,
                        while_edited=while_edited, protocol=protocol)):
                    write(task, record)
                    bar.update()
        finished = True
    finally:
        bar.close()
        if shard.world > 1 and finished:
            shard.barrier()  # every shard is complete: merge them
        if shard.rank == 0 and (finished or shard.world == 1):
            if shard.world > 1:
                records = run.merge_shards(order)
            summary = summarize_run(config, records)
            summary["wall_time_s"] = round(time.perf_counter() - started, 2)
            run.write_summary(summary)
    if shard.rank == 0:
        log(format_summary(summary))
        for hook in hooks:
            block = hook.finish()
            if block is not None:
                summary[hook.name] = block
                run.write_summary(summary)
        log(f"results: {run.path}")
    return run.path


def resume(run_path: Path, log: Callable[[str], None] = print, limit: int | None | str = "keep") -> Path:
    """Continue a run with its stored options. `limit` other than "keep" extends (or narrows) the
    cases per task; finished cases are never rerun and config.json records the new plan."""
    run = RunDir(run_path)
    config = run.read_config()
    opts = options_from_config(config)
    # Pin every editor hyperparameter as the run resolved it, so a changed default in the code
    # cannot silently edit the remaining cases differently from the finished ones.
    opts.hparams = {**config["editor"]["hparams"], **opts.hparams}
    if limit != "keep" and limit != opts.limit:
        opts.limit = limit
        return execute(opts, resume_dir=run.path, argv=config.get("argv"), log=log,
                       rewrite_config=True)
    return execute(opts, resume_dir=run.path, argv=config.get("argv"), log=log)
