"""Compare two run directories case by case: a behaviour-preservation check for a change that
should not move any result (a speed-up, a refactoring).

    python benchmarks/compare_runs.py runs/before runs/after
    python benchmarks/compare_runs.py runs/before runs/after --ignore-task-metric zsre:locality

For every (task, case_id) finished in both runs, the `pre` and `post` score dicts, the
`predictions`, the wild protocol's generated answers and the edit error (if any) must be equal: scores within `--tolerance` (default 0:
exact), predictions and errors exactly. Prints one row per task (cases compared, equal,
differing, only in one run, and the largest absolute score difference per metric over pre and
post) and the first differing cases with what differs; for sequential runs, whether the
checkpoint records are equal (all of each record but its time). Exit status 0 when every compared
case and checkpoint is equal, 1 otherwise (also when the runs have no case in common), 2 on a usage error.

`--ignore-metric NAME` (every task) and `--ignore-task-metric TASK:METRIC` (one task) leave a
metric out, for a deliberate change. Ignoring a token-accuracy metric also ignores the
predictions it is read from: reliability the prompt's, generality the rephrases', locality the
locality prompts', portability the portability prompts'.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from bench.core.errors import BenchError
from bench.core.runfiles import RunDir

# The predictions field each token-accuracy metric is read from (cases.jsonl "predictions").
PREDICTION_OF = {"reliability": "prompt", "generality": "rephrase", "locality": "locality",
                 "portability": "portability"}
STAGES = ("pre", "post")


@dataclass
class Ignore:
    metrics: set[str] = field(default_factory=set)
    task_metrics: set[tuple[str, str]] = field(default_factory=set)

    def __call__(self, task: str, metric: str) -> bool:
        return metric in self.metrics or (task, metric) in self.task_metrics

    def prediction(self, task: str, name: str) -> bool:
        return any(self(task, m) for m, p in PREDICTION_OF.items() if p == name)


@dataclass
class TaskResult:
    compared: int = 0
    equal: int = 0
    only_a: int = 0
    only_b: int = 0
    max_diff: dict[str, float] = field(default_factory=dict)  # metric -> largest |a - b|
    differing: list[tuple[str, list[str]]] = field(default_factory=list)  # (case_id, what differs)


def read_run(path: str) -> dict[tuple[str, str], dict]:
    run = RunDir(Path(path))
    if not run.path.is_dir():
        raise BenchError(f"run directory {path} does not exist")
    records = run.read_cases()
    if not records:
        raise BenchError(f"{path} holds no finished case (no {run.cases_path.name})")
    return {(r["task"], str(r["case_id"])): r for r in records}


def compare_checkpoints(path_a: str, path_b: str) -> tuple[int, list[str]] | None:
    """Sequential runs: (the number of checkpoints in both runs, one line per checkpoint that
    differs naming the fields that do), over the whole records less their time - every retained
    case's scores and generated answers, the fixed probes', the summary; None when either run
    has no checkpoint."""
    a = {c["n_edits"]: c for c in RunDir(Path(path_a)).read_checkpoints()}
    b = {c["n_edits"]: c for c in RunDir(Path(path_b)).read_checkpoints()}
    if not a or not b:
        return None
    both = sorted(a.keys() & b.keys())
    lines = []
    for n in both:
        fields = sorted(k for k in (a[n].keys() | b[n].keys()) - {"time"} if a[n].get(k) != b[n].get(k))
        if fields:
            lines.append(f"checkpoint at {n} edits differs in: {', '.join(fields)}")
    return len(both), lines


def checkpoint_report(found: tuple[int, list[str]] | None) -> str:
    if found is None:
        return ""
    n, lines = found
    return "\n".join([f"checkpoints: {n - len(lines)} of {n} in both runs equal (their times left out)", *lines])


def short(value, width: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= width else text[:width - 3] + "..."


def compare_case(task: str, a: dict, b: dict, ignore: Ignore, tolerance: float,
                 max_diff: dict[str, float]) -> list[str]:
    """What differs between the two records of one case (empty: equal); updates `max_diff`."""
    out = []
    if a.get("error") != b.get("error"):
        out.append(f"error: {short(a.get('error'))} -> {short(b.get('error'))}")
    for stage in STAGES:
        sa, sb = a.get(stage) or {}, b.get(stage) or {}
        for metric in sorted(set(sa) | set(sb)):
            if ignore(task, metric):
                continue
            if metric not in sa or metric not in sb:
                out.append(f"{stage}.{metric}: {'absent' if metric not in sa else sa[metric]} -> "
                           f"{'absent' if metric not in sb else sb[metric]}")
                continue
            x, y = sa[metric], sb[metric]
            # null is how a non-finite score is written; two nulls are equal
            diff = 0.0 if x == y else math.inf if x is None or y is None else abs(x - y)
            max_diff[metric] = max(max_diff.get(metric, 0.0), diff)
            if diff > tolerance:
                out.append(f"{stage}.{metric}: {x} -> {y}")
    pa, pb = a.get("predictions") or {}, b.get("predictions") or {}
    for stage in STAGES:
        fa, fb = pa.get(stage) or {}, pb.get(stage) or {}
        for name in sorted(set(fa) | set(fb)):
            if not ignore.prediction(task, name) and fa.get(name) != fb.get(name):
                out.append(f"predictions.{stage}.{name}: {short(fa.get(name))} -> {short(fb.get(name))}")
    ga = ((a.get("wild") or {}).get("generations")) or {}
    gb = ((b.get("wild") or {}).get("generations")) or {}
    for stage in sorted(set(ga) | set(gb)):  # the wild protocol's answers, as generated
        if ga.get(stage) != gb.get(stage):
            out.append(f"wild.generations.{stage}: {short(ga.get(stage))} -> {short(gb.get(stage))}")
    return out


def compare_runs(a: dict, b: dict, ignore: Ignore, tolerance: float) -> dict[str, TaskResult]:
    tasks: dict[str, TaskResult] = {}
    for key in list(a) + [k for k in b if k not in a]:  # run A's order, then B's extra cases
        task, case_id = key
        res = tasks.setdefault(task, TaskResult())
        if key not in b:
            res.only_a += 1
        elif key not in a:
            res.only_b += 1
        else:
            res.compared += 1
            what = compare_case(task, a[key], b[key], ignore, tolerance, res.max_diff)
            if what:
                res.differing.append((case_id, what))
            else:
                res.equal += 1
    return tasks


def fmt_diff(d: float | None) -> str:
    if d is None:
        return "-"
    return "0" if d == 0 else "inf" if math.isinf(d) else f"{d:.4g}"


def report(tasks: dict[str, TaskResult], ignore: Ignore, show: int) -> str:
    metrics = sorted({m for r in tasks.values() for m in r.max_diff}
                     | {m for t, m in ignore.task_metrics} | ignore.metrics)
    lines = ["| task | compared | equal | differing | only in A | only in B | "
             + " | ".join(f"max abs diff {m}" for m in metrics) + " |",
             "|---|" + "---:|" * (5 + len(metrics))]
    for task, r in tasks.items():
        cells = ["ignored" if ignore(task, m) else fmt_diff(r.max_diff.get(m)) for m in metrics]
        lines.append(f"| {task} | {r.compared} | {r.equal} | {len(r.differing)} | {r.only_a} | {r.only_b} | "
                     + " | ".join(cells) + " |")
    differing = [(task, case_id, what) for task, r in tasks.items() for case_id, what in r.differing]
    if differing:
        lines += ["", f"differing cases ({len(differing)}; the first {min(show, len(differing))}):"]
        for task, case_id, what in differing[:show]:
            lines.append(f"  {task}/{case_id}: " + "; ".join(what[:8])
                         + (f"; ... {len(what) - 8} more" if len(what) > 8 else ""))
    return "\n".join(lines)


def task_metric(text: str) -> tuple[str, str]:
    task, sep, metric = text.partition(":")
    if not sep or not task.strip() or not metric.strip():
        raise argparse.ArgumentTypeError(f"expected TASK:METRIC, got {text!r}")
    return task.strip(), metric.strip()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_a", help="run directory A (e.g. before the change)")
    ap.add_argument("run_b", help="run directory B (e.g. after it)")
    ap.add_argument("--ignore-metric", action="append", default=[], metavar="NAME",
                    help="leave this metric out for every task (repeatable)")
    ap.add_argument("--ignore-task-metric", action="append", default=[], type=task_metric,
                    metavar="TASK:METRIC", help="leave this metric out for one task (repeatable)")
    ap.add_argument("--tolerance", type=float, default=0.0,
                    help="largest absolute score difference taken as equal (default 0: exact)")
    ap.add_argument("--show", type=int, default=5, help="differing cases listed (default 5)")
    args = ap.parse_args(argv)
    if not args.tolerance >= 0:
        ap.error("--tolerance must be a number >= 0")
    ignore = Ignore(set(args.ignore_metric), set(args.ignore_task_metric))
    try:
        a, b = read_run(args.run_a), read_run(args.run_b)
    except BenchError as exc:
        print(f"compare_runs.py: error: {exc}", file=sys.stderr)
        return 2
    tasks = compare_runs(a, b, ignore, args.tolerance)
    print(f"A: {args.run_a} ({len(a)} cases)\nB: {args.run_b} ({len(b)} cases)\n"
          f"scores equal within {args.tolerance:g}; predictions and errors exactly\n")
    print(report(tasks, ignore, args.show))
    seen = {m for r in list(a.values()) + list(b.values()) for s in STAGES for m in (r.get(s) or {})}
    unseen = sorted(ignore.metrics - seen) + [f"{t}:{m}" for t, m in sorted(ignore.task_metrics) if m not in seen]
    for m in unseen:
        print(f"note: ignored metric {m} is in neither run (a typo?)")
    compared = sum(r.compared for r in tasks.values())
    if compared == 0:
        print("\nno case is in both runs: nothing was compared")
        return 1
    differing = sum(len(r.differing) for r in tasks.values())
    print(f"\n{compared - differing} of {compared} compared cases equal"
          + ("" if not differing else f"; {differing} differ"))
    checkpoints = compare_checkpoints(args.run_a, args.run_b)
    if checkpoints is not None:
        print(checkpoint_report(checkpoints))
        differing += len(checkpoints[1])
    return 0 if differing == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
