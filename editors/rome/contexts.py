"""ROME's context templates: the prompt alone ("{}") and the prompt after short texts sampled from
the model itself ("<text>. {}"), so that the key and the value hold in varied contexts."""

from __future__ import annotations

from pathlib import Path

from bench.core.samples import SampleBatch, cached_samples, sample_batches

CONTEXT_STARTERS = ("The", "Therefore", "Because", "I", "You")
TOP_K = 5


def context_templates(model, tokenizer, identity: str | None, lengths: list[int], counts: list[int],
                      seed: int, cache_dir: Path | None) -> list[str]:
    """["{}"] + for each (length, count): `count` texts of about `length` tokens sampled from the
    model (top-k 5) after the openers in CONTEXT_STARTERS, each as "<text>. {}". Cached per
    model identity (bench.core.samples)."""
    batches = []
    for length, count in zip(lengths, counts):
        k = len(CONTEXT_STARTERS)
        per = [count // k + (1 if i < count % k else 0) for i in range(k)]
        for starter, n in zip(CONTEXT_STARTERS, per):
            if n > 0:
                new = max(1, length - len(tokenizer(starter)["input_ids"]))
                batches.append(SampleBatch((starter,) * n, max_new_tokens=new, min_new_tokens=new))

    def produce() -> list[list[int]]:
        rows = sample_batches(model, tokenizer, batches, seed=seed, top_k=TOP_K)
        return [prompt + gen for batch in rows for prompt, gen in batch]

    spec = {"lengths": list(lengths), "counts": list(counts), "seed": seed, "top_k": TOP_K,
            "starters": CONTEXT_STARTERS}
    docs = cached_samples(cache_dir, "rome-contexts", identity, spec, produce)
    templates = ["{}"]
    for doc in docs:
        text = tokenizer.decode(doc, skip_special_tokens=True)
        templates.append(text.replace("{", " ").replace("}", " ").strip() + ". {}")
    return templates
