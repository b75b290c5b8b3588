"""Speed benchmark: the optimised and the plain path of FT-L and ROME, side by side.

    python benchmarks/speed.py --cases 5 --editors ft,rome --json speed.json
    python benchmarks/speed.py --curve --curve-cases 2

Compare mode (default) builds editors per method from the reference hyperparameters
(FT: layer 21, 25 Adam steps, lr 5e-4, no norm constraint, teacher-forced target loss,
stop below 1e-2; ROME: layer 5, 25 value steps, context_counts 10,10 with lengths 5,10, no
covariance adjustment) that differ only in the optimisation switches: "optimised" and
"plain" (FT `frozen_prefix` + `fused_vocab_loss`, ROME `reuse_context_prefix`), for FT also
"parallel" (optimised, `--parallel-edits` cases optimised together) and "reference" (the
reference framework's whole-model computation, written out here). Every path runs the same
CounterFact cases through bench.runner.run_cases, the order of the paths rotating chunk by
chunk so that a busy machine slows all alike. It prints seconds per edit (edit only, and
edit plus pre- and post-edit evaluation), the ratios to plain and to the reference, and
every metric's post-edit mean for each path.

Curve mode (--curve) times the edit alone (no evaluation) against model size (the tiny
random Llama of tests/tiny.py and SmolLM2-135M) for FT and ROME, and against the number of
ROME context prompts on SmolLM2-135M, with the peak resident-memory increase during the edit.

Absolute seconds depend on the machine's load (reported at start and end); the ratios
optimised/plain, measured in the same process on the same cases, are the robust figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.models import LoadedModel, cache_dir, load_model  # noqa: E402
from bench.runner import run_cases  # noqa: E402
from bench.metrics import encode_probe  # noqa: E402
from bench.models import find_layout  # noqa: E402
from editors.base import EditContext, EditHandle, param_name  # noqa: E402
from editors.ft import FineTune, FTHparams  # noqa: E402
from editors.rome import Rome, RomeHparams  # noqa: E402

MODEL = "smollm2-135m"
DATA_DIR = Path(os.environ.get("BENCH_DATA", "/work/shared/data"))
METRICS = ("reliability", "generality", "locality", "efficacy", "paraphrase", "neighborhood")
# The issue author's figures on this machine, idle (another framework, SmolLM2-135M float32,
# first 50 CounterFact edit records). ROME's figure has no separate evaluation time.
REFERENCE = {"ft": {"edit_s": 2.3, "eval_s": 0.4}, "rome": {"edit_s": 30.0, "eval_s": None}}
TARGET = {"ft": 0.4, "rome": 0.7}  # optimised seconds per edit / reference, at most
SWITCH = {"ft": "frozen_prefix", "rome": "reuse_context_prefix"}
OPTIMISED_PATHS = ("optimised", "parallel")  # compared with "plain" (and FT's "reference")
REF_LAYER = {"ft": 21, "rome": 5}  # on SmolLM2-135M's 30 layers


# ------------------------------------------------------------------------------------------
# Machine, memory and step counting
# ------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine() -> dict:
    import transformers

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


def rss_bytes() -> int | None:
    try:
        import psutil
    except ImportError:
        return None
    return psutil.Process().memory_info().rss


class PeakRSS:
    """Peak resident-set growth while the block runs: psutil sampled every `interval` seconds
    on a background thread; without psutil, the growth of ru_maxrss (which only sees growth
    beyond the process's earlier peak, so it is a lower bound)."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.delta_mib = 0.0
        self.source = "psutil" if rss_bytes() is not None else "ru_maxrss"

    def __enter__(self):
        self._stop = threading.Event()
        if self.source == "psutil":
            import psutil

            proc = psutil.Process()
            self._base = proc.memory_info().rss
            self._peak = self._base

            def sample():
                while not self._stop.is_set():
                    self._peak = max(self._peak, proc.memory_info().rss)
                    self._stop.wait(self.interval)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        else:
            self._base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self.source == "psutil":
            self._thread.join()
            self._peak = max(self._peak, rss_bytes())
        else:
            self._peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.delta_mib = (self._peak - self._base) / 2**20
        return False


class StepCounter:
    """Counts optimizer steps taken by any torch optimizer inside the block (both editors stop
    early on a loss threshold, so steps differ from case to case)."""

    def __enter__(self):
        self.n = 0

        def hook(_opt, _args, _kwargs):
            self.n += 1

        from torch.optim.optimizer import register_optimizer_step_post_hook

        self._handle = register_optimizer_step_post_hook(hook)
        return self

    def __exit__(self, *exc):
        self._handle.remove()
        return False


# ------------------------------------------------------------------------------------------
# Cases, models, editors
# ------------------------------------------------------------------------------------------


def load_cases(n: int, offset: int = 0):
    from tasks.registry import load_split

    split = load_split("counterfact", "eval", DATA_DIR)
    return split.cases[offset: offset + n]


def load_lm(spec: str) -> tuple[LoadedModel, Path, tempfile.TemporaryDirectory | None]:
    """The model and the cache directory its editors prepare into (a throwaway one for the
    random tiny model, so it leaves nothing in the shared cache)."""
    if spec == "tiny-llama":
        from tests.tiny import tiny_model

        tmp = tempfile.TemporaryDirectory(prefix="speed-tiny-")
        return tiny_model("llama"), Path(tmp.name), tmp
    return load_model(spec, device="cpu", dtype="float32"), cache_dir(), None


def scaled_layer(name: str, n_layers: int) -> int:
    """The reference layer (of 30) at the same relative depth for another model."""
    if n_layers == 30:
        return REF_LAYER[name]
    return max(0, min(n_layers - 1, round(REF_LAYER[name] / 30 * n_layers)))


def context_spec(n_contexts: int) -> tuple[list[int], list[int]]:
    """(lengths, counts) for `n_contexts` context prompts, half of length 5 and half of 10."""
    if n_contexts <= 0:
        return [], []
    return [5, 10], [n_contexts // 2, n_contexts - n_contexts // 2]


def make_hparams(name: str, n_layers: int, optimised: bool, n_contexts: int = 20, steps: int = 25,
                 parallel_edits: int = 1):
    layer = scaled_layer(name, n_layers)
    if name == "ft":
        # The reference framework's Llama FT setting: no norm constraint, the loss is the mean NLL
        # of the teacher-forced target tokens (our FT-M objective), stop once it is below 1e-2.
        return FTHparams(layers=[layer], steps=steps, lr=5e-4, norm_constraint=None,
                         objective="target_masked", min_loss=1e-2, frozen_prefix=optimised,
                         fused_vocab_loss=optimised, parallel_edits=parallel_edits)
    lengths, counts = context_spec(n_contexts)
    # The reference stops on the total loss (NLL + KL + weight decay) < 0.05, which the KL term
    # keeps from firing, so it runs all 25 steps: early stopping is off here for the same work.
    return RomeHparams(layer=layer, v_num_grad_steps=steps, context_lengths=lengths,
                       context_counts=counts, mom2_adjustment=False, v_loss_layer=-1,
                       v_early_stop_nll=0.0, reuse_context_prefix=optimised)


class ReferenceLikeFT(FineTune):
    """The reference framework's FT computation, written out here for timing only: every step
    runs the whole model on prompt + target with logits at every position, and the loss is the
    mean NLL of the target tokens (the same loss, optimizer and stopping rule as FineTune with
    objective target_masked, so the same steps and, up to float rounding, the same edit). It
    measures on this machine, now, what the reference figure measured then."""

    def apply(self, model, tokenizer, case):
        hp = self.hparams
        layout = find_layout(model)
        layers = self._check(layout.num_layers)
        weights = [layout.layers[i].mlp_out.weight for i in layers]
        handle = EditHandle(model, [param_name(model, layout.layers[i].mlp_out) for i in layers])
        prompt_ids, target_ids = encode_probe(tokenizer, case.prompt, case.target_new)
        ids = torch.tensor([prompt_ids + target_ids], device=weights[0].device)
        labels = ids[0, 1:]
        mask = torch.zeros(labels.shape, device=ids.device)
        mask[len(prompt_ids) - 1:] = 1.0
        for w in weights:
            w.requires_grad_(True)
        opt = torch.optim.Adam(weights, lr=hp.lr, weight_decay=hp.weight_decay)
        try:
            with torch.enable_grad():
                for _ in range(hp.steps):
                    opt.zero_grad(set_to_none=True)
                    logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
                    nll = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
                    loss = (nll * mask).sum() / mask.sum()
                    if loss.item() < hp.min_loss:
                        break
                    loss.backward()
                    opt.step()
        finally:
            for w in weights:
                w.requires_grad_(False)
                w.grad = None
        return handle


def make_editor(name: str, lm: LoadedModel, cache: Path, hparams, reference: bool = False) -> tuple[object, float]:
    """The editor, prepared; returns (editor, seconds spent in prepare)."""
    editor = (ReferenceLikeFT if reference else FineTune if name == "ft" else Rome)(hparams)
    t0 = time.perf_counter()
    editor.prepare(lm, EditContext(cache_dir=cache, seed=0, log=lambda s: print(s, file=sys.stderr)))
    return editor, time.perf_counter() - t0


def warm_up(name: str, lm: LoadedModel, cache: Path, optimised: bool, cases, n_contexts: int = 20,
            parallel_edits: int = 1) -> None:
    """One short call (2 steps) so the first timed edit pays no first-call costs."""
    editor, _ = make_editor(name, lm, cache, make_hparams(name, lm.layout.num_layers, optimised,
                                                          n_contexts, steps=2, parallel_edits=parallel_edits))
    for handle in editor.apply_many(lm.model, lm.tokenizer, cases[:parallel_edits]):
        handle.restore()


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------
# Compare mode
# ------------------------------------------------------------------------------------------


def timed_cases(lm: LoadedModel, editor, cases, optimised: bool) -> list[dict]:
    """The cases through bench.runner.run_cases, in one call when the editor computes several
    edits together (then `steps` is the joint steps, the most any of them took); the optimised
    paths' post-edit evaluation reuses the blocks below the edit, the others run every block."""
    with StepCounter() as steps:
        records = list(run_cases(lm, editor, [(c, True) for c in cases], batch_size=32,
                                 reuse_unchanged_blocks=optimised))
    out = []
    for case, rec in zip(cases, records):
        r = {"case_id": case.case_id, "error": rec["error"], "steps": steps.n, "load": loadavg()}
        if not rec["error"]:
            r.update(edit_s=rec["time"]["edit_s"], eval_s=rec["time"]["eval_s"],
                     pre={k: rec["pre"][k] for k in METRICS if k in rec["pre"]},
                     post={k: rec["post"][k] for k in METRICS if k in rec["post"]})
        if isinstance(editor, Rome):
            r["phases"] = {k: round(v, 4) for k, v in editor.last_timings.items()}
            r["prefix_reused"] = editor.last_info.get("prefix_reused")
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


def compare(lm: LoadedModel, names: list[str], cases, warmup: bool, parallel_edits: int = 8) -> dict:
    results = {}
    for name in names:
        editors, prepare_s = {}, {}
        paths = paths_for(name, parallel_edits)
        for path, optimised, per_call in paths:
            hp = make_hparams(name, lm.layout.num_layers, optimised, parallel_edits=per_call)
            editors[path], prepare_s[path] = make_editor(name, lm, cache_dir(), hp, path == "reference")
            if warmup:
                warm_up(name, lm, cache_dir(), optimised, cases, parallel_edits=per_call)
        runs = {path: [] for path, _, _ in paths}
        chunk = max(per_call for _, _, per_call in paths)
        for i, start in enumerate(range(0, len(cases), chunk)):
            # Rotate the order chunk by chunk so that a busy machine slows every path alike.
            order = paths[i % len(paths):] + paths[:i % len(paths)]
            for path, optimised, per_call in order:
                for j in range(start, min(start + chunk, len(cases)), per_call):
                    batch = cases[j:min(j + per_call, start + chunk, len(cases))]
                    for case, r in zip(batch, timed_cases(lm, editors[path], batch, optimised)):
                        runs[path].append(r)
                        log(f"{name} {path:9s} case {case.case_id}: edit {r.get('edit_s', float('nan')):.2f} s, "
                            f"eval {r.get('eval_s', float('nan')):.2f} s, {r['steps']} steps, load {r['load']}"
                            + (f"  ERROR {r['error']}" if r["error"] else ""))
        results[name] = {"hparams": {p: dataclasses.asdict(e.hparams) for p, e in editors.items()},
                         "prepare_s": prepare_s, "runs": runs}
    return results


def _mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")


def summarize(results: dict) -> dict:
    out = {}
    for name, res in results.items():
        ok_ids = set.intersection(*({r["case_id"] for r in runs if not r["error"]}
                                    for runs in res["runs"].values()))
        s = {}
        for path, runs in res["runs"].items():
            ok = [r for r in runs if r["case_id"] in ok_ids]
            s[path] = {"n": len(ok), "errors": len(runs) - len(ok),
                       "edit_s": _mean([r["edit_s"] for r in ok]),
                       "total_s": _mean([r["edit_s"] + r["eval_s"] for r in ok]),
                       "eval_s": _mean([r["eval_s"] for r in ok]),
                       "steps": _mean([r["steps"] for r in ok]),
                       "pre": {m: 100 * _mean([r["pre"][m] for r in ok if m in r["pre"]]) for m in METRICS},
                       "post": {m: 100 * _mean([r["post"][m] for r in ok if m in r["post"]]) for m in METRICS}}
            if name == "rome":
                s[path]["phases"] = {k: _mean([r["phases"][k] for r in ok])
                                     for k in ("key_s", "value_s", "update_s")}
                s[path]["prefix_reused"] = sum(bool(r["prefix_reused"]) for r in ok)
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
                 "max_metric_diff": max(abs(o["post"][m] - p["post"][m]) for m in METRICS)}
            if "reference" in s:
                r["vs_reference_path_edit"] = o["edit_s"] / s["reference"]["edit_s"]
                r["vs_reference_path_total"] = o["total_s"] / s["reference"]["total_s"]
            s["ratios"][path] = r
        out[name] = s
    return out


def fmt(x, nd=2) -> str:
    if x is None or (isinstance(x, float) and x != x):
        return "-"
    return f"{x:.{nd}f}"


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
        for m in METRICS:
            o, p = s["optimised"]["post"][m], s["plain"]["post"][m]
            par = s["parallel"]["post"][m] if "parallel" in s else None
            r = fmt(s["reference"]["post"][m], 1) if "reference" in s else "-"
            lines.append(f"| {name} | {m} | {fmt(s['plain']['pre'][m], 1)} | {fmt(p, 1)} | "
                         f"{fmt(o, 1)} | {fmt(o - p, 2)} | {fmt(par, 1)} | "
                         f"{fmt(par - p if par is not None else None, 2)} | {r} |")
    if "rome" in summary:
        lines += ["", "| rome path | key s | value s | update s | cases with prefix reused |",
                  "|---|---:|---:|---:|---:|"]
        for path in ("optimised", "plain"):
            ph = summary["rome"][path]["phases"]
            lines.append(f"| {path} | {fmt(ph['key_s'])} | {fmt(ph['value_s'])} | {fmt(ph['update_s'], 3)} | "
                         f"{summary['rome'][path]['prefix_reused']}/{summary['rome'][path]['n']} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# Curve mode
# ------------------------------------------------------------------------------------------


def curve_point(name: str, spec: str, lm: LoadedModel, cache: Path, cases, optimised: bool, n_contexts: int,
                warmup: bool, parallel_edits: int = 1) -> dict:
    hp = make_hparams(name, lm.layout.num_layers, optimised, n_contexts, parallel_edits=parallel_edits)
    editor, prep = make_editor(name, lm, cache, hp)
    if warmup:
        warm_up(name, lm, cache, optimised, cases, n_contexts, parallel_edits=parallel_edits)
    times, mems, steps = [], [], []
    for start in range(0, len(cases), parallel_edits):
        chunk = cases[start:start + parallel_edits]
        with StepCounter() as sc, PeakRSS() as mem:
            t0 = time.perf_counter()
            for handle in editor.apply_many(lm.model, lm.tokenizer, chunk):
                handle.restore()  # a copy of the tuned weights: negligible next to the edit
            times += [(time.perf_counter() - t0) / len(chunk)] * len(chunk)
        mems.append(mem.delta_mib)
        steps += [sc.n] * len(chunk)
    n_params = sum(p.numel() for p in lm.model.parameters())
    return {"model": spec, "params_m": n_params / 1e6, "layers": lm.layout.num_layers,
            "editor": name, "path": "plain" if not optimised else "parallel" if parallel_edits > 1 else "optimised",
            "together": parallel_edits, "layer": scaled_layer(name, lm.layout.num_layers),
            "contexts": n_contexts if name == "rome" else None, "prepare_s": prep,
            "edit_s": _mean(times), "steps": _mean(steps), "peak_rss_mib": max(mems),
            "rss_source": PeakRSS().source, "n": len(cases), "load": loadavg()}


def curve(models: list[str], contexts: list[int], n_cases: int, names: list[str], warmup: bool,
          parallel: list[int] = ()) -> list[dict]:
    points, memo = [], {}

    def point(name, spec, lm, cache, optimised, n_ctx, together=1):
        key = (name, spec, optimised, n_ctx if name == "rome" else None, together)
        if key not in memo:
            cases = load_cases(max(n_cases, together))
            memo[key] = curve_point(name, spec, lm, cache, cases, optimised, n_ctx, warmup, together)
            p = memo[key]
            log(f"curve {spec} {name} {p['path']} contexts {p['contexts']} together {together}: "
                f"{p['edit_s']:.2f} s/edit, peak +{p['peak_rss_mib']:.0f} MiB, load {p['load']}")
            points.append(p)
        return memo[key]

    for spec in models:
        lm, cache, tmp = load_lm(spec)
        try:
            for name in names:
                for optimised in (True, False):
                    point(name, spec, lm, cache, optimised, 20)
            if spec == MODEL and "rome" in names:
                for n_ctx in contexts:
                    for optimised in (True, False):
                        point("rome", spec, lm, cache, optimised, n_ctx)
            if spec == MODEL and "ft" in names:
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=10, help="CounterFact edit records (the first N)")
    ap.add_argument("--editors", default="ft,rome")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--json", default=None, help="write all measurements here")
    ap.add_argument("--parallel-edits", type=int, default=8,
                    help="FT: also time the optimised path with this many cases optimised together "
                         "(the 'parallel' path; 1 = leave it out)")
    ap.add_argument("--no-warmup", action="store_true", help="skip the untimed 2-step edit per path")
    ap.add_argument("--curve", action="store_true", help="cost curves instead of the comparison")
    ap.add_argument("--curve-cases", type=int, default=2)
    ap.add_argument("--curve-models", default=f"tiny-llama,{MODEL}")
    ap.add_argument("--curve-contexts", default="0,4,10,20", help="ROME context prompts (besides the bare prompt)")
    ap.add_argument("--curve-parallel", default="2,4,8,16",
                    help="FT on SmolLM2: cases optimised together (each point uses that many cases)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    torch.manual_seed(0)
    names = [n.strip() for n in args.editors.split(",") if n.strip()]
    unknown = [n for n in names if n not in SWITCH]
    if unknown:
        ap.error(f"unknown editors {unknown}; choose from ft, rome")

    info = {"machine": machine(), "load_start": loadavg(), "argv": sys.argv[1:]}
    started = time.perf_counter()
    if args.curve:
        points = curve([m.strip() for m in args.curve_models.split(",") if m.strip()],
                       [int(c) for c in args.curve_contexts.split(",") if c.strip()],
                       args.curve_cases, names, not args.no_warmup,
                       [int(c) for c in args.curve_parallel.split(",") if c.strip()])
        info["curve"] = points
        table = curve_tables(points)
    else:
        lm = load_model(MODEL, device="cpu", dtype="float32")
        cases = load_cases(args.cases)
        results = compare(lm, names, cases, not args.no_warmup, args.parallel_edits)
        info["compare"] = results
        info["summary"] = summarize(results)
        table = compare_tables(info["summary"])
    info["load_end"] = loadavg()
    info["wall_s"] = round(time.perf_counter() - started, 1)
    m = info["machine"]
    print(f"machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} with {m['torch_threads']} "
          f"thread(s), transformers {m['transformers']}, python {m['python']}")
    print(f"load average (1, 5, 15 min): start {info['load_start']}, end {info['load_end']}; "
          f"wall {info['wall_s']} s")
    print()
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(info, indent=1, default=str))


if __name__ == "__main__":
    main()
