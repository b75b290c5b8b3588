"""`memit` and `alphaedit`: editors that write many facts at once into a range of MLP output
projections.

MEMIT (Meng et al., ICLR 2023, "Mass-Editing Memory in a Transformer"): for each case, a target
hidden state z at the output of the last edited block L (the residual stream at the subject's
last token), found by optimisation as ROME finds its value one layer lower; then, for each edited
layer l in turn, the update

    D_l = R K^T (lambda C + K K^T)^-1          (K: the cases' keys at l, one per column;
                                                R: (z - current hidden state at L) / layers left)

is added to the layer's MLP output projection. AlphaEdit (Fang et al., ICLR 2025) projects the
update onto the null space of the preserved keys' second moment C:

    D_l = R K^T P (K K^T P + K_p K_p^T P + l2 I)^-1   (P: projector onto C's small eigenvectors;
                                                       K_p: keys of earlier sequential edits)

One module per part, as in editors/rome/ (whose contexts, sequences, prefix cache and key
statistics are reused as they are):

  * hparams.py:    the two hyperparameter dataclasses and their per-model defaults;
  * rows.py:       the rows several cases put through the model together, cache helpers;
  * values.py:     z, optimised for all cases of a call together (one delta, Adam state and
                   stopping rule per case; only the blocks above L run per step);
  * keys.py:       the keys at a layer and the current hidden states at L;
  * solve.py:      the two updates (float64, through the push-through identity);
  * nullspace.py:  AlphaEdit's projectors, cached on disk next to the statistics;
  * editor.py:     the `memit` editor (prepare, apply / apply_many for single mode,
                   apply_batch for sequential mode);
  * alphaedit.py:  the `alphaedit` editor, with its sequential state K_p K_p^T.
"""

from editors.memit.alphaedit import AlphaEdit
from editors.memit.editor import Memit
from editors.memit.hparams import AlphaEditHparams, MemitHparams

__all__ = ["Memit", "AlphaEdit", "MemitHparams", "AlphaEditHparams"]
