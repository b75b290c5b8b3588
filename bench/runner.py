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
from bench.core.probes import CaseEval, evaluate_case, predictions
from bench.core.replay import BlockOutputs, first_changed_block
from bench.core.runfiles import RunDir, check_run_name, new_run_dir
from bench.regression.hook import RegressionHook
from bench.session import RunOptions, Setup, evaluation_case, options_from_config, run_config, set_up


# --------------------------------------------------------------------------------------------
# The case loop
# --------------------------------------------------------------------------------------------


def case_record(case: EditCase, tokenizer, pre: CaseEval) -> dict:
    """The cases.jsonl record of a case as its pre-edit evaluation leaves it; the loop adds
    `post`, `edit` (the handle's facts) and `time`, or `error`."""
    return {"task": case.task, "case_id": case.case_id, "case": case.to_dict(),
            "pre": case_scores(pre), "predictions": {"pre": predictions(tokenizer, pre)},
            "error": None}


def _add_post(record: dict, tokenizer, pre: CaseEval, post: CaseEval, handle) -> None:
    record["post"] = case_scores(post, pre)
    record["predictions"]["post"] = predictions(tokenizer, post)
    if handle.info:
        record["edit"] = dict(handle.info)


def run_case(lm, editor, case: EditCase, counterfact: bool, batch_size: int) -> dict:
    """Pre-edit evaluation, edit, post-edit evaluation, restore. Never leaves the model edited."""
    return next(run_cases(lm, editor, [(case, counterfact)], batch_size))


def run_cases(lm, editor, cases: list[tuple[EditCase, bool]], batch_size: int,
              reuse_unchanged_blocks: bool = True,
              while_edited: Callable[[EditCase], None] | None = None) -> Iterator[dict]:
    """`run_case` for several (case, counterfact) pairs whose edits the editor may compute
    together (`apply_many`): every pre-edit evaluation first, then each edit in turn applied,
    evaluated and restored, its record yielded as soon as it is complete. `while_edited(case)`
    is called while the case's edit is applied, after its evaluation.

    The post-edit evaluation runs the pre-edit one's batches again; the blocks below the lowest
    one the edit changed (from the handle's parameter names) are not run again but replaced by
    their recorded outputs (identical results; `reuse_unchanged_blocks=False` runs them)."""
    model, tok = lm.model, lm.tokenizer
    layout = find_layout(model)
    records, pres, pre_s, kept = [], [], [], []
    for case, counterfact in cases:
        t0 = time.perf_counter()
        outputs = BlockOutputs(layout)
        with outputs.record() if reuse_unchanged_blocks else nullcontext():
            pre = evaluate_case(model, tok, case, counterfact=counterfact, batch_size=batch_size)
        pre_s.append(time.perf_counter() - t0)
        pres.append(pre)
        kept.append(outputs)
        records.append(case_record(case, tok, pre))
    edits = editor.apply_many(model, tok, [c for c, _ in cases]) if len(cases) > 1 else None
    for k, ((case, counterfact), pre, record) in enumerate(zip(cases, pres, records)):
        t1 = time.perf_counter()
        try:
            try:
                handle = next(edits) if edits is not None else editor.apply(model, tok, case)
            except BenchError:
                if edits is None:
                    raise
                edits = None  # the joint call failed: go on one case at a time, so the error lands on its case
                handle = editor.apply(model, tok, case)
        except BenchError as exc:
            record["error"] = str(exc)
            kept[k] = None
            yield record
            continue
        t2 = time.perf_counter()
        try:
            with kept[k].replay(first_changed_block(layout, handle.changed)):
                post = evaluate_case(model, tok, case, counterfact=counterfact, batch_size=batch_size)
            _add_post(record, tok, pre, post, handle)
            t3 = time.perf_counter()
            if while_edited is not None:
                while_edited(case)
        finally:
            handle.restore()
            kept[k] = None  # free the recorded outputs
        # Edits computed together: the first case's edit_s carries the joint computation.
        record["time"] = {"edit_s": round(t2 - t1, 4), "eval_s": round(pre_s[k] + t3 - t2, 4)}
        if len(cases) > 1:
            record["time"]["edits_together"] = len(cases)
        yield record


def run_sequential(lm, editor, cases: list[tuple[EditCase, bool]], batch_size: int,
                   all_applied: Callable[[list[EditCase]], None] | None = None) -> list[dict]:
    """Every case evaluated on the unedited model, then every edit applied in order and kept,
    then every case evaluated on the model holding all of them (`all_applied(applied cases)` is
    called at that point), then every edit restored in reverse order."""
    model, tok = lm.model, lm.tokenizer
    records, pres = [], []
    for case, counterfact in cases:
        pre = evaluate_case(model, tok, case, counterfact=counterfact, batch_size=batch_size)
        pres.append(pre)
        records.append(case_record(case, tok, pre))
    handles = []
    try:
        for (case, _), record in zip(cases, records):
            t0 = time.perf_counter()
            try:
                handles.append((case, editor.apply(model, tok, case)))
            except BenchError as exc:
                record["error"] = str(exc)
            record["time"] = {"edit_s": round(time.perf_counter() - t0, 4)}
        applied = {id(case): handle for case, handle in handles}
        for (case, counterfact), pre, record in zip(cases, pres, records):
            if id(case) in applied:
                post = evaluate_case(model, tok, case, counterfact=counterfact, batch_size=batch_size)
                _add_post(record, tok, pre, post, applied[id(case)])
        if all_applied is not None:
            all_applied([case for case, _ in handles])
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
                      "skipped": task["skipped"], "skipped_reasons": task.get("skipped_reasons", {})}
    return {"config": {"model": config["model"]["spec"], "editor": config["editor"]["name"],
                       "hparams": config["editor"]["hparams"], "seed": config["seed"],
                       "mode": config.get("mode", "single"),
                       "metric_definitions": config["metric_definitions"]},
            "tasks": tasks, "task_info": info}


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
    return "\n".join([table] + notes)


# --------------------------------------------------------------------------------------------
# The orchestrator
# --------------------------------------------------------------------------------------------


def execute(opts: RunOptions, resume_dir: Path | None = None, argv: list[str] | None = None,
            log: Callable[[str], None] = print, rewrite_config: bool = False,
            label: str | None = None) -> Path:
    """Run (or resume) a benchmark run; returns the run directory. The run directory is locked
    while this process writes it (a resumed one before anything loads)."""
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
        return _execute(setup, run, resume_dir, argv, log, rewrite_config)
    finally:
        if run is not None:
            run.release()


def _execute(setup: Setup, run: RunDir, resume_dir: Path | None, argv, log, rewrite_config: bool) -> Path:
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
    hook = None
    if opts.regression:
        hook = RegressionHook(lm, opts.regression_options(), run.path, setup.data_dir,
                              [t.name for t in planned], [c for t in planned for c in t.cases], log=log)
        hook.before_cases([c for _, c in todo])

    def write(task, record: dict) -> None:
        record["holdout"] = task.holdout
        run.append_case(record, rank=shard.rank if shard.world > 1 else None)
        records.append(record)
        if hook is not None:
            hook.on_record(record)
        if record["error"]:
            tqdm.write(f"case {task.name}/{record['case_id']}: {record['error']}")

    started = time.perf_counter()
    bar = tqdm(total=len(todo), desc=f"{editor.name}" + (f"[{shard.rank}]" if shard.world > 1 else ""),
               unit="edit", dynamic_ncols=True, position=shard.rank)
    finished = False
    summary = None
    try:
        if opts.mode == "sequential":
            bar.set_postfix_str("applying every edit")
            results = run_sequential(lm, editor, [(c, t.counterfact) for t, c in todo], opts.batch_size,
                                     all_applied=hook.all_applied if hook else None)
            for (task, _), record in zip(todo, results):
                write(task, record)
                bar.update()
        else:
            per_call = editor.edits_per_call
            for start in range(0, len(todo), per_call):
                chunk = todo[start:start + per_call]
                bar.set_postfix_str(chunk[0][0].name)
                for (task, _), record in zip(chunk, run_cases(
                        lm, editor, [(c, t.counterfact) for t, c in chunk], batch_size=opts.batch_size,
                        while_edited=hook.while_edited if hook else None)):
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
        if hook is not None:
            summary["regression"] = hook.finish()
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
