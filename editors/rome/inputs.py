"""What ROME feeds the model for one edit: the rewriting prompts (every context template around
the prompt, followed by the target) and the essence prompt ("{subject} is a"), as padded batches
that reuse the cached context text and, during the value optimisation, the tokens before the
subject (neither can depend on the delta)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from bench.core.errors import BenchError
from bench.core.kvcache import cache_arg, cache_of, with_cache
from editors.base import param_name
from editors.rome.hparams import KL_POSITIONS
from editors.rome.prefix_cache import PrefixCache, crop, current_prefix_cache
from editors.rome.tokens import encode, find_subject, last_token_in_span, pad, prefix_tokens, split_prompt_target

ESSENCE_TEMPLATE = "{} is a"


@dataclass
class RomeState:
    """What `Rome.prepare` computes once per run for one model."""

    model_id: int
    layout: object
    tokenizer: object
    templates: list[str]
    c_inv: torch.Tensor | None
    layer: int
    prefix: PrefixCache | None = None


@dataclass
class Seq:
    ids: list[int]
    lookup: int  # subject's last token
    tgt_start: int = 0  # first target token (rewriting prompts)
    tgt_len: int = 0
    kl_pos: int = -1  # essence prompt: position whose next-token distribution is kept (kl_index)
    labels: list[int] = field(default_factory=list)  # target token ids
    prefix_len: int | None = 0  # leading tokens that are the context text (None: unknown)


def kl_index(kl_position: str, subject_last: int, n_tokens: int) -> int:
    """The position of the essence prompt (`n_tokens` tokens, the subject ending at token
    `subject_last`) whose next-token distribution the KL term keeps (hparams.KL_POSITIONS)."""
    if kl_position == "after_prompt":
        return n_tokens - 1
    if kl_position == "subject_last":
        return subject_last
    raise BenchError(f"kl_position must be one of {', '.join(KL_POSITIONS)}, got {kl_position!r}")


def build_sequences(tokenizer, case, templates: list[str],
                    kl_position: str = "after_prompt") -> tuple[list[Seq], Seq]:
    """The rewriting prompts (one per template; row 0 is the bare prompt) and the essence prompt,
    its KL term read at `kl_position` (see kl_index)."""
    span = find_subject(case.prompt, case.subject)
    rewrite = []
    for template in templates:
        prefix = template[: template.index("{}")]
        text = template.replace("{}", case.prompt, 1)
        ids, offsets, t_start, t_len = split_prompt_target(tokenizer, text, case.target_new)
        lookup = last_token_in_span(tokenizer, text, len(prefix) + span[0],
                                    len(prefix) + span[1], ids, offsets)
        if lookup >= t_start:
            raise BenchError(f"subject '{case.subject}' overlaps the target tokens")
        # Teacher forcing: the last target token is never an input.
        rewrite.append(Seq(ids[: t_start + t_len - 1], lookup, t_start, t_len,
                           labels=ids[t_start: t_start + t_len],
                           prefix_len=prefix_tokens(prefix, ids, offsets)))
    e_text = ESSENCE_TEMPLATE.format(case.subject)
    e_ids, e_off = encode(tokenizer, e_text)
    e_lookup = last_token_in_span(tokenizer, e_text, 0, len(case.subject), e_ids, e_off)
    essence = Seq(e_ids, e_lookup, kl_pos=kl_index(kl_position, e_lookup, len(e_ids)))
    return rewrite, essence


def batch_inputs(model, st: RomeState, seqs: list[Seq], cut: list[int] | None = None):
    """Padded inputs for `seqs` (rows: rewriting prompts then the essence prompt), each cut
    to its first `cut[b]` tokens. With a valid prefix cache only the tokens after the
    context text run; returns (ids, mask, skip, decoder kwargs, prefix or None)."""
    device = next(model.parameters()).device
    st.prefix = current_prefix_cache(st.prefix, model, st.tokenizer, st.layout, st.templates,
                                     param_name(model, st.layout.layers[st.layer].mlp_out))
    prefix = st.prefix
    if prefix is not None and (len(seqs) != len(prefix.ids) or any(
            s.prefix_len is None or s.ids[: s.prefix_len] != p
            for s, p in zip(seqs, prefix.ids))):
        prefix = None  # this case's tokenisation does not reuse the cached context tokens
    skip = [len(p) for p in prefix.ids] if prefix is not None else [0] * len(seqs)
    cut = cut or [len(s.ids) for s in seqs]
    ids, mask = pad([s.ids[k:c] for s, k, c in zip(seqs, skip, cut)], 0, device)
    extra = {"use_cache": False}
    if prefix is not None:
        extra = {**with_cache(st.layout.decoder, prefix.cache), "use_cache": True,
                 "position_ids": torch.arange(ids.shape[1], device=device)[None]
                 + torch.tensor(skip, device=device)[:, None]}
        mask = torch.cat([prefix.mask.to(device), mask], dim=1)
    return ids, mask, skip, extra, prefix


def forward(st: RomeState, ids, mask, extra, keep: int | None = None):
    """One decoder pass; with a cache in `extra`, its entries beyond the first `keep`
    positions (this call's) are dropped afterwards."""
    try:
        return st.layout.decoder(input_ids=ids, attention_mask=mask, **extra)
    finally:
        past = extra.get(cache_arg(st.layout.decoder))
        if keep is not None and past is not None:
            crop(past, keep)


@torch.no_grad()
def cache_fixed_tokens(st: RomeState, seqs: list[Seq], skip: list[int], prefix, device):
    """Tokens before each row's subject-last token do not depend on the delta (it is added at
    that token and attention is causal). Run them once per edit after the cached context
    text, keep their keys/values, and let every optimisation step run only the tokens from
    the subject's last token on. Returns (ids, mask, skip, extra, cache width to keep)."""
    heads = [s.ids[k: s.lookup] for s, k in zip(seqs, skip)]
    past_mask = (prefix.mask.to(device) if prefix is not None
                 else torch.zeros(len(seqs), 0, dtype=torch.long, device=device))
    cache = prefix.cache if prefix is not None else None
    head_mask = torch.zeros(len(seqs), 0, dtype=torch.long, device=device)
    if any(heads):
        head_ids, head_mask = pad(heads, 0, device)
        pos = torch.arange(head_ids.shape[1], device=device)[None] + torch.tensor(skip, device=device)[:, None]
        # Padding is unmasked in this pass (so no query attends to nothing) and masked later.
        try:
            out = st.layout.decoder(input_ids=head_ids, position_ids=pos, **with_cache(st.layout.decoder, cache),
                                    attention_mask=torch.cat([past_mask, torch.ones_like(head_mask)], 1),
                                    use_cache=True)
        except BaseException:
            if prefix is not None:
                crop(prefix.cache, prefix.width)  # a failed case must not leave entries behind
            raise
        cache = cache_of(out)
    tails = [s.ids[s.lookup:] for s in seqs]
    ids, tail_mask = pad(tails, 0, device)
    new_skip = [s.lookup for s in seqs]
    extra = {"use_cache": cache is not None, **with_cache(st.layout.decoder, cache),
             "position_ids": torch.arange(ids.shape[1], device=device)[None]
             + torch.tensor(new_skip, device=device)[:, None]}
    keep = past_mask.shape[1] + head_mask.shape[1]
    return ids, torch.cat([past_mask, head_mask, tail_mask], 1), new_skip, extra, keep
