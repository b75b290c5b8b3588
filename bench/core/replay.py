"""Replaying recorded block outputs: what an edit cannot change need not be computed again.

The blocks below the lowest changed one compute, after an edit, exactly what they computed
before it; `BlockOutputs` records every block's output during the pre-edit evaluation and replays
them after the edit in place of those blocks (the post-edit evaluation runs the same batches in
the same order). `forwards_replaced` is the one mechanism that swaps a module's forward for a
stub and back; editors/frozen_prefix.py uses it too. Both rely on a block's output depending only
on its inputs and weights (no dropout: models are in eval mode).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch

from bench.core.layout import ModelLayout


def detached(value):
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, tuple):
        return tuple(detached(v) for v in value)
    return value


@contextmanager
def forwards_replaced(stubs: list[tuple[torch.nn.Module, Callable]]):
    """Each module's forward replaced by its stub (an instance attribute), back to the class's
    forward on exit."""
    patched = []
    try:
        for module, stub in stubs:
            module.forward = stub
            patched.append(module)
        yield
    finally:
        for module in patched:
            del module.forward


def first_changed_block(layout: ModelLayout, param_names: list[str]) -> int | None:
    """The lowest block holding one of `param_names` (the number of blocks when there are
    none); None when one lies outside the blocks (embeddings: nothing can be reused)."""
    prefix = layout.blocks_name + "."
    lowest = layout.num_layers
    for name in param_names:
        if not name.startswith(prefix):
            return None
        lowest = min(lowest, int(name[len(prefix):].split(".", 1)[0]))
    return lowest


class BlockOutputs:
    """Every block's output over a series of forward passes, recorded before an edit and replayed
    after it in place of the blocks the edit left unchanged, for the same passes in the same order
    (the post-edit evaluation runs exactly the batches of the pre-edit one). The blocks from the
    first changed one up then run on exactly the inputs they would get, so results are identical."""

    def __init__(self, layout: ModelLayout):
        self.layout = layout
        self.passes: list[list] = []

    @contextmanager
    def record(self):
        blocks = self.layout.blocks
        self.passes = []

        def start(_module, _args):
            self.passes.append([None] * len(blocks))

        def keeper(i):
            def keep(_module, _args, output):
                self.passes[-1][i] = detached(output)
            return keep

        hooks = [blocks[0].register_forward_pre_hook(start)]
        hooks += [block.register_forward_hook(keeper(i)) for i, block in enumerate(blocks)]
        try:
            yield self
        finally:
            for h in hooks:
                h.remove()

    @contextmanager
    def replay(self, first_changed: int | None):
        """Blocks below `first_changed` return their recorded outputs, pass by pass (None or 0:
        nothing is replaced)."""
        blocks = self.layout.blocks
        if not first_changed or not self.passes:
            yield
            return
        passes = iter(self.passes)
        current: dict[str, object] = {}

        def first_stub(hidden_states=None, *args, **kwargs):
            recorded = next(passes, None)
            if recorded is None:
                raise RuntimeError("BlockOutputs.replay: more forward passes than were recorded")
            out = recorded[first_changed - 1]
            ref = out[0] if isinstance(out, tuple) else out
            if hidden_states is not None and tuple(hidden_states.shape) != tuple(ref.shape):
                raise RuntimeError("BlockOutputs.replay: a pass differs from the recorded one")
            current["out"] = out
            return out

        # Only the last stub's output reaches the first changed block.
        stubs = [(blocks[i], lambda *a, **k: current["out"]) for i in range(1, first_changed)]
        with forwards_replaced([(blocks[0], first_stub)] + stubs):
            yield
