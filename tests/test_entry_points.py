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


# --------------------------------------------------------------------------------------------
# The README's examples, run as a third party would write them (from the README alone)
# --------------------------------------------------------------------------------------------


def _readme_module(monkeypatch, name: str):
    """The README's `my_package/<name>.py` block, imported as that module."""
    import re
    import sys
    import types
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = dict((m.group(2), m.group(1)) for m in
                re.finditer(r"```python\n(# my_package/(\w+)\.py\n.*?)```", text, re.S))[name]
    package = types.ModuleType("my_package")
    package.__path__ = []
    module = types.ModuleType(f"my_package.{name}")
    monkeypatch.setitem(sys.modules, "my_package", package)
    monkeypatch.setitem(sys.modules, f"my_package.{name}", module)
    exec(compile(code, f"README.md:{name}", "exec"), module.__dict__)
    return module


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_readme_hook_editor_works_from_the_readme_alone(monkeypatch, arch):
    from bench.core.cases import EditCase
    from bench.core.snapshot import model_fingerprint
    from bench.evaluation import Job
    from bench.runner import run_cases

    _readme_module(monkeypatch, "steer_editor")
    ep = EntryPoint(name="steer", value="my_package.steer_editor:SteerEditor", group=editors.ENTRY_POINT_GROUP)
    monkeypatch.setattr(editors, "entry_points", lambda group: [ep] if group == editors.ENTRY_POINT_GROUP else [])
    cls = editors.get_editor_class("steer")
    assert cls.kinds == ("modules",)
    lm = tiny_model(arch)
    before = model_fingerprint(lm.model)
    case = EditCase(case_id="1", task="t", prompt="The Eiffel Tower is located in", subject="The Eiffel Tower",
                    target_new="Paris")
    record = next(run_cases(lm, cls(cls.Hparams(strength=400.0)), [Job(case)], batch_size=2))
    assert record["error"] is None and record["edit"] == {"layer": 3}
    assert record["post"]["reliability"] == 1.0 > record["pre"]["reliability"]
    assert model_fingerprint(lm.model) == before


def test_readme_weight_editor_is_the_tested_one(monkeypatch):
    module = _readme_module(monkeypatch, "scale_editor")
    lm = tiny_model("gpt2")
    handle = module.ScaleEditor(module.ScaleHparams(layer=1, factor=2.0)).apply(lm.model, lm.tokenizer, None)
    assert handle.changed == ["transformer.h.1.mlp.c_proj.weight"] and handle.kinds == ("weights",)
    handle.restore()
