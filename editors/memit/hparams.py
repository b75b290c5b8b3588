"""Hyperparameters of MEMIT and AlphaEdit: one dataclass each, sharing the fields of the value
(z) optimisation, the context prefixes and the key statistics; per-model defaults from the
model's shape (`default_for`)."""

from __future__ import annotations

from dataclasses import dataclass

from bench.core.hparams import param
from bench.core.layout import text_config
from editors.rome.hparams import KL_POSITIONS, STOP_RULES

# The edited range, chosen by the sweeps on SmolLM2-135M (30 layers, docs/memit.md): five
# consecutive layers from a sixth of the depth (5..9). MEMIT's and AlphaEdit's published ranges
# are alike: five layers from 3 to 5 on models of 28-48 layers.
DEFAULT_FIRST_FRACTION = 1 / 6
DEFAULT_SPAN = 5
# lambda (mom2_update_weight) per key dimension: lambda = the MLP's intermediate size. The sweep
# on SmolLM2-135M (intermediate 1536) found 500 and 1500 equal and 5000 and 15000 too weak; the
# published values (15000 for GPT-J and Llama-3-8B, intermediate 16384 and 14336) are the same
# ratio.
LAMBDA_PER_KEY_DIM = 1.0

_SHARED_DOC = """
    layers: blocks whose MLP output projections are edited, strictly increasing (at least one);
        the last one, L, is where the target hidden states z are optimised.
    v_num_grad_steps: iterations of each case's z optimisation (see v_stop_rule).
    v_lr: Adam learning rate of each case's delta.
    v_loss_layer: block whose output (after the final norm) gives the logits of the z loss;
        -1 = the last block (the model's own output); never below L.
    kl_factor: weight of KL(edited || original) on a next-token distribution of the essence
        prompt "{subject} is a" (the delta is added at its subject token too).
    kl_position: where that distribution is read, as for ROME: "after_prompt" (its last token;
        the default) or "subject_last" (the subject's last token, as MEMIT's, AlphaEdit's and
        EasyEdit's code do).
    v_weight_decay: weight of ||delta|| / ||h||^2 in the loss, h the original hidden state at
        L (MEMIT's form).
    clamp_norm_factor: after each step the delta is scaled back to at most this multiple of
        ||h||.
    v_stop_rule, v_stop_threshold: when a case's optimisation stops, as for ROME: "loss" stops
        once the case's total loss is below the threshold (the last iteration only evaluates);
        "nll" once its target NLL alone is. Each case stops on its own; a stopped case gets no
        more gradient and its rows leave the batch.
    context_lengths / context_counts: the context prefixes (editors/rome/contexts.py): for each
        pair, `count` texts of `length` tokens sampled from the model; MEMIT's code uses five of
        ten tokens. The keys are averaged per group (the bare prompt, then each length), then
        over groups, as MEMIT's code averages per context type.
    mom2_n_samples, mom2_dtype, stats_corpus, seed: the key statistics C of every edited layer
        and the context texts, exactly as ROME's (editors/rome/layer_stats.py; the same cache
        files, so ROME, MEMIT and AlphaEdit compute each layer's statistics once).
    reuse_context_prefix: the fast path of the z optimisation: the context texts' attention
        keys/values are computed once per run, the tokens before each subject once per call,
        the blocks up to L once per call, so every step runs only blocks above L on the tokens
        from the subject on (same z to float rounding); off = whole sequences through the whole
        model every step (the plain path, for tests and benchmarks).
    parallel_edits: single mode: how many cases' z are optimised together (each case's edit is
        still computed, applied, evaluated and restored alone).
"""


@dataclass
class BatchEditHparams:
    """The fields MEMIT and AlphaEdit share (see MemitHparams / AlphaEditHparams)."""

    layers: list[int] = param([5, 6, 7, 8, 9], layer="index")
    v_num_grad_steps: int = param(25, ge=1, le=10_000)
    v_lr: float = param(0.5, gt=0)
    v_loss_layer: int = param(-1, layer="signed")
    kl_factor: float = param(0.0625, ge=0)
    kl_position: str = param("after_prompt", choices=KL_POSITIONS)
    v_weight_decay: float = param(0.5, ge=0)
    clamp_norm_factor: float = param(0.75, gt=0)
    v_stop_rule: str = param("loss", choices=STOP_RULES)
    v_stop_threshold: float = param(0.05, ge=0)
    context_lengths: list[int] = param([10], ge=1, le=1024)
    context_counts: list[int] = param([5], ge=0, le=1000)
    mom2_n_samples: int = param(20000, ge=1, le=10_000_000)
    mom2_dtype: str = param("float32", choices=("float32", "float64", "bfloat16", "float16"))
    stats_corpus: str | None = None
    seed: int = 0
    reuse_context_prefix: bool = True
    parallel_edits: int = param(8, ge=1, le=1024)


@dataclass
class MemitHparams(BatchEditHparams):
    mom2_update_weight: float = param(1536.0, gt=0)


MemitHparams.__doc__ = ("Hyperparameters of MEMIT.\n" + _SHARED_DOC + """
    mom2_update_weight: lambda in update = R K^T (lambda C + K K^T)^-1: how strongly the keys of
        ordinary text (C, a second moment, i.e. per key) are preserved against the edited keys;
        default: the MLP's intermediate size (the key dimension).
""")


@dataclass
class AlphaEditHparams(BatchEditHparams):
    nullspace_threshold: float = param(2e-2, ge=0)
    l2: float = param(10.0, gt=0)


AlphaEditHparams.__doc__ = ("Hyperparameters of AlphaEdit.\n" + _SHARED_DOC + """
    nullspace_threshold: eigenvalues of C below it span the null space that the update is
        projected onto (P = U_small U_small^T); 0 leaves no null space, so no update.
    l2: the ridge term l2 * I in update = R K^T P (K K^T P + K_p K_p^T P + l2 I)^-1 (AlphaEdit's
        "L2").
""")


def default_layers(n_layers: int) -> list[int]:
    """DEFAULT_SPAN consecutive layers from DEFAULT_FIRST_FRACTION of the depth (fewer on a
    shallow model)."""
    first = min(n_layers - 1, max(1, round(DEFAULT_FIRST_FRACTION * n_layers)))
    return list(range(first, min(n_layers, first + DEFAULT_SPAN)))


def default_for(cls: type, config):
    tc = text_config(config)
    n_layers = tc.num_hidden_layers
    hp = cls(layers=default_layers(n_layers), v_loss_layer=n_layers - 1)
    if hasattr(hp, "mom2_update_weight"):
        key_dim = getattr(tc, "intermediate_size", None) or getattr(tc, "n_inner", None) or 4 * tc.hidden_size
        hp.mom2_update_weight = LAMBDA_PER_KEY_DIM * key_dim
    return hp
