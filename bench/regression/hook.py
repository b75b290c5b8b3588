"""General-capability regression as a hook of the run's case loop (bench.runner).

The hook evaluates the lm-eval suite on the unedited model before the first case, then:

  single      after each of a seeded sample of `sample` edits, while that edit (alone) is
              applied; "after" is the mean over those edits;
  sequential  at every checkpoint of the sequential loop (bench.sequential), on the model holding
              every edit made so far; "after" is the last checkpoint's.

At the end it checks that the model is back to its unedited weights, compares before and after
(bench.regression.stats) and writes `regression.json` and `regression/` into the run directory.
"""

from __future__ import annotations

import hashlib
import random
import time
from pathlib import Path
from typing import Callable

import torch

from bench.core.cases import EditCase
from bench.core.errors import BenchError
from bench.core.io import write_json_atomic
from bench.regression.options import RegressionOptions
from bench.regression.stats import compare, format_table
from bench.regression.suite import LMSuite

REGRESSION_JSON = "regression.json"
REGRESSION_DIR = "regression"


def weights_fingerprint(model) -> str:
    """sha256 over every parameter and buffer (name, dtype, shape, bytes)."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
            # reshape(-1): a 0-dim buffer (Gemma-3's embedding scale) cannot be viewed as bytes
            h.update(t.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _context(view) -> str:
    """The text an edit's view puts in front of every prompt ("" for edits of weights/modules)."""
    return getattr(view, "context", "") if view is not None else ""


class RegressionHook:
    """Called by the run's case loop (the methods of bench.runner.RunHook); see the module
    docstring. Its summary block is summary.json's `regression`."""

    name = "regression"

    def __init__(self, lm, reg: RegressionOptions, run_dir: Path, data_dir, source_tasks: list[str],
                 run_cases: list[EditCase], log: Callable[[str], None] = print):
        reg.check()
        self.lm, self.reg, self.run_dir, self.log = lm, reg, Path(run_dir), log
        self.data_dir, self.source_tasks = data_dir, list(source_tasks)
        self.exclude = [(c.task, c.case_id) for c in run_cases]  # edited facts leave the suite
        self.sampled: set[tuple[str, str]] = set()
        self.evaluated: set[tuple[str, str]] = set()  # edits the suite ran after
        self.edits: list[dict] = []
        self.afters: list[dict] = []

    def before_cases(self, todo: list[EditCase]) -> None:
        """Evaluate the unedited model; in single mode, choose the edits evaluated after."""
        if not todo:
            raise BenchError("no edit cases to apply")
        self.started = time.perf_counter()
        self.suite = LMSuite(self.lm, self.reg, self.run_dir / REGRESSION_DIR, self.data_dir,
                             self.source_tasks, exclude=self.exclude, log=self.log)
        self.fingerprint = weights_fingerprint(self.lm.model)
        self.before = self.suite.evaluate("before")
        if self.reg.mode == "single":
            picks = random.Random(f"regression-sample:{self.reg.seed}").sample(
                range(len(todo)), min(self.reg.sample, len(todo)))
            self.sampled = {(todo[i].task, todo[i].case_id) for i in picks}

    def while_edited(self, case: EditCase, view=None) -> None:
        """Single mode: the case's edit is applied alone right now (`view`: its handle; the
        suite reads the model through it)."""
        key = (case.task, case.case_id)
        if key in self.sampled:
            self.afters.append(self.suite.evaluate(f"after-{len(self.afters)}", context=_context(view)))
            self.evaluated.add(key)

    def at_checkpoint(self, n_edits: int, applied: list[EditCase], view=None) -> dict | None:
        """Sequential mode: the edits of `applied` (all made so far that did not fail) are on the
        model. The suite's results against the unedited model go into the checkpoint record;
        the last checkpoint's are the run's "after"."""
        if not applied:
            return None
        after = self.suite.evaluate(f"after-{n_edits}", context=_context(view))
        self.afters = [after]
        self.evaluated = {(c.task, c.case_id) for c in applied}
        results = compare(self.before, [after], seed=self.reg.seed)
        keep = ("before", "after", "diff", "diff_stderr")
        return {t: {m: {k: r[k] for k in keep} for m, r in ms.items()} for t, ms in results.items()}

    def on_record(self, record: dict) -> None:
        """Every case record the loop writes (an edit that may have failed)."""
        key = (record["task"], record["case_id"])
        self.edits.append({"task": key[0], "case_id": key[1], "error": record.get("error"),
                           "edit_s": (record.get("time") or {}).get("edit_s"),
                           "evaluated": key in self.evaluated})

    def finish(self) -> dict:
        """Check the restore, compare, write regression.json; the summary.json block."""
        restored = weights_fingerprint(self.lm.model) == self.fingerprint
        if not restored:
            self.log("WARNING: the model's weights differ from the unedited ones after restoring every edit")
        if not self.afters:
            raise BenchError("no edit could be applied; nothing to compare (see the edit errors above)")
        reg = self.reg
        block = {
            "mode": reg.mode, "lm_tasks": self.suite.names, "lm_limit": reg.lm_limit, "seed": reg.seed,
            "batch_size": reg.batch_size, "n_edits": len(self.edits),
            "n_edits_applied": sum(1 for e in self.edits if not e["error"]),
            "n_evaluated": len(self.afters), "sample": reg.sample if reg.mode == "single" else None,
            "suite": self.suite.info, "results": compare(self.before, self.afters, seed=reg.seed),
            "restored_bit_exact": restored, "edits": self.edits,
            "lm_eval_files": sorted(p.name for p in (self.run_dir / REGRESSION_DIR).glob("lm_eval-*.json")),
            "wall_time_s": round(time.perf_counter() - self.started, 2),
        }
        write_json_atomic(self.run_dir / REGRESSION_JSON, block)
        self.log(format_table(block))
        return summary_block(block)


def summary_block(block: dict) -> dict:
    """The compact `regression` entry of summary.json."""
    keep = ("before", "after", "diff", "diff_stderr", "stderr_before", "stderr_after", "n")
    return {"mode": block["mode"], "lm_tasks": block["lm_tasks"], "lm_limit": block["lm_limit"],
            "n_edits": block["n_edits"], "n_edits_applied": block["n_edits_applied"],
            "n_evaluated": block["n_evaluated"], "restored_bit_exact": block["restored_bit_exact"],
            "file": REGRESSION_JSON,
            "results": {t: {m: {k: r[k] for k in keep} for m, r in ms.items()}
                        for t, ms in block["results"].items()}}
