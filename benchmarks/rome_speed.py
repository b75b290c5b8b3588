"""Seconds per ROME edit on SmolLM2-135M (CPU by default), split into its phases.

    python benchmarks/rome_speed.py --cases 3 --threads 1

Phases: key (k* over the context-prefixed prompts), value (the delta optimisation), update
(the rank-one write) and eval (bench.metrics.evaluate_case after the edit, CounterFact probes).
`prepare` (context texts, key statistics and C^-1; cached on disk after the first run) is timed
once. Peak memory is the process's maximum resident set size (getrusage) after each phase;
`--tracemalloc` also reports the peak of Python-level allocations (torch tensors excluded).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.metrics import evaluate_case  # noqa: E402
from bench.models import cache_dir, load_model  # noqa: E402
from editors.base import EditContext, override_hparams, parse_hparam_args  # noqa: E402
from editors.rome import Rome  # noqa: E402
from tasks.registry import load_split  # noqa: E402


def rss_mib() -> float:
    # ru_maxrss is KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cases", type=int, default=3)
    ap.add_argument("--offset", type=int, default=100)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--hparam", action="append", default=[], help="key=value override")
    ap.add_argument("--data", default=os.environ.get("BENCH_DATA", "/work/shared/data"))
    ap.add_argument("--tracemalloc", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tracemalloc:
        tracemalloc.start()

    lm = load_model(args.model, device=args.device)
    rss_model = rss_mib()
    hp = override_hparams(Rome.default_hparams(lm.model.config), parse_hparam_args(args.hparam))
    editor = Rome(hp)
    ctx = EditContext(cache_dir=cache_dir(), log=lambda s: print(s, file=sys.stderr))
    t0 = time.perf_counter()
    editor.prepare(lm, ctx)
    t_prepare = time.perf_counter() - t0
    cases = load_split("counterfact", "train", Path(args.data)).cases[args.offset: args.offset + args.cases]

    rows = []
    for case in cases:
        t0 = time.perf_counter()
        handle = editor.apply(lm.model, lm.tokenizer, case)
        t_apply = time.perf_counter() - t0
        t0 = time.perf_counter()
        ev = evaluate_case(lm.model, lm.tokenizer, case, counterfact=True)
        t_eval = time.perf_counter() - t0
        handle.restore()
        tm = editor.last_timings
        rows.append({"case": case.case_id, "key": tm["key_s"], "value": tm["value_s"],
                     "update": tm["update_s"], "eval": t_eval, "total": t_apply + t_eval,
                     "steps": editor.last_info.get("steps"), "rel": ev.reliability.accuracy,
                     "rss": rss_mib()})

    print(f"model {lm.identity} on {lm.device}, torch threads {torch.get_num_threads()}, "
          f"layer {hp.layer}, contexts 1+{sum(hp.context_counts)}, "
          f"mom2_adjustment {hp.mom2_adjustment}, prefix reuse "
          f"{ctx.notes['rome'].get('context_prefix_reused')}")
    print(f"prepare: {t_prepare:.2f} s (stats from cache: "
          f"{ctx.notes['rome'].get('stats_loaded_from_cache')}); RSS after loading model "
          f"{rss_model:.0f} MiB")
    print("| case | key s | value s (steps) | update s | eval s | total s | reliability | peak RSS MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['case']} | {r['key']:.2f} | {r['value']:.2f} ({r['steps']}) | {r['update']:.3f} | "
              f"{r['eval']:.2f} | {r['total']:.2f} | {r['rel']:.2f} | {r['rss']:.0f} |")
    n = len(rows)
    mean = {k: sum(r[k] for r in rows) / n for k in ("key", "value", "update", "eval", "total")}
    print(f"| mean | {mean['key']:.2f} | {mean['value']:.2f} | {mean['update']:.3f} | "
          f"{mean['eval']:.2f} | {mean['total']:.2f} | | {max(r['rss'] for r in rows):.0f} |")
    if args.tracemalloc:
        _, peak = tracemalloc.get_traced_memory()
        print(f"tracemalloc peak (Python allocations only): {peak / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
