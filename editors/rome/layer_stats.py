"""Second-moment statistics of MLP keys, for ROME's covariance-weighted rank-one update.

A *key* is the input of a block's MLP output projection (down_proj / c_proj / dense_4h_to_h) at
one token.  ROME needs C = E[k k^T] over ordinary text at the edited layer.  We estimate it from

  * a corpus file (`stats_corpus`, read by bench.core.io.read_corpus: JSONL whose objects carry
    a "text" field, or plain text paragraphs; one document per line when there is no blank line);
  * by default, text sampled from the model itself with a fixed seed (no data download).

Statistics are computed once per (model identity, layer, corpus, sample count, dtype) and
cached as safetensors under `<cache_dir>/stats/`, so a second run loads them at once.  Text
sampled from the model is cached too (bench.core.samples), so statistics for another layer only
cost one forward pass.  `compute_moments` is the one function that does the expensive pass (tests
monkeypatch it to check the cache is used).
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from bench.core.errors import BenchError
from bench.core.io import read_corpus
from bench.core.samples import SampleBatch, cached_samples, sample_batches, samples_path

# Openers for text sampled from the model (statistics corpus when none is given).
SAMPLE_STARTERS = (
    "The", "In", "A", "It", "He", "She", "This", "When", "According to", "Many",
    "After", "There", "We", "One of the", "During", "Although", "They", "If", "Most", "On",
)
MAX_DOC_TOKENS = 256  # corpus documents are truncated to this many tokens
SAMPLE_NEW_TOKENS = 128  # tokens generated per sampled document
SAMPLE_BATCH = 16
SAMPLE_TOP_K = 50
FORWARD_BATCH = 8

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
           "float16": torch.float16}


@dataclass
class KeyStats:
    """C = E[k k^T] at one layer, from `n_tokens` key vectors."""

    layer: int
    mom2: torch.Tensor  # (in, in), float32 on CPU
    n_tokens: int
    path: Path | None  # cache file, None when not cached
    loaded: bool  # True when read from the cache


def stats_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise BenchError(f"unknown mom2_dtype {name!r}: use one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:80]


def corpus_tag(corpus: str | None, seed: int) -> str:
    """A short, content-addressed name for the statistics corpus."""
    if corpus is None:
        return f"self-s{seed}"
    path = Path(corpus).expanduser()
    if not path.is_file():
        raise BenchError(f"stats_corpus file not found: {corpus}")
    h = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    return f"file-{h}"


@torch.no_grad()
def sample_documents(model: nn.Module, tokenizer, n_tokens: int, seed: int) -> list[list[int]]:
    """Token-id documents sampled from the model (top-k 50, temperature 1, SAMPLE_BATCH at a
    time after the openers in turn), each cut after its first EOS, until `n_tokens`. The bar
    counts the kept tokens as they are generated (not only when a batch ends)."""
    eos = tokenizer.eos_token_id

    def batches():
        for i in itertools.count():
            starter = SAMPLE_STARTERS[i % len(SAMPLE_STARTERS)]
            yield SampleBatch((starter,) * SAMPLE_BATCH, max_new_tokens=SAMPLE_NEW_TOKENS)

    docs: list[list[int]] = []
    total = 0
    bar = tqdm(total=n_tokens, desc="sampling statistics text", unit="tok", leave=False)
    try:
        for rows in sample_batches(model, tokenizer, batches(), seed=seed, top_k=SAMPLE_TOP_K,
                                   progress=bar.update):
            for prompt, gen in rows:
                if eos is not None and eos in gen:  # keep the EOS token, drop what follows
                    gen = gen[: gen.index(eos) + 1]
                docs.append(prompt + gen)
                total += len(docs[-1])
            if bar.n != total:  # the counts during generation are exact; this is only a guard
                bar.n = total
                bar.refresh()
            if total >= n_tokens:
                break
    finally:
        bar.close()
    return docs


class _Stop(Exception):
    pass


@torch.no_grad()
def compute_moments(model: nn.Module, layout, docs: Iterable[list[int]], layers: list[int],
                    n_samples: int, dtype: torch.dtype, pad_id: int) -> tuple[dict, int]:
    """One pass over `docs`: sum of k k^T at each layer's MLP output projection input.

    Returns ({layer: E[k k^T] as float32 CPU tensor}, number of key vectors used).  Stops after
    `n_samples` tokens; the forward pass is cut short after the deepest requested layer.
    """
    device = next(model.parameters()).device
    d = layout.intermediate_size
    sums = {layer: torch.zeros(d, d, dtype=dtype, device=device) for layer in layers}
    state = {"mask": None, "take": 0}
    deepest = max(layers)

    def make_hook(layer):
        def hook(module, args):
            keys = args[0][state["mask"]][: state["take"]].to(dtype)
            sums[layer].addmm_(keys.T, keys)
            if layer == deepest:
                raise _Stop
        return hook

    handles = [layout.layers[layer].mlp_out.register_forward_pre_hook(make_hook(layer))
               for layer in layers]
    docs = [doc[:MAX_DOC_TOKENS] for doc in docs if doc]
    count = 0
    bar = tqdm(total=n_samples, desc=f"key statistics (layers {layers})", unit="tok", leave=False)
    try:
        for start in range(0, len(docs), FORWARD_BATCH):
            if count >= n_samples:
                break
            batch = docs[start: start + FORWARD_BATCH]
            width = max(len(doc) for doc in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for i, doc in enumerate(batch):
                ids[i, : len(doc)] = torch.tensor(doc)
                mask[i, : len(doc)] = 1
            take = min(int(mask.sum()), n_samples - count)
            state["mask"], state["take"] = mask.bool().to(device), take
            try:
                layout.decoder(input_ids=ids.to(device), attention_mask=mask.to(device),
                               use_cache=False)
            except _Stop:
                pass
            count += take
            bar.update(take)
    finally:
        for h in handles:
            h.remove()
        bar.close()
    if count == 0:
        raise BenchError("key statistics: the corpus produced no tokens")
    return {layer: (s / count).float().cpu() for layer, s in sums.items()}, count


def layer_stats(model: nn.Module, tokenizer, layout, identity: str, layers: list[int], *,
                corpus: str | None, n_samples: int, dtype_name: str, seed: int,
                cache_dir: Path | None, log: Callable[[str], None] = print) -> dict[int, KeyStats]:
    """Key statistics for `layers`, read from the cache where present, else computed in one pass
    (and cached when `cache_dir` is given)."""
    dtype = stats_dtype(dtype_name)
    tag = corpus_tag(corpus, seed)
    cache = None
    if cache_dir is not None:
        cache = Path(cache_dir) / "stats"
        cache.mkdir(parents=True, exist_ok=True)

    out: dict[int, KeyStats] = {}
    paths: dict[int, Path] = {}
    for layer in layers:
        key = f"{identity}|layer={layer}|corpus={tag}|n={n_samples}|dtype={dtype_name}"
        digest = hashlib.sha256(key.encode()).hexdigest()[:10]
        name = f"{_slug(identity)}-L{layer}-{tag}-n{n_samples}-{dtype_name}-{digest}.safetensors"
        if cache is None:
            continue
        paths[layer] = cache / name
        if paths[layer].exists():
            with safe_open(str(paths[layer]), framework="pt") as f:
                meta = f.metadata() or {}
            mom2 = load_file(str(paths[layer]))["mom2"]
            out[layer] = KeyStats(layer, mom2, int(meta.get("n_tokens", 0)), paths[layer], True)

    missing = [layer for layer in layers if layer not in out]
    if missing:
        if corpus is None:
            spec = {"n_tokens": n_samples, "seed": seed, "top_k": SAMPLE_TOP_K, "batch": SAMPLE_BATCH,
                    "new_tokens": SAMPLE_NEW_TOKENS, "starters": SAMPLE_STARTERS}
            text_path = samples_path(cache_dir, "stats-text", identity, spec)
            sampled = []

            def produce() -> list[list[int]]:  # called only when the text is not in the cache
                where = f"; to be cached as {text_path}" if text_path is not None else "; not cached"
                log(f"rome: sampling {n_samples} tokens of text from the model for key statistics "
                    f"(seed {seed}{where})")
                sampled.append(True)
                return sample_documents(model, tokenizer, n_samples, seed)

            docs = cached_samples(cache_dir, "stats-text", identity, spec, produce)
            if not sampled:
                log(f"rome: key-statistics text read from the cache: {text_path} "
                    f"({sum(map(len, docs))} tokens, seed {seed})")
        else:
            docs = [tokenizer(text).input_ids for text in read_corpus(corpus, "stats_corpus file")]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        log(f"rome: computing key statistics for layers {missing} ({n_samples} tokens, {tag})")
        moments, count = compute_moments(model, layout, docs, missing, n_samples, dtype, pad)
        for layer in missing:
            path = paths.get(layer)
            if path is not None:
                tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
                save_file({"mom2": moments[layer].contiguous()}, str(tmp),
                          metadata={"identity": identity, "layer": str(layer), "corpus": tag,
                                    "n_samples": str(n_samples), "n_tokens": str(count),
                                    "dtype": dtype_name})
                tmp.replace(path)
            out[layer] = KeyStats(layer, moments[layer], count, path, False)
    return out


def inverse_float64(c: torch.Tensor) -> torch.Tensor:
    """c^-1 of a symmetric matrix in float64 (pseudo-inverse when c is singular)."""
    c = c.double()
    try:
        inv = torch.linalg.inv(c)
        if not torch.isfinite(inv).all():
            raise RuntimeError
    except RuntimeError:
        inv = torch.linalg.pinv(c, hermitian=True)
    return inv


def inverse_mom2(mom2: torch.Tensor) -> torch.Tensor:
    """C^-1 computed in float64 (pseudo-inverse when C is singular), returned as float32."""
    return inverse_float64(mom2).float()
