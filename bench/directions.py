"""Edit-direction analysis (`bench analyze directions`, docs/directions.md): for learned editors'
checkpoints (MEND, InstructEdit), collect for N edits per task

* the raw fine-tuning gradient of the edit loss at the edited weights (dL/dW = sum_t d_t u_t^T,
  from editors.mend.factors.edit_factors: the model's, the same for every editor), and
* each editor network's update for that edit (dW = D~^T U~ from its transformed factors,
  EditorNetwork.edit_factors_out: what the editor would add to the weights),

each under three conditions: the edit prompt as the data gives it ("raw"), and wrapped in its
task's instruction with a seen or with an unseen description (tasks.instructions.instruct, the
run's seed: the same wrapping as evaluation). Every vector is flattened over the edited weights;
on a large model through a fixed random sketch (below). reports.directions projects the vectors
of each (kind, editor, condition) with PCA, measures per-task separation and where the held-out
task's edits fall, and writes the files.

The sketch: for an edited weight of shape (out, in), Gaussian matrices R_o (k, out) and R_i
(k, in) with entries N(0, 1/k), drawn once from the seed, and the update's sketch
R_o dW R_i^T = (D R_o^T)^T (U R_i^T), k*k numbers computed from the factors without forming dW.
Its inner products are unbiased estimates of those of the flattened weights (a Kronecker
Johnson-Lindenstrauss map), so cosines and PCA are approximately preserved; sketch = 0, or a
weight with out*in <= k*k, keeps the exact flattened dW.

Checkpoints come from the editors' cache under the key a matrix run uses (the same
hyperparameter overrides, EQUAL_STEPS by default, held-out task and seed); a missing one is an
error unless `train` is set.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from bench import session
from bench.core.distributed import Shard
from bench.core.errors import BenchError
from bench.core.io import read_json
from bench.session import RunOptions
from editors import get_editor_class
from editors.mend import Mend
from editors.mend.factors import edit_factors
from reports.directions import analyze_set, write_directions
from reports.directions_seeds import write_seed_summary
from tasks.instructions import instruct

CONDITIONS = ("raw", "seen", "unseen")
KINDS = ("gradient", "update")
DEFAULT_SKETCH = 32


@dataclass
class DirectionsPlan:
    editors: list[str]
    tasks: list[str]
    holdout: list[str]  # the checkpoints' held-out tasks (empty: the multi-task checkpoint)
    n: int  # edits per task (the first of its eval split; a held-out task's whole file)
    output_dir: Path
    base: RunOptions = field(default_factory=RunOptions)  # model, device, dtype, seed, data
    hparams: dict = field(default_factory=dict)  # the overrides every editor gets
    sketch: int = DEFAULT_SKETCH
    train: bool = False  # train a checkpoint that is not cached (else an error)


def check_plan(plan: DirectionsPlan) -> None:
    """One-line errors before anything loads."""
    for name in plan.editors:
        if not issubclass(get_editor_class(name), Mend):
            raise BenchError(f"editor {name!r} has no editor network to analyse (mend, instructedit)")
    if len(set(plan.editors)) != len(plan.editors):
        raise BenchError("--editors names an editor twice")
    if len(plan.tasks) < 2:
        raise BenchError("--tasks needs at least two tasks: the analysis compares their directions")
    for name in plan.holdout:
        if name not in plan.tasks:
            raise BenchError(f"--holdout {name} is not one of --tasks ({','.join(plan.tasks)}): its edits "
                             "are where the held-out directions come from")
    if plan.n < 2:
        raise BenchError("--n must be at least 2 edits per task")
    if plan.sketch < 0:
        raise BenchError("--sketch must be >= 0 (0: no sketch)")


class Sketch:
    """The fixed random map of every edited weight's dW (k*k numbers, or dW itself)."""

    def __init__(self, targets, k: int, seed: int):
        self.k = k
        self.maps: dict[str, tuple[torch.Tensor, torch.Tensor] | None] = {}
        for i, t in enumerate(targets):
            if k == 0 or t.out_dim * t.in_dim <= k * k:
                self.maps[t.name] = None
                continue
            g = torch.Generator().manual_seed(int(seed) * 1_000_003 + i)
            self.maps[t.name] = (torch.randn(k, t.out_dim, generator=g) / k ** 0.5,
                                 torch.randn(k, t.in_dim, generator=g) / k ** 0.5)

    def vector(self, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> np.ndarray:
        """pairs: weight name -> (D (N, out), U (N, in)) with dW (out, in) = D^T U; the
        concatenation of every weight's sketch (in the targets' order)."""
        parts = []
        for name, m in self.maps.items():
            d, u = (x.detach().float().cpu() for x in pairs[name])
            if m is None:
                parts.append((d.T @ u).reshape(-1))
            else:
                r_out, r_in = m
                parts.append(((d @ r_out.T).T @ (u @ r_in.T)).reshape(-1))
        return torch.cat(parts).double().numpy()


def _editor_set_up(plan: DirectionsPlan, name: str, lm, data_dir, log: Callable[[str], None]):
    """The editor with its checkpoint loaded (trained first only with plan.train)."""
    opts = dataclasses.replace(plan.base, editor=name, tasks=list(plan.tasks), holdout=list(plan.holdout),
                               hparams=dict(plan.hparams))
    editor = session.build_editor(name, opts.hparams, session.load_config(opts.model), opts.model)
    ctx = session.edit_context(opts, editor, data_dir, Shard(), log)
    if not editor.hparams.checkpoint and not plan.train:
        stem = editor.checkpoint_stem(lm, ctx)
        if not stem.with_suffix(".safetensors").is_file():
            held = ",".join(plan.holdout) or "none"
            raise BenchError(f"{name}: no trained checkpoint for held-out {held}, seed {opts.seed} and these "
                             f"hyperparameters in the cache ({stem.name}); make it with bench holdout-matrix "
                             "(same --hparam, --seed; --multitask for held-out none) or add --train")
    session.prepare_editor(editor, lm, ctx)
    return editor, ctx


def collect(plan: DirectionsPlan, log: Callable[[str], None] = print) -> tuple[dict, list[dict]]:
    """(meta, sets): every set of edit vectors, analysed (reports.directions.analyze_set)."""
    check_plan(plan)
    opts = dataclasses.replace(plan.base, editor=plan.editors[0], tasks=list(plan.tasks),
                               holdout=list(plan.holdout), limit=plan.n, protocols=["teacher_forced"],
                               hparams=dict(plan.hparams))
    opts.check()
    data_dir = session.find_data(opts.data_dir, log)
    planned = session.plan_tasks(opts, data_dir, log)
    lm = session.load_model(opts.model, device=opts.device, dtype=opts.dtype)
    editors = {}
    meta_editors = {}
    for name in plan.editors:
        editor, ctx = _editor_set_up(plan, name, lm, data_dir, log)
        editors[name] = editor
        meta = editor.checkpoint_meta or {}
        meta_editors[name] = {"checkpoint": Path(ctx.notes.get("checkpoint") or "").name or None,
                              "checkpoint_source": ctx.notes.get("checkpoint_source"),
                              "train_tasks": meta.get("train_tasks"), "holdout_tasks": meta.get("holdout_tasks"),
                              "steps": meta.get("steps"), "best_step": meta.get("best_step")}
    targets = editors[plan.editors[0]].targets
    names = [t.name for t in targets]
    if any([t.name for t in e.targets] != names for e in editors.values()):
        raise BenchError("the editors edit different weights (set layers/modules alike with --hparam)")
    sketch = Sketch(targets, plan.sketch, opts.seed)
    vectors: dict[tuple[str | None, str, str], list[np.ndarray]] = {}
    points: list[dict] = []
    model, tokenizer = lm.model, lm.tokenizer
    for task in planned:
        for case in task.cases:
            points.append({"task": task.name, "case_id": case.case_id})
            for cond in CONDITIONS:
                shown = case if cond == "raw" else instruct(case, cond, opts.seed)
                factors = edit_factors(model, tokenizer, targets, shown.prompt, shown.target_new)
                # the gradient dL/dW = d^T u: D = d, U = u
                vectors.setdefault((None, "gradient", cond), []).append(
                    sketch.vector({n: (d, u) for n, (u, d) in factors.items()}))
                for name, editor in editors.items():
                    editor.network.eval()
                    with torch.no_grad():
                        out = editor.network.edit_factors_out(editor.targets, factors)
                    vectors.setdefault((name, "update", cond), []).append(
                        sketch.vector({n: (d, u) for n, (u, d) in out.items()}))
        log(f"directions: {task.name}: {len(task.cases)} edits x {len(CONDITIONS)} conditions")
    tasks_of = [p["task"] for p in points]
    sets = []
    for (editor, kind, cond), rows in vectors.items():
        sets.append({"editor": editor, "kind": kind, "condition": cond, "points": points,
                     "result": analyze_set(np.stack(rows), tasks_of, plan.holdout)})
    meta = {"model": _model_name(opts),
            "model_identity": lm.identity, "seed": opts.seed, "tasks": [t.name for t in planned],
            "holdout": list(plan.holdout), "n_per_task": plan.n,
            "edited_weights": names, "sketch": plan.sketch,
            "dimensions": int(len(next(iter(vectors.values()))[0])),
            "hparams": dict(plan.hparams), "editors": meta_editors}
    return meta, sets


def run_directions(plan: DirectionsPlan, log: Callable[[str], None] = print) -> dict:
    """Collect, analyse, write the files into plan.output_dir; returns directions.json's content
    (less the coordinates, which are in directions.csv)."""
    meta, sets = collect(plan, log)
    files = write_directions(plan.output_dir, meta, sets)
    for s in sets:
        r = s["result"]
        sil = "–" if r["silhouette_2d"] is None else f"{r['silhouette_2d']:.3f}"
        silc = "–" if r["silhouette_cosine"] is None else f"{r['silhouette_cosine']:.3f}"
        where = "; ".join(f"{h} nearest {p['nearest_mean']}" for h, p in r["placement"].items())
        who = "gradient" if s["editor"] is None else f"{s['editor']} update"
        log(f"{who:>22} · {s['condition']:<6}: silhouette {sil} (2-D), {silc} (cosine)"
            + (f"; {where}" if where else ""))
    log(f"directions: {', '.join(str(f) for f in files)}")
    return {"meta": meta, "sets": [{k: v for k, v in s.items() if k != "points"} for s in sets]}


def _model_name(opts: RunOptions) -> str:
    """The model as directions.json names it: a preset or hub id as given, a local path by its
    last part (no machine path in the files)."""
    return opts.model if not Path(opts.model).exists() else Path(opts.model).name


def _finished(plan: DirectionsPlan) -> dict | None:
    """The directions.json an earlier analysis left in plan.output_dir, when it was made with
    the same model, seed, tasks, held-out tasks, n, sketch, hyperparameters and editors (and
    dtype, when one is asked for); else None (the seed is analysed again)."""
    path = plan.output_dir / "directions.json"
    if not path.is_file():
        return None
    try:
        doc = read_json(path)
    except BenchError:
        return None
    if not isinstance(doc, dict):
        return None
    opts = plan.base
    same = (doc.get("model") == _model_name(opts) and doc.get("seed") == opts.seed and doc.get("tasks") == list(plan.tasks)
            and doc.get("holdout") == list(plan.holdout) and doc.get("n_per_task") == plan.n
            and doc.get("sketch") == plan.sketch and doc.get("hparams") == dict(plan.hparams)
            and sorted(doc.get("editors") or {}) == sorted(plan.editors) and isinstance(doc.get("sets"), list)
            and (opts.dtype == "auto" or str(doc.get("model_identity", "")).endswith(f":{opts.dtype}")))
    return doc if same else None


def run_directions_seeds(plan: DirectionsPlan, seeds: list[int], log: Callable[[str], None] = print) -> dict:
    """The analysis once per training seed (each seed's checkpoints, instruction wrapping and
    sketch), in plan.output_dir/seed-<S>; a seed whose folder already holds the same analysis
    is read, not redone (a killed analysis resumes). Then seeds.json and seeds.csv
    (reports.directions_seeds) in plan.output_dir."""
    if len(set(seeds)) != len(seeds):
        raise BenchError("--seeds names a seed twice")
    check_plan(plan)
    docs = {}
    for seed in seeds:
        one = dataclasses.replace(plan, base=dataclasses.replace(plan.base, seed=seed),
                                  output_dir=plan.output_dir / f"seed-{seed}")
        doc = _finished(one)
        if doc is None:
            log(f"seed {seed}: analysing into {one.output_dir}")
            run_directions(one, log)
            doc = read_json(one.output_dir / "directions.json")
        else:
            log(f"seed {seed}: the analysis in {one.output_dir} is this one's; not redone")
        docs[seed] = doc
    files = write_seed_summary(plan.output_dir, docs)
    log(f"directions over seeds {', '.join(map(str, seeds))}: {', '.join(str(f) for f in files)}")
    return docs
