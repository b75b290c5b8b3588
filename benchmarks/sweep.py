"""Compare hyperparameter variants of any editor on the train split of a task (never its eval
cases, so tuning does not see what runs are scored on).

    python benchmarks/sweep.py --editor rome --task counterfact --cases 10 --threads 1 \
        --sweep layer=2,4,6,8 --hparam context_counts=2,2 --hparam v_num_grad_steps=15
    python benchmarks/sweep.py --editor rome --task zsre --cases 12 --threads 1 \
        --variant prompt:residual_key=prompt --variant mean:residual_key=mean
    python benchmarks/sweep.py --editor ft --task counterfact --sweep steps=1,2 --cases 2

Variants: `--variant NAME:KEY=VALUE[,KEY=VALUE...]` (a comma-separated piece without "=" continues
the previous value, so list values read `a:context_counts=2,2,layer=5`; `NAME` or `NAME:` alone is
the base setting), and `--sweep KEY=V1,V2,...`, one variant per value (a list value in brackets:
`--sweep "context_counts=[2,2],[5,5]"`). Without either, the base setting alone. The base setting
is the editor's defaults for the model (with the model preset's measured ones, bench list models),
then `--hparams-file FILE|PRESET` (a YAML file or a preset
shipped for the editor, editors/presets/), then each `--hparam KEY=VALUE`; a variant's values go on
top. Every variant is built with bench.session.build_editor, so every value is checked against the
model before its weights load.

Every variant runs on the same cases through bench.runner.run_cases (pre-edit evaluation, edit,
post-edit evaluation, restore; `edits_per_call` cases per call for editors that compute several
edits together, FT with parallel_edits > 1, MEMIT and AlphaEdit: each still applied alone). The table gives post-edit means in percent per metric, the mean
optimisation steps (the case record's "edit" entry, where the editor reports `steps`; "-"
otherwise) and seconds per edit (the edit alone, without evaluation).

`--edit-batch B` measures batch editing instead: B cases are written by one `apply_batch` call
(MEMIT and AlphaEdit compute them together; other editors apply them one after another) and each
case is evaluated with all B edits in place (its locality therefore with B edits), then the
batch is restored.

    python benchmarks/sweep.py --editor memit --task counterfact --cases 20 --edit-batch 20 \
        --sweep mom2_update_weight=500,1500,5000

Learned editors (mend, instructedit) are prepared as a run prepares them (bench.session.edit_context
and prepare_editor): each variant loads its cached checkpoint or trains one, which can take long.
The swept task is always held out of their training (with any `--holdout` tasks), since its train
split is what the sweep scores; editors that use instructions get the "seen" description.
"""

from __future__ import annotations

import argparse
import re
import sys
import time

from _common import (add_variant_run_arguments, emit, find_data_dir, fmt, is_counterfact, load_cases, log, machine,
                     machine_line, mean, prepare, run_main, set_threads)
from bench.core.errors import BenchError
from bench.core.hparams import hparams_to_dict, parse_hparam_args
from bench.core.metrics import ALL_METRICS
from bench.core.models import load_config, load_model
from bench.runner import Job, run_cases
from bench.session import build_editor, hparams_source
from editors import get_editor_class
from editors.base import Editor

BASE = "base"  # the name of the variant without overrides


class BatchWritten(Editor):
    """--edit-batch: the runner's joint call (apply_many) served by one `apply_batch` of the
    editor, so every case of the call is evaluated on the model holding all of the call's edits
    (batch editing, as MEMIT and AlphaEdit are meant for); the batch is restored after the last
    case's evaluation. A failing call falls back to the editor's own `apply`, case by case."""

    def __init__(self, inner: Editor, size: int):
        super().__init__(inner.hparams)
        self.inner, self.size = inner, size
        self.name, self.uses_instructions, self.learns = inner.name, inner.uses_instructions, inner.learns

    @property
    def edits_per_call(self) -> int:
        return self.size

    def apply(self, model, tokenizer, case):
        return self.inner.apply(model, tokenizer, case)

    def apply_many(self, model, tokenizer, cases):
        handle = self.inner.apply_batch(model, tokenizer, cases)
        shared = {k: v for k, v in handle.info.items() if k != "cases"}
        per_case = handle.info.get("cases") or [{} for _ in cases]
        for k, info in enumerate(per_case):
            yield _BatchMember(handle, {**info, **shared, "edit_batch": len(cases)}, last=k == len(cases) - 1)


class _BatchMember:
    """One case's view of a batch handle: only the last case's restore undoes the batch."""

    def __init__(self, handle, info: dict, last: bool):
        self.handle, self.info, self.last, self.changed = handle, info, last, handle.changed

    def restore(self) -> None:
        if self.last:
            self.handle.restore()

    def original(self, name: str):
        return self.handle.original(name)

    def __getattr__(self, name: str):
        """Everything else the runner reads of a handle (its view, `reusable_blocks`, ...) is the
        batch handle's."""
        return getattr(self.handle, name)


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    """NAME:K=V,K=V; a comma-separated piece without "=" continues the previous value
    (list values: `a:context_counts=2,2,layer=5`)."""
    name, _, overrides = text.partition(":")
    if not name.strip():
        raise BenchError(f"--variant {text!r}: a variant needs a name before ':'")
    items: list[str] = []
    for piece in filter(None, overrides.split(",")):
        if "=" in piece or not items:
            items.append(piece)
        else:
            items[-1] += "," + piece
    return name.strip(), parse_hparam_args(items)


def parse_sweep(text: str) -> list[tuple[str, dict[str, str]]]:
    """KEY=V1,V2,... as one variant per value, named KEY=V; commas inside brackets belong to
    one (list) value."""
    key, sep, values = text.partition("=")
    if not sep or not key.strip():
        raise BenchError(f"--sweep expects KEY=V1,V2,..., got {text!r}")
    items = [v.strip() for v in re.split(r",(?![^\[]*\])", values) if v.strip()]
    if not items:
        raise BenchError(f"--sweep {text!r}: no values")
    return [(f"{key.strip()}={v}", {key.strip(): v}) for v in items]


def build_variants(editor: str, model_config, base: dict, variants: list[tuple[str, dict]],
                   model: str | None = None) -> list[tuple[str, dict, Editor]]:
    """(name, its own overrides, the checked editor) per variant; names must differ. `model`:
    the model spec, whose preset's measured defaults (if any) sit under the base setting."""
    names = [name for name, _ in variants]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise BenchError(f"variant names must differ: {', '.join(dup)}")
    return [(name, ov, build_editor(editor, {**base, **ov}, model_config, model)) for name, ov in variants]


def sweep(lm, variants: list[tuple[str, dict, Editor]], cases, counterfact: bool, data_dir,
          holdout: list[str], seed: int = 0, batch_size: int = 32,
          edit_batch: int = 0) -> tuple[list[dict], list[dict]]:
    """(one row of post-edit means per variant, every per-case record tagged with its variant);
    `edit_batch` > 1: that many cases written by one apply_batch and evaluated together."""
    rows, records = [], []
    for name, overrides, editor in variants:
        ctx, prepare_s = prepare(editor, lm, data_dir, holdout if editor.learns else [], seed)
        post: dict[str, list[float]] = {}
        pre: dict[str, list[float]] = {}
        steps, seconds, errors = [], [], 0
        if editor.uses_instructions:
            cases_in = [ctx.instruct(case, "seen") for case in cases]
        else:
            cases_in = list(cases)
        # Editors that compute several independent edits together get them edits_per_call at a
        # time (each still applied, evaluated and restored alone); the joint computation's
        # seconds land on the first case of a call, so the mean seconds per edit stay right.
        runner_editor = BatchWritten(editor, edit_batch) if edit_batch > 1 else editor
        per_call = max(1, runner_editor.edits_per_call)
        done = []
        for start in range(0, len(cases_in), per_call):
            chunk = cases_in[start:start + per_call]
            done += list(zip(chunk, run_cases(lm, runner_editor, [Job(c, counterfact) for c in chunk],
                                              batch_size=batch_size)))
        for case, rec in done:
            records.append({"variant": name, **rec})
            if rec["error"]:
                errors += 1
                log(f"{name} {case.case_id}: ERROR {rec['error']}")
                continue
            if "steps" in rec.get("edit", {}):
                steps.append(rec["edit"]["steps"])
            seconds.append(rec["time"]["edit_s"])
            for k in ALL_METRICS:
                if k in rec["post"]:
                    post.setdefault(k, []).append(rec["post"][k])
                if k in rec["pre"]:
                    pre.setdefault(k, []).append(rec["pre"][k])
            log(f"{name} {case.case_id}: reliability {rec['post']['reliability']:.2f}, "
                f"steps {rec.get('edit', {}).get('steps', '-')}, {rec['time']['edit_s']:.2f} s")
        rows.append({"variant": name, "overrides": overrides, "hparams": hparams_to_dict(editor.hparams),
                     "n": len(cases) - errors, "errors": errors, "prepare_s": round(prepare_s, 2),
                     "steps": mean(steps) if steps else None, "s_per_edit": mean(seconds),
                     "post": {k: 100 * mean(v) for k, v in post.items()},
                     "pre": {k: 100 * mean(v) for k, v in pre.items()}})
    return rows, records


def table(rows: list[dict]) -> str:
    cols = [c for c in ALL_METRICS if any(c in r["post"] for r in rows)]
    lines = ["| variant | overrides | n | " + " | ".join(cols) + " | steps | s/edit |",
             "|---|---|---:|" + "---:|" * (len(cols) + 2)]
    for r in rows:
        ov = ", ".join(f"{k}={v}" for k, v in r["overrides"].items()) or "(base)"
        lines.append(f"| {r['variant']} | {ov} | {r['n']} | "
                     + " | ".join(fmt(r["post"].get(c), 1) for c in cols)
                     + f" | {fmt(r['steps'], 1)} | {fmt(r['s_per_edit'])} |")
    # The pre-edit scores do not depend on the variant: one line under the table.
    pre = next((r["pre"] for r in rows if r["pre"]), {})
    if pre:
        lines += ["", "pre-edit means: " + ", ".join(f"{c} {fmt(pre[c], 1)}" for c in cols if c in pre)]
    errors = [f"{r['variant']}: {r['errors']}" for r in rows if r["errors"]]
    if errors:
        lines.append("cases whose edit failed (left out of the means): " + ", ".join(errors))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_variant_run_arguments(ap, editor_help="editor name (bench list editors); default rome",
                              hparam_scope="every variant",
                              edit_batch_help="write B cases with one apply_batch call and evaluate each with "
                                              "all B edits in place (batch editing; default: each edit alone)")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE[,KEY=VALUE]",
                    help="one variant (repeatable)")
    ap.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2,...",
                    help="one variant per value (repeatable)")
    ap.add_argument("--holdout", action="append", default=[], metavar="TASK",
                    help="learned editors: also keep this task out of training (repeatable)")
    args = ap.parse_args()
    if args.cases < 1 or args.offset < 0 or args.edit_batch < 0:
        ap.error("--cases must be positive, --offset and --edit-batch not negative")
    set_threads(args.threads)

    get_editor_class(args.editor)  # unknown editor: one line, before anything loads
    base = hparams_source(args.editor, args.hparams_file)
    base.update(parse_hparam_args(args.hparam))
    wanted = [parse_variant(v) for v in args.variant] + [v for s in args.sweep for v in parse_sweep(s)]
    variants = build_variants(args.editor, load_config(args.model), base, wanted or [(BASE, {})], args.model)
    data_dir = find_data_dir(args.data_dir)
    cases = load_cases(args.task, "train", data_dir, args.cases, args.offset)
    counterfact = is_counterfact(args.task)
    holdout = sorted({args.task, *args.holdout})

    info = {"machine": machine(), "argv": sys.argv[1:], "data_dir": str(data_dir) if data_dir else None}
    started = time.perf_counter()
    lm = load_model(args.model, device=args.device, dtype=args.dtype)
    rows, records = sweep(lm, variants, cases, counterfact, data_dir, holdout, args.seed,
                          edit_batch=args.edit_batch)
    info.update(rows=rows, records=records, wall_s=round(time.perf_counter() - started, 1),
                load_end=machine()["load"])

    print(machine_line(info["machine"]) + f"; load average {info['machine']['load']} -> {info['load_end']}")
    based = f", base: {', '.join(f'{k}={v}' for k, v in base.items())}" if base else ""
    print(f"{args.editor} on {args.model}, {args.task} train split, cases [{args.offset}, "
          f"{args.offset + len(cases)}){based}"
          + (f"; {args.edit_batch} cases per apply_batch, each evaluated with all of them applied"
             if args.edit_batch > 1 else "") + f"; wall {info['wall_s']} s")
    emit(table(rows), info, args.json)


if __name__ == "__main__":
    run_main(main)
