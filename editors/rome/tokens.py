"""Where things are in a tokenised prompt: the subject's last token, the target's tokens, the
context text's tokens. Character offsets are used where the tokenizer gives them, so it works
whether or not the tokenizer folds a leading space into a token."""

from __future__ import annotations

import torch

from bench.core.errors import BenchError


def find_subject(prompt: str, subject: str) -> tuple[int, int]:
    """Character span of `subject` in `prompt` (exact match first, then case-insensitive)."""
    if subject:
        start = prompt.find(subject)
        if start < 0:
            start = prompt.lower().find(subject.lower())
        if start >= 0:
            return start, start + len(subject)
    raise BenchError(f"subject '{subject}' not found in prompt")


def encode(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]] | None]:
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    return list(tokenizer(text)["input_ids"]), None


def last_token_in_span(tokenizer, text: str, start: int, end: int,
                       ids: list[int] | None = None, offsets=None) -> int:
    """Index of the last token of `text` overlapping characters [start, end).

    Uses character offsets (works whether or not the tokenizer folds the leading space into a
    token); falls back to counting tokens of text[:end] for tokenizers without offsets.
    """
    if ids is None:
        ids, offsets = encode(tokenizer, text)
    if offsets is not None:
        idx = None
        for j, (a, b) in enumerate(offsets):
            if b > a and a < end and b > start:
                idx = j
        if idx is not None:
            return idx
    return len(tokenizer(text[:end])["input_ids"]) - 1


def continuation(prompt: str, target: str) -> str:
    """The target as a continuation of the prompt: with a leading space unless one is there."""
    target = target.strip()
    return target if (not prompt or prompt[-1].isspace()) else " " + target


def split_prompt_target(tokenizer, text: str, target: str):
    """Tokenise text + continuation(target) together; (ids, offsets, index of first target token,
    number of target tokens)."""
    full = text + continuation(text, target)
    ids, offsets = encode(tokenizer, full)
    if offsets is not None:
        tgt = [j for j, (a, b) in enumerate(offsets) if b > len(text) and b > a]
        if tgt:
            return ids, offsets, tgt[0], tgt[-1] - tgt[0] + 1
    prompt_ids = list(tokenizer(text)["input_ids"])
    if ids[: len(prompt_ids)] == prompt_ids and len(ids) > len(prompt_ids):
        return ids, offsets, len(prompt_ids), len(ids) - len(prompt_ids)
    extra = list(tokenizer(continuation(text, target), add_special_tokens=False)["input_ids"])
    if not extra:
        raise BenchError(f"target {target!r} tokenises to nothing")
    return prompt_ids + extra, None, len(prompt_ids), len(extra)


def pad(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and attention mask of token sequences."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


def prefix_tokens(prefix: str, ids: list[int], offsets) -> int | None:
    """How many leading tokens of `ids` belong to the context text `prefix` (None when the
    tokenizer gives no offsets)."""
    if not prefix:
        return 0
    if offsets is None:
        return None
    end = len(prefix.rstrip())
    n = 0
    while n < len(ids) and offsets[n][1] <= end:
        n += 1
    return n
