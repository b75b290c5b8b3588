"""`frozen_prefix`: while an editor optimises a change at one MLP output projection, the blocks
below it are computed once.

While only `W` = the MLP output projection of block L changes, nothing upstream of it changes:
the outputs of blocks 0..L-1 and the input `x` of that projection are the same at every
optimisation step. `frozen_prefix` runs the model once, keeps those tensors, and then replaces
blocks 0..L-1 by stubs returning the kept output and block L's MLP by `W x_kept`, so each later
forward pass computes only block L's attention and blocks L+1.. (and backward never goes below L).

It works from the module structure alone (find_layout), for any architecture whose MLP returns
its output projection applied to `x` (Llama, Gemma, GPT-2 and GPT-NeoX in eval mode). The same
input ids must be fed while the stubs are in place (no dropout: models are in eval mode).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from bench.core.layout import ModelLayout
from bench.core.replay import detached, forwards_replaced


@contextmanager
def frozen_prefix(model, layout: ModelLayout, layer: int, **inputs):
    """Capture with one forward pass on `inputs`, then yield with the prefix stubbed out."""
    blocks, mlp_out, mlp = layout.blocks, layout.layers[layer].mlp_out, layout.layers[layer].mlp
    kept: dict[str, object] = {}

    def keep_block_output(_module, _args, output):
        kept["block"] = output

    def keep_mlp_input(_module, args):
        kept["x"] = args[0].detach()

    hooks = [mlp_out.register_forward_pre_hook(keep_mlp_input)]
    if layer > 0:
        hooks.append(blocks[layer - 1].register_forward_hook(keep_block_output))
    try:
        with torch.no_grad():
            model.base_model(**inputs)
    finally:
        for h in hooks:
            h.remove()

    block_out = detached(kept.get("block"))
    x = kept["x"]
    # Every block stub ignores its input; only the last one's output reaches block L.
    stubs = [(blocks[i], lambda *a, **k: block_out) for i in range(layer)]
    with forwards_replaced(stubs + [(mlp, lambda *a, **k: mlp_out(x))]):
        yield
