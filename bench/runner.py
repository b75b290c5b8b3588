"""The one orchestrator behind `bench run` and `bench regress`: for each case, evaluate before the
edit, apply it, evaluate after, restore (single mode, bench.single); or apply the edits in order,
keep them, and evaluate every edit made so far at checkpoints (sequential mode, bench.sequential).

Results go to a run directory (bench.core.runfiles) case by case, so a killed run loses nothing
and `--resume` continues where it stopped without repeating a finished case. Hooks (the lm-eval
regression, bench.regression.hook) are called at fixed points of the loop.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import pandas as pd
import torch
from tqdm import tqdm

from bench.core.cases import EditCase
from bench.core.distributed import Shard
from bench.core.errors import BenchError
from bench.core.metrics import summarize_task
from bench.core.io import check_writable_dir
from bench.core.provenance import peak_memory
from bench.core import timings
from bench.core.runfiles import RunDir, check_resume_limit, check_run_config, check_run_name, new_run_dir
from bench.evaluation import Job, Protocol, RunHook
from bench.regression.hook import RegressionHook
from bench.sequential import run_sequential, sequential_summary
from bench.single import WILD_WINDOW, run_case, run_cases
from bench.runconfig import run_config
from bench.options import options_from_config
from bench.session import RunOptions, Setup, evaluation_case, run_timing_key, set_up

__all__ = ["Job", "Protocol", "RunHook", "run_case", "run_cases", "execute", "resume", "summarize_run",
           "format_summary"]


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
    cached = sum((r.get("wild") or {}).get("unedited_answers") == "cached" for r in records)
    return {"max_new_tokens": cap, "generations": total, "stops": stops,
            "cap_hit_rate": round(stops.get("max_new_tokens", 0) / total, 4) if total else None,
            "unedited_answers_cached": cached}


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
    notes += [f"{t}: the unedited model's answers of {i['wild']['unedited_answers_cached']} cases read from the "
              "answer cache (--no-answer-cache: generate them)"
              for t, i in summary["task_info"].items() if (i.get("wild") or {}).get("unedited_answers_cached")]
    return "\n".join([table] + notes)


# --------------------------------------------------------------------------------------------
# The orchestrator
# --------------------------------------------------------------------------------------------


def execute(opts: RunOptions, resume_dir: Path | None = None, argv: list[str] | None = None,
            log: Callable[[str], None] = print, rewrite_config: bool = False,
            label: str | None = None,
            hooks: Callable[[Setup, RunDir], list[RunHook]] | None = None) -> Path:
    """Run (or resume) a benchmark run; returns the run directory. The run directory is locked
    while this process writes it (a resumed one before anything loads). `hooks(setup, run)`
    gives hooks besides the regression (which --regression adds)."""
    if opts.run_name is not None:
        check_run_name(opts.run_name)
    if resume_dir is None:  # /proc, /sys, below a file, read-only: one line before anything loads
        check_writable_dir(opts.output_dir, "--output-dir")
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


def _write_config(setup: Setup, run: RunDir, resume_dir: Path | None, argv, rewrite_config: bool) -> dict:
    """config.json, written by rank 0 for a new run or an extended one (which keeps the original
    command and date and notes the extension)."""
    config = run_config(setup, argv)
    if setup.shard.rank == 0 and (resume_dir is None or rewrite_config):
        if rewrite_config:
            old = run.read_config()
            config["command"], config["argv"], config["created"] = old["command"], old["argv"], old["created"]
            config["extended"] = old.get("extended", []) + [
                {"limit": setup.opts.limit, "at": datetime.now(timezone.utc).isoformat(timespec="seconds")}]
        run.write_config(config)
    return config


def _todo(setup: Setup, run: RunDir, done: set, log) -> tuple[list[tuple[object, EditCase]], int]:
    """(the cases this process works on, how many edits are still to make). Sequential: every
    case in order (bench.sequential knows which edits the saved state holds); single: case i of
    the planned order belongs to process i mod world - a fixed split, so a resumed shard picks up
    exactly its own remaining cases."""
    planned, shard = setup.planned, setup.shard
    for t in planned:
        for s in t.skipped[:3]:
            log(f"skipped {t.name} record {s.index} of {s.source}: {s.reason}")
        if len(t.skipped) > 3:
            log(f"... and {len(t.skipped) - 3} more skipped {t.name} records")
    if setup.opts.mode == "sequential":
        if shard.world > 1:
            raise BenchError("--mode sequential runs in one process (its edits build on each other)")
        todo = [(t, evaluation_case(setup, c)) for t in planned for c in t.cases]
        saved = run.read_state()
        n_edits = int(saved[1]["n_edits"]) if saved else 0
        log(f"run directory: {run.path}  ({n_edits} edits already made, {len(todo) - n_edits} to go)")
        return todo, len(todo) - n_edits
    todo = [(t, evaluation_case(setup, c)) for i, (t, c) in enumerate((t, c) for t in planned for c in t.cases)
            if i % shard.world == shard.rank and (t.name, c.case_id) not in done]
    if shard.rank == 0:
        log(f"run directory: {run.path}  ({len(done)} cases already done, {len(todo)} to go"
            + (f" on this process of {shard.world})" if shard.world > 1 else ")"))
    return todo, len(todo)


def _run_single(setup: Setup, todo: list, jobs: Callable[[list], list[Job]], hooks: list[RunHook],
                protocol: Protocol, write: Callable[[object, dict], None], bar) -> None:
    """Single mode in windows of cases: their pre-edit answers are decoded together, and so are
    the post-edit answers of weight edits (run_cases). The bar advances as records come."""
    def while_edited(case: EditCase, view) -> None:
        for hook in hooks:
            hook.while_edited(case, view)

    per_call = setup.editor.edits_per_call
    window = max(per_call, WILD_WINDOW // per_call * per_call)
    for start in range(0, len(todo), window):
        chunk = todo[start:start + window]
        bar.set_postfix_str(chunk[0][0].name)
        for (task, _), record in zip(chunk, run_cases(
                setup.lm, setup.editor, jobs(chunk), batch_size=setup.opts.batch_size, while_edited=while_edited,
                protocol=protocol, progress=bar.set_postfix_str)):
            write(task, record)
            bar.set_postfix_str(task.name, refresh=False)
            bar.update()


def _write_summary(setup: Setup, run: RunDir, config: dict, records: list[dict], planned_edits: int,
                   started: float) -> dict:
    """summary.json from the run's records (a sequential run: its checkpoints too), with wall time
    and peak memory."""
    summary = summarize_run(config, records)
    if setup.opts.mode == "sequential":
        # A complete run's table is its cases' scores after all N edits (each case's own
        # locality prompts included); an unfinished one shows its last checkpoint.
        checkpoints = run.read_checkpoints()
        if not checkpoints or checkpoints[-1]["n_edits"] != planned_edits:
            summary["tasks"] = checkpoints[-1]["summary"] if checkpoints else {}
        summary["sequential"] = sequential_summary(config, checkpoints, planned_edits)
    summary["wall_time_s"] = round(time.perf_counter() - started, 2)
    summary["memory"] = peak_memory(setup.lm.device)
    run.write_summary(summary)
    return summary


def _execute(setup: Setup, run: RunDir, resume_dir: Path | None, argv, log, rewrite_config: bool,
             extra_hooks) -> Path:
    opts, planned, shard, editor, lm = setup.opts, setup.planned, setup.shard, setup.editor, setup.lm
    config = _write_config(setup, run, resume_dir, argv, rewrite_config)
    sequential = opts.mode == "sequential"
    torch.manual_seed(opts.seed)
    todo, remaining = _todo(setup, run, {(r["task"], r["case_id"]) for r in run.read_cases(repair=True)}, log)
    hooks: list[RunHook] = list(extra_hooks(setup, run)) if extra_hooks else []
    if opts.regression:
        hooks.append(RegressionHook(lm, opts.regression_options(), run.path, setup.data_dir,
                                    [t.name for t in planned], [c for t in planned for c in t.cases], log=log))
    if not sequential:  # the sequential loop calls it after its pre-edit evaluation
        for hook in hooks:
            hook.before_cases([c for _, c in todo])

    def write(task, record: dict) -> None:
        record["holdout"] = task.holdout
        for hook in hooks:
            hook.on_record(record)
        run.append_case(record, rank=shard.rank if shard.world > 1 else None)
        if record["error"]:
            tqdm.write(f"case {task.name}/{record['case_id']}: {record['error']}")
        if sequential:  # single mode advances the bar itself (_run_single)
            bar.update()

    protocol = Protocol(teacher_forced="teacher_forced" in opts.protocols, prompt_format=opts.prompt_format)

    def jobs(items) -> list[Job]:
        return [Job(case, task.counterfact, setup.wild.get(task.name)) for task, case in items]

    started = time.perf_counter()
    # smoothing=0: the rate (and ETA) is the average over the cases finished since the start, which
    # edits computed together (FT's `apply_many`) do not swing as an instantaneous rate does
    bar = tqdm(total=remaining, desc=f"{editor.name}" + (f"[{shard.rank}]" if shard.world > 1 else ""),
               unit="edit", dynamic_ncols=True, position=shard.rank, smoothing=0)
    finished = False
    summary = None
    try:
        if sequential:
            run_sequential(setup, run, todo, jobs(todo), hooks, protocol, write, progress=bar.set_postfix_str, log=log)
        else:
            _run_single(setup, todo, jobs, hooks, protocol, write, bar)
        finished = True
    finally:
        bar.close()
        if shard.world > 1 and finished:
            shard.barrier()  # every shard is complete: merge them
        if shard.rank == 0 and (finished or shard.world == 1):
            if shard.world > 1:
                records = run.merge_shards([(t.name, c.case_id) for t in planned for c in t.cases])
            else:  # the file is the truth: a signal between writing a record and keeping it in memory
                records = run.read_cases()
            summary = _write_summary(setup, run, config, records, len(todo), started)
            if finished and shard.world == 1 and bar.n:  # what the next such run's training line estimates from
                timings.record(setup.ctx.cache_dir, run_timing_key(opts, lm), summary["wall_time_s"] / bar.n)
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
    check_run_config(config, str(run.path))
    check_resume_limit(run, limit)
    # Pin every editor hyperparameter as the run resolved it, so a changed default in the code
    # cannot silently edit the remaining cases differently from the finished ones.
    opts.hparams = {**config["editor"]["hparams"], **opts.hparams}
    if limit != "keep" and limit != opts.limit:
        if opts.mode == "sequential":
            raise BenchError("a sequential run cannot change its --limit on resume (its edits are "
                             "applied in the planned order); start a new run")
        opts.limit = limit
        return execute(opts, resume_dir=run.path, argv=config.get("argv"), log=log,
                       rewrite_config=True)
    return execute(opts, resume_dir=run.path, argv=config.get("argv"), log=log)
