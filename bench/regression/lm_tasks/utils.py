"""Dataset builders named by the YAML task files in this directory (`custom_dataset`).

lm-eval calls them as `fn(**task_metadata, **dataset_kwargs)`; the metadata carries every key
given to the TaskManager (`bench regress` passes the paths of the files it wrote), so each
function picks its own keys and ignores the rest. Both return a DatasetDict with one "test"
split. lm-eval loads this module from its file path.
"""

from __future__ import annotations

import math

import datasets

from bench.core.io import read_corpus, read_jsonl
from bench.regression.docs import build_fact_retention_docs
from tasks.registry import resolve_data_dir


def _dataset(docs: list[dict]):
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})


def fact_retention_dataset(fact_retention_file: str | None = None, data_dir: str | None = None,
                           tasks: str | list | None = None, seed: int = 0, **_ignored):
    """Docs from the JSONL written by `bench regress`, or built now from a data directory
    (standalone use: `lm_eval --include_path bench/regression/lm_tasks --tasks fact_retention
    --metadata '{"data_dir": "...", "tasks": "counterfact"}'`)."""
    if fact_retention_file:
        docs = read_jsonl(fact_retention_file)
    else:
        names = tasks.split(",") if isinstance(tasks, str) else list(tasks or [])
        directory, _ = resolve_data_dir(data_dir)
        docs = build_fact_retention_docs(directory, names or ["counterfact"], seed=int(seed))
    if not docs:
        raise ValueError("fact_retention: no docs (no locality records with distinct answers)")
    return _dataset(docs)


def perplexity_dataset(perplexity_file: str | None = None, **_ignored):
    """Documents of the corpus file (bench.core.io.read_corpus)."""
    if not perplexity_file:
        raise ValueError("bench_perplexity: no corpus; pass the metadata key perplexity_file "
                         "(bench regress does this itself)")
    return _dataset([{"text": t} for t in read_corpus(perplexity_file, "perplexity corpus")])


def safe_weighted_perplexity(items) -> float:
    """exp(-sum(loglikelihood) / sum(count)) over (loglikelihood, count) pairs, as lm-eval's
    weighted_perplexity, but inf where the exponential overflows."""
    total = sum(ll for ll, _ in items)
    count = sum(n for _, n in items)
    rate = -total / count
    return math.exp(rate) if rate < 709.0 else float("inf")
