"""`mend`: Model Editor Networks with Gradient Decomposition (Mitchell et al., 2022), and the
machinery InstructEdit shares with it, one module per part:

  * factors.py:    the edited weights and the rank-one factors of an edit's gradient;
  * networks.py:   the editor network (one per weight shape) and its learned step sizes;
  * trainer.py:    meta-training on a mixture of tasks (validation, early stopping, budget,
                   data-parallel across processes);
  * checkpoint.py: safetensors + JSON checkpoints and their cache key;
  * editor.py:     the `mend` editor (prepare: load the cached checkpoint or train; apply).
"""

from editors.mend.editor import Mend, MendHparams

__all__ = ["Mend", "MendHparams"]
