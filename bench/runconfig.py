"""config.json of a run: everything needed to reproduce it and compare it with another (the
options, model, editor hyperparameters as resolved, tasks with their data hashes and sources,
wild settings, metric definitions, versions and the git commit of the code)."""

from __future__ import annotations

import dataclasses
import platform
import sys
from datetime import datetime, timezone

import torch
import transformers

from bench import __version__
from bench.core.cases import SkippedRecord
from bench.core.hparams import hparams_to_dict
from bench.core.judge import JUDGE_PROMPT_VERSION
from bench.core.metrics import METRIC_DEFINITIONS
from bench.core.provenance import git_commit
from bench.core.scorers import SCORERS
from bench.core.wild import WildSettings
from bench.regression import lm_eval_version
from bench.session import PlannedTask, Setup
from tasks.card import merge_options
from tasks.registry import get_card

def _versions(regression: bool) -> dict:
    out = {"instructedit_bench": __version__, "torch": torch.__version__,
           "transformers": transformers.__version__, "python": platform.python_version(), **git_commit()}
    if regression:
        out["lm_eval"] = lm_eval_version()
    return out


def _count_reasons(skipped: list[SkippedRecord]) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in skipped:
        out[s.reason] = out.get(s.reason, 0) + 1
    return out


def _describe_wild(settings: WildSettings) -> dict:
    judge = settings.judge
    return {"max_new_tokens": settings.rules.max_new_tokens, "stop_strings": list(settings.rules.stop_strings),
            "stop_at_newline": settings.rules.at_newline, "scorer": settings.scorer,
            "scorers": sorted(SCORERS) + (["judge"] if judge is not None else []),
            "judge": None if judge is None else {"name": judge.name, "prompt": JUDGE_PROMPT_VERSION},
            "fluency_tokens": settings.fluency_tokens}


SOURCE_KEYS = ("origin", "location", "licence", "provenance", "verified", "note")


def _source_entry(source: dict) -> dict:
    """A task's `source` in config.json: where its data came from, licence, provenance."""
    return {k: source[k] for k in SOURCE_KEYS if source.get(k) is not None or k == "verified"}


def run_data(planned: list[PlannedTask]) -> str:
    """config.json's `data`: "real" when every task read real data, "built-in sample" when every
    task read the built-in sample (not benchmark numbers), "partly built-in sample" otherwise."""
    kinds = {t.source.get("data") for t in planned}
    if kinds == {"built-in sample"}:
        return "built-in sample"
    return "partly built-in sample" if "built-in sample" in kinds else "real"


def run_config(setup: Setup, argv: list[str] | None) -> dict:
    """The config.json of a run: everything needed to reproduce and compare it."""
    opts, lm, editor = setup.opts, setup.lm, setup.editor
    args = list(argv if argv is not None else sys.argv[1:])
    return {
        "command": "bench " + " ".join(args),
        "argv": args,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "options": dataclasses.asdict(opts),
        "model": {"spec": lm.spec, "source_hash": lm.source_hash,
                  "dtype": str(lm.dtype).replace("torch.", ""), "device": str(lm.device)},
        "editor": {"name": editor.name, "hparams": hparams_to_dict(editor.hparams),
                   "uses_instructions": editor.uses_instructions},
        "tasks": [{"name": t.name, "split": "eval", "holdout": t.holdout, "metrics": t.metrics,
                   "options": merge_options(get_card(t.name), opts.task_options.get(t.name)),
                   "data_files": t.data_files, "n_cases": len(t.cases), "skipped": len(t.skipped),
                   "skipped_reasons": _count_reasons(t.skipped), "data": t.source.get("data"),
                   "source": _source_entry(t.source)} for t in setup.planned],
        "data": run_data(setup.planned),
        "data_dir": str(setup.data_dir) if setup.data_dir else None,
        "seed": opts.seed, "limit": opts.limit, "mode": opts.mode,
        **({"sequential": {"edit_batch": opts.edit_batch, "eval_every": opts.eval_every,
                           "locality_probes": opts.locality_probes,
                           "retention_sample": opts.retention_sample,
                           "batch_edits": type(editor).batch_edits}}
           if opts.mode == "sequential" else {}),
        "instruction_mode": opts.instruction_mode,
        "protocols": list(opts.protocols), "prompt_format": opts.prompt_format,
        "wild": {name: _describe_wild(w) for name, w in setup.wild.items() if w is not None},
        "metric_definitions": METRIC_DEFINITIONS,
        "versions": _versions(bool(opts.regression)),
        "notes": setup.ctx.notes,
    }
