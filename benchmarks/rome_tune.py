"""Compare ROME hyperparameter variants on the train split of a task (never its eval cases).

    python benchmarks/rome_tune.py --task zsre --cases 20 --threads 1 \
        --variant default: --variant stop0.01:v_early_stop_nll=0.01 \
        --variant steps25:v_early_stop_nll=0

A variant is NAME:KEY=VALUE[,KEY=VALUE...] on top of the editor's defaults for the model (an
empty override list is the defaults). Every variant runs on the same cases through
bench.runner.run_case (pre-edit evaluation, edit, post-edit evaluation, restore); the table
gives post-edit means in percent, mean value-optimisation steps and seconds per edit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.models import cache_dir, load_model  # noqa: E402
from bench.runner import run_case  # noqa: E402
from editors.base import EditContext, override_hparams, parse_hparam_args  # noqa: E402
from editors.rome import Rome  # noqa: E402
from tasks.registry import get_card, load_split  # noqa: E402

COLUMNS = ("reliability", "generality", "locality", "efficacy", "paraphrase", "neighborhood")


def parse_variant(text: str) -> tuple[str, dict]:
    name, _, overrides = text.partition(":")
    return name, parse_hparam_args([kv for kv in overrides.split(",") if kv])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="zsre")
    ap.add_argument("--cases", type=int, default=20, help="first N cases of the task's train split")
    ap.add_argument("--variant", action="append", default=[], help="NAME:KEY=VALUE[,KEY=VALUE]")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--data", default=os.environ.get("BENCH_DATA", "/work/shared/data"))
    ap.add_argument("--json", default=None, help="write per-case records here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = [parse_variant(v) for v in (args.variant or ["default:"])]

    lm = load_model(args.model)
    cases = load_split(args.task, "train", Path(args.data)).cases[: args.cases]
    counterfact = "counterfact" in get_card(args.task).metrics
    rows, records = [], []
    for name, overrides in variants:
        editor = Rome(override_hparams(Rome.default_hparams(lm.model.config), overrides))
        editor.prepare(lm, EditContext(cache_dir=cache_dir(), log=lambda s: print(s, file=sys.stderr)))
        scores: dict[str, list[float]] = {}
        steps, seconds, errors = [], [], 0
        for case in cases:
            t0 = time.perf_counter()
            rec = run_case(lm, editor, case, counterfact=counterfact, batch_size=32)
            seconds.append(time.perf_counter() - t0)
            records.append({"variant": name, **rec})
            if rec["error"]:
                errors += 1
                continue
            steps.append(editor.last_info.get("steps", float("nan")))
            for k in COLUMNS:
                if k in rec["post"]:
                    scores.setdefault(k, []).append(rec["post"][k])
            print(f"{name} {case.case_id}: reliability {rec['post']['reliability']:.2f} "
                  f"steps {steps[-1]} {seconds[-1]:.1f} s", file=sys.stderr, flush=True)
        rows.append({"variant": name, "overrides": overrides, "n": len(cases) - errors, "errors": errors,
                     "steps": sum(steps) / max(len(steps), 1), "s_per_case": sum(seconds) / len(seconds),
                     **{k: 100 * sum(v) / len(v) for k, v in scores.items()}})

    cols = [c for c in COLUMNS if any(c in r for r in rows)]
    print(f"{args.task} train split, first {len(cases)} cases, model {args.model}")
    print("| variant | overrides | n | " + " | ".join(cols) + " | steps | s/case |")
    print("|---|---|---:|" + "---:|" * (len(cols) + 2))
    for r in rows:
        ov = ", ".join(f"{k}={v}" for k, v in r["overrides"].items()) or "(defaults)"
        print(f"| {r['variant']} | {ov} | {r['n']} | " + " | ".join(f"{r.get(c, float('nan')):.1f}" for c in cols)
              + f" | {r['steps']:.1f} | {r['s_per_case']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "records": records}, indent=1, default=str))


if __name__ == "__main__":
    main()
