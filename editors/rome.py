"""`rome`: Rank-One Model Editing (Meng et al., 2022, "Locating and Editing Factual
Associations in GPT").

One edit rewrites the MLP output projection W of one layer with a rank-one update so that the
key k* (the projection's input at the subject's last token) maps to a value v* that makes the
model continue the prompt with `target_new`:

    W <- W + (v* - W k* - b) (C^-1 k*)^T / ((C^-1 k*)^T k*)          (W in (out, in) terms)

  * k*: mean of the key over the prompt and the prompt prefixed by short context texts
    sampled once from the model itself (seeded; cached per model identity);
  * v*: the projection's original output at the subject's last token plus a delta optimised
    with Adam so that target_new is likely after every (context-prefixed) prompt, with a KL
    term on the next-token distribution after "{subject} is a", a weight decay on the delta
    and a clamp of its norm;
  * C: the uncentred second moment E[k k^T] of keys at that layer over text (see
    editors/key_stats.py); identity when `mom2_adjustment` is off.

`prepare(lm, ctx)` loads or computes the context texts and C^-1 once per run.  `apply` works
without it (it then computes both in memory, uncached).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from bench.errors import BenchError
from bench.models import find_layout, output_logits, text_config, weight_out_in
from editors.base import EditContext, EditHandle, Editor, param_name
from editors.key_stats import inverse_mom2, layer_stats

CONTEXT_STARTERS = ("The", "Therefore", "Because", "I", "You")
ESSENCE_TEMPLATE = "{} is a"

# Default edited layer as a fraction of depth, chosen by the layer sweep on SmolLM2-135M
# (30 layers; docs/rome.md): round(0.07 * 30) = 2.
DEFAULT_LAYER_FRACTION = 0.07


@dataclass
class RomeHparams:
    """Hyperparameters of ROME.

    layer: index of the block whose MLP output projection is edited.
    v_num_grad_steps: maximum Adam steps when optimising the value delta.
    v_lr: Adam learning rate for the delta.
    v_loss_layer: block whose output (after the final norm) gives the logits of the value loss;
        -1 = the last block (the model's own output).
    kl_factor: weight of KL(edited || original) on the next-token distribution after the
        essence prompt "{subject} is a".
    v_weight_decay: weight of ||delta|| / ||v_orig||^2 in the loss (ROME's form).
    clamp_norm_factor: after each step the delta is scaled back to at most this multiple of
        the original value's norm.
    v_early_stop_nll: stop optimising once the target NLL term (mean over prompts of the mean
        per-token negative log-likelihood) falls below this. ROME stops on the total loss; the
        KL term here (read after "is a") rarely falls below 0.05, so that rule never fires.
    context_lengths / context_counts: the context prefixes: for each pair, `count` texts of
        `length` tokens sampled from the model (top-k 5, seed `seed`), each followed by ". ".
        The defaults (10 of length 5, 10 of length 10) give the prompt plus 20 context-prefixed
        prompts.
    mom2_adjustment: weight the update by C^-1 (the second moment of keys); off => C = I.
    mom2_n_samples: number of key vectors (tokens) used to estimate C.
    mom2_dtype: dtype C is accumulated in ("float32" or "float64").
    stats_corpus: text file (one document per line, or JSONL with "text") for C; None = text
        sampled from the model itself with seed `seed`.
    seed: seed for the context texts and the self-sampled statistics corpus.
    residual_key: which key the update maps exactly to v*: "prompt" (the bare prompt's key, as
        ROME's and EasyEdit's code do; the edit then holds exactly on the prompt itself) or
        "mean" (k*, the paper's equation). The direction is C^-1 k* either way.
    reuse_context_prefix: run the context texts through the model once per run and reuse their
        attention keys/values in every optimisation step of every edit (the same result up to
        float rounding, about twice as fast); cases whose tokenisation merges across the
        context/prompt boundary, and models where a check at preparation fails, use full
        sequences.
    """

    layer: int = 2
    v_num_grad_steps: int = 25
    v_lr: float = 0.5
    v_loss_layer: int = -1
    kl_factor: float = 0.0625
    v_weight_decay: float = 1e-3
    clamp_norm_factor: float = 4.0
    v_early_stop_nll: float = 0.05
    context_lengths: list[int] = field(default_factory=lambda: [5, 10])
    context_counts: list[int] = field(default_factory=lambda: [10, 10])
    mom2_adjustment: bool = True
    mom2_n_samples: int = 20000
    mom2_dtype: str = "float32"
    stats_corpus: str | None = None
    seed: int = 0
    reuse_context_prefix: bool = True
    residual_key: str = "prompt"


# --------------------------------------------------------------------------------------------
# Tokenisation helpers
# --------------------------------------------------------------------------------------------


def find_subject(prompt: str, subject: str) -> tuple[int, int]:
    """Character span of `subject` in `prompt` (exact match first, then case-insensitive)."""
    if subject:
        start = prompt.find(subject)
        if start < 0:
            start = prompt.lower().find(subject.lower())
        if start >= 0:
            return start, start + len(subject)
    raise BenchError(f"subject '{subject}' not found in prompt")


def _encode(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]] | None]:
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
        ids, offsets = _encode(tokenizer, text)
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
    ids, offsets = _encode(tokenizer, full)
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


# --------------------------------------------------------------------------------------------
# Context templates
# --------------------------------------------------------------------------------------------

_CONTEXT_MEMO: dict[str, list[str]] = {}


@torch.no_grad()
def generate_context_templates(model: nn.Module, tokenizer, lengths: list[int],
                               counts: list[int], seed: int) -> list[str]:
    """["{}"] + for each (length, count): `count` texts of about `length` tokens sampled from
    the model (top-k 5) after the openers in CONTEXT_STARTERS, each as "<text>. {}"."""
    if len(lengths) != len(counts):
        raise BenchError("context_lengths and context_counts must have the same length")
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    templates = ["{}"]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for length, count in zip(lengths, counts):
            k = len(CONTEXT_STARTERS)
            per = [count // k + (1 if i < count % k else 0) for i in range(k)]
            for starter, n in zip(CONTEXT_STARTERS, per):
                if n <= 0:
                    continue
                ids = tokenizer(starter, return_tensors="pt").input_ids.to(device).repeat(n, 1)
                new = max(1, length - ids.shape[1])
                out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                     top_k=5, top_p=1.0, temperature=1.0, max_new_tokens=new,
                                     min_new_tokens=new, pad_token_id=pad)
                for row in out:
                    text = tokenizer.decode(row, skip_special_tokens=True)
                    text = text.replace("{", " ").replace("}", " ").strip()
                    templates.append(text + ". {}")
    return templates


def context_templates(model, tokenizer, identity: str | None, hp: RomeHparams,
                      cache_dir: Path | None) -> list[str]:
    """Context templates, memoised per model identity and cached as JSON under cache_dir."""
    spec = json.dumps({"id": identity, "lengths": list(hp.context_lengths),
                       "counts": list(hp.context_counts), "seed": hp.seed}, sort_keys=True)
    key = hashlib.sha256(spec.encode()).hexdigest()[:16]
    path = Path(cache_dir) / "rome" / f"contexts-{key}.json" if cache_dir and identity else None
    if identity is not None and key in _CONTEXT_MEMO:
        templates = list(_CONTEXT_MEMO[key])
    elif path is not None and path.exists():
        templates = json.loads(path.read_text())["templates"]
    else:
        templates = generate_context_templates(model, tokenizer, list(hp.context_lengths),
                                               list(hp.context_counts), hp.seed)
    if path is not None and not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"spec": json.loads(spec), "templates": templates}, indent=1))
    if identity is not None:
        _CONTEXT_MEMO[key] = list(templates)
    return templates


# --------------------------------------------------------------------------------------------
# The rank-one update
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def rank_one_update(module: nn.Module, key: torch.Tensor, value: torch.Tensor,
                    c_inv: torch.Tensor | None, residual_key: torch.Tensor | None = None) -> None:
    """Change `module` (nn.Linear or GPT-2 Conv1D) in place so that module(k) == value for
    k = residual_key (default: key): W <- W + (value - module(k)) u^T / (u^T k), with the update
    direction u = C^-1 key (u = key when c_inv is None)."""
    w = weight_out_in(module)  # (out, in) view of the stored weight
    u = key.to(torch.float32)
    u = u if c_inv is None else c_inv.to(u.device, torch.float32) @ u
    k = (key if residual_key is None else residual_key).to(torch.float32)
    current = w.float() @ k
    bias = getattr(module, "bias", None)
    if bias is not None:
        current = current + bias.float()
    residual = value.to(torch.float32) - current
    upd = torch.outer(residual, u) / torch.dot(u, k)
    w.add_(upd.to(w.dtype))


# --------------------------------------------------------------------------------------------
# The editor
# --------------------------------------------------------------------------------------------


@dataclass
class _Prepared:
    model_id: int
    layout: object
    templates: list[str]
    c_inv: torch.Tensor | None
    layer: int
    prefix: "_PrefixCache | None" = None


@dataclass
class _PrefixCache:
    """Attention keys/values of the context texts: one row per template plus one (empty) row
    for the essence prompt, right-padded to `width`."""

    ids: list[list[int]]  # real prefix token ids per row ([] for the bare prompt and essence)
    width: int
    cache: object  # a transformers Cache (supports crop)
    mask: torch.Tensor  # (rows, width): 1 at real prefix tokens
    versions: dict = field(default_factory=dict)  # parameter name -> tensor version when built
    watched: dict = field(default_factory=dict)  # copy of the weight ROME edits, when built

    def snapshot(self, model, watch: str) -> None:
        params = dict(model.named_parameters())
        self.versions = {n: p._version for n, p in params.items()}
        self.watched = {watch: params[watch].detach().clone()}

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


@dataclass
class _Seq:
    ids: list[int]
    lookup: int  # subject's last token
    tgt_start: int = 0  # first target token (rewriting prompts)
    tgt_len: int = 0
    kl_pos: int = -1  # essence prompt: position whose next-token distribution is kept
    labels: list[int] = field(default_factory=list)  # target token ids
    prefix_len: int | None = 0  # leading tokens that are the context text (None: unknown)


class Rome(Editor):
    name = "rome"
    Hparams = RomeHparams

    def __init__(self, hparams=None):
        super().__init__(hparams)
        self._prepared: _Prepared | None = None
        self.last_timings: dict[str, float] = {}
        self.last_info: dict = {}
        self.last_key: torch.Tensor | None = None  # k* and v* of the latest edit
        self.last_value: torch.Tensor | None = None
        self.last_residual_key: torch.Tensor | None = None
        self._tokenizer = None

    @classmethod
    def default_hparams(cls, config) -> RomeHparams:
        n_layers = text_config(config).num_hidden_layers
        layer = min(n_layers - 1, max(1, round(DEFAULT_LAYER_FRACTION * n_layers)))
        return RomeHparams(layer=layer, v_loss_layer=n_layers - 1)

    # ---------------------------------------------------------------- preparation

    def prepare(self, lm, ctx: EditContext) -> None:
        self._prepared = self._prepare(lm.model, lm.tokenizer, lm.layout, lm.identity,
                                       ctx.cache_dir, ctx.log, ctx.notes)

    def _prepare(self, model, tokenizer, layout, identity, cache_dir, log, notes) -> _Prepared:
        hp = self.hparams
        layout = layout or find_layout(model)
        layer = hp.layer if hp.layer >= 0 else layout.num_layers + hp.layer
        if not 0 <= layer < layout.num_layers:
            raise BenchError(f"rome: layer {hp.layer} out of range for a {layout.num_layers}-layer model")
        if hp.residual_key not in ("prompt", "mean"):
            raise BenchError(f"rome: residual_key must be prompt or mean, got {hp.residual_key!r}")
        templates = context_templates(model, tokenizer, identity, hp, cache_dir)
        c_inv = None
        info = {"layer": layer, "context_templates": templates}
        if hp.mom2_adjustment:
            stats = layer_stats(model, tokenizer, layout, identity or "uncached", [layer],
                                corpus=hp.stats_corpus, n_samples=hp.mom2_n_samples,
                                dtype_name=hp.mom2_dtype, seed=hp.seed,
                                cache_dir=cache_dir if identity else None, log=log)[layer]
            c_inv = inverse_mom2(stats.mom2).to(next(model.parameters()).device)
            info.update(stats_tokens=stats.n_tokens, stats_corpus=hp.stats_corpus or
                        f"sampled from the model (seed {hp.seed})",
                        stats_cache=str(stats.path) if stats.path else None,
                        stats_loaded_from_cache=stats.loaded)
        prefix = None
        if hp.reuse_context_prefix:
            prefix = build_prefix_cache(model, tokenizer, layout, templates)
            if prefix is None:
                log("rome: context-prefix reuse unavailable for this model; using full sequences")
            else:
                prefix.snapshot(model, param_name(model, layout.layers[layer].mlp_out))
        info["context_prefix_reused"] = prefix is not None
        if notes is not None:
            notes["rome"] = info
        return _Prepared(id(model), layout, templates, c_inv, layer, prefix)

    def _state(self, model, tokenizer) -> _Prepared:
        if self._prepared is None or self._prepared.model_id != id(model):
            # Not prepared for this model: compute contexts and statistics in memory, uncached.
            self._prepared = self._prepare(model, tokenizer, None, None, None, lambda s: None, None)
        return self._prepared

    # ---------------------------------------------------------------- one edit

    def apply(self, model: nn.Module, tokenizer, case) -> EditHandle:
        st = self._state(model, tokenizer)
        self._tokenizer = tokenizer
        module = st.layout.layers[st.layer].mlp_out
        t0 = time.perf_counter()
        rewrite, essence = self.build_sequences(tokenizer, case, st.templates)
        keys = self.compute_keys(model, st, rewrite, essence)
        key = keys.mean(0)  # k*: the update direction is C^-1 k*
        t1 = time.perf_counter()
        value = self.compute_value(model, st, rewrite, essence)
        t2 = time.perf_counter()
        handle = EditHandle(model, [param_name(model, module)])
        residual_key = keys[0] if self.hparams.residual_key == "prompt" else key
        rank_one_update(module, key, value, st.c_inv, residual_key)
        t3 = time.perf_counter()
        self.last_timings = {"key_s": t1 - t0, "value_s": t2 - t1, "update_s": t3 - t2}
        self.last_key, self.last_value = key.detach(), value.detach()
        self.last_residual_key = residual_key.detach()  # the key now mapped exactly to v*
        return handle

    def build_sequences(self, tokenizer, case, templates) -> tuple[list[_Seq], _Seq]:
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
            rewrite.append(_Seq(ids[: t_start + t_len - 1], lookup, t_start, t_len,
                                labels=ids[t_start: t_start + t_len],
                                prefix_len=_prefix_tokens(prefix, ids, offsets)))
        e_text = ESSENCE_TEMPLATE.format(case.subject)
        e_ids, e_off = _encode(tokenizer, e_text)
        essence = _Seq(e_ids, last_token_in_span(tokenizer, e_text, 0, len(case.subject),
                                                 e_ids, e_off), kl_pos=len(e_ids) - 1)
        return rewrite, essence

    def _batch(self, model, st: _Prepared, seqs: list[_Seq], cut: list[int] | None = None):
        """Padded inputs for `seqs` (rows: rewriting prompts then the essence prompt), each cut
        to its first `cut[b]` tokens. With a valid prefix cache only the tokens after the
        context text run; returns (ids, mask, skip, decoder kwargs, prefix or None)."""
        device = _device(model)
        if st.prefix is not None and not st.prefix.valid_for(model):
            # The model was changed (e.g. sequential edits without restore): recompute.
            st.prefix = build_prefix_cache(model, self._tokenizer, st.layout, st.templates)
            if st.prefix is not None:
                st.prefix.snapshot(model, param_name(model, st.layout.layers[st.layer].mlp_out))
        prefix = st.prefix
        if prefix is not None and (len(seqs) != len(prefix.ids) or any(
                s.prefix_len is None or s.ids[: s.prefix_len] != p
                for s, p in zip(seqs, prefix.ids))):
            prefix = None  # this case's tokenisation does not reuse the cached context tokens
        skip = [len(p) for p in prefix.ids] if prefix is not None else [0] * len(seqs)
        cut = cut or [len(s.ids) for s in seqs]
        ids, mask = _pad([s.ids[k:c] for s, k, c in zip(seqs, skip, cut)], 0, device)
        extra = {"use_cache": False}
        if prefix is not None:
            extra = {"past_key_values": prefix.cache, "use_cache": True,
                     "position_ids": torch.arange(ids.shape[1], device=device)[None]
                     + torch.tensor(skip, device=device)[:, None]}
            mask = torch.cat([prefix.mask.to(device), mask], dim=1)
        return ids, mask, skip, extra, prefix

    def _forward(self, st: _Prepared, ids, mask, extra, keep: int | None = None):
        """One decoder pass; with a cache in `extra`, its entries beyond the first `keep`
        positions (this call's) are dropped afterwards."""
        try:
            return st.layout.decoder(input_ids=ids, attention_mask=mask, **extra)
        finally:
            if keep is not None and extra.get("past_key_values") is not None:
                _crop(extra["past_key_values"], keep)

    @torch.no_grad()
    def _cache_fixed_tokens(self, st: _Prepared, seqs: list[_Seq], skip: list[int], prefix, device):
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
            head_ids, head_mask = _pad(heads, 0, device)
            pos = torch.arange(head_ids.shape[1], device=device)[None] + torch.tensor(skip, device=device)[:, None]
            # Padding is unmasked in this pass (so no query attends to nothing) and masked later.
            try:
                out = st.layout.decoder(input_ids=head_ids, position_ids=pos, past_key_values=cache,
                                        attention_mask=torch.cat([past_mask, torch.ones_like(head_mask)], 1),
                                        use_cache=True)
            except BaseException:
                if prefix is not None:
                    _crop(prefix.cache, prefix.width)  # a failed case must not leave entries behind
                raise
            cache = out.past_key_values
        tails = [s.ids[s.lookup:] for s in seqs]
        ids, tail_mask = _pad(tails, 0, device)
        new_skip = [s.lookup for s in seqs]
        extra = {"use_cache": cache is not None, "past_key_values": cache,
                 "position_ids": torch.arange(ids.shape[1], device=device)[None]
                 + torch.tensor(new_skip, device=device)[:, None]}
        keep = past_mask.shape[1] + head_mask.shape[1]
        return ids, torch.cat([past_mask, head_mask, tail_mask], 1), new_skip, extra, keep

    @torch.no_grad()
    def compute_keys(self, model, st: _Prepared, rewrite: list[_Seq], essence: _Seq) -> torch.Tensor:
        """The projection's input at the subject's last token in each rewriting prompt (row 0:
        the bare prompt), each prompt cut just after the subject (later tokens cannot change it)."""
        seqs = rewrite + [essence]
        ids, mask, skip, extra, prefix = self._batch(model, st, seqs, [s.lookup + 1 for s in seqs])
        got = {}

        def hook(module, args):
            got["k"] = args[0]

        h = st.layout.layers[st.layer].mlp_out.register_forward_pre_hook(hook)
        try:
            self._forward(st, ids, mask, extra, prefix.width if prefix is not None else None)
        finally:
            h.remove()
        rows = torch.arange(len(rewrite), device=ids.device)
        cols = torch.tensor([s.lookup - k for s, k in zip(rewrite, skip)], device=ids.device)
        return got["k"][rows, cols].float()

    def compute_value(self, model, st: _Prepared, rewrite: list[_Seq], essence: _Seq) -> torch.Tensor:
        """v*: the original output at the subject's last token plus an optimised delta."""
        hp = self.hparams
        layout = st.layout
        device = _device(model)
        seqs = rewrite + [essence]
        # With the prefix cache, each row only runs its tokens after the context text.
        ids, mask, skip, extra, prefix = self._batch(model, st, seqs)
        keep = prefix.width if prefix is not None else None
        if hp.reuse_context_prefix:  # ... and, with this, only from the subject's last token on
            ids, mask, skip, extra, keep = self._cache_fixed_tokens(st, seqs, skip, prefix, device)
        batch, width = ids.shape

        # Where the delta goes: each sequence's subject-last token.
        edit_mask = torch.zeros(batch, width, 1, device=device)
        for b, (s, k) in enumerate(zip(seqs, skip)):
            edit_mask[b, s.lookup - k] = 1.0
        # Positions whose logits a loss reads: target predictions, then the essence position.
        rows, cols, labels, owner = [], [], [], []
        for b, s in enumerate(rewrite):
            for j in range(s.tgt_len):
                rows.append(b)
                cols.append(s.tgt_start + j - 1 - skip[b])  # the position predicting token j
                labels.append(s.labels[j])
                owner.append(b)
        rows.append(len(seqs) - 1)
        cols.append(essence.kl_pos - skip[-1])
        rows_t = torch.tensor(rows, device=device)
        cols_t = torch.tensor(cols, device=device)
        labels_t = torch.tensor(labels, device=device)
        owner_t = torch.tensor(owner, device=device)
        n_rewrite = len(rewrite)
        weights = torch.tensor([1.0 / rewrite[o].tgt_len for o in owner], device=device)

        loss_layer = hp.v_loss_layer if hp.v_loss_layer >= 0 else layout.num_layers + hp.v_loss_layer
        loss_layer = max(loss_layer, st.layer)
        use_final = loss_layer >= layout.num_layers - 1

        delta = torch.zeros(layout.hidden_size, device=device, requires_grad=True)
        state = {"init": None}

        def edit_hook(module, args, out):
            if state["init"] is None:
                state["init"] = out[0, seqs[0].lookup - skip[0]].detach().float().clone()
            return out + edit_mask.to(out.dtype) * delta.to(out.dtype)

        captured = {}

        def loss_layer_hook(module, args, out):
            captured["h"] = out[0] if isinstance(out, tuple) else out

        opt = torch.optim.Adam([delta], lr=hp.v_lr)
        handles = [layout.layers[st.layer].mlp_out.register_forward_hook(edit_hook)]
        if not use_final:
            handles.append(layout.blocks[loss_layer].register_forward_hook(loss_layer_hook))
        kl_init = None
        steps = 0
        info = {}
        try:
            with torch.enable_grad():
                for step in range(hp.v_num_grad_steps):
                    opt.zero_grad()
                    out = self._forward(st, ids, mask, extra, keep)
                    if use_final:
                        hidden = out.last_hidden_state
                    else:
                        hidden = captured["h"]
                        if layout.final_norm is not None:
                            hidden = layout.final_norm(hidden)
                    logp = torch.log_softmax(output_logits(model, hidden[rows_t, cols_t]).float(), -1)
                    tok_lp = logp[:-1].gather(1, labels_t[:, None]).squeeze(1)
                    per_prompt = torch.zeros(n_rewrite, device=device).index_add(
                        0, owner_t, -tok_lp * weights)
                    nll = per_prompt.mean()
                    kl_lp = logp[-1:]
                    if kl_init is None:
                        kl_init = kl_lp.detach().clone()
                    kl = hp.kl_factor * F.kl_div(kl_init, kl_lp, log_target=True,
                                                 reduction="batchmean")
                    wd = hp.v_weight_decay * delta.norm() / state["init"].norm() ** 2
                    loss = nll + kl + wd
                    info = {"steps": step, "loss": loss.item(), "nll": nll.item(),
                            "kl": kl.item(), "target_prob": torch.exp(-per_prompt).mean().item()}
                    if nll.item() < hp.v_early_stop_nll:
                        break
                    loss.backward()
                    opt.step()
                    steps = step + 1
                    max_norm = hp.clamp_norm_factor * state["init"].norm()
                    with torch.no_grad():
                        norm = delta.norm()
                        if norm > max_norm:
                            delta.mul_(max_norm / norm)
        finally:
            for h in handles:
                h.remove()
            if prefix is not None:
                _crop(prefix.cache, prefix.width)  # leave the shared context cache as it was
        info["steps"] = steps
        info["prefix_reused"] = prefix is not None
        info["delta_norm"] = delta.norm().item()
        info["value_norm"] = state["init"].norm().item()
        self.last_info = info
        return state["init"] + delta.detach()


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _pad(seqs: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


def _prefix_tokens(prefix: str, ids: list[int], offsets) -> int | None:
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


@torch.no_grad()
def build_prefix_cache(model, tokenizer, layout, templates: list[str]) -> _PrefixCache | None:
    """Keys/values of the context texts for the rows [templates..., essence]; None when the model
    cannot reuse them exactly (checked on a probe suffix against full sequences)."""
    device = _device(model)
    prefixes = [t[: t.index("{}")].rstrip() for t in templates] + [""]
    ids = []
    for p in prefixes:
        if not p:
            ids.append([])
            continue
        got, offsets = _encode(tokenizer, p + " x")
        n = _prefix_tokens(p, got, offsets)
        if n is None:
            return None
        ids.append(got[:n])
    width = max(len(i) for i in ids)
    if width == 0:
        return None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    # Rows without a context run pad tokens (unmasked here so no query attends to nothing); the
    # edit steps mask them out.
    fill = [i if i else [pad] * width for i in ids]
    run_ids, run_mask = _pad(fill, pad, device)
    mask = torch.zeros(len(ids), width, dtype=torch.long)
    for r, i in enumerate(ids):
        mask[r, : len(i)] = 1
    try:
        out = layout.decoder(input_ids=run_ids, attention_mask=run_mask, use_cache=True)
        cache = out.past_key_values
        if cache is None or not hasattr(cache, "crop"):
            return None
        prefix = _PrefixCache(ids=ids, width=width, cache=cache, mask=mask.to(device))
        # Check: a probe suffix through the cache == the same tokens as full sequences.
        probe = list(tokenizer(" is a check", add_special_tokens=False)["input_ids"])
        suf, suf_mask = _pad([probe] * len(ids), pad, device)
        pos = torch.arange(suf.shape[1], device=device)[None] + \
            torch.tensor([len(i) for i in ids], device=device)[:, None]
        try:
            cached = layout.decoder(input_ids=suf, attention_mask=torch.cat([prefix.mask, suf_mask], 1),
                                    position_ids=pos, past_key_values=cache,
                                    use_cache=True).last_hidden_state
        finally:
            _crop(cache, width)
        full_ids, full_mask = _pad([i + probe for i in ids], pad, device)
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


def _crop(cache, width: int) -> None:
    """Drop cache entries beyond the first `width` positions (a negative count works on both
    the older and the newer transformers Cache.crop)."""
    extra = cache.get_seq_length() - width
    if extra > 0:
        cache.crop(-extra)
    # What remains is a slice of this step's concatenation: cut it from the autograd graph.
    for layer in getattr(cache, "layers", []):
        for attr in ("keys", "values"):
            t = getattr(layer, attr, None)
            if isinstance(t, torch.Tensor) and t.requires_grad:
                setattr(layer, attr, t.detach())
    for attr in ("key_cache", "value_cache"):  # older transformers
        tensors = getattr(cache, attr, None)
        if isinstance(tensors, list):
            tensors[:] = [t.detach() if isinstance(t, torch.Tensor) else t for t in tensors]
