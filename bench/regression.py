"""General-capability regression: lm-evaluation-harness before and after editing.

`bench regress` (and `bench run --regression TASKS`) evaluates the unedited model once with
lm-eval, applies edits, evaluates again and reports, per lm-eval task and metric, the score
before, after and the difference with its standard error. The model stays in memory: lm-eval's
HFLM wraps the very module the editors change, so nothing is saved or reloaded per edit.

Modes
  single      each of the K edits is applied alone and restored; the suite runs on a seeded
              sample of S of them (--sample) and "after" is the mean over those S edits;
  sequential  the K edits are applied one after another (handles kept), the suite runs once on
              the model holding all of them, then every edit is restored in reverse order.

The offline suite is registered through the lm-eval include path bench/lm_tasks:
  fact_retention    multiple choice over locality facts (build_fact_retention_docs);
  bench_perplexity  rolling log-likelihood of a text corpus (--regression-corpus, or text
                    sampled from the unedited model: generate_corpus).
Any other lm-eval task name (hellaswag, arc_easy, ...) works where lm-eval can load its data.
See docs/regression.md for the statistics and the files written.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from bench.defaults import DEFAULT_LM_LIMIT  # noqa: F401  (docs per lm-eval task; None = all)
from bench.errors import BenchError
from bench.lm_tasks import LM_TASKS_DIR, OFFLINE_TASKS

DEFAULT_SUITE = list(OFFLINE_TASKS)
MODES = ("single", "sequential")
DEFAULT_MODE = "single"
DEFAULT_SAMPLE = 3  # edits evaluated in single mode
FACT_CHOICES = 4  # true answer + 3 distractors
FACT_MAX_DOCS = 1000  # docs written to fact_retention.jsonl (before --lm-limit)
CORPUS_DOCS = 24
CORPUS_NEW_TOKENS = 96
BOOTSTRAP_ITERS = 1000
REGRESSION_JSON = "regression.json"
REGRESSION_DIR = "regression"

# Neutral openings for the generated perplexity corpus (document i starts with opener i % 16).
CORPUS_OPENERS = (
    "The history of the city begins", "In the morning, the market", "Scientists have long studied",
    "The recipe calls for", "During the winter months,", "The museum's collection includes",
    "A typical day at the school", "The river flows through", "Many people believe that",
    "The company was founded", "In the final chapter of the book,", "The weather forecast for",
    "When the train arrived at the station,", "The old house on the hill", "Music has always been",
    "The rules of the game are",
)

# lm-eval's corpus-level perplexity metrics: per-doc values are (loglikelihood, count) pairs.
_PPL_METRICS = ("word_perplexity", "byte_perplexity", "bits_per_byte")


@dataclass
class RegressionOptions:
    lm_tasks: list[str] = field(default_factory=lambda: list(DEFAULT_SUITE))
    mode: str = DEFAULT_MODE
    lm_limit: int | None = DEFAULT_LM_LIMIT
    sample: int = DEFAULT_SAMPLE
    corpus: str | None = None  # --regression-corpus; None = generate from the unedited model
    batch_size: int = 32
    seed: int = 0

    def check(self) -> None:
        if self.mode not in MODES:
            raise BenchError(f"--mode must be single or sequential, got {self.mode!r}")
        if not self.lm_tasks:
            raise BenchError("no lm-eval tasks given")
        if self.sample < 1:
            raise BenchError(f"--sample must be at least 1, got {self.sample}")
        if self.lm_limit is not None and self.lm_limit < 1:
            raise BenchError(f"--lm-limit must be positive (0 = all), got {self.lm_limit}")
        if self.batch_size < 1:
            raise BenchError("--batch-size must be at least 1")
        if self.corpus is not None and not Path(self.corpus).is_file():
            raise BenchError(f"regression corpus not found: {self.corpus}")


# --------------------------------------------------------------------------------------------
# Small file helpers (also used by bench/lm_tasks/utils.py)
# --------------------------------------------------------------------------------------------


def read_jsonl(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path: Path, rows) -> None:
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
    os.replace(tmp, path)


def read_corpus(path) -> list[str]:
    """Documents of a corpus file: JSON lines with a "text" field (.jsonl, or any file whose
    first non-blank character is "{"), otherwise plain text split on blank lines."""
    p = Path(path)
    try:
        raw = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BenchError(f"regression corpus not found: {path}") from None
    except UnicodeDecodeError:
        raise BenchError(f"regression corpus {path} is not UTF-8 text") from None
    if p.suffix == ".jsonl" or raw.lstrip().startswith("{"):
        docs = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line).get("text")
            except (json.JSONDecodeError, AttributeError):
                raise BenchError(f"regression corpus {path} line {n}: expected a JSON object "
                                 "with a \"text\" field") from None
            if isinstance(text, str) and text.strip():
                docs.append(text)
    else:
        docs = [block.strip() for block in raw.replace("\r\n", "\n").split("\n\n") if block.strip()]
    if not docs:
        raise BenchError(f"regression corpus {path} holds no documents")
    return docs


# --------------------------------------------------------------------------------------------
# fact_retention docs
# --------------------------------------------------------------------------------------------


def _tail(prompt: str) -> str:
    """The last two words of a prompt: locality probes of one relation share them
    ("... is a native speaker of", "... is located in")."""
    return " ".join(prompt.lower().split()[-2:])


def _locality_records(name: str, data_dir, exclude: set) -> list[tuple[str, str, str]]:
    from tasks.registry import load_split

    try:
        split = load_split(name, "eval", data_dir)
    except BenchError:
        split = load_split(name, "eval", data_dir, holdout=True)  # holdout-only tasks
    out, seen = [], set()
    for case in split.cases:
        if (case.task, case.case_id) in exclude:
            continue
        for pa in case.locality:
            prompt, answer = pa.prompt.strip(), pa.answer.strip()
            key = (prompt, answer.lower())
            if prompt and answer and key not in seen:
                seen.add(key)
                out.append((case.case_id, prompt, answer))
    return out


def build_fact_retention_docs(data_dir, task_names: list[str], seed: int = 0,
                              n_choices: int = FACT_CHOICES, max_docs: int = FACT_MAX_DOCS,
                              exclude=()) -> list[dict]:
    """Multiple-choice docs from the locality probes of `task_names`' eval splits.

    One doc per distinct (prompt, answer) locality probe of a case not in `exclude` (pairs of
    (task, case_id): the cases being edited). The choices are the true answer and up to
    n_choices - 1 distractors: other locality answers of the same task, first from probes whose
    prompt ends in the same two words (same relation, e.g. "speaker of"), then from the whole
    task; distinct case-insensitively from each other and from the true answer. Probes per task
    are shuffled with random.Random("fact_retention:<seed>:<task>"), at most max_docs / #tasks
    are kept per task, and the union is shuffled again with the seed, so lm-eval's `limit`
    (the first N docs) is a seeded random sample.
    """
    exclude = set(exclude)
    per_task = max(1, math.ceil(max_docs / max(1, len(task_names))))
    docs: list[dict] = []
    for name in task_names:
        records = _locality_records(name, data_dir, exclude)
        groups: dict[str, list[str]] = {}
        pool: list[str] = []
        seen_pool: set[str] = set()
        group_seen: dict[str, set] = {}
        for _, prompt, answer in records:
            g = _tail(prompt)
            if answer.lower() not in group_seen.setdefault(g, set()):
                group_seen[g].add(answer.lower())
                groups.setdefault(g, []).append(answer)
            if answer.lower() not in seen_pool:
                seen_pool.add(answer.lower())
                pool.append(answer)
        rng = random.Random(f"fact_retention:{seed}:{name}")
        order = list(range(len(records)))
        rng.shuffle(order)
        kept = 0
        for i in order:
            if kept >= per_task:
                break
            case_id, prompt, answer = records[i]
            gold = answer.lower()
            want = n_choices - 1
            same = [a for a in groups[_tail(prompt)] if a.lower() != gold]
            picks = rng.sample(same, min(want, len(same)))
            taken = {a.lower() for a in picks} | {gold}
            others = len(pool) - len(taken)
            while len(picks) < want and others > 0:
                cand = pool[rng.randrange(len(pool))]
                if cand.lower() not in taken:
                    picks.append(cand)
                    taken.add(cand.lower())
                    others -= 1
            if not picks:
                continue  # a task whose probes all share one answer has no distractors
            choices = picks + [answer]
            rng.shuffle(choices)
            docs.append({"id": f"{name}/{case_id}/{kept}", "task": name, "case_id": case_id,
                         "query": prompt, "choices": choices, "gold": choices.index(answer)})
            kept += 1
    random.Random(f"fact_retention:{seed}").shuffle(docs)
    return docs


# --------------------------------------------------------------------------------------------
# bench_perplexity corpus
# --------------------------------------------------------------------------------------------


def generate_corpus(lm, seed: int = 0, n_docs: int = CORPUS_DOCS,
                    new_tokens: int = CORPUS_NEW_TOKENS, batch_size: int = 8) -> list[str]:
    """Sample `n_docs` continuations of CORPUS_OPENERS from the (unedited) model: top-k 50,
    top-p 0.95, temperature 1, `new_tokens` new tokens, torch seeded with `seed` (global RNG
    state restored afterwards). Each document is opener + decoded continuation."""
    import torch

    tok, model = lm.tokenizer, lm.model
    prompts = [CORPUS_OPENERS[i % len(CORPUS_OPENERS)] for i in range(n_docs)]
    texts: list[str] = []
    side = tok.padding_side
    tok.padding_side = "left"  # batched generation continues from the real last token
    devices = [lm.device.index or 0] if lm.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(seed)
            for start in range(0, n_docs, batch_size):
                batch = prompts[start:start + batch_size]
                enc = tok(batch, return_tensors="pt", padding=True).to(lm.device)
                out = model.generate(**enc, do_sample=True, top_k=50, top_p=0.95, temperature=1.0,
                                     max_new_tokens=new_tokens, pad_token_id=tok.pad_token_id)
                for prompt, row in zip(batch, out[:, enc["input_ids"].shape[1]:]):
                    text = (prompt + tok.decode(row, skip_special_tokens=True)).strip()
                    if text:
                        texts.append(text)
    finally:
        tok.padding_side = side
    return texts


def cached_generated_corpus(lm, seed: int, log=print) -> tuple[list[str], str]:
    """generate_corpus, remembered in $BENCH_CACHE/regression per (weights, seed, settings)."""
    from bench.models import cache_dir

    key = json.dumps([lm.identity, seed, CORPUS_DOCS, CORPUS_NEW_TOKENS, CORPUS_OPENERS])
    path = cache_dir() / "regression" / f"corpus-{hashlib.sha256(key.encode()).hexdigest()[:16]}.jsonl"
    if path.exists():
        return [r["text"] for r in read_jsonl(path)], str(path)
    log(f"generating the perplexity corpus from the unedited model ({CORPUS_DOCS} docs, seed {seed}) ...")
    texts = generate_corpus(lm, seed=seed, n_docs=CORPUS_DOCS, new_tokens=CORPUS_NEW_TOKENS)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(path, [{"text": t} for t in texts])
    return texts, str(path)


# --------------------------------------------------------------------------------------------
# lm-eval plumbing
# --------------------------------------------------------------------------------------------


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
    import torch

    return random.getstate(), np.random.get_state(), torch.random.get_rng_state()


def _set_rng_state(state) -> None:
    import torch

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
                texts, origin = read_corpus(reg.corpus), str(Path(reg.corpus).resolve())
            else:
                texts, cached = cached_generated_corpus(lm, reg.seed, log=log)
                origin = (f"generated from the unedited model: {CORPUS_DOCS} samples of "
                          f"{CORPUS_NEW_TOKENS} tokens, seed {reg.seed} (cache {cached})")
            path = self.workdir / "perplexity_corpus.jsonl"
            write_jsonl(path, [{"text": t} for t in texts])
            metadata["perplexity_file"] = str(path)
            self.info["bench_perplexity"] = {"corpus_file": str(path.relative_to(self.workdir.parent)),
                                             "n_docs": len(texts), "source": origin}
        self.tm = task_manager(self.names, metadata)
        with _quiet_lm_eval():
            from lm_eval.models.huggingface import HFLM

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

    def evaluate(self, label: str) -> dict:
        """Run the suite on the model as it is now; write the raw lm-eval output and samples to
        the work directory; return {task: {"metrics": {m: {"value", "stderr"}}, "per_doc": ...,
        "higher_is_better": ..., "n": ...}}."""
        import lm_eval

        t0 = time.perf_counter()
        state = _rng_state()
        seed = self.reg.seed
        try:
            with _quiet_lm_eval():
                out = lm_eval.simple_evaluate(
                    model=self.hflm, tasks=list(self.names), limit=self.reg.lm_limit,
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


def _brief(parsed: dict) -> str:
    parts = []
    for task, e in parsed.items():
        for m, v in e["metrics"].items():
            if m in ("acc", "word_perplexity") or len(e["metrics"]) == 1:
                parts.append(f"{task}/{m}={v['value']:.4g}")
    return ", ".join(parts) or "no metrics"


# --------------------------------------------------------------------------------------------
# Before/after comparison
# --------------------------------------------------------------------------------------------


def _ppl(metric: str, ll: np.ndarray, count: np.ndarray) -> np.ndarray:
    """lm-eval's corpus-level aggregation of (loglikelihood, count) pairs along the last axis."""
    rate = -ll.sum(axis=-1) / count.sum(axis=-1)
    return rate / math.log(2) if metric == "bits_per_byte" else np.exp(rate)


def _sd(x: np.ndarray) -> float | None:
    return float(np.std(x, ddof=1)) if x.size > 1 else None


def compare(before: dict, afters: list[dict], seed: int = 0) -> dict:
    """Per task and metric: before, after (mean over `afters`), diff = after - before and their
    standard errors; values that overflow (perplexities of a broken model) become None.
    See docs/regression.md ("Statistics")."""
    with np.errstate(over="ignore", invalid="ignore"):
        return _compare(before, afters, seed)


def _compare(before: dict, afters: list[dict], seed: int) -> dict:
    out: dict[str, dict] = {}
    for task, b in before.items():
        rows = {}
        for metric, bm in b["metrics"].items():
            ams = [a[task]["metrics"][metric] for a in afters
                   if task in a and metric in a[task]["metrics"]]
            if not ams:
                continue
            values = [m["value"] for m in ams]
            after = float(np.mean(values))
            se_b = bm["stderr"]
            ses_a = [m["stderr"] for m in ams]
            se_a = (math.sqrt(float(np.mean(np.square(ses_a)))) if all(s is not None for s in ses_a)
                    else None)
            row = {"before": bm["value"], "after": after, "diff": after - bm["value"],
                   "rel_diff": (after - bm["value"]) / bm["value"] if bm["value"] else None,
                   "stderr_before": se_b, "stderr_after": se_a, "diff_stderr": None,
                   "diff_stderr_unpaired": None, "stderr_method": "lm-eval",
                   "higher_is_better": b["higher_is_better"].get(metric), "n": b.get("n")}
            if len(values) > 1:
                row["after_per_edit"] = values
                row["after_sd_over_edits"] = _sd(np.asarray(values))
            bd = b["per_doc"].get(metric) or {}
            ads = [a[task]["per_doc"].get(metric) or {} for a in afters if task in a]
            common = sorted(set(bd).intersection(*[set(ad) for ad in ads])) if ads else []
            if common and all(isinstance(bd[i], float) for i in common):
                # mean metrics (acc, acc_norm, ...): paired per-doc differences
                bv = np.array([bd[i] for i in common])
                av = np.array([[ad[i] for i in common] for ad in ads]).mean(axis=0)
                n = len(common)
                if n > 1:
                    row["diff_stderr"] = _sd(av - bv) / math.sqrt(n)
                    if len(ads) > 1 or se_a is None:
                        row["stderr_after"] = _sd(av) / math.sqrt(n)
                    if se_b is None:
                        row["stderr_before"] = _sd(bv) / math.sqrt(n)
                row["stderr_method"] = "paired per-doc differences"
                row["n"] = n
            elif common and all(isinstance(bd[i], tuple) for i in common):
                # corpus-level perplexities: paired bootstrap over docs
                ll_b = np.array([bd[i][0] for i in common])
                cnt = np.array([bd[i][1] for i in common])
                ll_a = np.array([[ad[i][0] for i in common] for ad in ads])
                n = len(common)
                idx = np.random.default_rng(seed).integers(0, n, size=(BOOTSTRAP_ITERS, n))
                boot_b = _ppl(metric, ll_b[idx], cnt[idx])
                boot_a = np.mean([_ppl(metric, la[idx], cnt[idx]) for la in ll_a], axis=0)
                if n > 1:
                    row["stderr_before"] = se_b if se_b is not None else _sd(boot_b)
                    row["stderr_after"] = se_a if (se_a is not None and len(ads) == 1) else _sd(boot_a)
                    row["diff_stderr"] = _sd(boot_a - boot_b)
                row["stderr_method"] = f"paired bootstrap over docs ({BOOTSTRAP_ITERS} resamples)"
                row["n"] = n
            if row["stderr_before"] is not None and row["stderr_after"] is not None:
                row["diff_stderr_unpaired"] = math.hypot(row["stderr_before"], row["stderr_after"])
            if row["diff_stderr"] is None:
                row["diff_stderr"] = row["diff_stderr_unpaired"]
                if row["diff_stderr"] is not None:
                    row["stderr_method"] = "unpaired sqrt(se_before^2 + se_after^2)"
            rows[metric] = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                            for k, v in row.items()}
        out[task] = rows
    return out


def format_table(block: dict) -> str:
    import pandas as pd

    def num(v, fmt=".4g"):
        return "inf" if v is None else format(v, fmt)

    rows = []
    for task, metrics in block["results"].items():
        for metric, r in metrics.items():
            z = (f"{r['diff'] / r['diff_stderr']:+.1f}"
                 if r["diff"] is not None and r["diff_stderr"] else "")
            rows.append({"lm task": task, "metric": metric, "before": num(r["before"]),
                         "after": num(r["after"]), "diff": num(r["diff"], "+.4g"),
                         "diff se": "" if r["diff_stderr"] is None else num(r["diff_stderr"]),
                         "z": z, "n": r["n"]})
    if not rows:
        return "no regression results"
    head = (f"regression ({block['mode']}: {block['n_edits_applied']} edits applied, suite run on "
            f"{block['n_evaluated']} {'edit' if block['mode'] == 'single' else 'edited model'}"
            f"{'s' if block['n_evaluated'] != 1 else ''})")
    return head + "\n" + pd.DataFrame(rows).to_string(index=False)


# --------------------------------------------------------------------------------------------
# Driving edits
# --------------------------------------------------------------------------------------------


def weights_fingerprint(model) -> str:
    """sha256 over every parameter and buffer (name, dtype, shape, bytes)."""
    import torch

    h = hashlib.sha256()
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
            h.update(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def run_regression(lm, editor, cases: list, reg: RegressionOptions, out_dir: Path, data_dir,
                   source_tasks: list[str], counterfact_tasks=(), eval_batch_size: int = 32,
                   on_case: Callable[[dict], None] | None = None, log=print) -> dict:
    """Evaluate the suite on the unedited model, apply `cases` in `reg.mode`, evaluate again,
    restore; write <out_dir>/regression.json and <out_dir>/regression/; return the block.

    With `on_case`, every applied edit is also scored like `bench run` (pre/post probes of the
    case, bench.metrics) and handed over as a cases.jsonl record; in sequential mode "post" is
    measured on the model holding all edits."""
    import torch

    from bench.metrics import case_scores, evaluate_case, predictions

    reg.check()
    if not cases:
        raise BenchError("no edit cases to apply")
    out_dir = Path(out_dir)
    started = time.perf_counter()
    exclude = [(c.task, c.case_id) for c in cases]
    suite = LMSuite(lm, reg, out_dir / REGRESSION_DIR, data_dir, source_tasks, exclude=exclude, log=log)
    fingerprint = weights_fingerprint(lm.model)
    before = suite.evaluate("before")
    model, tok = lm.model, lm.tokenizer
    edits: list[dict] = []
    afters: list[dict] = []

    def score(case):
        return evaluate_case(model, tok, case, counterfact=case.task in counterfact_tasks,
                             batch_size=eval_batch_size)

    def record(case, pre, post, error, t_edit) -> None:
        edits.append({"task": case.task, "case_id": case.case_id, "error": error,
                      "edit_s": round(t_edit, 4), "evaluated": False})
        if on_case is None:
            return
        rec = {"task": case.task, "case_id": case.case_id, "case": case.to_dict(),
               "pre": case_scores(pre), "predictions": {"pre": predictions(tok, pre)},
               "error": error, "mode": reg.mode}
        if post is not None:
            rec["post"] = case_scores(post, pre)
            rec["predictions"]["post"] = predictions(tok, post)
        rec["time"] = {"edit_s": round(t_edit, 4)}
        on_case(rec)

    from tqdm import tqdm

    def progress(items, what):
        return tqdm(items, desc=f"{editor.name} {reg.mode}: {what}", unit="edit", dynamic_ncols=True)

    torch.manual_seed(reg.seed)
    if reg.mode == "single":
        chosen = set(random.Random(f"regression-sample:{reg.seed}").sample(
            range(len(cases)), min(reg.sample, len(cases))))
        for i, case in enumerate(progress(cases, "apply, score, restore")):
            if on_case is None and i not in chosen:
                continue  # nothing would be measured on it (bench run already scored the cases)
            pre = score(case) if on_case else None
            t0 = time.perf_counter()
            try:
                handle = editor.apply(model, tok, case)
            except BenchError as exc:
                record(case, pre, None, str(exc), time.perf_counter() - t0)
                log(f"edit {case.task}/{case.case_id} failed: {exc}")
                continue
            t_edit = time.perf_counter() - t0
            try:
                post = score(case) if on_case else None
                record(case, pre, post, None, t_edit)
                if i in chosen:
                    afters.append(suite.evaluate(f"after-{len(afters)}"))
                    edits[-1]["evaluated"] = True
            finally:
                handle.restore()
    else:
        pres = [score(c) if on_case else None for c in cases]
        handles, applied = [], []
        try:
            for case, pre in zip(progress(cases, "apply"), pres):
                t0 = time.perf_counter()
                try:
                    handles.append(editor.apply(model, tok, case))
                    applied.append((case, pre, time.perf_counter() - t0))
                except BenchError as exc:
                    record(case, pre, None, str(exc), time.perf_counter() - t0)
                    log(f"edit {case.task}/{case.case_id} failed: {exc}")
            for case, pre, t_edit in applied:
                record(case, pre, score(case) if on_case else None, None, t_edit)
                edits[-1]["evaluated"] = True
            if applied:
                afters.append(suite.evaluate("after"))
        finally:
            for handle in reversed(handles):
                handle.restore()
    restored = weights_fingerprint(lm.model) == fingerprint
    if not restored:
        log("WARNING: the model's weights differ from the unedited ones after restoring every edit")
    if not afters:
        raise BenchError("no edit could be applied; nothing to compare (see the edit errors above)")
    block = {
        "mode": reg.mode, "lm_tasks": suite.names, "lm_limit": reg.lm_limit, "seed": reg.seed,
        "batch_size": reg.batch_size, "n_edits": len(cases),
        "n_edits_applied": sum(1 for e in edits if not e["error"]),
        "n_evaluated": len(afters), "sample": reg.sample if reg.mode == "single" else None,
        "suite": suite.info, "results": compare(before, afters, seed=reg.seed),
        "restored_bit_exact": restored, "edits": edits,
        "lm_eval_files": sorted(p.name for p in (out_dir / REGRESSION_DIR).glob("lm_eval-*.json")),
        "wall_time_s": round(time.perf_counter() - started, 2),
    }
    from bench.results import write_json_atomic

    write_json_atomic(out_dir / REGRESSION_JSON, block)
    return block


def summary_block(block: dict) -> dict:
    """The compact `regression` entry of summary.json."""
    keep = ("before", "after", "diff", "diff_stderr", "stderr_before", "stderr_after", "n")
    return {"mode": block["mode"], "lm_tasks": block["lm_tasks"], "lm_limit": block["lm_limit"],
            "n_edits": block["n_edits"], "n_edits_applied": block["n_edits_applied"],
            "n_evaluated": block["n_evaluated"], "restored_bit_exact": block["restored_bit_exact"],
            "file": REGRESSION_JSON,
            "results": {t: {m: {k: r[k] for k in keep} for m, r in ms.items()}
                        for t, ms in block["results"].items()}}


# --------------------------------------------------------------------------------------------
# Entry points: `bench regress` and the `bench run --regression` hook
# --------------------------------------------------------------------------------------------


def _regression_options(opts, lm_tasks=None, mode=None, sample=DEFAULT_SAMPLE) -> RegressionOptions:
    return RegressionOptions(lm_tasks=list(lm_tasks or opts.regression or DEFAULT_SUITE),
                             mode=mode or opts.regression_mode, lm_limit=opts.lm_limit,
                             sample=sample, corpus=opts.regression_corpus,
                             batch_size=opts.batch_size, seed=opts.seed)


def check_run_options(opts) -> None:
    """`bench run --regression`: validate before the (long) case loop starts."""
    _regression_options(opts).check()
    check_lm_tasks(list(opts.regression))


def regression_for_run(lm, editor, planned, opts, run, data_dir, log=print) -> dict:
    """Called by bench.runner.execute after the cases: the regression over the run's cases
    (model unedited at that point); returns the summary.json block."""
    from bench.runner import _wrap_for_editor

    reg = _regression_options(opts)
    cases = [_wrap_for_editor(editor, c, opts.seed, opts.instruction_mode)
             for t in planned for c in t.cases]
    block = run_regression(lm, editor, cases, reg, run.path, data_dir, [t.name for t in planned],
                           log=log)
    log(format_table(block))
    return summary_block(block)


def execute_regress(opts, reg: RegressionOptions, argv: list[str] | None = None, log=print,
                    editor_class=None) -> Path:
    """`bench regress`: a run directory with config.json, cases.jsonl (the edits, scored like
    `bench run`), regression.json, regression/ and summary.json (with a `regression` block).
    `editor_class` replaces the registry lookup (tests)."""
    from bench.models import load_model
    from bench.results import RunDir, new_run_dir
    from bench.runner import (_cache_root, _wrap_for_editor, build_editor, plan_tasks, run_config,
                              summarize_run)
    from editors.base import EditContext, override_hparams
    from tasks.registry import list_cards, resolve_data_dir

    reg.check()
    if opts.limit is not None and opts.limit < 1:
        raise BenchError(f"--limit must be positive, got {opts.limit}")
    check_lm_tasks(reg.lm_tasks)
    data_dir, builtin = resolve_data_dir(opts.data_dir)
    if builtin:
        log("NOTE: no data directory found; using the small built-in sample records.")
    planned = plan_tasks(opts, data_dir)
    lm = load_model(opts.model, device=opts.device, dtype=opts.dtype)
    if editor_class is not None:
        editor = editor_class(override_hparams(editor_class.default_hparams(lm.model.config),
                                               opts.hparams))
    else:
        editor = build_editor(opts, lm.model.config)
    label = opts.run_name or f"regress-{editor.name}-{reg.mode}-{'+'.join(t.name for t in planned)}"
    run = RunDir(new_run_dir(Path(opts.output_dir), label))
    ctx = EditContext(cache_dir=Path(_cache_root()), seed=opts.seed, data_dir=data_dir,
                      train_tasks=[n for n in list_cards() if n not in opts.holdout],
                      holdout_tasks=list(opts.holdout), retrain=opts.retrain, log=log)
    editor.prepare(lm, ctx)
    config = run_config(opts, lm, editor, planned, data_dir, ctx.notes, argv)
    config["regression"] = asdict(reg)
    try:
        import lm_eval

        config["versions"]["lm_eval"] = getattr(lm_eval, "__version__", "?")
    except ImportError:
        pass
    run.write_config(config)
    log(f"run directory: {run.path}")
    records: list[dict] = []

    def on_case(rec: dict) -> None:
        rec["holdout"] = rec["task"] in opts.holdout
        run.append_case(rec)
        records.append(rec)

    cases = [_wrap_for_editor(editor, c, opts.seed, opts.instruction_mode)
             for t in planned for c in t.cases]
    started = time.perf_counter()
    block = run_regression(lm, editor, cases, reg, run.path, data_dir, [t.name for t in planned],
                           counterfact_tasks={t.name for t in planned if "counterfact" in t.metrics},
                           eval_batch_size=opts.batch_size, on_case=on_case, log=log)
    summary = summarize_run(config, records)
    summary["regression"] = summary_block(block)
    summary["wall_time_s"] = round(time.perf_counter() - started, 2)
    run.write_summary(summary)
    log(format_table(block))
    log(f"results: {run.path}")
    return run.path
