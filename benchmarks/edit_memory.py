"""Peak memory of one edit per editor on one model (default: Gemma-3-270M, 262,144-row vocabulary).

    python benchmarks/edit_memory.py --model gemma3-270m --editors none,ft,rome,mend,instructedit

Each editor runs in its own process (so one editor's freed memory cannot hide another's peak):
load the model, build the editor as a run builds it (its defaults for the model, the model
preset's measured defaults, `--hparam EDITOR.KEY=VALUE` on top), prepare it as a run prepares it,
then apply one edit to the first case of the task's train split and restore it. The table gives
the process's resident memory after loading the model and one forward pass (weights that are
memory-mapped are paged in by then), the peak growth of resident memory above that during
`prepare`, the resident memory before the edit (after memory freed by `prepare` is handed back
to the system, glibc's malloc_trim) and the peak growth above it during the edit (psutil sampled
every 2 ms; without psutil a lower bound from ru_maxrss), and on CUDA the peak of allocated GPU memory during the edit above what was
allocated before it.

Learned editors (mend, instructedit) train with a tiny budget (`--train-steps`, default 5 steps of
one edit) into a throwaway cache: what one edit costs does not depend on how long the network
trained, and no half-trained checkpoint is left in the harness's cache. ROME, MEMIT and AlphaEdit
use the harness's cache (key statistics are computed once per model and layer, which can take
minutes the first time).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

try:  # optional, as in _common: the resident memory now rather than the high-water mark
    import psutil
except ImportError:  # pragma: no cover
    psutil = None

from _common import (PeakRSS, add_data_argument, find_data_dir, fmt, load_cases, log, machine,
                     machine_line, max_rss_mib, prepare, run_main, set_threads)
from bench.core.errors import BenchError
from bench.core.hparams import hparams_to_dict
from bench.core.models import load_model
from bench.session import build_editor
from editors import get_editor_class

DEFAULT_EDITORS = "none,ft,rome,mend,instructedit"
LEARNED_BUDGET = {"batch_size": "1", "val_cases": "0", "time_budget_s": "0"}


def editor_overrides(items: list[str], editor: str) -> dict[str, str]:
    """--hparam EDITOR.KEY=VALUE items for `editor`."""
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        ed, dot, key = name.partition(".")
        if not sep or not dot or not key:
            raise BenchError(f"--hparam expects EDITOR.KEY=VALUE, got {item!r}")
        if ed == editor:
            out[key] = value
    return out


def release_freed_memory() -> None:
    """Hand memory freed by `prepare` (a learned editor's training) back to the system (glibc's
    malloc_trim), so that the edit's growth is not hidden in memory the process already holds."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the edit's growth is then a lower bound
        pass


def current_rss_mib() -> float:
    """The process's resident memory now (psutil), else its high-water mark so far."""
    return psutil.Process().memory_info().rss / 2**20 if psutil is not None else max_rss_mib()


def measure_one(args) -> dict:
    """One editor in this process: RSS after load, prepare and edit peaks (the --one mode)."""
    set_threads(args.threads)
    name = args.one
    data_dir = find_data_dir(args.data_dir)
    case = load_cases(args.task, "train", data_dir, 1)[0]
    lm = load_model(args.model, device=args.device, dtype=args.dtype)
    # The weights may be memory-mapped and paged in on first use: one full forward pass (what a
    # run's pre-edit evaluation does anyway) so that the edit's peak counts only what it allocates.
    with torch.no_grad():
        lm.model(**lm.tokenizer(case.prompt, return_tensors="pt").to(lm.device))
    loaded_mib = current_rss_mib()
    cls = get_editor_class(name)
    overrides = dict(LEARNED_BUDGET, max_steps=str(args.train_steps)) if cls.learns else {}
    overrides.update(editor_overrides(args.hparam, name))
    editor = build_editor(name, overrides, lm.model.config, args.model)
    cuda = lm.device.type == "cuda"
    with tempfile.TemporaryDirectory() as tmp:
        with PeakRSS() as prep_peak:
            ctx, prepare_s = prepare(editor, lm, data_dir, [args.task] if editor.learns else [],
                                     cache=Path(tmp) if editor.learns else None)
        if editor.uses_instructions:
            case = ctx.instruct(case, "seen")
        release_freed_memory()
        before_edit_mib = current_rss_mib()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base_cuda = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        with PeakRSS() as edit_peak:
            handle = editor.apply(lm.model, lm.tokenizer, case)
            if cuda:
                torch.cuda.synchronize()
        edit_s = time.perf_counter() - t0
        cuda_mib = (torch.cuda.max_memory_allocated() - base_cuda) / 2**20 if cuda else None
        handle.restore()
    return {"editor": name, "model": args.model, "device": str(lm.device), "dtype": str(lm.dtype),
            "rss_after_load_mib": round(loaded_mib, 1), "prepare_s": round(prepare_s, 2),
            "prepare_peak_mib": round(prep_peak.delta_mib, 1), "rss_before_edit_mib": round(before_edit_mib, 1),
            "edit_s": round(edit_s, 3),
            "edit_peak_mib": round(edit_peak.delta_mib, 1),
            "edit_peak_cuda_mib": None if cuda_mib is None else round(cuda_mib, 1),
            "changed": list(handle.changed), "hparams": hparams_to_dict(editor.hparams),
            "case": f"{case.task}/{case.case_id}", "memory_source": PeakRSS.source}


def table(rows: list[dict]) -> str:
    lines = ["| editor | RSS after load (MiB) | prepare (s) | prepare peak (+MiB) | RSS before edit (MiB) | "
             "edit (s) | edit peak (+MiB) | edit peak CUDA (MiB) | edited weights |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['editor']} | error: {r['error']} |||||||||")
            continue
        changed = r["changed"]
        weights = f"{len(changed)}: {changed[0]}{' ...' if len(changed) > 1 else ''}" if changed else "-"
        lines.append(f"| {r['editor']} | {fmt(r['rss_after_load_mib'], 0)} | {fmt(r['prepare_s'], 1)} | "
                     f"{fmt(r['prepare_peak_mib'], 0)} | {fmt(r['rss_before_edit_mib'], 0)} | "
                     f"{fmt(r['edit_s'], 2)} | {fmt(r['edit_peak_mib'], 0)} | "
                     f"{fmt(r['edit_peak_cuda_mib'], 0)} | {weights} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma3-270m", help="model spec (default gemma3-270m)")
    ap.add_argument("--editors", default=DEFAULT_EDITORS, help=f"comma-separated (default {DEFAULT_EDITORS})")
    ap.add_argument("--task", default="counterfact", help="task whose first train case is edited")
    ap.add_argument("--hparam", action="append", default=[], metavar="EDITOR.KEY=VALUE",
                    help="override one editor's hyperparameter (repeatable)")
    ap.add_argument("--train-steps", type=int, default=5, help="learned editors: training steps (default 5)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1; 0 = torch's choice)")
    ap.add_argument("--json", default=None, help="write the rows here")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one editor, JSON out
    add_data_argument(ap)
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(measure_one(args)))
        return
    set_threads(args.threads)  # what the machine line reports; each editor's process sets its own
    names = [n.strip() for n in args.editors.split(",") if n.strip()]
    for name in names:
        get_editor_class(name)  # unknown editor: one line, before anything runs
    find_data_dir(args.data_dir)  # says which data the cases come from
    rows = []
    for name in names:
        log(f"{name}: measuring in its own process ...")
        cmd = [sys.executable, __file__, "--one", name, *sys.argv[1:]]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        found = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not found:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            rows.append({"editor": name, "error": last[:200]})
            log(f"{name}: failed: {last}")
            continue
        rows.append(json.loads(found[-1][len("RESULT "):]))
        log(f"{name}: edit peak +{rows[-1]['edit_peak_mib']} MiB in {rows[-1]['edit_s']} s")
    print(machine_line(machine()))
    print(f"{args.model}, one edit of the first {args.task} train case per editor; memory: "
          f"{rows[0].get('memory_source', 'psutil') if rows else '-'}")
    print()
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    run_main(main)
