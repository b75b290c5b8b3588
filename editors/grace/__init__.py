"""`grace`: General Retrieval Adaptors for Continual Editing (Hartvigsen et al., NeurIPS 2023,
"Aging with GRACE: Lifelong Model Editing with Discrete Key-Value Adaptors").

A codebook adaptor wraps one MLP output projection. Each entry holds a key (the projection's
input at an edit prompt's last token), a value (trained so that the model answers the edit's
target) and a deferral radius; at every position whose input lies within the radius of its
nearest key, the projection's output is replaced by that key's value, and elsewhere the output
is the projection's own, bit for bit. The base weights never change. docs/grace.md.

  * hparams.py:   the hyperparameters (the reference's defaults) and the default layer;
  * codebook.py:  keys, values, radii, answers; the rules (add, expand, split) and their undo;
  * adaptor.py:   the module wrapping the projection (the lookup at every position);
  * editor.py:    the editor: install, one edit (key, rule, value training), sequential state.
"""

from editors.grace.adaptor import GraceAdaptor
from editors.grace.codebook import ACTIONS, Change, Codebook
from editors.grace.editor import Grace
from editors.grace.hparams import GraceHparams, default_layer

__all__ = ["ACTIONS", "Change", "Codebook", "Grace", "GraceAdaptor", "GraceHparams", "default_layer"]
