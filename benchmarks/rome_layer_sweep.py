"""Sweep ROME's edited layer on SmolLM2-135M over CounterFact train cases.

    python benchmarks/rome_layer_sweep.py --layers 2,4,6,8,12,16 --cases 15 --threads 1

One variant of benchmarks/rome_tune.py per layer (`--hparam` overrides apply to all of them),
on the first `--cases` records of the counterfact train split
(counterfact/counterfact-train.json under $BENCH_DATA): for every layer and case evaluate, edit,
evaluate, restore. Prints a markdown table of post-edit means (percent): reliability (token
accuracy of target_new after the prompt), generality (rephrase), locality (argmax agreement on
the locality prompt + answer, pre vs post), efficacy / paraphrase / neighborhood (CounterFact's
probability comparisons), plus value steps and seconds per edit.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rome_tune import add_common_args, run  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", default="2,4,6,8,12,16")
    add_common_args(ap)
    ap.set_defaults(cases=15)
    args = ap.parse_args()
    layers = [int(x) for x in args.layers.split(",")]
    run(args, "counterfact", [(str(layer), {"layer": layer}) for layer in layers], first="layer")


if __name__ == "__main__":
    main()
