"""ROME's hyperparameters (one dataclass; per-model defaults from `default_for`)."""

from __future__ import annotations

from dataclasses import dataclass

from bench.core.hparams import param
from bench.core.layout import text_config

# Default edited layer as a fraction of depth, chosen by the layer sweep on SmolLM2-135M
# (30 layers; docs/rome.md): round(0.07 * 30) = 2.
DEFAULT_LAYER_FRACTION = 0.07
STOP_RULES = ("loss", "nll")
# Where the KL (essence-drift) term reads the next-token distribution of the essence prompt
# "{subject} is a" (editors/rome/inputs.py `kl_index`): "after_prompt", its last token (the
# distribution of the word after "is a"; this harness's default), or "subject_last", the subject's
# last token, where ROME's, MEMIT's, AlphaEdit's and EasyEdit's code read it (their
# find_fact_lookup_idx with fact_token "subject_last" applied to the KL prompt).
KL_POSITIONS = ("after_prompt", "subject_last")


@dataclass
class RomeHparams:
    """Hyperparameters of ROME.

    layer: index of the block whose MLP output projection is edited (negative: from the end).
    v_num_grad_steps: iterations of the value optimisation (see v_stop_rule).
    v_lr: Adam learning rate for the delta.
    v_loss_layer: block whose output (after the final norm) gives the logits of the value loss;
        -1 = the last block (the model's own output).
    kl_factor: weight of KL(edited || original) on a next-token distribution of the essence
        prompt "{subject} is a" (the delta is added at its subject token too).
    kl_position: where that distribution is read: "after_prompt" (its last token, "a"; the
        default) or "subject_last" (the subject's last token, as ROME's and EasyEdit's code do).
    v_weight_decay: weight of ||delta|| / ||v_orig||^2 in the loss (ROME's form).
    clamp_norm_factor: after each step the delta is scaled back to at most this multiple of
        the original value's norm.
    v_stop_rule, v_stop_threshold: when the value optimisation stops early.
        "loss" (the published rule, ROME's and EasyEdit's code): stop once the total loss
        (NLL + KL + weight decay) is below the threshold; the last of the v_num_grad_steps
        iterations only evaluates the loss, so at most v_num_grad_steps - 1 updates are made.
        "nll" (this harness's earlier rule): stop once the target NLL term alone is below the
        threshold; every iteration that does not stop updates. On small models the KL term
        rarely falls below 0.05, so "loss" usually runs every step and "nll" stops after 5-10.
    context_lengths / context_counts: the context prefixes: for each pair, `count` texts of
        `length` tokens sampled from the model (top-k 5, seed `seed`), each followed by ". ".
        The defaults (10 of length 5, 10 of length 10) give the prompt plus 20 context-prefixed
        prompts.
    mom2_adjustment: weight the update by C^-1 (the second moment of keys); off => C = I.
    mom2_n_samples: number of key vectors (tokens) used to estimate C.
    mom2_dtype: dtype C is accumulated in ("float32" or "float64").
    stats_corpus: text file for C (bench.core.io.read_corpus: JSONL with "text", or plain text
        paragraphs); None = text sampled from the model itself with seed `seed`.
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

    layer: int = param(2, layer="signed")
    v_num_grad_steps: int = param(25, ge=1, le=10_000)
    v_lr: float = param(0.5, gt=0)
    v_loss_layer: int = param(-1, layer="signed")
    kl_factor: float = param(0.0625, ge=0)
    kl_position: str = param("after_prompt", choices=KL_POSITIONS)
    v_weight_decay: float = param(1e-3, ge=0)
    clamp_norm_factor: float = param(4.0, gt=0)
    v_stop_rule: str = param("loss", choices=STOP_RULES)
    v_stop_threshold: float = param(0.05, ge=0)
    context_lengths: list[int] = param([5, 10], ge=1, le=1024)
    context_counts: list[int] = param([10, 10], ge=0, le=1000)
    mom2_adjustment: bool = True
    mom2_n_samples: int = param(20000, ge=1, le=10_000_000)
    mom2_dtype: str = param("float32", choices=("float32", "float64", "bfloat16", "float16"))
    stats_corpus: str | None = None
    seed: int = 0
    reuse_context_prefix: bool = True
    residual_key: str = param("prompt", choices=("prompt", "mean"))


def default_for(config) -> RomeHparams:
    n_layers = text_config(config).num_hidden_layers
    layer = min(n_layers - 1, max(1, round(DEFAULT_LAYER_FRACTION * n_layers)))
    return RomeHparams(layer=layer, v_loss_layer=n_layers - 1)
