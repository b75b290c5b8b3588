"""Speed benchmark: the optimised and the plain path of FT and ROME side by side, their cost
curves, and the per-edit phases of any editor.

    python benchmarks/speed.py --cases 5 --editors ft,rome --json speed.json
    python benchmarks/speed.py --curve --curve-cases 2
    python benchmarks/speed.py --phases --editor rome --hparams-file easyedit --cases 3

Compare mode (default) builds the editors of each method from the reference settings, the
presets shipped for them (`ft/easyedit-ft-m`: layer 21, 25 Adam steps, lr 5e-4, no norm
constraint, teacher-forced target loss, stop below 1e-2; `rome/easyedit`: layer 5, 25 value
iterations with ROME's total-loss stop rule, context_counts 10,10 with lengths 5,10, no covariance
adjustment; layers scaled to the model's depth when it is not 30), which differ only in the
optimisation switches: "optimised" and "plain" (FT `frozen_prefix` + `fused_vocab_loss`, ROME
`reuse_context_prefix`), for FT also "parallel" (optimised, `--parallel-edits` cases optimised
together) and "reference" (the reference framework's whole-model computation, written out here).
Every path runs the same cases (CounterFact eval records by default) through
bench.runner.run_cases, the order of the paths rotating chunk by chunk so that a busy machine
slows all alike. It prints seconds per edit (edit only, and edit plus pre- and post-edit
evaluation), the ratios to plain and to the reference, every metric's post-edit mean for each
path, and the per-edit phases the editors report (ROME: key, value, update).

Curve mode (--curve) times the edit alone (no evaluation) against model size (the tiny random
Llama of bench.core.tiny and SmolLM2-135M) for FT and ROME, and against the number of ROME
context prompts on SmolLM2-135M, with the peak resident-memory increase during the edit.

Phases mode (--phases) runs any editor (`--editor`, default rome) with its defaults for the
model, `--hparams-file FILE|PRESET` and `--hparam KEY=VALUE` on top, and prints per case the
phase timings the edit reports (its handle.info: ROME's key_s, value_s, update_s), the edit and
evaluation seconds, the optimisation steps, the post-edit reliability and the memory, plus the
time of `prepare` (ROME: context texts, key statistics and C^-1, cached on disk after the first
run; learned editors: loading or training their checkpoint).

Steps and phases come from each edit's handle.info (the case record's "edit" entry). Absolute
seconds depend on the machine's load (reported at start and end); the ratios optimised/plain,
measured in the same process on the same cases, are the robust figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from _common import (PeakRSS, add_data_argument, find_data_dir, fmt, is_counterfact, load_cases, log,
                     loadavg, machine, machine_line, max_rss_mib, mean, prepare, run_main,
                     scalar_notes, set_threads)
from _reference import PRESET, TINY, load_lm, make_editor, phase_keys, reference_overrides, warm_up
from bench.core.defaults import DEFAULT_MODEL
from bench.core.hparams import hparams_to_dict, parse_hparam_args
from bench.core.metrics import ALL_METRICS
from bench.core.models import LoadedModel, load_model
from bench.runner import Job, run_cases
from bench.session import build_editor, hparams_source
from editors import get_editor_class

# The issue author's figures on this machine, idle (another framework, SmolLM2-135M float32,
# first 50 CounterFact edit records). ROME's figure has no separate evaluation time.
REFERENCE = {"ft": {"edit_s": 2.3, "eval_s": 0.4}, "rome": {"edit_s": 30.0, "eval_s": None}}
TARGET = {"ft": 0.4, "rome": 0.7}  # optimised seconds per edit / reference, at most
OPTIMISED_PATHS = ("optimised", "parallel")  # compared with "plain" (and FT's "reference")


# ------------------------------------------------------------------------------------------
# Compare mode
# ------------------------------------------------------------------------------------------


def timed_cases(lm: LoadedModel, editor, cases, optimised: bool, counterfact: bool) -> list[dict]:
    """The cases through bench.runner.run_cases, in one call when the editor computes several
    edits together; the optimised paths' post-edit evaluation reuses the blocks below the edit,
    the others run every block. Steps and phases from each record's "edit" entry."""
    records = list(run_cases(lm, editor, [Job(c, counterfact) for c in cases], batch_size=32,
                             reuse_unchanged_blocks=optimised))
    out = []
    for case, rec in zip(cases, records):
        info = rec.get("edit", {})
        r = {"case_id": case.case_id, "error": rec["error"], "steps": info.get("steps"), "load": loadavg(),
             "phases": {k: info[k] for k in phase_keys(info)}}
        if "prefix_reused" in info:
            r["prefix_reused"] = info["prefix_reused"]
        if not rec["error"]:
            r.update(edit_s=rec["time"]["edit_s"], eval_s=rec["time"]["eval_s"], pre=rec["pre"],
                     post=rec["post"])
        out.append(r)
    return out


def paths_for(name: str, parallel_edits: int) -> list[tuple[str, bool, int]]:
    """(path, optimised, edits per call): "parallel" is the optimised FT with that many cases
    optimised together."""
    paths = [("optimised", True, 1), ("plain", False, 1)]
    if name == "ft":
        paths.append(("reference", False, 1))
        if parallel_edits > 1:
            paths.insert(1, ("parallel", True, parallel_edits))
    return paths


def compare(lm: LoadedModel, names: list[str], cases, counterfact: bool, warmup: bool,
            parallel_edits: int = 8) -> dict:
    results = {}
    for name in names:
        editors, prepare_s = {}, {}
        paths = paths_for(name, parallel_edits)
        for path, optimised, per_call in paths:
            hp = reference_overrides(name, lm.layout.num_layers, optimised, parallel_edits=per_call)
            editors[path], _, prepare_s[path] = make_editor(name, lm, hp, reference=path == "reference")
            if warmup:
                warm_up(name, lm, None, optimised, cases, parallel_edits=per_call)
        runs = {path: [] for path, _, _ in paths}
        chunk = max(per_call for _, _, per_call in paths)
        for i, start in enumerate(range(0, len(cases), chunk)):
            # Rotate the order chunk by chunk so that a busy machine slows every path alike.
            order = paths[i % len(paths):] + paths[:i % len(paths)]
            for path, optimised, per_call in order:
                for j in range(start, min(start + chunk, len(cases)), per_call):
                    batch = cases[j:min(j + per_call, start + chunk, len(cases))]
                    for case, r in zip(batch, timed_cases(lm, editors[path], batch, optimised, counterfact)):
                        runs[path].append(r)
                        log(f"{name} {path:9s} case {case.case_id}: edit {r.get('edit_s', float('nan')):.2f} s, "
                            f"eval {r.get('eval_s', float('nan')):.2f} s, {r['steps']} steps, load {r['load']}"
                            + (f"  ERROR {r['error']}" if r["error"] else ""))
        results[name] = {"hparams": {p: hparams_to_dict(e.hparams) for p, e in editors.items()},
                         "prepare_s": prepare_s, "runs": runs}
    return results


def summarize(results: dict) -> dict:
    out = {}
    for name, res in results.items():
        ok_ids = set.intersection(*({r["case_id"] for r in runs if not r["error"]}
                                    for runs in res["runs"].values()))
        metrics = [m for m in ALL_METRICS
                   if any(m in r.get("post", {}) for runs in res["runs"].values() for r in runs)]
        s = {"metrics": metrics}
        for path, runs in res["runs"].items():
            ok = [r for r in runs if r["case_id"] in ok_ids]
            steps = [r["steps"] for r in ok if r["steps"] is not None]
            s[path] = {"n": len(ok), "errors": len(runs) - len(ok),
                       "edit_s": mean([r["edit_s"] for r in ok]),
                       "total_s": mean([r["edit_s"] + r["eval_s"] for r in ok]),
                       "eval_s": mean([r["eval_s"] for r in ok]),
                       "steps": mean(steps) if steps else None,
                       "pre": {m: 100 * mean([r["pre"][m] for r in ok if m in r["pre"]]) for m in metrics},
                       "post": {m: 100 * mean([r["post"][m] for r in ok if m in r["post"]]) for m in metrics}}
            keys = list(dict.fromkeys(k for r in ok for k in r["phases"]))
            if keys:
                s[path]["phases"] = {k: mean([r["phases"][k] for r in ok if k in r["phases"]]) for k in keys}
            if any("prefix_reused" in r for r in ok):
                s[path]["prefix_reused"] = sum(bool(r.get("prefix_reused")) for r in ok)
        by_case = {p: {r["case_id"]: r for r in runs} for p, runs in res["runs"].items()}
        p, ref = s["plain"], REFERENCE[name]
        s["ratios"] = {}
        for path in [q for q in OPTIMISED_PATHS if q in s]:
            o = s[path]
            per_case = [by_case[path][c]["edit_s"] / by_case["plain"][c]["edit_s"] for c in sorted(ok_ids)]
            r = {"edit": o["edit_s"] / p["edit_s"], "total": o["total_s"] / p["total_s"],
                 # per case only where each case's edit is its own (not a joint call's share)
                 "edit_median_case": statistics.median(per_case) if per_case and path == "optimised" else None,
                 "vs_reference_edit": o["edit_s"] / ref["edit_s"],
                 "vs_reference_total": (o["total_s"] / (ref["edit_s"] + ref["eval_s"])
                                        if ref["eval_s"] is not None else None),
                 "max_metric_diff": max((abs(o["post"][m] - p["post"][m]) for m in metrics), default=None)}
            if "reference" in s:
                r["vs_reference_path_edit"] = o["edit_s"] / s["reference"]["edit_s"]
                r["vs_reference_path_total"] = o["total_s"] / s["reference"]["total_s"]
            s["ratios"][path] = r
        out[name] = s
    return out


def compare_tables(summary: dict) -> str:
    lines = ["| editor | path | n | steps | s/edit (edit) | s/edit (edit+eval) | /plain edit "
             "(median per case) | /plain edit+eval | reference figure s/edit | /reference figure "
             "| /reference path, measured here (edit+eval) | target |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, s in summary.items():
        ref = REFERENCE[name]
        ref_txt = f"{ref['edit_s']:.1f}" + (f" (+{ref['eval_s']:.1f} eval)" if ref["eval_s"] else "")
        for path in [p for p in ("optimised", "parallel", "plain", "reference") if p in s]:
            p, r = s[path], s["ratios"].get(path)
            row = f"| {name} | {path} | {p['n']} | {fmt(p['steps'], 1)} | {fmt(p['edit_s'])} | {fmt(p['total_s'])} | "
            if r is None:
                lines.append(row + "| | | | | |")
                continue
            vs_ref = fmt(r["vs_reference_edit"]) + (f" ({fmt(r['vs_reference_total'])} edit+eval)"
                                                    if r["vs_reference_total"] is not None else "")
            vs_path = (f"{fmt(r['vs_reference_path_edit'])} ({fmt(r['vs_reference_path_total'])})"
                       if "vs_reference_path_edit" in r else "-")
            lines.append(row + f"{fmt(r['edit'])} ({fmt(r['edit_median_case'])}) | {fmt(r['total'])} | "
                         f"{ref_txt} | {vs_ref} | {vs_path} | <= {TARGET[name]} |")
    lines += ["", "| editor | metric | pre | plain | optimised | optimised - plain | parallel | parallel - plain "
              "| reference path |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, s in summary.items():
        for m in s["metrics"]:
            o, p = s["optimised"]["post"][m], s["plain"]["post"][m]
            par = s["parallel"]["post"][m] if "parallel" in s else None
            r = fmt(s["reference"]["post"][m], 1) if "reference" in s else "-"
            lines.append(f"| {name} | {m} | {fmt(s['plain']['pre'][m], 1)} | {fmt(p, 1)} | "
                         f"{fmt(o, 1)} | {fmt(o - p, 2)} | {fmt(par, 1)} | "
                         f"{fmt(par - p if par is not None else None, 2)} | {r} |")
    phased = [(name, path) for name, s in summary.items()
              for path in ("optimised", "parallel", "plain", "reference") if path in s and s[path].get("phases")]
    if phased:
        keys = list(dict.fromkeys(k for name, path in phased for k in summary[name][path]["phases"]))
        lines += ["", "| editor | path | " + " | ".join(k.replace("_s", " s") for k in keys)
                  + " | cases with prefix reused |", "|---|---|" + "---:|" * (len(keys) + 1)]
        for name, path in phased:
            s = summary[name][path]
            reused = f"{s['prefix_reused']}/{s['n']}" if "prefix_reused" in s else "-"
            cells = [fmt(s["phases"].get(k), 3 if k == "update_s" else 2) for k in keys]
            lines.append(f"| {name} | {path} | " + " | ".join(cells) + f" | {reused} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# Curve mode
# ------------------------------------------------------------------------------------------


def curve_point(name: str, spec: str, lm: LoadedModel, cache: Path | None, cases, optimised: bool,
                n_contexts: int, warmup: bool, parallel_edits: int = 1) -> dict:
    hp = reference_overrides(name, lm.layout.num_layers, optimised, n_contexts, parallel_edits=parallel_edits)
    editor, _, prep = make_editor(name, lm, hp, cache)
    if warmup:
        warm_up(name, lm, cache, optimised, cases, n_contexts, parallel_edits=parallel_edits)
    times, mems, steps = [], [], []
    for start in range(0, len(cases), parallel_edits):
        chunk = cases[start:start + parallel_edits]
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            for handle in editor.apply_many(lm.model, lm.tokenizer, chunk):
                steps.append(handle.info.get("steps"))
                handle.restore()  # a copy of the tuned weights: negligible next to the edit
            times += [(time.perf_counter() - t0) / len(chunk)] * len(chunk)
        mems.append(mem.delta_mib)
    steps = [s for s in steps if s is not None]
    n_params = sum(p.numel() for p in lm.model.parameters())
    layer = hp["layer"] if name == "rome" else hp["layers"][0]
    return {"model": spec, "params_m": n_params / 1e6, "layers": lm.layout.num_layers,
            "editor": name, "path": "plain" if not optimised else "parallel" if parallel_edits > 1 else "optimised",
            "together": parallel_edits, "layer": layer,
            "contexts": n_contexts if name == "rome" else None, "prepare_s": prep,
            "edit_s": mean(times), "steps": mean(steps) if steps else None, "peak_rss_mib": max(mems),
            "rss_source": PeakRSS.source, "n": len(cases), "load": loadavg()}


def curve(models: list[str], contexts: list[int], cases, n_cases: int, names: list[str], warmup: bool,
          parallel: list[int], device: str, dtype: str) -> list[dict]:
    """Each point times the first max(n_cases, edits together) of `cases`."""
    points, memo = [], {}

    def point(name, spec, lm, cache, optimised, n_ctx, together=1):
        key = (name, spec, optimised, n_ctx if name == "rome" else None, together)
        if key not in memo:
            memo[key] = curve_point(name, spec, lm, cache, cases[:max(n_cases, together)], optimised,
                                    n_ctx, warmup, together)
            p = memo[key]
            log(f"curve {spec} {name} {p['path']} contexts {p['contexts']} together {together}: "
                f"{p['edit_s']:.2f} s/edit, peak +{p['peak_rss_mib']:.0f} MiB, load {p['load']}")
            points.append(p)
        return memo[key]

    for spec in models:
        lm, cache, tmp = load_lm(spec, device, dtype)
        try:
            for name in names:
                for optimised in (True, False):
                    point(name, spec, lm, cache, optimised, 20)
            if spec != TINY and "rome" in names:
                for n_ctx in contexts:
                    for optimised in (True, False):
                        point("rome", spec, lm, cache, optimised, n_ctx)
            if spec != TINY and "ft" in names:
                for together in parallel:
                    point("ft", spec, lm, cache, True, 20, together)
        finally:
            del lm
            if tmp is not None:
                tmp.cleanup()
    return points


def curve_tables(points: list[dict]) -> str:
    def ratio(p, key):
        other = [q for q in points if q["model"] == p["model"] and q["editor"] == p["editor"]
                 and q["contexts"] == p["contexts"] and q["path"] == "plain"]
        return fmt(p[key] / other[0][key]) if other and p["path"] != "plain" else ""

    lines = ["| model | params (M) | editor | layer | contexts | path | edits together | steps | s/edit | "
             "/plain | peak RSS growth (MiB) |", "|---|---:|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for p in sorted(points, key=lambda q: (q["editor"], q["params_m"], q["contexts"] or 0, q["path"],
                                           q.get("together", 1))):
        lines.append(f"| {p['model']} | {p['params_m']:.2f} | {p['editor']} | {p['layer']} | "
                     f"{'' if p['contexts'] is None else 1 + p['contexts']} | {p['path']} | "
                     f"{p.get('together', 1)} | {fmt(p['steps'], 1)} | {fmt(p['edit_s'])} | "
                     f"{ratio(p, 'edit_s')} | {fmt(p['peak_rss_mib'], 0)} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# Phases mode
# ------------------------------------------------------------------------------------------


def phases(lm: LoadedModel, editor, ctx, cases, counterfact: bool) -> list[dict]:
    """Each case through bench.runner.run_cases (pre-edit evaluation, edit, post-edit
    evaluation, restore): the phases the edit reports, seconds, steps, reliability, memory."""
    rows = []
    for case in cases:
        if editor.uses_instructions:
            case = ctx.instruct(case, "seen")
        with PeakRSS() as mem:
            rec = next(run_cases(lm, editor, [Job(case, counterfact)], batch_size=32))
        info = rec.get("edit", {})
        row = {"case": case.case_id, "error": rec["error"], "phases": {k: info[k] for k in phase_keys(info)},
               "steps": info.get("steps"), "growth_mib": mem.delta_mib, "max_rss_mib": max_rss_mib()}
        if not rec["error"]:
            row.update(edit_s=rec["time"]["edit_s"], eval_s=rec["time"]["eval_s"],
                       total_s=rec["time"]["edit_s"] + rec["time"]["eval_s"],
                       reliability=rec["post"]["reliability"])
        rows.append(row)
        log(f"{editor.name} case {case.case_id}: edit {row.get('edit_s', float('nan')):.2f} s, "
            f"eval {row.get('eval_s', float('nan')):.2f} s, steps {row['steps']}"
            + (f"  ERROR {rec['error']}" if rec["error"] else ""))
    return rows


def phases_table(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r["phases"]))
    head = ["case"] + [k.replace("_s", " s") for k in keys] + [
        "edit s", "eval s (pre+post)", "total s", "steps", "reliability",
        f"RSS growth MiB ({PeakRSS.source})", "peak RSS MiB"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in rows:
        if r["error"]:
            lines.append(f"| {r['case']} | error: {r['error']} |")
            continue
        cells = ([r["case"]] + [fmt(r["phases"].get(k), 3) for k in keys]
                 + [fmt(r["edit_s"]), fmt(r["eval_s"]), fmt(r["total_s"]),
                    "-" if r["steps"] is None else str(r["steps"]), fmt(r["reliability"]),
                    fmt(r["growth_mib"], 0), fmt(r["max_rss_mib"], 0)])
        lines.append("| " + " | ".join(cells) + " |")
    ok = [r for r in rows if not r["error"]]
    if ok:
        steps = [r["steps"] for r in ok if r["steps"] is not None]
        cells = (["mean"] + [fmt(mean([r["phases"][k] for r in ok if k in r["phases"]]), 3) for k in keys]
                 + [fmt(mean([r[k] for r in ok])) for k in ("edit_s", "eval_s", "total_s")]
                 + [fmt(mean(steps) if steps else None, 1), fmt(mean([r["reliability"] for r in ok])),
                    fmt(max(r["growth_mib"] for r in ok), 0), fmt(max(r["max_rss_mib"] for r in ok), 0)])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------


def csv_ints(text: str) -> list[int]:
    return [int(c) for c in text.split(",") if c.strip()]


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=None,
                    help="cases of the task split, from --offset (default 10; --phases: 3)")
    ap.add_argument("--task", default="counterfact", help="task whose cases are edited (default counterfact)")
    ap.add_argument("--split", default="eval", choices=("eval", "train"), help="its split (default eval)")
    ap.add_argument("--offset", type=int, default=0, help="skip this many cases first")
    ap.add_argument("--model", default=DEFAULT_MODEL, help="compare and phases modes")
    ap.add_argument("--device", default="cpu", help="default cpu (the reference figures are CPU figures)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1; 0 = torch's choice)")
    ap.add_argument("--json", default=None, help="write all measurements here")
    add_data_argument(ap)
    ap.add_argument("--editors", default="ft,rome", help="compare and curve modes: ft and/or rome")
    ap.add_argument("--parallel-edits", type=int, default=8,
                    help="FT: also time the optimised path with this many cases optimised together "
                         "(the 'parallel' path; 1 = leave it out)")
    ap.add_argument("--no-warmup", action="store_true", help="skip the untimed 2-step edit per path")
    ap.add_argument("--curve", action="store_true", help="cost curves instead of the comparison")
    ap.add_argument("--curve-cases", type=int, default=2)
    ap.add_argument("--curve-models", default=f"{TINY},{DEFAULT_MODEL}")
    ap.add_argument("--curve-contexts", default="0,4,10,20", help="ROME context prompts (besides the bare prompt)")
    ap.add_argument("--curve-parallel", default="2,4,8,16",
                    help="FT on the real model: cases optimised together (each point uses that many cases)")
    ap.add_argument("--phases", action="store_true",
                    help="per-edit phases of one editor instead of the comparison")
    ap.add_argument("--editor", default="rome", help="phases mode: editor name (default rome)")
    ap.add_argument("--hparams-file", default=None, metavar="FILE|PRESET",
                    help="phases mode: YAML mapping or a preset shipped for the editor")
    ap.add_argument("--hparam", action="append", default=[], metavar="KEY=VALUE",
                    help="phases mode: hyperparameter override (repeatable)")
    return ap


def main() -> None:
    ap = _parser()
    args = ap.parse_args()
    if args.curve and args.phases:
        ap.error("--curve and --phases are different modes; choose one")
    n_cases = args.cases if args.cases is not None else 3 if args.phases else 10
    if n_cases < 1 or args.offset < 0:
        ap.error("--cases must be positive and --offset not negative")
    set_threads(args.threads)
    torch.manual_seed(0)
    names = [n.strip() for n in args.editors.split(",") if n.strip()]
    unknown = [n for n in names if n not in PRESET]
    if unknown and not args.phases:
        ap.error(f"unknown editors {unknown}; compare and curve modes time ft and rome")

    data_dir = find_data_dir(args.data_dir)
    counterfact = is_counterfact(args.task)
    info = {"machine": machine(), "load_start": loadavg(), "argv": sys.argv[1:],
            "data_dir": str(data_dir) if data_dir else None}
    started = time.perf_counter()
    if args.curve:
        parallel = csv_ints(args.curve_parallel)
        cases = load_cases(args.task, args.split, data_dir, max([args.curve_cases] + parallel), args.offset)
        points = curve([m.strip() for m in args.curve_models.split(",") if m.strip()],
                       csv_ints(args.curve_contexts), cases, args.curve_cases, names, not args.no_warmup,
                       parallel, args.device, args.dtype)
        info["curve"] = points
        header, table = [], curve_tables(points)
    elif args.phases:
        get_editor_class(args.editor)  # unknown editor: one line, before anything loads
        overrides = hparams_source(args.editor, args.hparams_file)
        overrides.update(parse_hparam_args(args.hparam))
        cases = load_cases(args.task, args.split, data_dir, n_cases, args.offset)
        lm = load_model(args.model, device=args.device, dtype=args.dtype)
        rss_model = max_rss_mib()
        editor = build_editor(args.editor, overrides, lm.model.config, lm.spec)
        ctx, prepare_s = prepare(editor, lm, data_dir)
        rows = phases(lm, editor, ctx, cases, counterfact)
        notes = scalar_notes(ctx.notes)
        info.update(phases=rows, prepare_s=prepare_s, notes=notes, hparams=hparams_to_dict(editor.hparams))
        given = ", ".join(f"{k}={v}" for k, v in overrides.items()) or "the editor's defaults"
        header = [f"{args.editor} on {lm.spec} ({lm.device}, {str(lm.dtype).replace('torch.', '')}), "
                  f"{args.task} {args.split} cases [{args.offset}, {args.offset + len(cases)}); "
                  f"hyperparameters: {given}",
                  f"prepare: {prepare_s:.2f} s; RSS after loading the model {rss_model:.0f} MiB"
                  + ("; " + ", ".join(f"{k}={v}" for k, v in notes.items()) if notes else ""), ""]
        table = phases_table(rows)
    else:
        cases = load_cases(args.task, args.split, data_dir, n_cases, args.offset)
        lm = load_model(args.model, device=args.device, dtype=args.dtype)
        results = compare(lm, names, cases, counterfact, not args.no_warmup, args.parallel_edits)
        info["compare"] = results
        info["summary"] = summarize(results)
        header = [f"{args.model}, {args.task} {args.split} cases [{args.offset}, {args.offset + len(cases)}); "
                  + "; ".join(f"{n}: preset {n}/{PRESET[n]}" for n in names), ""]
        table = compare_tables(info["summary"])
    info["load_end"] = loadavg()
    info["wall_s"] = round(time.perf_counter() - started, 1)
    print(machine_line(info["machine"]))
    print(f"load average (1, 5, 15 min): start {info['load_start']}, end {info['load_end']}; "
          f"wall {info['wall_s']} s")
    print("\n".join(header))
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(info, indent=1, default=str))


if __name__ == "__main__":
    run_main(main)
