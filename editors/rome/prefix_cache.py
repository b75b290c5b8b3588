"""The attention keys/values of ROME's context texts, computed once per run and reused by every
optimisation step of every edit (`PrefixCache`), with the check that reusing them reproduces full
sequences on this model."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from bench.core.kvcache import cache_of, with_cache
from editors.rome.tokens import encode, pad, prefix_tokens


@dataclass
class PrefixCache:
    """Attention keys/values of the context texts: one row per template plus one (empty) row
    for the essence prompt, right-padded to `width`."""

    ids: list[list[int]]  # real prefix token ids per row ([] for the bare prompt and essence)
    width: int
    cache: object  # a transformers Cache (supports crop)
    mask: torch.Tensor  # (rows, width): 1 at real prefix tokens
    versions: dict = field(default_factory=dict)  # parameter name -> tensor version when built
    watched: dict = field(default_factory=dict)  # copies of the weights the editor edits, when built

    def snapshot(self, model, watch: str | list[str]) -> None:
        """Remember the weights' versions, and a copy of the weight(s) an editor changes and
        restores between edits (one name, or several for editors that edit several layers)."""
        params = dict(model.named_parameters())
        self.versions = {n: p._version for n, p in params.items()}
        names = [watch] if isinstance(watch, str) else list(watch)
        self.watched = {n: params[n].detach().clone() for n in names}

    def valid_for(self, model) -> bool:
        """True while the model's weights are those the cache was computed with: unchanged
        versions, or only the watched weight touched and back to its old value (edit+restore)."""
        params = dict(model.named_parameters())
        touched = [n for n, p in params.items() if p._version != self.versions.get(n)]
        if any(n not in self.watched or not torch.equal(params[n], self.watched[n])
               for n in touched):
            return False
        for n in touched:
            self.versions[n] = params[n]._version
        return True


@torch.no_grad()
def build_prefix_cache(model, tokenizer, layout, templates: list[str]) -> PrefixCache | None:
    """Keys/values of the context texts for the rows [templates..., essence]; None when the model
    cannot reuse them exactly (checked on a probe suffix against full sequences)."""
    device = next(model.parameters()).device
    prefixes = [t[: t.index("{}")].rstrip() for t in templates] + [""]
    ids = []
    for p in prefixes:
        if not p:
            ids.append([])
            continue
        got, offsets = encode(tokenizer, p + " x")
        n = prefix_tokens(p, got, offsets)
        if n is None:
            return None
        ids.append(got[:n])
    width = max(len(i) for i in ids)
    if width == 0:
        return None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    # Rows without a context run pad tokens (unmasked here so no query attends to nothing); the
    # edit steps mask them out.
    fill = [i if i else [pad_id] * width for i in ids]
    run_ids, run_mask = pad(fill, pad_id, device)
    mask = torch.zeros(len(ids), width, dtype=torch.long)
    for r, i in enumerate(ids):
        mask[r, : len(i)] = 1
    try:
        out = layout.decoder(input_ids=run_ids, attention_mask=run_mask, use_cache=True)
        cache = cache_of(out)
        if cache is None or not hasattr(cache, "crop"):
            return None
        prefix = PrefixCache(ids=ids, width=width, cache=cache, mask=mask.to(device))
        # Check: a probe suffix through the cache == the same tokens as full sequences.
        probe = list(tokenizer(" is a check", add_special_tokens=False)["input_ids"])
        suf, suf_mask = pad([probe] * len(ids), pad_id, device)
        pos = torch.arange(suf.shape[1], device=device)[None] + \
            torch.tensor([len(i) for i in ids], device=device)[:, None]
        try:
            cached = layout.decoder(input_ids=suf, attention_mask=torch.cat([prefix.mask, suf_mask], 1),
                                    position_ids=pos, use_cache=True,
                                    **with_cache(layout.decoder, cache)).last_hidden_state
        finally:
            crop(cache, width)
        full_ids, full_mask = pad([i + probe for i in ids], pad_id, device)
        full = layout.decoder(input_ids=full_ids, attention_mask=full_mask,
                              use_cache=False).last_hidden_state
        expect = torch.stack([full[r, len(i): len(i) + len(probe)] for r, i in enumerate(ids)])
        scale = expect.abs().max().clamp_min(1e-6)
        if not torch.isfinite(cached).all() or \
                (cached.float() - expect.float()).abs().max() / scale > 1e-3:
            return None
        return prefix
    except Exception:  # noqa: BLE001 - any model that cannot do this falls back to full sequences
        return None


def watched_prefix_cache(model, tokenizer, layout, templates: list[str],
                         watch: str | list[str]) -> PrefixCache | None:
    """build_prefix_cache, remembering the weights (`watch`) the editor edits and restores."""
    prefix = build_prefix_cache(model, tokenizer, layout, templates)
    if prefix is not None:
        prefix.snapshot(model, watch)
    return prefix


def current_prefix_cache(prefix: PrefixCache | None, model, tokenizer, layout, templates: list[str],
                         watch: str | list[str]) -> PrefixCache | None:
    """`prefix` while the model's weights are those it was computed with (or edited and
    restored); recomputed when they changed for good (sequential edits kept in place)."""
    if prefix is not None and not prefix.valid_for(model):
        return watched_prefix_cache(model, tokenizer, layout, templates, watch)
    return prefix


def map_cache(cache, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Replace every key/value tensor of a transformers cache by fn(tensor), in place (the
    per-layer objects of transformers >= 4.56, or the older key_cache/value_cache lists)."""
    layers = getattr(cache, "layers", None)
    if isinstance(layers, list):
        for layer in layers:
            keys = getattr(layer, "keys", None)
            length = keys.shape[-2] if isinstance(keys, torch.Tensor) and keys.numel() else None
            for attr in ("keys", "values"):
                t = getattr(layer, attr, None)
                if isinstance(t, torch.Tensor) and t.numel():
                    setattr(layer, attr, fn(t))
            # A sliding-window layer (Gemma 3) counts the positions it has seen and builds the next
            # pass's mask from that count; while nothing has slid out it equals the stored length.
            if length is not None and getattr(layer, "cumulative_length", None) == length:
                layer.cumulative_length = layer.keys.shape[-2]
        return
    for attr in ("key_cache", "value_cache"):
        tensors = getattr(cache, attr, None)
        if isinstance(tensors, list):
            tensors[:] = [fn(t) if isinstance(t, torch.Tensor) and t.numel() else t for t in tensors]


def crop(cache, width: int) -> None:
    """Drop cache entries beyond the first `width` positions (a negative count works on both
    the older and the newer transformers Cache.crop)."""
    extra = cache.get_seq_length() - width
    if extra > 0:
        cache.crop(-extra)
    # What remains is a slice of this step's concatenation: cut it from the autograd graph.
    map_cache(cache, torch.Tensor.detach)
