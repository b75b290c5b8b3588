"""Sweep ROME's edited layer on SmolLM2-135M over CounterFact train cases.

    python benchmarks/rome_layer_sweep.py --layers 2,4,6,8,12,16 --cases 15 --threads 1

For every layer and case: evaluate (bench.metrics), edit, evaluate, restore. Prints a markdown
table of post-edit means (percent): reliability (token accuracy of target_new after the prompt),
generality (rephrase), locality (argmax agreement on the locality prompt+answer, pre vs post)
and efficacy (P(new) > P(true)), plus seconds per edit.  The data is read from
$BENCH_DATA or /work/shared/data (counterfact/counterfact-train.json, EasyEdit layout).
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

from bench.cases import EditCase, PromptAnswer  # noqa: E402
from bench.metrics import case_scores, evaluate_case  # noqa: E402
from bench.models import cache_dir, load_model  # noqa: E402
from editors.base import EditContext, override_hparams, parse_hparam_args  # noqa: E402
from editors.rome import Rome  # noqa: E402


def counterfact_cases(path: Path, n: int, offset: int = 0) -> list[EditCase]:
    records = json.loads(path.read_text())[offset: offset + n]
    cases = []
    for r in records:
        loc = ()
        if r.get("locality_prompt") and r.get("locality_ground_truth"):
            loc = (PromptAnswer(r["locality_prompt"], r["locality_ground_truth"]),)
        cases.append(EditCase(case_id=str(r["case_id"]), task="counterfact", prompt=r["prompt"],
                              subject=r["subject"], target_new=r["target_new"],
                              ground_truth=r.get("ground_truth"),
                              rephrase_prompts=(r["rephrase_prompt"],) if r.get("rephrase_prompt") else (),
                              locality=loc))
    return cases


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layers", default="2,4,6,8,12,16")
    ap.add_argument("--cases", type=int, default=15)
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--hparam", action="append", default=[], help="key=value override")
    ap.add_argument("--data", default=os.environ.get("BENCH_DATA", "/work/shared/data"))
    ap.add_argument("--json", default=None, help="write per-layer results here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    lm = load_model(args.model)
    cases = counterfact_cases(Path(args.data) / "counterfact" / "counterfact-train.json",
                              args.cases, args.offset)
    layers = [int(x) for x in args.layers.split(",")]
    pre = {c.case_id: evaluate_case(lm.model, lm.tokenizer, c, counterfact=True) for c in cases}
    rows = []
    for layer in layers:
        hp = Rome.default_hparams(lm.model.config)
        hp = override_hparams(hp, {**parse_hparam_args(args.hparam), "layer": layer})
        editor = Rome(hp)
        ctx = EditContext(cache_dir=cache_dir(), log=lambda s: print(s, file=sys.stderr))
        editor.prepare(lm, ctx)
        sums: dict[str, list[float]] = {}
        t_edit = 0.0
        for case in cases:
            t0 = time.perf_counter()
            handle = editor.apply(lm.model, lm.tokenizer, case)
            t_edit += time.perf_counter() - t0
            post = evaluate_case(lm.model, lm.tokenizer, case, counterfact=True)
            handle.restore()
            for k, v in case_scores(post, pre[case.case_id]).items():
                sums.setdefault(k, []).append(v)
        row = {"layer": layer, "n": len(cases), "s_per_edit": t_edit / len(cases),
               **{k: 100 * sum(v) / len(v) for k, v in sums.items()}}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)

    cols = ["reliability", "generality", "locality", "efficacy", "paraphrase", "neighborhood"]
    print("| layer | " + " | ".join(cols) + " | s/edit |")
    print("|---:|" + "---:|" * (len(cols) + 1))
    for r in rows:
        print(f"| {r['layer']} | " + " | ".join(f"{r.get(c, float('nan')):.1f}" for c in cols)
              + f" | {r['s_per_edit']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
