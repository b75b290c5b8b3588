"""Text sampled from the model itself with a fixed seed, cached per model: the one mechanism behind
ROME's context prefixes, the key-statistics corpus and the regression suite's perplexity corpus
(each needs ordinary text without downloading any).

`sample_batches` draws from the model batch by batch after seeding torch once (the global RNG
state is restored afterwards, so sampling never disturbs the caller's randomness); `cached_samples`
stores what a producer returns (token-id documents) as safetensors under
`<cache>/samples/<name>-<key>.safetensors`, keyed by the model's identity and the sampling spec.
A `progress` callback sees the tokens as they are produced (each batch's prompt tokens, then
each generated token until its row's EOS), so a progress bar moves during a batch, not after it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from bench.core.io import short_hash


@dataclass(frozen=True)
class SampleBatch:
    """Prompts generated from together (left-padded when their lengths differ)."""

    prompts: tuple[str, ...]
    max_new_tokens: int
    min_new_tokens: int | None = None


def _token_counter(report: Callable[[int], None], eos: int | None):
    """A generation stopping criterion that never stops: after each decoding step it reports how
    many rows produced a real token (rows that had not yet produced `eos`; the EOS counts)."""
    from transformers import StoppingCriteria  # late: only generation needs it

    class Counter(StoppingCriteria):
        def __init__(self):
            self.finished = None

        def __call__(self, input_ids, scores, **kwargs):
            last = input_ids[:, -1]
            if self.finished is None:
                self.finished = torch.zeros_like(last, dtype=torch.bool)
            report(int((~self.finished).sum()))
            if eos is not None:
                self.finished |= last == eos
            return torch.zeros_like(last, dtype=torch.bool)

    return Counter()


@torch.no_grad()
def sample_batches(model, tokenizer, batches: Iterable[SampleBatch], *, seed: int, top_k: int,
                   top_p: float = 1.0, temperature: float = 1.0,
                   progress: Callable[[int], None] | None = None) -> Iterator[list[tuple[list[int], list[int]]]]:
    """For each batch, [(prompt ids, generated ids)] per prompt, sampled with torch seeded once
    with `seed` before the first batch. A generator: stop iterating whenever enough was drawn.
    `progress(n)` is called as tokens are produced: once with a batch's prompt tokens, then after
    each decoding step with the number of rows that produced a token before (or as) their EOS
    (tokenizer.eos_token_id); per batch the calls add up to its prompt tokens plus its generated
    tokens up to and including each row's first EOS."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    side = tokenizer.padding_side
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for batch in batches:
            tokenizer.padding_side = "left"  # generation continues from each row's real last token
            try:
                enc = tokenizer(list(batch.prompts), return_tensors="pt", padding=True).to(device)
            finally:
                tokenizer.padding_side = side
            extra = {} if batch.min_new_tokens is None else {"min_new_tokens": batch.min_new_tokens}
            if progress is not None:
                from transformers import StoppingCriteriaList  # late: see _token_counter

                progress(int(enc["attention_mask"].sum()))
                extra["stopping_criteria"] = StoppingCriteriaList(
                    [_token_counter(progress, tokenizer.eos_token_id)])
            out = model.generate(**enc, do_sample=True, top_k=top_k, top_p=top_p,
                                 temperature=temperature, max_new_tokens=batch.max_new_tokens,
                                 pad_token_id=pad, **extra)
            width = enc["input_ids"].shape[1]
            rows = []
            for ids, mask, row in zip(enc["input_ids"].tolist(), enc["attention_mask"].tolist(),
                                      out.tolist()):
                prompt = [t for t, m in zip(ids, mask) if m]
                rows.append((prompt, row[width:]))
            yield rows


def samples_path(cache: Path | None, name: str, identity: str | None, spec: dict) -> Path | None:
    """Where cached_samples keeps these samples; None when they are not cached."""
    if cache is None or identity is None:
        return None
    key = short_hash({"name": name, "model": identity, "spec": spec})
    return Path(cache) / "samples" / f"{name}-{key}.safetensors"


def cached_samples(cache: Path | None, name: str, identity: str | None, spec: dict,
                   produce: Callable[[], list[list[int]]]) -> list[list[int]]:
    """`produce()` (token-id documents), read from the cache when this (name, model identity,
    spec) was produced before (then `produce` is not called: a caller that logs inside it says
    "sampling" only when it samples). Without a cache directory or a model identity nothing is
    stored."""
    path = samples_path(cache, name, identity, spec)
    if path is not None:
        if path.exists():
            data = load_file(str(path))
            flat, lengths = data["ids"].tolist(), data["lengths"].tolist()
            docs, at = [], 0
            for n in lengths:
                docs.append(flat[at: at + n])
                at += n
            return docs
    docs = produce()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        flat = torch.tensor([t for d in docs for t in d], dtype=torch.int64)
        lengths = torch.tensor([len(d) for d in docs], dtype=torch.int64)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        save_file({"ids": flat, "lengths": lengths}, str(tmp))
        tmp.replace(path)
    return docs
