"""`bench run`: for each case, evaluate before the edit, apply it, evaluate after, restore.

Results go to a run directory (bench/results.py) case by case, so a killed run loses nothing and
`--resume` continues where it stopped without repeating a finished case.
"""

from __future__ import annotations

import dataclasses
import platform
import sys
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from bench import __version__
from bench.cases import EditCase
from bench.distributed import Shard
from bench.errors import BenchError
from bench.metrics import METRIC_DEFINITIONS, case_scores, evaluate_case, predictions, summarize_task
from bench.models import find_layout
from bench.results import RunDir, new_run_dir

from bench.defaults import DEFAULT_LIMIT, DEFAULT_LM_LIMIT


@dataclass
class RunOptions:
    """Everything that defines a run; stored in config.json so `--resume` can rebuild it."""

    editor: str = "ft"
    tasks: list[str] = field(default_factory=list)  # empty: every task whose data is found
    holdout: list[str] = field(default_factory=list)
    model: str = "smollm2-135m"
    device: str = "auto"
    dtype: str = "auto"
    limit: int | None = DEFAULT_LIMIT  # cases per task; None = all
    seed: int = 0
    data_dir: str | None = None
    output_dir: str = "runs"
    hparams: dict = field(default_factory=dict)  # overrides from --hparam / --hparams-file
    instruction_mode: str = "seen"  # "seen" or "unseen" description at evaluation
    batch_size: int = 32
    retrain: bool = False
    run_name: str | None = None
    # lm-eval regression after the cases (bench/regression.py); empty list = none
    regression: list[str] = field(default_factory=list)
    regression_mode: str = "single"
    lm_limit: int | None = DEFAULT_LM_LIMIT  # docs per lm-eval task; None = all
    regression_corpus: str | None = None


@dataclass
class PlannedTask:
    name: str
    holdout: bool
    metrics: list[str]
    cases: list[EditCase]
    skipped: list
    data_files: dict[str, str]


def _versions() -> dict:
    import torch
    import transformers

    return {"instructedit_bench": __version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def plan_tasks(opts: RunOptions, data_dir: Path | None) -> list[PlannedTask]:
    """Resolve task names, load their eval splits and apply --limit."""
    from tasks.registry import data_file_hashes, get_card, list_cards, load_split, task_status

    for name in opts.holdout:
        get_card(name)  # unknown holdout names are an error, not ignored
    names = list(opts.tasks)
    explicit = set(names) | set(opts.holdout)
    if not names:
        names = [n for n in list_cards() if task_status(n, data_dir)["found"]]
    for name in opts.holdout:
        if name not in names:
            names.append(name)
    planned = []
    for name in names:
        card = get_card(name)
        holdout = name in opts.holdout
        split = load_split(name, "eval", data_dir, holdout=holdout)
        cases = split.cases if opts.limit is None else split.cases[: opts.limit]
        if not cases:
            if name in explicit:
                raise BenchError(f"task {name!r} has no usable eval cases in its data")
            continue  # chosen by default because its files exist, but they hold no eval case
        planned.append(PlannedTask(name=name, holdout=holdout, metrics=list(card.metrics),
                                   cases=cases, skipped=split.skipped,
                                   data_files=data_file_hashes(name, data_dir, split="eval")))
    if not planned:
        raise BenchError("no task with eval cases found; name one with --task (see bench list tasks)")
    return planned


def build_editor(opts: RunOptions, model_config):
    from editors import get_editor_class
    from editors.base import override_hparams

    cls = get_editor_class(opts.editor)
    hparams = override_hparams(cls.default_hparams(model_config), opts.hparams)
    return cls(hparams)


def _wrap_for_editor(editor, case: EditCase, seed: int, mode: str) -> EditCase:
    if not editor.uses_instructions:
        return case
    from tasks.instructions import pick_description, wrap_case
    from tasks.registry import get_card

    card = get_card(case.task)
    return wrap_case(case, card, pick_description(card, mode, key=case.case_id, seed=seed))


def run_case(lm, editor, case: EditCase, counterfact: bool, batch_size: int) -> dict:
    """Pre-edit evaluation, edit, post-edit evaluation, restore. Never leaves the model edited."""
    return next(run_cases(lm, editor, [(case, counterfact)], batch_size))


def run_cases(lm, editor, cases: list[tuple[EditCase, bool]], batch_size: int,
              reuse_unchanged_blocks: bool = True) -> Iterator[dict]:
    """`run_case` for several (case, counterfact) pairs whose edits the editor may compute
    together (`apply_many`): every pre-edit evaluation first, then each edit in turn applied,
    evaluated and restored, its record yielded as soon as it is complete.

    The post-edit evaluation runs the pre-edit one's batches again; the blocks below the lowest
    one the edit changed (from the handle's parameter names) are not run again but replaced by
    their recorded outputs (identical results; `reuse_unchanged_blocks=False` runs them)."""
    from editors.frozen import BlockOutputs, first_changed_block

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
        records.append({"task": case.task, "case_id": case.case_id, "case": case.to_dict(),
                        "pre": case_scores(pre), "predictions": {"pre": predictions(tok, pre)},
                        "error": None})
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
        finally:
            handle.restore()
            kept[k] = None  # free the recorded outputs
        t3 = time.perf_counter()
        record["post"] = case_scores(post, pre)
        record["predictions"]["post"] = predictions(tok, post)
        # Edits computed together: the first case's edit_s carries the joint computation.
        record["time"] = {"edit_s": round(t2 - t1, 4), "eval_s": round(pre_s[k] + t3 - t2, 4)}
        if len(cases) > 1:
            record["time"]["edits_together"] = len(cases)
        yield record


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
                       "metric_definitions": config["metric_definitions"]},
            "tasks": tasks, "task_info": info}


def format_summary(summary: dict) -> str:
    import pandas as pd

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


def execute(opts: RunOptions, resume_dir: Path | None = None, argv: list[str] | None = None,
            log=print, rewrite_config: bool = False) -> Path:
    """Run (or resume) a benchmark run; returns the run directory."""
    from tqdm import tqdm

    from bench.models import load_config, load_model, resolve_device, resolve_dtype
    from editors.base import EditContext
    from tasks.registry import resolve_data_dir

    if opts.instruction_mode not in ("seen", "unseen"):
        raise BenchError(f"--instruction must be seen or unseen, got {opts.instruction_mode!r}")
    if opts.limit is not None and opts.limit < 1:
        raise BenchError(f"--limit must be positive, got {opts.limit}")
    data_dir, builtin = resolve_data_dir(opts.data_dir)
    if builtin:
        log("=" * 72)
        log("NOTE: no data directory found (--data-dir, $BENCH_DATA, ../shared/data);")
        log("      using the small built-in sample records. Numbers are not comparable.")
        log("=" * 72)
    planned = plan_tasks(opts, data_dir)
    if opts.regression:
        from bench.regression import check_run_options

        check_run_options(opts)  # unknown lm-eval task: fail before the cases
    shard = Shard.current(opts.device)
    device = shard.device_for(opts.device)
    resolve_dtype(opts.dtype, resolve_device(device))  # bad --device / --dtype: fail before loading
    editor = build_editor(opts, load_config(opts.model))  # bad hyperparameters: likewise
    lm = load_model(opts.model, device=device, dtype=opts.dtype)

    if resume_dir is None:
        label = opts.run_name or f"{opts.editor}-{'+'.join(t.name for t in planned)}"
        path = new_run_dir(Path(opts.output_dir), label) if shard.rank == 0 else None
        run = RunDir(shard.broadcast(path))
    else:
        run = RunDir(resume_dir)
    from tasks.registry import list_cards

    train_tasks = [n for n in list_cards() if n not in opts.holdout]
    ctx = EditContext(cache_dir=Path(_cache_root()), seed=opts.seed, data_dir=data_dir,
                      train_tasks=train_tasks, holdout_tasks=list(opts.holdout),
                      retrain=opts.retrain, log=log, shard=shard)
    if editor.learns and shard.world > 1:
        editor.prepare(lm, ctx)  # all processes load the checkpoint, or train it data-parallel
    else:
        # Cached preparation (e.g. ROME's key statistics) happens once, on the first process;
        # the others then find it in the cache.
        if shard.rank == 0:
            editor.prepare(lm, ctx)
        shard.barrier()
        if shard.rank != 0:
            editor.prepare(lm, ctx)

    config = run_config(opts, lm, editor, planned, data_dir, ctx.notes, argv)
    if shard.rank == 0 and (resume_dir is None or rewrite_config):
        if rewrite_config:  # keep the original command and date; note the extension
            old = run.read_config()
            config["command"], config["argv"], config["created"] = old["command"], old["argv"], old["created"]
            config["extended"] = old.get("extended", []) + [
                {"limit": opts.limit, "at": datetime.now(timezone.utc).isoformat(timespec="seconds")}]
        run.write_config(config)
    records = run.read_cases()
    done = {(r["task"], r["case_id"]) for r in records}
    for t in planned:
        for s in t.skipped[:3]:
            log(f"skipped {t.name} record {s.index} of {s.source}: {s.reason}")
        if len(t.skipped) > 3:
            log(f"... and {len(t.skipped) - 3} more skipped {t.name} records")

    import torch

    torch.manual_seed(opts.seed)
    order = [(t.name, c.case_id) for t in planned for c in t.cases]
    # Case i of the planned order belongs to process i mod world: a fixed split, so a resumed
    # shard picks up exactly its own remaining cases.
    todo = [(t, c) for i, (t, c) in enumerate((t, c) for t in planned for c in t.cases)
            if i % shard.world == shard.rank and (t.name, c.case_id) not in done]
    if shard.rank == 0:
        log(f"run directory: {run.path}  ({len(done)} cases already done, {len(todo)} to go"
            + (f" on this process of {shard.world})" if shard.world > 1 else ")"))
    started = time.perf_counter()
    bar = tqdm(total=len(todo), desc=f"{editor.name}" + (f"[{shard.rank}]" if shard.world > 1 else ""),
               unit="edit", dynamic_ncols=True, position=shard.rank)
    finished = False
    try:
        per_call = editor.edits_per_call
        for start in range(0, len(todo), per_call):
            chunk = [(task, _wrap_for_editor(editor, case, opts.seed, opts.instruction_mode))
                     for task, case in todo[start:start + per_call]]
            bar.set_postfix_str(chunk[0][0].name)
            for (task, case), record in zip(chunk, run_cases(
                    lm, editor, [(case, "counterfact" in task.metrics) for task, case in chunk],
                    batch_size=opts.batch_size)):
                record["holdout"] = task.holdout
                run.append_case(record, rank=shard.rank if shard.world > 1 else None)
                records.append(record)
                bar.update()
                if record["error"]:
                    tqdm.write(f"case {task.name}/{case.case_id}: {record['error']}")
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
        if opts.regression:
            from bench.regression import regression_for_run

            summary["regression"] = regression_for_run(lm, editor, planned, opts, run, data_dir, log=log)
            run.write_summary(summary)
        log(f"results: {run.path}")
    return run.path


def run_config(opts: RunOptions, lm, editor, planned: list[PlannedTask], data_dir: Path | None,
               notes: dict, argv: list[str] | None) -> dict:
    """The config.json of a run: everything needed to reproduce and compare it."""
    from editors.base import hparams_to_dict

    args = list(argv if argv is not None else sys.argv[1:])
    return {
        "command": "bench " + " ".join(args),
        "argv": args,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "options": dataclasses.asdict(opts),
        "model": {"spec": lm.spec, "source_hash": lm.source_hash,
                  "dtype": str(lm.dtype).replace("torch.", ""), "device": str(lm.device)},
        "editor": {"name": editor.name, "hparams": hparams_to_dict(editor.hparams),
                   "uses_instructions": editor.uses_instructions},
        "tasks": [{"name": t.name, "split": "eval", "holdout": t.holdout, "metrics": t.metrics,
                   "data_files": t.data_files, "n_cases": len(t.cases), "skipped": len(t.skipped),
                   "skipped_reasons": _count_reasons(t.skipped)} for t in planned],
        "data_dir": str(data_dir) if data_dir else "built-in sample",
        "seed": opts.seed, "limit": opts.limit, "instruction_mode": opts.instruction_mode,
        "metric_definitions": METRIC_DEFINITIONS,
        "versions": _versions(),
        "notes": notes,
    }


def _count_reasons(skipped) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in skipped:
        out[s.reason] = out.get(s.reason, 0) + 1
    return out


def _cache_root() -> Path:
    from bench.models import cache_dir

    return cache_dir()


def resume(run_path: Path, log=print, limit: int | None | str = "keep") -> Path:
    """Continue a run with its stored options. `limit` other than "keep" extends (or narrows) the
    cases per task; finished cases are never rerun and config.json records the new plan."""
    run = RunDir(run_path)
    config = run.read_config()
    opts = RunOptions(**config["options"])
    # Pin every editor hyperparameter as the run resolved it, so a changed default in the code
    # cannot silently edit the remaining cases differently from the finished ones.
    opts.hparams = {**config["editor"]["hparams"], **opts.hparams}
    if limit != "keep" and limit != opts.limit:
        opts.limit = limit
        return execute(opts, resume_dir=run.path, argv=config.get("argv"), log=log,
                       rewrite_config=True)
    return execute(opts, resume_dir=run.path, argv=config.get("argv"), log=log)
