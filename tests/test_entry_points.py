"""Third-party editors register through the `instructedit_bench.editors` entry-point group."""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import EntryPoint

import pytest
import torch

import editors
from bench.core.errors import BenchError
from bench.core.layout import find_layout
from editors.base import EditHandle, Editor, param_name
from bench.core.tiny import tiny_model


@dataclass
class ScaleHparams:
    layer: int = 0
    factor: float = 1.01


class ScaleEditor(Editor):
    """The README's worked example."""

    name = "scale"
    Hparams = ScaleHparams

    def apply(self, model, tokenizer, case) -> EditHandle:
        proj = find_layout(model).layers[self.hparams.layer].mlp_out
        handle = EditHandle(model, [param_name(model, proj)])
        with torch.no_grad():
            proj.weight.mul_(self.hparams.factor)
        return handle


class NotAnEditor:
    pass


def _fake_entry_points(monkeypatch, value: str):
    ep = EntryPoint(name="scale", value=value, group=editors.ENTRY_POINT_GROUP)
    monkeypatch.setattr(editors, "entry_points",
                        lambda group: [ep] if group == editors.ENTRY_POINT_GROUP else [])


def test_entry_point_editor_is_listed_loaded_and_restorable(monkeypatch):
    _fake_entry_points(monkeypatch, "tests.test_entry_points:ScaleEditor")
    assert editors.available_editors()["scale"] == "tests.test_entry_points:ScaleEditor"
    cls = editors.get_editor_class("scale")
    assert cls is ScaleEditor
    lm = tiny_model("gpt2")
    before = {n: p.clone() for n, p in lm.model.named_parameters()}
    handle = cls(ScaleHparams(layer=1, factor=2.0)).apply(lm.model, lm.tokenizer, None)
    changed = [n for n, p in lm.model.named_parameters() if not torch.equal(p, before[n])]
    assert changed == handle.changed == ["transformer.h.1.mlp.c_proj.weight"]
    handle.restore()
    assert all(torch.equal(p, before[n]) for n, p in lm.model.named_parameters())


def test_entry_point_that_is_not_an_editor_is_refused(monkeypatch):
    _fake_entry_points(monkeypatch, "tests.test_entry_points:NotAnEditor")
    with pytest.raises(BenchError, match="not an Editor subclass"):
        editors.get_editor_class("scale")
