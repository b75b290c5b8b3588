"""Sequential (lifelong) editing: the run's cases applied in their planned order and never
restored, `--edit-batch` cases per editor call (`Editor.apply_batch`), and at checkpoints (every
`--eval-every` edits and at the end) every edit made so far evaluated on the model that holds
them all:

* retention - reliability, generality, portability (and CounterFact's efficacy / paraphrase) of
  every earlier edit, not only the latest, teacher forced and in the wild;
* locality - on a fixed set of locality prompts per task (`--locality-probes`), drawn once per
  run with the seed and read on the unedited model first, so that the curve compares one set;
* whatever the hooks measure (the lm-eval regression suite with --regression).

"pre" is always the unedited model: every case's pre-edit record and the probes' readings are
taken before the first edit.

Crash safety: the pre-edit records (sequential/pre.jsonl) and the probes
(sequential/locality_probes.json) are written before the first edit; at each checkpoint the
changed tensors of the model and the editor's own state (`Editor.sequential_state`) are saved
(sequential/state.safetensors, replaced atomically, with the applied case order), then the
checkpoint's evaluation is appended to checkpoints.jsonl. A resumed run loads that state, drops
the case records of edits made after it (lost with the process, so made again), evaluates the
checkpoint if its record is missing, and goes on: nothing is applied twice and no finished
checkpoint is lost. The edits are seeded per position, so a resumed run ends in the state an
uninterrupted one reaches.

A numerically broken batch (a NaN or inf in the weights it changed; a NaN, inf or float32-
overflowing activation or logit after its edit prompts: bench.evaluation.broken_edit) is undone
at once: its handle is
restored (weights, modules, the editor's own sequential state), each of its cases fails with the
reason, and the run goes on from the model as it was before the batch.
"""

from __future__ import annotations

from typing import Callable

from bench.core.cases import EditCase
from bench.core.runfiles import RunDir
from bench.evaluation import Job, Protocol, RunHook
from bench.sequential.stream import EditStream, is_checkpoint


def run_sequential(setup, run: RunDir, items: list[tuple[object, EditCase]], jobs: list[Job],
                   hooks: list[RunHook], protocol: Protocol, write: Callable[[object, dict], None],
                   progress, log: Callable[[str], None] = print) -> None:
    """Run (or resume) the sequential protocol over `items` (planned task, evaluation case) with
    their `jobs`; `write(task, record)` stores a case record; at the end each case record is
    rewritten with its scores after all the edits (cases.jsonl). The model is back to its
    unedited weights when this returns or raises."""
    stream = EditStream(setup, run, items, jobs, hooks, protocol, write, progress, log)
    stream.read_pre_edit()
    stream.read_locality_probes()
    for hook in hooks:
        hook.before_cases([case for _, case in items])
    try:
        stream.back_to_saved_state()
        for start in range(stream.n_done, stream.total, setup.opts.edit_batch):
            n = stream.edit(list(range(start, min(start + setup.opts.edit_batch, stream.total))))
            if is_checkpoint(n, stream.total, stream.every):
                stream.save_state(n)
                stream.evaluate_checkpoint(n)
    finally:
        stream.undo_all()
    stream.write_final_records()


def sequential_summary(config: dict, checkpoints: list[dict], planned: int) -> dict:
    """summary.json's `sequential` block: the run's shape and, per checkpoint, each task's
    metrics (post-edit mean, interval, n) and the relative weight change."""
    seq = config.get("sequential", {})
    return {"edit_batch": seq.get("edit_batch"), "eval_every": seq.get("eval_every"),
            "locality_probes": seq.get("locality_probes"), "planned_edits": planned,
            "n_edits": checkpoints[-1]["n_edits"] if checkpoints else 0,
            "retention_sample": seq.get("retention_sample", 0),
            "checkpoints": [{"n_edits": c["n_edits"], "n_applied": c["n_applied"],
                             **({"retention_sample": c["retention_sample"]} if "retention_sample" in c else {}),
                             "tasks": {t: {m: {k: s[k] for k in ("pre", "post", "ci", "n")} for m, s in ms.items()}
                                       for t, ms in c["summary"].items()},
                             "weight_change": c["weight_change"], "eval_s": c["time"]["eval_s"],
                             **({"regression": c["regression"]} if "regression" in c else {})}
                            for c in checkpoints]}
