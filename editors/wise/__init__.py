"""`wise`: WISE (Wang et al., NeurIPS 2024, "WISE: Rethinking the Knowledge Memory for Lifelong
Model Editing of Large Language Models"), its merge form (WISE-Merge), after EasyEdit's
`easyeditor/models/wise`.

A side copy of one MLP output projection holds the edits; the base weights never change. Each
shard of edits trains under a random gradient mask; shards are closed every `save_freq` edits and
merged (TIES) every `merge_freq`; a router on the projection's input sends an input to the side
memory when its activation score passes a threshold learned from the edits, else to the main
memory. One module per part (docs/wise.md):

  * hparams.py:  the hyperparameters and their bounds;
  * masks.py:    knowledge sharding: each shard's random gradient mask;
  * merge.py:    TIES and the rest of EasyEdit's GTA merges;
  * memory.py:   the side memory (task vectors, shards, router statistics, undo records, state);
  * router.py:   the activation score and the routing hooks;
  * inputs.py:   one edit's training rows (context templates, irrelevant inputs);
  * train.py:    the loss (target NLL + the activation-margin routing loss) and masked SGD;
  * editor.py:   the editor (install, edit, sequential state, reattach).
"""

from editors.wise.editor import Wise
from editors.wise.hparams import WiseHparams

__all__ = ["Wise", "WiseHparams"]
