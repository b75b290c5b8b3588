"""lm-evaluation-harness plumbing: the task manager with the offline suite on its include path,
and `LMSuite`, the regression's lm-eval tasks bound to one in-memory model (lm-eval's HFLM wraps
the very module the editors change, so nothing is saved or reloaded per edit)."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import os
import random
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from bench.core.errors import BenchError
from bench.core.io import read_corpus, write_jsonl
from bench.regression.corpus import describe as describe_corpus
from bench.regression.corpus import generated_corpus
from bench.regression.docs import FACT_CHOICES, build_fact_retention_docs
from bench.regression.lm_tasks import LM_TASKS_DIR, OFFLINE_TASKS
from bench.regression.options import RegressionOptions

BOOTSTRAP_ITERS = 1000  # lm-eval's own stderr bootstrap


def lm_eval_version() -> str:
    """The installed lm-eval's version, read from package metadata (no import of lm-eval)."""
    try:
        return importlib.metadata.version("lm_eval")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def set_offline_defaults() -> None:
    """Keep lm-eval / datasets off the Hugging Face hub unless the user said otherwise
    (export HF_DATASETS_OFFLINE=0 HF_HUB_OFFLINE=0 to let lm-eval download task data)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


@contextlib.contextmanager
def _quiet_lm_eval():
    """lm-eval logs every request batch and several warnings about in-memory models."""
    loggers = [logging.getLogger(n) for n in ("lm_eval", "lm-eval")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip().rstrip(":")


_TASK_MANAGERS: dict[tuple, object] = {}


def task_manager(names: list[str], metadata: dict | None = None):
    """An lm-eval TaskManager with bench/lm_tasks on its include path (lm-eval's own task
    index only when a name outside the offline suite is asked for: building it takes 10-20 s,
    so managers are kept per (index, metadata) for the process). Unknown names: BenchError."""
    set_offline_defaults()
    defaults = any(n not in OFFLINE_TASKS for n in names)
    key = (defaults, json.dumps(metadata or {}, sort_keys=True))
    tm = _TASK_MANAGERS.get(key)
    if tm is None:
        with _quiet_lm_eval():
            # late: lm-eval (with datasets) costs over a second to import and only runs with
            # --regression
            from lm_eval.tasks import TaskManager

            tm = TaskManager(include_path=str(LM_TASKS_DIR), include_defaults=defaults,
                             metadata=dict(metadata) if metadata else None)
        _TASK_MANAGERS[key] = tm
    unknown = [n for n in names if n not in tm.all_tasks]
    if unknown:
        raise BenchError(f"unknown lm-eval task {unknown[0]!r}: not an lm-eval task, group or tag "
                         f"(the offline suite is {', '.join(OFFLINE_TASKS)})")
    return tm


def check_lm_tasks(names: list[str]) -> None:
    """Fail early (before loading a model) on an unknown lm-eval task name."""
    task_manager(names)


def _rng_state():
    return random.getstate(), np.random.get_state(), torch.random.get_rng_state()


def _set_rng_state(state) -> None:
    random.setstate(state[0])
    np.random.set_state(state[1])
    torch.random.set_rng_state(state[2])


def _per_doc(sample: dict) -> dict:
    out = {}
    for metric in sample.get("metrics", []):
        v = sample.get(metric)
        if isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, (int, float)) for x in v):
            out[metric] = (float(v[0]), float(v[1]))
        elif isinstance(v, (int, float, bool, np.number)):
            out[metric] = float(v)
    return out


class LMSuite:
    """The lm-eval tasks of one regression run, bound to one in-memory model."""

    def __init__(self, lm, reg: RegressionOptions, workdir: Path, data_dir, source_tasks: list[str],
                 exclude=(), log=print):
        self.lm, self.reg, self.workdir, self.log = lm, reg, Path(workdir), log
        self.names = list(dict.fromkeys(reg.lm_tasks))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.info: dict[str, dict] = {}
        metadata = {}
        if "fact_retention" in self.names:
            path = self.workdir / "fact_retention.jsonl"
            docs = build_fact_retention_docs(data_dir, source_tasks, seed=reg.seed, exclude=exclude)
            if not docs:
                raise BenchError(f"fact_retention: the locality records of {', '.join(source_tasks)} "
                                 "give no multiple-choice docs (need two distinct answers)")
            write_jsonl(path, docs)
            metadata["fact_retention_file"] = str(path)
            self.info["fact_retention"] = {
                "docs_file": str(path.relative_to(self.workdir.parent)), "n_docs": len(docs),
                "source_tasks": list(source_tasks), "data_dir": str(data_dir) if data_dir else "built-in sample",
                "excluded_edited_cases": len(set(exclude)), "choices": FACT_CHOICES, "seed": reg.seed}
        if "bench_perplexity" in self.names:
            if reg.corpus:
                texts, origin = read_corpus(reg.corpus, "regression corpus"), str(Path(reg.corpus).resolve())
            else:
                texts, origin = generated_corpus(lm, reg.seed, log=log), describe_corpus(reg.seed)
            path = self.workdir / "perplexity_corpus.jsonl"
            write_jsonl(path, [{"text": t} for t in texts])
            metadata["perplexity_file"] = str(path)
            self.info["bench_perplexity"] = {"corpus_file": str(path.relative_to(self.workdir.parent)),
                                             "n_docs": len(texts), "source": origin}
        self.tm = task_manager(self.names, metadata)
        with _quiet_lm_eval():
            from lm_eval.models.huggingface import HFLM  # late: see task_manager

            self.hflm = HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=reg.batch_size,
                             device=str(lm.device))
        self._check_data()

    def _check_data(self) -> None:
        """Load every task once so a task whose data cannot be read fails before any edit."""
        for name in self.names:
            try:
                with _quiet_lm_eval():
                    self.tm.load([name])
            except Exception as exc:  # datasets / hub / custom_dataset errors of any type
                raise BenchError(f"lm-eval task {name!r} could not load its data: {_one_line(exc)}") from exc

    def evaluate(self, label: str, context: str = "") -> dict:
        """Run the suite on the model as it is now, every request with `context` in front (the
        edit's view: in-context editors); write the raw lm-eval output and samples to the work
        directory; return {task: {"metrics": {m: {"value", "stderr"}}, "per_doc": ...,
        "higher_is_better": ..., "n": ...}}."""
        import lm_eval  # late: see task_manager

        t0 = time.perf_counter()
        state = _rng_state()
        seed = self.reg.seed
        try:
            with _quiet_lm_eval():
                out = lm_eval.simple_evaluate(
                    model=with_context(self.hflm, context) if context else self.hflm, tasks=list(self.names), limit=self.reg.lm_limit,
                    task_manager=self.tm, bootstrap_iters=BOOTSTRAP_ITERS, log_samples=True,
                    random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                    fewshot_random_seed=seed)
        except BenchError:
            raise
        except Exception as exc:
            raise BenchError(f"lm-eval failed on {', '.join(self.names)}: {_one_line(exc)}") from exc
        finally:
            _set_rng_state(state)
        samples = out.pop("samples", {}) or {}
        raw_path = self.workdir / f"lm_eval-{label}.json"
        raw_path.write_text(json.dumps(out, indent=1, default=str) + "\n")
        parsed: dict[str, dict] = {}
        for task, metrics in (out.get("results") or {}).items():
            entry = {"metrics": {}, "per_doc": {},
                     "higher_is_better": dict((out.get("higher_is_better") or {}).get(task) or {}),
                     "n": ((out.get("n-samples") or {}).get(task) or {}).get("effective")}
            for key, value in metrics.items():
                name, sep, _filter = key.partition(",")
                if not sep or name.endswith("_stderr") or not isinstance(value, (int, float)):
                    continue
                se = metrics.get(f"{name}_stderr,{_filter}")
                entry["metrics"][name] = {"value": float(value),
                                          "stderr": float(se) if isinstance(se, (int, float)) else None}
            rows = samples.get(task) or []
            if rows:
                write_jsonl(self.workdir / f"samples-{label}-{task}.jsonl", rows)
            for row in rows:
                for metric, v in _per_doc(row).items():
                    entry["per_doc"].setdefault(metric, {})[row["doc_id"]] = v
            parsed[task] = entry
        self.log(f"lm-eval {label}: {_brief(parsed)}  ({time.perf_counter() - t0:.1f}s)")
        return parsed


def with_context(inner, context: str):
    """An lm-eval model that hands `inner` every request with `context` in front: the view of an
    edit that puts a context before each prompt. A rolling log-likelihood (perplexity) becomes
    the document's log-likelihood after the context (the context itself is not scored)."""
    from lm_eval.api.model import LM  # late: see task_manager

    class ContextLM(LM):
        def __init__(self):
            super().__init__()
            self.inner = inner

        def __getattr__(self, name):  # anything else as the wrapped model
            return getattr(self.__dict__["inner"], name)

        @property
        def tokenizer_name(self) -> str:
            return inner.tokenizer_name

        def chat_template(self, *args, **kwargs):
            return inner.chat_template(*args, **kwargs)

        def apply_chat_template(self, *args, **kwargs):
            return inner.apply_chat_template(*args, **kwargs)

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return inner.loglikelihood([replace(r, arguments=(context + r.args[0], r.args[1])) for r in requests],
                                       disable_tqdm=disable_tqdm)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            moved = [replace(r, request_type="loglikelihood", arguments=(context, r.args[0])) for r in requests]
            return [ll for ll, _greedy in inner.loglikelihood(moved, disable_tqdm=disable_tqdm)]

        def generate_until(self, requests, disable_tqdm: bool = False):
            return inner.generate_until([replace(r, arguments=(context + r.args[0], *r.args[1:])) for r in requests],
                                        disable_tqdm=disable_tqdm)

    return ContextLM()


def _brief(parsed: dict) -> str:
    parts = []
    for task, e in parsed.items():
        for m, v in e["metrics"].items():
            if m in ("acc", "word_perplexity") or len(e["metrics"]) == 1:
                parts.append(f"{task}/{m}={v['value']:.4g}")
    return ", ".join(parts) or "no metrics"
