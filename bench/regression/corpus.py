"""The default corpus of the offline `bench_perplexity` task: text sampled, seeded, from the
unedited model itself (no download), cached per model (bench.core.samples)."""

from __future__ import annotations

from typing import Callable

from tqdm import tqdm

from bench.core.io import cache_dir
from bench.core.samples import SampleBatch, cached_samples, sample_batches

CORPUS_DOCS = 24
CORPUS_NEW_TOKENS = 96
CORPUS_BATCH = 8
TOP_K, TOP_P = 50, 0.95

# Neutral openings for the generated corpus (document i starts with opener i % 16).
CORPUS_OPENERS = (
    "The history of the city begins", "In the morning, the market", "Scientists have long studied",
    "The recipe calls for", "During the winter months,", "The museum's collection includes",
    "A typical day at the school", "The river flows through", "Many people believe that",
    "The company was founded", "In the final chapter of the book,", "The weather forecast for",
    "When the train arrived at the station,", "The old house on the hill", "Music has always been",
    "The rules of the game are",
)


def generated_corpus(lm, seed: int, log: Callable[[str], None] = print, n_docs: int | None = None,
                     new_tokens: int | None = None) -> list[str]:
    """`n_docs` (default CORPUS_DOCS) continuations of CORPUS_OPENERS sampled from the model
    (top-k 50, top-p 0.95, temperature 1, `new_tokens` (CORPUS_NEW_TOKENS) new tokens, torch
    seeded with `seed`); each document is the opener + its decoded continuation (empty documents
    are left out)."""
    n_docs = n_docs or CORPUS_DOCS
    new_tokens = new_tokens or CORPUS_NEW_TOKENS
    openers = [CORPUS_OPENERS[i % len(CORPUS_OPENERS)] for i in range(n_docs)]
    batches = [SampleBatch(tuple(openers[i:i + CORPUS_BATCH]), max_new_tokens=new_tokens)
               for i in range(0, n_docs, CORPUS_BATCH)]

    def produce() -> list[list[int]]:  # called only when the corpus is not in the cache
        log(f"generating the perplexity corpus from the unedited model ({n_docs} docs, seed {seed}) ...")
        # One step per batch of documents; within a batch the postfix counts its decoding steps.
        bar = tqdm(total=n_docs, desc="perplexity corpus", unit="doc", leave=False)
        steps = [0]

        def tokens(n: int) -> None:
            steps[0] += 1
            if steps[0] > 1:  # the first call is the batch's prompt tokens
                bar.set_postfix_str(f"token {steps[0] - 1}/{new_tokens} of this batch")

        docs = []
        try:
            for batch in sample_batches(lm.model, lm.tokenizer, batches, seed=seed, top_k=TOP_K,
                                        top_p=TOP_P, progress=tokens):
                docs += [gen for _, gen in batch]
                steps[0] = 0
                bar.update(len(batch))
        finally:
            bar.close()
        return docs

    spec = {"openers": openers, "new_tokens": new_tokens, "seed": seed, "top_k": TOP_K,
            "top_p": TOP_P, "batch": CORPUS_BATCH}
    generated = cached_samples(cache_dir(), "perplexity-corpus", lm.identity, spec, produce)
    texts = [(opener + lm.tokenizer.decode(gen, skip_special_tokens=True)).strip()
             for opener, gen in zip(openers, generated)]
    return [t for t in texts if t]


def describe(seed: int) -> str:
    return (f"generated from the unedited model: {CORPUS_DOCS} samples of {CORPUS_NEW_TOKENS} "
            f"tokens, seed {seed} (cached per model)")
