"""What measuring costs: one `bench run`, per case split into the edit, the teacher-forced
evaluation and the wild evaluation, and per checkpoint of a sequential run; optionally the same
run from other checkouts (the code before a change) in the same sitting, one after the other.

    python benchmarks/eval_cost.py -- --editor ft --limit 30
    python benchmarks/eval_cost.py --checkout ../before -- --editor none --mode sequential \\
        --task counterfact,zsre --limit 100 --eval-every 0

Everything after `--` is passed to `bench run` (with `--output-dir` set to `--runs-dir/LABEL`).
Each checkout runs `python -m bench run` from its own directory (so its own code), the others
first and this one last (`--this-first` swaps that; on a busy machine run it both ways). Prints, per checkout: cases, the mean seconds
per case of the edit, the teacher-forced evaluation (pre + post) and the wild evaluation (pre +
post generations), wild / edit, the wall time of the run and, for sequential runs, each
checkpoint's seconds; then, when two or more runs were made, whether their case records agree
(benchmarks/compare_runs.py: scores, predictions, generated answers). `--again` runs this
checkout once more at the end, so that the second run reads what the first left in the cache
(the unedited model's answers: docs/wild.md, "Cost").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import _common
from compare_runs import Ignore, checkpoint_report, compare_checkpoints, compare_runs, read_run, report

HERE = Path(__file__).resolve().parent.parent


def run_bench(checkout: Path, runs_dir: Path, label: str, args: list[str], threads: int) -> tuple[Path, float]:
    out = runs_dir / label
    env = {**os.environ, "PYTHONPATH": str(checkout), "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "bench", "--threads", str(threads), "run", *args, "--output-dir", str(out),
           "--name", label]
    _common.log(f"[{label}] {' '.join(cmd[1:])}  (in {checkout})")
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=checkout, env=env)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"[{label}] bench run failed with exit status {done.returncode}")
    found = sorted(p for p in out.iterdir() if p.is_dir())
    return found[-1], wall


def costs(run: Path) -> dict:
    cases = [json.loads(line) for line in (run / "cases.jsonl").read_text().splitlines() if line.strip()]
    ok = [c for c in cases if not c.get("error")]
    mean = lambda key: statistics.mean(c["time"].get(key, 0.0) for c in ok) if ok else float("nan")  # noqa: E731
    out = {"cases": len(ok), "edit_s": mean("edit_s"), "eval_s": mean("eval_s"), "wild_s": mean("wild_s")}
    per_task: dict[str, list[dict]] = {}
    for c in ok:
        per_task.setdefault(c["task"], []).append(c["time"])
    out["tasks"] = {t: (statistics.mean(x["edit_s"] for x in ts), statistics.mean(x.get("wild_s", 0.0) for x in ts))
                    for t, ts in sorted(per_task.items())}
    out["cached"] = sum((c.get("wild") or {}).get("unedited_answers") == "cached" for c in ok)
    path = run / "checkpoints.jsonl"
    if path.exists():
        out["checkpoints"] = [(c["n_edits"], c["time"]["eval_s"])
                              for c in map(json.loads, path.read_text().splitlines()) if c]
    return out


def main() -> None:
    argv = sys.argv[1:]
    passed = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkout", action="append", default=[], type=Path,
                    help="another checkout of the harness to run the same command from (repeatable)")
    ap.add_argument("--this-first", action="store_true", help="run this checkout before the others")
    ap.add_argument("--again", action="store_true",
                    help="run this checkout once more at the end (this-again): it reads what the runs "
                         "before it left in the cache, e.g. the unedited model's answers")
    ap.add_argument("--runs-dir", type=Path, default=Path("eval-cost-runs"))
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each run (default 1)")
    args = ap.parse_args(own)
    checkouts = [(f"before{k}" if len(args.checkout) > 1 else "before", c.resolve()) for k, c in enumerate(args.checkout)]
    order = [("this", HERE)] + checkouts if args.this_first else checkouts + [("this", HERE)]
    if args.again:
        order.append(("this-again", HERE))
    machine = _common.machine()
    results = {}
    for label, checkout in order:
        run, wall = run_bench(checkout, args.runs_dir.resolve(), label, passed, args.threads)
        results[label] = {"run": run, "wall": wall, **costs(run)}
    print(_common.machine_line(machine))
    print(f"bench run {' '.join(passed)}  (torch threads {args.threads}); seconds per case (means)")
    print("| checkout | cases | edit | teacher forced | wild | wild / edit | wall (s) | checkpoints (edits: s) |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for label, _ in order:
        r = results[label]
        ratio = r["wild_s"] / r["edit_s"] if r["edit_s"] else float("nan")
        cps = ", ".join(f"{n}: {s:.1f}" for n, s in r.get("checkpoints", []))
        print(f"| {label} | {r['cases']} | {r['edit_s']:.3f} | {r['eval_s']:.3f} | {r['wild_s']:.3f} | "
              f"{ratio:.2f} | {r['wall']:.0f} | {cps} |")
    print("\nper task, edit / wild (s per case); cases whose unedited answers came from the answer cache")
    for label, _ in order:
        r = results[label]
        tasks = "; ".join(f"{t} {e:.2f} / {w:.2f}" for t, (e, w) in r["tasks"].items())
        print(f"  {label}: {tasks}; cached {r['cached']} of {r['cases']}")
    if len(order) > 1:
        base = read_run(str(results[order[0][0]]["run"]))
        for label, _ in order[1:]:
            tasks = compare_runs(base, read_run(str(results[label]["run"])), Ignore(), 0.0)
            print(f"\ncase records, {order[0][0]} vs {label}:")
            print(report(tasks, Ignore(), show=3))
            print(checkpoint_report(compare_checkpoints(str(results[order[0][0]]["run"]),
                                                        str(results[label]["run"]))))


if __name__ == "__main__":
    _common.run_main(main)
