"""What `kl_position` changes (ROME, MEMIT, AlphaEdit): the same train cases edited with the KL
term read after "{subject} is a" (`after_prompt`, the default) and at the subject's last token
(`subject_last`, the reference code's position); per edited layer, the relative norm of the weight
update ||dW|| / ||W|| under each position and how far the two updates are apart
(||dW_subject - dW_after|| / ||dW_after||); then the post-edit scores of both.

    python benchmarks/kl_position.py --editor rome --cases 10 --threads 1
    python benchmarks/kl_position.py --editor memit --cases 20 --edit-batch 20 --threads 1
    python benchmarks/kl_position.py --editor alphaedit --cases 20 --edit-batch 20 --threads 1

Cases, evaluation and `--edit-batch` are those of benchmarks/sweep.py (the task's train split,
never its eval cases; with `--edit-batch B`, B cases written by one apply_batch and each evaluated
with all B in place). `--hparams-file` / `--hparam` set the base setting of both variants, as for
sweep.py. An "update" is what one call wrote: one case's edit in single mode, the batch's in batch
mode; the norms are means over updates, the distance between positions its median and maximum.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time

import torch

from _common import (add_variant_run_arguments, emit, find_data_dir, fmt, is_counterfact, load_cases, machine,
                     machine_line, run_main, set_threads)
from sweep import build_variants, sweep, table
from bench.core.errors import BenchError
from bench.core.hparams import parse_hparam_args
from bench.core.models import load_config, load_model
from bench.session import hparams_source
from editors import get_editor_class
from editors.base import Editor
from editors.rome.hparams import KL_POSITIONS


class Recorder(Editor):
    """`inner` as it is, with the weight change of every update it makes kept (on the CPU, in
    float32) before the runner evaluates and restores it."""

    def __init__(self, inner: Editor):
        super().__init__(inner.hparams)
        self.inner = inner
        self.name, self.uses_instructions, self.learns = inner.name, inner.uses_instructions, inner.learns
        self.reads_train_split = getattr(inner, "reads_train_split", False)
        self.updates: list[dict[str, tuple[torch.Tensor, float]]] = []  # per update: name -> (dW, ||W||)

    @property
    def edits_per_call(self) -> int:
        return self.inner.edits_per_call

    def prepare(self, lm, ctx) -> None:
        self.inner.prepare(lm, ctx)

    def _keep(self, model, handle):
        params = dict(model.named_parameters())
        self.updates.append({n: ((params[n].detach().float() - handle.original(n).float()).cpu(),
                                 handle.original(n).float().norm().item()) for n in handle.changed})
        return handle

    def apply(self, model, tokenizer, case):
        return self._keep(model, self.inner.apply(model, tokenizer, case))

    def apply_many(self, model, tokenizer, cases):
        for handle in self.inner.apply_many(model, tokenizer, cases):
            yield self._keep(model, handle)

    def apply_batch(self, model, tokenizer, cases):
        return self._keep(model, self.inner.apply_batch(model, tokenizer, cases))


def layer_of(name: str) -> str:
    found = re.search(r"\.(\d+)\.", name)
    return found.group(1) if found else name


def layer_rows(recorders: dict[str, Recorder]) -> list[dict]:
    """Per edited weight: mean relative update norm per position; median and maximum distance
    between the positions' updates of the same call."""
    after, subject = recorders["after_prompt"].updates, recorders["subject_last"].updates
    if len(after) != len(subject):
        raise BenchError(f"the positions made {len(after)} and {len(subject)} updates: not comparable")
    names = sorted({n for u in after for n in u}, key=lambda n: (len(layer_of(n)), layer_of(n), n))
    rows = []
    for name in names:
        pairs = [(a[name], s[name]) for a, s in zip(after, subject) if name in a and name in s]
        rel = {pos: [d.norm().item() / w for d, w in (p[i] for p in pairs)]
               for i, pos in enumerate(KL_POSITIONS)}
        apart = [(s[0] - a[0]).norm().item() / a[0].norm().item() for a, s in pairs if a[0].norm() > 0]
        rows.append({"weight": name, "layer": layer_of(name), "updates": len(pairs),
                     **{f"rel_norm_{pos}": statistics.mean(v) for pos, v in rel.items()},
                     "apart_median": statistics.median(apart) if apart else None,
                     "apart_max": max(apart) if apart else None})
    return rows


def layer_table(rows: list[dict]) -> str:
    lines = ["| layer | updates | ‖ΔW‖/‖W‖ after_prompt | ‖ΔW‖/‖W‖ subject_last | ‖ΔW_s − ΔW_a‖/‖ΔW_a‖ median | max |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['layer']} | {r['updates']} | {fmt(100 * r['rel_norm_after_prompt'], 3)}% | "
                     f"{fmt(100 * r['rel_norm_subject_last'], 3)}% | "
                     f"{fmt(None if r['apart_median'] is None else 100 * r['apart_median'], 2)}% | "
                     f"{fmt(None if r['apart_max'] is None else 100 * r['apart_max'], 2)}% |")
    return "\n".join(lines)


def optimisation_table(records: list[dict]) -> str:
    """Per position, means over cases of the value (z) optimisation's end state, from the case
    records' "edit" entries: the KL term (kl_factor x KL, at the position's own place), the target
    NLL, and the delta's norm relative to the original value (ROME) or hidden state (MEMIT)."""
    lines = ["| variant | cases | KL term | NLL | ‖δ‖/‖v‖ |", "|---|---:|---:|---:|---:|"]
    for pos in KL_POSITIONS:
        edits = [r.get("edit", {}) for r in records if r["variant"] == pos and not r["error"]]
        edits = [e for e in edits if "kl" in e and "delta_norm" in e]
        rel = [e["delta_norm"] / (e.get("value_norm") or e.get("z_norm")) for e in edits
               if e.get("value_norm") or e.get("z_norm")]
        lines.append(f"| {pos} | {len(edits)} | {fmt(statistics.mean(e['kl'] for e in edits) if edits else None, 4)} | "
                     f"{fmt(statistics.mean(e['nll'] for e in edits) if edits else None, 3)} | "
                     f"{fmt(statistics.mean(rel) if rel else None, 3)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_variant_run_arguments(ap, editor_help="rome, memit or alphaedit (default rome)",
                              hparam_scope="both positions",
                              edit_batch_help="write B cases with one apply_batch call (batch editing; "
                                              "default: each edit alone)")
    args = ap.parse_args()
    if args.cases < 1 or args.offset < 0 or args.edit_batch < 0:
        ap.error("--cases must be positive, --offset and --edit-batch not negative")
    set_threads(args.threads)

    get_editor_class(args.editor)
    base = hparams_source(args.editor, args.hparams_file)
    base.update(parse_hparam_args(args.hparam))
    if "kl_position" in base:
        raise BenchError("kl_position is what this benchmark varies: leave it out of --hparam / --hparams-file")
    variants = build_variants(args.editor, load_config(args.model), base,
                              [(pos, {"kl_position": pos}) for pos in KL_POSITIONS], args.model)
    recorders = {name: Recorder(editor) for name, _, editor in variants}
    data_dir = find_data_dir(args.data_dir)
    cases = load_cases(args.task, "train", data_dir, args.cases, args.offset)

    info = {"machine": machine(), "argv": sys.argv[1:], "data_dir": str(data_dir) if data_dir else None}
    started = time.perf_counter()
    lm = load_model(args.model, device=args.device, dtype=args.dtype)
    rows, records = sweep(lm, [(name, ov, recorders[name]) for name, ov, _ in variants], cases,
                          is_counterfact(args.task), data_dir, sorted({args.task}), args.seed,
                          edit_batch=args.edit_batch)
    layers = layer_rows(recorders)
    info.update(rows=rows, layers=layers, records=records, wall_s=round(time.perf_counter() - started, 1),
                load_end=machine()["load"])

    print(machine_line(info["machine"]) + f"; load average {info['machine']['load']} -> {info['load_end']}")
    based = f", base: {', '.join(f'{k}={v}' for k, v in base.items())}" if base else ""
    print(f"{args.editor} on {args.model}, {args.task} train split, cases [{args.offset}, "
          f"{args.offset + len(cases)}){based}"
          + (f"; {args.edit_batch} cases per apply_batch" if args.edit_batch > 1 else "")
          + f"; wall {info['wall_s']} s")
    emit(layer_table(layers) + "\n\n" + optimisation_table(records) + "\n\n" + table(rows), info, args.json)


if __name__ == "__main__":
    run_main(main)
