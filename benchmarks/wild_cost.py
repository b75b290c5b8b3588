"""What evaluation in the wild costs beside the edit and the teacher-forced evaluation.

    python benchmarks/wild_cost.py --editor ft --task counterfact,zsre,recast --cases 24 --threads 2

Runs the first `--cases` eval cases of each task through bench.runner.run_cases with both
protocols (as `bench run` does: the editor's own batching, the pre-edit generations of a call
batched together, post-edit ones reusing the pre-edit answers the edited model still gives) and
prints seconds per case: the edit, the teacher-forced evaluation (pre + post), the wild
evaluation (pre + post generations), and wild / edit. The per-task cap on generated tokens and
how often it was hit are printed too, since they drive the cost.
"""

from __future__ import annotations

import argparse
import statistics

import _common
from bench.core.generation import StopRules
from bench.core.models import load_model
from bench.core.wild import WildSettings, default_max_new_tokens
from bench.runner import Job, Protocol, run_cases
from bench.session import build_editor, hparams_source
from bench.core.hparams import parse_hparam_args
from tasks.registry import get_card, load_split


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--editor", default="ft")
    ap.add_argument("--task", default="counterfact,zsre,recast")
    ap.add_argument("--cases", type=int, default=24, help="first N eval cases per task")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--hparams-file", default=None)
    ap.add_argument("--hparam", action="append", default=[])
    _common.add_data_argument(ap)
    args = ap.parse_args()
    _common.set_threads(args.threads)
    data_dir = _common.find_data_dir(args.data_dir)
    lm = load_model(args.model, device="cpu", dtype="float32")
    overrides = {**hparams_source(args.editor, args.hparams_file), **parse_hparam_args(args.hparam)}
    editor = build_editor(args.editor, overrides, lm.model.config, lm.spec)
    _common.prepare(editor, lm, data_dir)
    protocol = Protocol(teacher_forced=True)
    rows = []
    for task in [t.strip() for t in args.task.split(",") if t.strip()]:
        holdout = get_card(task).holdout_only
        split = load_split(task, "eval", data_dir, holdout=holdout).cases
        settings = WildSettings(rules=StopRules(max_new_tokens=default_max_new_tokens(lm.tokenizer, split),
                                                stop_strings=get_card(task).stop_strings))
        jobs = [Job(c, _common.is_counterfact(task), settings) for c in split[: args.cases]]
        records = []
        for start in range(0, len(jobs), editor.edits_per_call):
            records += list(run_cases(lm, editor, jobs[start:start + editor.edits_per_call], batch_size=32,
                                      protocol=protocol))
        ok = [r for r in records if not r["error"]]
        stops = [e["stop"] for r in ok for state in r["wild"]["generations"].values()
                 for e in [state["prompt"]] + [x for k in ("rephrase", "locality", "portability")
                                                for x in state.get(k, [])]]
        rows.append({"task": task, "n": len(ok), "cap": settings.rules.max_new_tokens,
                     "cap_hits": f"{stops.count('max_new_tokens')}/{len(stops)}",
                     **{k: statistics.mean(r["time"][k] for r in ok) for k in ("edit_s", "eval_s", "wild_s")}})
        _common.log(f"{task}: {rows[-1]}")
    m = _common.machine()
    print(_common.machine_line(m))
    print(f"editor {args.editor}, {editor.edits_per_call} edits per call; seconds per case (means)")
    print("| task | cases | cap (tokens) | capped / generations | edit | teacher forced | wild | wild / edit |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['task']} | {r['n']} | {r['cap']} | {r['cap_hits']} | {r['edit_s']:.3f} | "
              f"{r['eval_s']:.3f} | {r['wild_s']:.3f} | {r['wild_s'] / r['edit_s']:.2f} |")
    n = sum(r["n"] for r in rows)
    mean = {k: sum(r[k] * r["n"] for r in rows) / n for k in ("edit_s", "eval_s", "wild_s")}
    print(f"| all | {n} | | | {mean['edit_s']:.3f} | {mean['eval_s']:.3f} | {mean['wild_s']:.3f} | "
          f"{mean['wild_s'] / mean['edit_s']:.2f} |")


if __name__ == "__main__":
    _common.run_main(main)
