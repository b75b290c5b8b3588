"""`rome`: Rank-One Model Editing (Meng et al., 2022, "Locating and Editing Factual
Associations in GPT").

One edit rewrites the MLP output projection W of one layer with a rank-one update so that the
key k* (the projection's input at the subject's last token) maps to a value v* that makes the
model continue the prompt with `target_new`:

    W <- W + (v* - W k* - b) (C^-1 k*)^T / ((C^-1 k*)^T k*)          (W in (out, in) terms)

One module per part of the method, as ROME's own code keeps them apart:

  * contexts.py:     the context texts sampled once from the model itself (seeded, cached);
  * keys.py:         k*, the mean key over the prompt and its context-prefixed forms;
  * values.py:       v*, the original output plus a delta optimised with Adam so that target_new
                     follows every prompt, with a KL term on "{subject} is a" (read at its
                     end or at the subject, `kl_position`), weight decay and a norm clamp;
  * layer_stats.py:  C, the uncentred second moment E[k k^T] of keys at the layer over text
                     (identity when `mom2_adjustment` is off), cached;
  * update.py:       the rank-one write;
  * inputs.py, tokens.py, prefix_cache.py: the batches, token positions and the reuse of the
                     context texts' attention keys/values;
  * editor.py:       the editor (`prepare` computes contexts and C^-1 once per run; `compute`
                     gives k*, v* without touching the model; `apply` writes them).
"""

from editors.rome.editor import Rome, RomeEdit
from editors.rome.hparams import RomeHparams
from editors.rome.update import rank_one_update

__all__ = ["Rome", "RomeEdit", "RomeHparams", "rank_one_update"]
