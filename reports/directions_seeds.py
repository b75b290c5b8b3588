"""Edit directions over training seeds (`bench analyze directions --seeds`): each seed's analysis
(reports.directions, one folder per seed) reduced to a few numbers per set, side by side, with
their mean and spread, so that a separation is read against how much it moves from one trained
checkpoint to the next (docs/directions.md, "Seeds").

The numbers of a set (editor, kind, condition):

* silhouette_2d, silhouette_cosine - the training tasks' separation (analyze_set's);
* held_out_silhouette_2d - the held-out task's own silhouette among all tasks on the two
  components (mean over held-out tasks; empty without one);
* task_mean_cosine - the mean, over every pair of tasks, of the cosine between the two tasks'
  mean unit directions (1: every task's edits point the same way on average);
* held_out_nearest - the training task whose mean direction is nearest the held-out task's
  (per seed; a word, so no mean).
"""

from __future__ import annotations

import csv
import statistics
from pathlib import Path

from bench.core.io import write_json_atomic

SEEDS_FORMAT = "instructedit-bench/directions-seeds/v1"
SEED_METRICS = ("silhouette_2d", "silhouette_cosine", "held_out_silhouette_2d", "task_mean_cosine")


def set_numbers(s: dict) -> dict:
    """The numbers above for one set of a directions.json."""
    held = [s["placement"][h] for h in s.get("held_out") or [] if h in s.get("placement", {})]
    held_sil = [p["silhouette_2d"] for p in held if p.get("silhouette_2d") is not None]
    tasks = s["tasks"]
    pairs = [s["mean_cosine"][a][b] for i, a in enumerate(tasks) for b in tasks[i + 1:]
             if s["mean_cosine"][a][b] is not None]
    return {"silhouette_2d": s.get("silhouette_2d"), "silhouette_cosine": s.get("silhouette_cosine"),
            "held_out_silhouette_2d": statistics.fmean(held_sil) if held_sil else None,
            "task_mean_cosine": statistics.fmean(pairs) if pairs else None,
            "held_out_nearest": held[0].get("nearest_mean") if held else None}


def _spread(values: list[float]) -> tuple[float | None, float | None]:
    """(mean, sample standard deviation; None with fewer than two values)."""
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def seed_summary(docs: dict[int, dict]) -> list[dict]:
    """Per set (in the first seed's order): each metric's per-seed values, mean and standard
    deviation over the seeds that have it; the held-out task's nearest training task per seed."""
    keys = list(dict.fromkeys((s["editor"], s["kind"], s["condition"]) for d in docs.values() for s in d["sets"]))
    rows = []
    for editor, kind, condition in keys:
        per_seed = {seed: set_numbers(s) for seed, d in docs.items() for s in d["sets"]
                    if (s["editor"], s["kind"], s["condition"]) == (editor, kind, condition)}
        row = {"editor": editor, "kind": kind, "condition": condition, "seeds": sorted(per_seed),
               "held_out_nearest": {seed: x["held_out_nearest"] for seed, x in sorted(per_seed.items())}}
        for m in SEED_METRICS:
            values = {seed: x[m] for seed, x in sorted(per_seed.items()) if x[m] is not None}
            mean, sd = _spread(list(values.values()))
            row[m] = {"per_seed": values, "mean": mean, "sd": sd}
        rows.append(row)
    return rows


def _num(v: float | None) -> str:
    return "" if v is None else f"{v:.4f}"


def write_seed_summary(out_dir: Path, docs: dict[int, dict]) -> list[Path]:
    """seeds.json and seeds.csv (one row per set: each metric's mean, sd and per-seed values)."""
    out_dir = Path(out_dir)
    rows = seed_summary(docs)
    first = docs[min(docs)]
    write_json_atomic(out_dir / "seeds.json", {
        "format": SEEDS_FORMAT, "seeds": sorted(docs), "model": first.get("model"), "tasks": first.get("tasks"),
        "holdout": first.get("holdout"), "n_per_task": first.get("n_per_task"), "sketch": first.get("sketch"),
        "folders": {str(seed): f"seed-{seed}" for seed in sorted(docs)}, "sets": rows})
    seeds = sorted(docs)
    with open(out_dir / "seeds.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["editor", "kind", "condition"]
                   + [f"{m}_{x}" for m in SEED_METRICS for x in ("mean", "sd")]
                   + [f"{m}_seed{s}" for m in SEED_METRICS for s in seeds]
                   + [f"held_out_nearest_seed{s}" for s in seeds])
        for r in rows:
            w.writerow([r["editor"] or "", r["kind"], r["condition"]]
                       + [_num(r[m][x]) for m in SEED_METRICS for x in ("mean", "sd")]
                       + [_num(r[m]["per_seed"].get(s)) for m in SEED_METRICS for s in seeds]
                       + [r["held_out_nearest"].get(s) or "" for s in seeds])
    return [out_dir / "seeds.json", out_dir / "seeds.csv"]
