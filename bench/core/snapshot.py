"""Exact restore of a model's module tree, and a fingerprint that shows whether it was exact.

An edit that adds or replaces modules, registers forward hooks or sets attributes (adapters,
codebooks, side memories) is undone by `TreeSnapshot`: taken before the change, it holds every
module's attribute dictionary (submodules, parameters, buffers, hook tables, plain attributes)
and each parameter's `requires_grad`; `restore()` puts each dictionary back as it was, in
place. Parameter *values* written in place are not its business (the weight side of an edit
handle saves those).

`model_fingerprint` hashes what a user means by "the same model": the state_dict bit for bit,
the module tree (qualified names and classes), every module's hooks and attribute names, and
the parameters' `requires_grad`.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn


class TreeSnapshot:
    """Every module's attributes as they are now; `restore()` returns the tree to this state."""

    def __init__(self, model: nn.Module):
        self._entries = []
        for module in model.modules():
            attrs = dict(module.__dict__)
            # Dict-valued attributes (_modules, _parameters, _buffers, hook tables) are changed in
            # place by register_* and setattr: keep their contents, restore into the same objects.
            contents = {k: dict(v) for k, v in attrs.items() if isinstance(v, dict)}
            grads = {n: p.requires_grad for n, p in module._parameters.items() if p is not None}
            self._entries.append((module, attrs, contents, grads))

    def restore(self) -> None:
        for module, attrs, contents, grads in self._entries:
            module.__dict__.clear()
            module.__dict__.update(attrs)
            for key, items in contents.items():
                table = attrs[key]
                table.clear()
                table.update(items)
            for name, flag in grads.items():
                module._parameters[name].requires_grad_(flag)


def _hook_ids(module: nn.Module) -> list[str]:
    out = []
    for key, value in sorted(vars(module).items()):
        if key.startswith("_") and "hook" in key and isinstance(value, dict):
            out.append(f"{key}:{len(value)}")
    return out


def model_fingerprint(model: nn.Module) -> str:
    """sha256 over the state_dict (names, dtypes, shapes, bytes), the module tree (names,
    classes, attribute names, hook tables) and each parameter's requires_grad."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, t in model.state_dict(keep_vars=True).items():
            t = t.detach()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|{getattr(t, 'requires_grad', False)}".encode())
            h.update(t.reshape(-1).contiguous().cpu().view(torch.uint8).numpy().tobytes())
    for name, module in model.named_modules(remove_duplicate=False):
        attrs = sorted(k for k in vars(module) if k != "training")
        h.update(f"{name}|{type(module).__qualname__}|{attrs}|{_hook_ids(module)}|{module.training}".encode())
    return h.hexdigest()
