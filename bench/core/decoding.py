"""Reading many token sequences through the model at the compute floor: how they are batched,
a prefix they share computed once, and greedy decoding that stops each row on its own.

* `plan_batches` orders sequences so that a batch wastes little on padding (sorted by length)
  or, when asked to share, so that rows with a long common token prefix (an in-context edit's
  context in front of every probe of a case) go together; the prefix is then run once and its
  key-value cache copied to every row (`prefix_cache`).
* `greedy_decode` is greedy decoding as `transformers`' `generate` does it (left padding,
  positions counted from each row's first real token, the key-value cache, logits at the last
  position only), but a row leaves the batch as soon as it stops (EOS or its stop rule), so no
  row is decoded to the length of the batch's longest one, and the stop rule is asked after
  each token without decoding the whole row again (`bench.core.generation` gives the rule).

`reference_paths()` switches all of it off (transformers' `generate`, no shared prefix): the
benchmarks time both paths in one sitting and the tests check that the numbers agree.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch

from bench.core.kvcache import cache_of, with_cache

MIN_SHARED = 16  # tokens: a shorter common prefix is not worth a pass of its own
_REFERENCE = [False]


@contextmanager
def reference_paths() -> Iterator[None]:
    """Within this block: transformers' `generate` and no shared prefixes (the paths these
    replace), for benchmarks and identity tests."""
    _REFERENCE.append(True)
    try:
        yield
    finally:
        _REFERENCE.pop()


def reference() -> bool:
    return _REFERENCE[-1]


def _common(a: list[int], b: list[int], limit: int) -> int:
    n = 0
    for x, y in zip(a[:limit], b[:limit]):
        if x != y:
            break
        n += 1
    return n


def in_order(n: int, batch_size: int) -> list[tuple[list[int], int]]:
    """Batches of the indices 0..n-1 in their order, nothing shared (the paths before plan_batches)."""
    return [(list(range(k, min(k + batch_size, n))), 0) for k in range(0, n, batch_size)]


def plan_batches(seqs: list[list[int]], batch_size: int, share: bool = False,
                 min_shared: int = MIN_SHARED) -> list[tuple[list[int], int]]:
    """Batches of sequence indices, each with the length of the token prefix its rows share and
    that is run once for all of them (0: none). Without `share`, sequences are sorted by length
    (shortest first) and cut into batches. With it, rows whose common prefix is at least
    `min_shared` tokens (and at least half of the batch's so far: a context is not traded for a
    shorter header) are batched together; the prefix stops one token short of the shortest row,
    so every row has a token of its own to be read from. The rest are batched by length."""
    by_length = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    if not share or reference():
        return [(by_length[k:k + batch_size], 0) for k in range(0, len(by_length), batch_size)]
    batches, loose = [], []
    current, prefix = [], 0

    def close() -> None:
        if len(current) > 1:
            shared = min(prefix, min(len(seqs[i]) for i in current) - 1)
            if shared >= min_shared:
                batches.append((sorted(current, key=lambda i: len(seqs[i])), shared))
                return
        loose.extend(current)

    for i in sorted(range(len(seqs)), key=lambda i: seqs[i]):
        if current:
            common = _common(seqs[current[0]], seqs[i], prefix)
            if len(current) < batch_size and common >= max(min_shared, prefix // 2):
                current.append(i)
                prefix = common
                continue
            close()
        current, prefix = [i], len(seqs[i])
    if current:
        close()
    loose.sort(key=lambda i: len(seqs[i]))
    return batches + [(loose[k:k + batch_size], 0) for k in range(0, len(loose), batch_size)]


def prefix_cache(model, prefix: list[int], rows: int):
    """The key-value cache of `prefix` run once, repeated for `rows` rows."""
    device = next(model.parameters()).device
    ids = torch.tensor([prefix], device=device)
    out = model.base_model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
    cache = cache_of(out)
    cache.batch_repeat_interleave(rows)
    return cache


def _padded(model, rows: list[list[int]], shared: int, pad: int, left: bool):
    """(the key-value cache of the `shared` tokens the rows begin with, run once, or None; the
    rest of each row padded to one width, on the left or the right; the attention mask over
    prefix and rest)."""
    cache = prefix_cache(model, rows[0][:shared], len(rows)) if shared else None
    rest = [r[shared:] for r in rows]
    width = max(len(r) for r in rest)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), shared + width), dtype=torch.long)
    mask[:, :shared] = 1
    for k, r in enumerate(rest):
        at = width - len(r) if left else 0
        ids[k, at:at + len(r)] = torch.tensor(r)
        mask[k, shared + at:shared + at + len(r)] = 1
    return cache, ids, mask


def run_rows(model, rows: list[list[int]], shared: int, pad: int) -> torch.Tensor:
    """Final hidden states of `rows` (right padded; [rows, width, hidden]) after the first
    `shared` tokens, which every row has in common and which are run once. Position j of the
    result is position shared + j of the row (each real token where it is unbatched)."""
    device = next(model.parameters()).device
    cache, ids, mask = _padded(model, rows, shared, pad, left=False)
    if not shared:  # right padding: the model's own positions are each token's unbatched ones
        return model.base_model(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
    positions = (shared + torch.arange(ids.shape[1]))[None].expand(len(rows), -1)
    out = model.base_model(input_ids=ids.to(device), attention_mask=mask.to(device),
                           position_ids=positions.to(device), use_cache=True,
                           **with_cache(model.base_model, cache))
    return out.last_hidden_state


def run_rows_cached(model, rows: list[list[int]], pad: int):
    """`run_rows` with nothing shared, also returning the key-value cache of the pass (right
    padded: row k's token j at column j)."""
    device = next(model.parameters()).device
    _, ids, mask = _padded(model, rows, 0, pad, left=False)
    out = model.base_model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=True)
    return out.last_hidden_state, cache_of(out)


@torch.no_grad()
def greedy_decode(model, prompts: list[list[int]], max_new_tokens: int, eos: int | None, pad: int,
                  stopped: Callable[[list[int]], bool], batch_size: int = 32,
                  share: bool = False, on_rows: Callable[[list[int]], None] | None = None) -> list[list[int]]:
    """The greedy continuation (token ids) of each prompt (token ids), up to and including the
    token at which it stops: EOS, `stopped(tokens so far)`, or `max_new_tokens`. `on_rows` is
    told, before every forward pass, which prompts (indices) its rows are (no prefix is shared
    then: every row is run whole)."""
    out: list[list[int]] = [[] for _ in prompts]
    if max_new_tokens <= 0:
        return out
    device = next(model.parameters()).device
    tell = on_rows or (lambda rows: None)
    for idx, shared in plan_batches(prompts, batch_size, share and on_rows is None):
        rows = [prompts[i] for i in idx]
        # left padding: every row continues from its own last token
        cache, ids, mask = _padded(model, rows, shared, pad, left=True)
        # As generate counts them: from each row's first real token, padding given position 1.
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)[:, shared:]
        ids, mask, positions = ids.to(device), mask.to(device), positions.to(device)
        tell(idx)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                       logits_to_keep=1, **with_cache(model, cache))
        continue_greedy(model, cache_of(logits), mask, positions[:, -1], logits.logits[:, -1].argmax(-1),
                        [out[i] for i in idx], [max_new_tokens] * len(idx), eos, [stopped] * len(idx),
                        lambda alive, idx=idx: tell([idx[k] for k in alive]))
    return out


@torch.no_grad()
def continue_greedy(model, cache, mask: torch.Tensor, last: torch.Tensor, tokens: torch.Tensor,
                    outs: list[list[int]], caps: list[int], eos: int | None,
                    stops: list[Callable[[list[int]], bool]],
                    tell: Callable[[list[int]], None] | None = None) -> None:
    """Greedy decoding of a batch whose prompts are already in `cache` (left padded: `mask` over
    its columns, `last` each row's last position), from each row's first new token (`tokens`,
    the argmax after its prompt). Row k's tokens are appended to `outs[k]` until it stops: EOS,
    `stops[k](its tokens)`, or `caps[k]` tokens; a row that stops leaves the batch. `tell` is
    told, before each later forward pass, which rows (indices into `outs`) it runs."""
    device = tokens.device
    alive = list(range(len(outs)))
    while True:
        keep = []
        for r, (k, t) in enumerate(zip(alive, tokens.tolist())):
            outs[k].append(t)
            if not ((eos is not None and t == eos) or stops[k](outs[k]) or len(outs[k]) >= caps[k]):
                keep.append(r)
        if not keep:
            return
        if len(keep) < len(alive):  # rows that stopped leave the batch
            sel = torch.tensor(keep, device=device)
            cache.batch_select_indices(sel)
            tokens, mask, last = tokens[sel], mask[sel], last[sel]
            alive = [alive[r] for r in keep]
            if tell is not None:
                tell(alive)
        mask = torch.cat([mask, mask.new_ones((len(alive), 1))], dim=1)
        last = last + 1
        logits = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=last[:, None],
                       use_cache=True, logits_to_keep=1, **with_cache(model, cache))
        cache = cache_of(logits)
        tokens = logits.logits[:, -1].argmax(-1)
