"""Batch-editing speed: MEMIT and AlphaEdit computing many edits in one call, against ROME editing
the same cases one at a time.

    python benchmarks/batch_edit_speed.py --cases 50 --per-call 50 --rome-cases 10 --threads 1
    python benchmarks/batch_edit_speed.py --cases 20 --per-call 1,10,20 --editors memit

Each batch editor (`--editors`, default memit,alphaedit; their defaults for the model, each
`--hparam KEY=VALUE` on top for all of them) edits the cases in calls of `--per-call` cases with
`apply_batch` (sequential mode: every case of a call written together, one handle); each call is
restored before the next, so every call starts from the unedited model. ROME (its defaults)
edits the first `--rome-cases` of the same cases one at a time (`apply`, then restore), half of
them before the batch editors and half after, so that a change of the machine's load slows both
alike.

The table gives seconds per edit (a call's wall time over its cases), split as the editors report
it: z (MEMIT/AlphaEdit: the joint optimisation of the target hidden states; ROME: its value v*),
keys (the key passes and the current hidden states; ROME: k*) and solve (the updates; ROME: the
rank-one write); the ratio to ROME's seconds per edit; the mean optimisation steps; the peak
resident-memory growth during a call (psutil, sampled); and the efficacy of each call's edit
with all its cases applied: the teacher-forced token accuracy of every case's target_new after its
prompt, before -> after (ROME: each case alone). Absolute seconds depend on the machine's load
(reported at start and end); the ratios, measured in one process on the same cases, are the
robust figures.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from _common import (PeakRSS, add_data_argument, emit, find_data_dir, fmt, load_cases, log, loadavg, machine,
                     machine_line, max_rss_mib, mean, prepare, run_main, set_threads)
from bench.core.defaults import DEFAULT_MODEL
from bench.core.errors import BenchError
from bench.core.hparams import hparams_to_dict, parse_hparam_args
from bench.core.layout import output_logits
from bench.core.models import LoadedModel, load_model
from bench.core.probes import encode_probe
from bench.session import build_editor

BATCH_EDITORS = ("memit", "alphaedit")
PHASES = {"rome": {"z": "value_s", "keys": "key_s", "solve": "update_s"},
          "batch": {"z": "z_s", "keys": "keys_s", "solve": "solve_s"}}


@torch.no_grad()
def target_accuracy(lm: LoadedModel, cases, chunk: int = 16) -> list[float]:
    """Per case: the fraction of target_new's tokens that are the argmax after the prompt and
    the target's earlier tokens (teacher forced); logits only at those positions."""
    device = next(lm.model.parameters()).device
    out = []
    for start in range(0, len(cases), chunk):
        probes = [encode_probe(lm.tokenizer, c.prompt, c.target_new) for c in cases[start:start + chunk]]
        feeds = [p + t[:-1] for p, t in probes]
        width = max(len(f) for f in feeds)
        ids = torch.zeros(len(feeds), width, dtype=torch.long)
        mask = torch.zeros(len(feeds), width, dtype=torch.long)
        for b, f in enumerate(feeds):
            ids[b, :len(f)], mask[b, :len(f)] = torch.tensor(f), 1
        hidden = lm.layout.decoder(input_ids=ids.to(device), attention_mask=mask.to(device),
                                   use_cache=False).last_hidden_state
        for b, (p, t) in enumerate(probes):
            pred = output_logits(lm.model, hidden[b, len(p) - 1: len(p) - 1 + len(t)]).argmax(-1).tolist()
            out.append(mean([float(a == b_) for a, b_ in zip(pred, t)]))
    return out


def time_batch_editor(lm: LoadedModel, editor, cases, per_call: int) -> dict:
    calls = []
    for start in range(0, len(cases), per_call):
        chunk = cases[start:start + per_call]
        before = target_accuracy(lm, chunk)
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            handle = editor.apply_batch(lm.model, lm.tokenizer, chunk)
            wall = time.perf_counter() - t0
        after = target_accuracy(lm, chunk)
        handle.restore()
        info = handle.info
        calls.append({"cases": len(chunk), "wall_s": wall, "rss_mib": mem.delta_mib, "load": loadavg(),
                      "phases": {k: info[v] for k, v in PHASES["batch"].items()},
                      "steps": [c["steps"] for c in info["cases"]], "before": before, "after": after})
        log(f"{editor.name} {len(chunk)} cases per call: {wall / len(chunk):.2f} s/edit "
            f"(z {info['z_s']:.1f} s, keys {info['keys_s']:.1f} s, solve {info['solve_s']:.1f} s), "
            f"accuracy {100 * mean(before):.0f} -> {100 * mean(after):.0f}, "
            f"peak +{mem.delta_mib:.0f} MiB, load {loadavg()}")
    n = sum(c["cases"] for c in calls)
    return {"editor": editor.name, "per_call": per_call, "n": n,
            "edit_s": sum(c["wall_s"] for c in calls) / n,
            "phases": {k: sum(c["phases"][k] for c in calls) / n for k in PHASES["batch"]},
            "steps": mean([s for c in calls for s in c["steps"]]),
            "rss_mib": max(c["rss_mib"] for c in calls),
            "before": mean([a for c in calls for a in c["before"]]),
            "after": mean([a for c in calls for a in c["after"]]), "calls": calls}


def time_rome(lm: LoadedModel, editor, cases) -> list[dict]:
    rows = []
    for case in cases:
        before = target_accuracy(lm, [case])
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            handle = editor.apply(lm.model, lm.tokenizer, case)
            wall = time.perf_counter() - t0
        after = target_accuracy(lm, [case])
        handle.restore()
        info = handle.info
        rows.append({"case_id": case.case_id, "wall_s": wall, "rss_mib": mem.delta_mib, "load": loadavg(),
                     "phases": {k: info[v] for k, v in PHASES["rome"].items()}, "steps": info["steps"],
                     "before": before[0], "after": after[0]})
        log(f"rome case {case.case_id}: {wall:.2f} s (value {info['value_s']:.1f} s), load {loadavg()}")
    return rows


def summarize_rome(rows: list[dict]) -> dict:
    return {"editor": "rome", "per_call": 1, "n": len(rows), "edit_s": mean([r["wall_s"] for r in rows]),
            "phases": {k: mean([r["phases"][k] for r in rows]) for k in PHASES["rome"]},
            "steps": mean([r["steps"] for r in rows]), "rss_mib": max(r["rss_mib"] for r in rows),
            "before": mean([r["before"] for r in rows]), "after": mean([r["after"] for r in rows])}


def table(rows: list[dict]) -> str:
    rome = next((r for r in rows if r["editor"] == "rome"), None)
    lines = ["| editor | cases per call | n | s/edit | z | keys | solve | other | / ROME | steps | "
             f"peak RSS growth MiB ({PeakRSS.source}) | target accuracy before -> after |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        ph = r["phases"]
        other = r["edit_s"] - sum(ph.values())
        ratio = fmt(r["edit_s"] / rome["edit_s"]) if rome and r is not rome else "-"
        lines.append(f"| {r['editor']} | {r['per_call']} | {r['n']} | {fmt(r['edit_s'])} | {fmt(ph['z'])} | "
                     f"{fmt(ph['keys'])} | {fmt(ph['solve'], 3)} | {fmt(other)} | {ratio} | {fmt(r['steps'], 1)} | "
                     f"{fmt(r['rss_mib'], 0)} | {fmt(100 * r['before'], 1)} -> {fmt(100 * r['after'], 1)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=50, help="cases edited by the batch editors (default 50)")
    ap.add_argument("--per-call", default="50", help="cases per apply_batch call, comma-separated (default 50)")
    ap.add_argument("--rome-cases", type=int, default=10,
                    help="ROME edits the first N of the same cases, one at a time (default 10; 0 = no ROME)")
    ap.add_argument("--editors", default=",".join(BATCH_EDITORS), help="batch editors to time")
    ap.add_argument("--hparam", action="append", default=[], metavar="KEY=VALUE",
                    help="override for every batch editor (repeatable)")
    ap.add_argument("--task", default="counterfact", help="task whose cases are edited (default counterfact)")
    ap.add_argument("--split", default="train", choices=("eval", "train"), help="its split (default train)")
    ap.add_argument("--offset", type=int, default=0, help="skip this many cases first")
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1; 0 = torch's choice)")
    ap.add_argument("--json", default=None, help="write all measurements here")
    add_data_argument(ap)
    args = ap.parse_args()
    per_call = [int(c) for c in args.per_call.split(",") if c.strip()]
    names = [n.strip() for n in args.editors.split(",") if n.strip()]
    if args.cases < 1 or args.rome_cases < 0 or args.offset < 0 or not per_call or min(per_call) < 1:
        ap.error("--cases and --per-call must be positive, --rome-cases and --offset not negative")
    if any(n not in BATCH_EDITORS for n in names):
        raise BenchError(f"--editors: batch editors are {', '.join(BATCH_EDITORS)}")
    set_threads(args.threads)

    overrides = parse_hparam_args(args.hparam)
    data_dir = find_data_dir(args.data_dir)
    cases = load_cases(args.task, args.split, data_dir, max(args.cases, args.rome_cases), args.offset)
    info = {"machine": machine(), "load_start": loadavg(), "argv": sys.argv[1:]}
    started = time.perf_counter()
    lm = load_model(args.model, device=args.device, dtype=args.dtype)
    rss_model = max_rss_mib()
    editors = {}
    for name in names:
        editors[name] = build_editor(name, overrides, lm.model.config)
        _, info[f"prepare_{name}_s"] = prepare(editors[name], lm, data_dir)
    rome_rows = []
    rome = None
    if args.rome_cases:
        rome = build_editor("rome", {}, lm.model.config)
        _, info["prepare_rome_s"] = prepare(rome, lm, data_dir)
        half = (args.rome_cases + 1) // 2
        rome_rows += time_rome(lm, rome, cases[:half])
    rows = []
    for name in names:
        for size in per_call:
            rows.append(time_batch_editor(lm, editors[name], cases[:args.cases], size))
    if rome is not None:
        rome_rows += time_rome(lm, rome, cases[(args.rome_cases + 1) // 2: args.rome_cases])
        rows.insert(0, summarize_rome(rome_rows))
    info.update(rows=rows, rome=rome_rows, hparams={n: hparams_to_dict(e.hparams) for n, e in editors.items()},
                load_end=loadavg(), wall_s=round(time.perf_counter() - started, 1), rss_model_mib=rss_model)

    print(machine_line(info["machine"]))
    print(f"load average (1, 5, 15 min): start {info['load_start']}, end {info['load_end']}; "
          f"wall {info['wall_s']} s; RSS after loading the model {rss_model:.0f} MiB")
    given = ", ".join(f"{k}={v}" for k, v in overrides.items()) or "defaults"
    print(f"{args.model}, {args.task} {args.split} cases [{args.offset}, {args.offset + args.cases}) "
          f"(ROME: the first {args.rome_cases}); batch editors: {given}; ROME: defaults")
    emit(table(rows), info, args.json)


if __name__ == "__main__":
    run_main(main)
