"""Compare ROME hyperparameter variants on the train split of a task (never its eval cases).

    python benchmarks/rome_tune.py --task zsre --cases 20 --threads 1 \
        --variant default: --variant stop0.01:v_early_stop_nll=0.01 \
        --variant steps25:v_early_stop_nll=0

A variant is NAME:KEY=VALUE[,KEY=VALUE...] on top of the editor's defaults for the model (an
empty override list is the defaults); `--hparam` overrides apply to every variant. Every variant
runs on the same cases through bench.runner.run_case (pre-edit evaluation, edit, post-edit
evaluation, restore); the table gives post-edit means in percent, mean value-optimisation steps
and seconds per edit (`editor.apply` alone). benchmarks/rome_layer_sweep.py is this with one
variant per layer.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
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
    """NAME:K=V,K=V; a comma-separated piece without "=" continues the previous value
    (list values: `a:context_counts=2,2,layer=5`)."""
    name, _, overrides = text.partition(":")
    items: list[str] = []
    for piece in filter(None, overrides.split(",")):
        if "=" in piece or not items:
            items.append(piece)
        else:
            items[-1] += "," + piece
    return name, parse_hparam_args(items)


def sweep(task: str, n_cases: int, variants: list[tuple[str, dict]], model: str = "smollm2-135m",
          data: str | Path = "/work/shared/data", offset: int = 0) -> tuple[list[dict], list[dict]]:
    """(one row of post-edit means per variant, every per-case record) on the cases
    [offset, offset + n_cases) of the task's train split."""
    lm = load_model(model)
    cases = load_split(task, "train", Path(data)).cases[offset: offset + n_cases]
    counterfact = "counterfact" in get_card(task).metrics
    rows, records = [], []
    for name, overrides in variants:
        editor = Rome(override_hparams(Rome.default_hparams(lm.model.config), overrides))
        editor.prepare(lm, EditContext(cache_dir=cache_dir(), log=lambda s: print(s, file=sys.stderr)))
        scores: dict[str, list[float]] = {}
        steps, seconds, errors = [], [], 0
        for case in cases:
            rec = run_case(lm, editor, case, counterfact=counterfact, batch_size=32)
            records.append({"variant": name, **rec})
            if rec["error"]:
                errors += 1
                continue
            steps.append(editor.last_info.get("steps", float("nan")))
            seconds.append(rec["time"]["edit_s"])
            for k in COLUMNS:
                if k in rec["post"]:
                    scores.setdefault(k, []).append(rec["post"][k])
            print(f"{name} {case.case_id}: reliability {rec['post']['reliability']:.2f} "
                  f"steps {steps[-1]} {seconds[-1]:.1f} s", file=sys.stderr, flush=True)
        rows.append({"variant": name, "overrides": overrides, "n": len(cases) - errors, "errors": errors,
                     "steps": sum(steps) / max(len(steps), 1), "s_per_edit": sum(seconds) / max(len(seconds), 1),
                     **{k: 100 * sum(v) / len(v) for k, v in scores.items()}})
    return rows, records


def table(rows: list[dict], first: str = "variant") -> str:
    cols = [c for c in COLUMNS if any(c in r for r in rows)]
    lines = [f"| {first} | overrides | n | " + " | ".join(cols) + " | steps | s/edit |",
             "|---|---|---:|" + "---:|" * (len(cols) + 2)]
    for r in rows:
        ov = ", ".join(f"{k}={v}" for k, v in r["overrides"].items()) or "(defaults)"
        lines.append(f"| {r['variant']} | {ov} | {r['n']} | "
                     + " | ".join(f"{r.get(c, float('nan')):.1f}" for c in cols)
                     + f" | {r['steps']:.1f} | {r['s_per_edit']:.1f} |")
    return "\n".join(lines)


def add_common_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--cases", type=int, default=20, help="N cases of the task's train split")
    ap.add_argument("--offset", type=int, default=0, help="skip this many train cases first")
    ap.add_argument("--hparam", action="append", default=[], help="key=value override for every variant")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--data", default=os.environ.get("BENCH_DATA", "/work/shared/data"))
    ap.add_argument("--json", default=None, help="write the rows and per-case records here")


def run(args, task: str, variants: list[tuple[str, dict]], first: str = "variant") -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    common = parse_hparam_args(args.hparam)
    variants = [(name, {**common, **ov}) for name, ov in variants]
    rows, records = sweep(task, args.cases, variants, args.model, args.data, args.offset)
    print(f"{task} train split, cases [{args.offset}, {args.offset + args.cases}), model {args.model}")
    print(table(rows, first))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "records": records}, indent=1, default=str))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="zsre")
    ap.add_argument("--variant", action="append", default=[], help="NAME:KEY=VALUE[,KEY=VALUE]")
    add_common_args(ap)
    args = ap.parse_args()
    run(args, args.task, [parse_variant(v) for v in (args.variant or ["default:"])])


if __name__ == "__main__":
    main()
