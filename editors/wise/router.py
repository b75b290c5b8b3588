"""WISE's router: which memory computes the MLP output projection, input by input.

The activation score of an input x (the projection's input, i.e. the MLP's activations) for a
side weight W' is, per token, ||(W' - W) x|| (the paper's Delta_act; `score: activated` takes
EasyEdit's ||act(W' x) - act(W x)|| with the model's hidden activation), and for an input the
mean over its tokens. Edited inputs were trained to score high, unrelated ones low; the
threshold is act_ratio times the smallest score an edit had at the end of its training.
EasyEdit's rule for its merge form, with s_merged and s_shard the scores of the merged side
memory and of the open shard:

    both below the threshold  -> the main memory (the projection as it is);
    s_merged > s_shard        -> the merged side memory;
    otherwise                 -> the open shard's side memory.

EasyEdit routes a whole sequence with its mean over every token. Here the decision at position
t reads the mean over the sequence's tokens up to t (its real tokens: the attention mask's
padding is left out), so a position never depends on what follows it. That keeps every
evaluation path of the harness consistent: right-padded teacher-forced batches (where a probe
may be read from a longer sequence holding its tokens as a prefix), left-padded generation with
the key-value cache (the running sums continue from one decoding step to the next), and batches
of any size give each sequence what it gets alone. The attention mask and the cache position are
read by a pre-hook on the decoder (the base model); the projection's forward hook routes.

While an edit trains (`train_delta` set) the hook returns the side output W x + delta x at every
position (EasyEdit's editing mode) and keeps the per-token scores for the routing loss.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import torch

from editors.wise.memory import WiseState

MAIN, MERGED, SHARD = 0, 1, 2
MEMORY_NAMES = {MAIN: "main", MERGED: "merged", SHARD: "shard"}


def token_scores(side: torch.Tensor, main: torch.Tensor, score: str, act: Callable | None) -> torch.Tensor:
    """Per-token activation score (B, T) of a side contribution `side` = (W' - W) x (float32)
    next to the main output `main` = W x (+ bias)."""
    if score == "delta" or act is None:
        return side.norm(dim=-1)
    m = main.float()
    return (act(m + side) - act(m)).norm(dim=-1)


def prefix_means(tokens: torch.Tensor, mask: torch.Tensor, carry_sum: torch.Tensor | None = None,
                 carry_count: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Running means of `tokens` (B, T) over the positions where `mask` is set, continued from
    earlier sums and counts (B,) when given: (means (B, T), 0 before any real token; sums (B, T);
    counts (B, T))."""
    w = mask.to(tokens.dtype)
    sums = torch.cumsum(tokens * w, dim=1)
    counts = torch.cumsum(w, dim=1)
    if carry_sum is not None:
        sums = sums + carry_sum[:, None]
        counts = counts + carry_count[:, None]
    means = torch.where(counts > 0, sums / counts.clamp(min=1), torch.zeros_like(sums))
    return means, sums, counts


def choose(s_merged: torch.Tensor, s_shard: torch.Tensor, threshold: float) -> torch.Tensor:
    """EasyEdit's three-way rule (merge form), per position: MAIN, MERGED or SHARD."""
    out = torch.full(s_shard.shape, SHARD, dtype=torch.long, device=s_shard.device)
    out[s_merged > s_shard] = MERGED
    out[(s_merged < threshold) & (s_shard < threshold)] = MAIN
    return out


@dataclass
class _Call:
    """What the decoder pre-hook saw of the current forward pass."""

    mask: torch.Tensor | None  # (B, width) attention mask over past and new tokens, or None
    past: int | None  # tokens already in the key-value cache (None: not said; the mask's width tells)


class Router:
    """The hooks of one side memory: `decoder_hook` (a forward pre-hook with kwargs on the
    decoder) and `projection_hook` (a forward hook on the MLP output projection)."""

    def __init__(self, state: WiseState, hparams, act: Callable | None):
        self.state, self.hparams, self.act = state, hparams, act
        self.train_delta: torch.Tensor | None = None  # set while an edit trains
        self.kept: dict[str, torch.Tensor] = {}  # training: the last pass's token scores
        self.trace: list[dict] | None = None  # a list to append each routed pass's decisions to
        self._call: _Call | None = None
        self._carry: tuple[torch.Tensor, torch.Tensor, int] | None = None  # sums, counts, length
        self._signatures: dict[type, inspect.Signature] = {}

    # ---------------------------------------------------------------------------------------
    # The decoder pre-hook: attention mask and cache position of each forward pass
    # ---------------------------------------------------------------------------------------

    def decoder_hook(self, module, args, kwargs) -> None:
        sig = self._signatures.get(type(module))
        if sig is None:
            sig = self._signatures[type(module)] = inspect.signature(module.forward)
        try:
            bound = sig.bind_partial(*args, **kwargs).arguments
        except TypeError:
            bound = dict(kwargs)
        mask = bound.get("attention_mask")
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            mask = None
        self._call = _Call(mask=mask, past=_past_length(bound))

    # ---------------------------------------------------------------------------------------
    # The projection hook
    # ---------------------------------------------------------------------------------------

    def projection_hook(self, module, args, output):
        x = args[0]
        if self.train_delta is not None:
            side = x.float() @ self.train_delta.T
            self.kept["tokens"] = token_scores(side, output, self.hparams.score, self.act)
            return output + side.to(output.dtype)
        return self.route(x, output)

    def _new_token_mask(self, batch: int, length: int, device) -> tuple[torch.Tensor, int]:
        call, self._call = self._call, None
        past = call.past if call is not None else None
        mask = call.mask if call is not None else None
        if mask is None or mask.shape[0] != batch or mask.shape[1] < length:
            return torch.ones((batch, length), device=device), past or 0
        return mask[:, -length:].to(device), mask.shape[1] - length if past is None else past

    @torch.no_grad()
    def _scores(self, x: torch.Tensor, output: torch.Tensor, delta: torch.Tensor | None):
        """(side contribution, token scores) of one task vector, or (None, zeros)."""
        if delta is None:
            return None, torch.zeros(output.shape[:-1], dtype=torch.float32, device=output.device)
        side = x.float() @ delta.T
        return side, token_scores(side, output, self.hparams.score, self.act)

    def route(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        batch, length = output.shape[0], output.shape[1]
        mask, past = self._new_token_mask(batch, length, output.device)
        merged, shard = self.state.deployed(self.hparams)
        side_m, tok_m = self._scores(x, output, merged)
        side_s, tok_s = self._scores(x, output, shard)
        carry = self._carry if past and self._carry is not None and self._carry[2] == past \
            and self._carry[0].shape[0] == 2 * batch else None
        tokens = torch.stack([tok_m, tok_s])  # running means of both scores at once
        both = mask.to(tokens.dtype).expand_as(tokens[0])
        means, sums, counts = prefix_means(tokens.reshape(2 * batch, length), both.repeat(2, 1),
                                           *(carry[:2] if carry else (None, None)))
        self._carry = (sums[:, -1].clone(), counts[:, -1].clone(), past + length)
        s_m, s_s = means[:batch], means[batch:]
        choice = choose(s_m, s_s, self.state.threshold(self.hparams.act_ratio))
        if self.trace is not None:
            self.trace.append({"merged": s_m, "shard": s_s, "choice": choice,
                               "threshold": self.state.threshold(self.hparams.act_ratio)})
        out = output
        for which, side in ((MERGED, side_m), (SHARD, side_s)):
            picked = (choice == which)
            if side is not None and bool(picked.any()):
                out = torch.where(picked[..., None], output + side.to(output.dtype), out)
        return out


def _past_length(bound: dict) -> int | None:
    """Tokens already in the key-value cache of this pass: from the cache position or the cache
    object (`cache` in recent transformers, `past_key_values` before); None when neither says."""
    position = bound.get("cache_position")
    if isinstance(position, torch.Tensor) and position.numel():
        return int(position.reshape(-1)[0])
    for key in ("cache", "past_key_values"):
        cache = bound.get(key)
        if cache is None:
            continue
        if hasattr(cache, "get_seq_length"):
            return int(cache.get_seq_length())
        try:
            return int(cache[0][0].shape[-2])
        except (TypeError, IndexError, AttributeError, KeyError):
            return None
    return None
