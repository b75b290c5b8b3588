"""FT-L / FT-M on tiny models, and hyperparameter overrides (--hparam, YAML file)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from bench.core.cases import EditCase
from bench.core.errors import BenchError
from bench.core.probes import encode_probe
from editors import get_editor_class
from bench.core.hparams import hparams_to_dict, load_hparams_file, override_hparams, parse_hparam_args
from editors.base import EditHandle
from editors.ft import FineTune, FTHparams
from bench.core.tiny import ARCHS, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

CASE = EditCase(case_id="1", task="t", prompt="The mother tongue of Danielle Darrieux is",
                subject="Danielle Darrieux", target_new="English", ground_truth="French")


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def target_logprob(lm, case=CASE) -> float:
    """Mean log-probability of the target tokens, teacher forced."""
    p, a = encode_probe(lm.tokenizer, case.prompt, case.target_new)
    with torch.no_grad():
        logits = lm.model(torch.tensor([p + a])).logits[0]
    logp = torch.log_softmax(logits[len(p) - 1: len(p) - 1 + len(a)].float(), -1)
    return logp.gather(1, torch.tensor(a)[:, None]).mean().item()


@pytest.mark.parametrize("objective,frozen", [("prompt_last", True), ("target_masked", True),
                                              ("prompt_last", False)])
@pytest.mark.parametrize("arch", ARCHS)
def test_apply_changes_only_named_weights_and_restore_is_exact(arch, objective, frozen):
    lm = tiny_model(arch)
    hp = FTHparams(layers=[1, 3], steps=3, lr=1e-2, norm_constraint=None, objective=objective,
                   frozen_prefix=frozen)
    before = snapshot(lm.model)
    probe = torch.tensor([lm.tokenizer("The Eiffel Tower is located in the city of")["input_ids"]])
    with torch.no_grad():
        logits_before = lm.model(probe).logits
    handle = FineTune(hp).apply(lm.model, lm.tokenizer, CASE)
    expected = [lm.layout.layers[1].mlp_out_name + ".weight", lm.layout.layers[3].mlp_out_name + ".weight"]
    assert handle.changed == expected
    after = snapshot(lm.model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == set(expected)
    assert all(not p.requires_grad and p.grad is None for p in lm.model.parameters())
    handle.restore()
    for name, p in lm.model.named_parameters():
        assert torch.equal(p, before[name]), name
    with torch.no_grad():  # nothing else (e.g. a cached prefix) is left behind
        assert torch.equal(lm.model(probe).logits, logits_before)


def test_norm_constraint_bounds_the_change():
    lm = tiny_model("llama")
    hp = FTHparams(layers=[2], steps=5, lr=1e-2, norm_constraint=1e-3)
    name = lm.layout.layers[2].mlp_out_name + ".weight"
    w0 = dict(lm.model.named_parameters())[name].detach().clone()
    handle = FineTune(hp).apply(lm.model, lm.tokenizer, CASE)
    w1 = dict(lm.model.named_parameters())[name].detach()
    delta = (w1 - w0).abs().max().item()
    assert 0 < delta <= 1e-3 + 1e-7
    handle.restore()


@pytest.mark.parametrize("arch", ARCHS)
def test_ft_m_raises_target_probability(arch):
    lm = tiny_model(arch)
    before = target_logprob(lm)
    hp = FTHparams(layers=[lm.layout.num_layers - 1], steps=10, lr=1e-2, norm_constraint=None,
                   objective="target_masked")
    handle = FineTune(hp).apply(lm.model, lm.tokenizer, CASE)
    edited = target_logprob(lm)
    assert edited > before + 0.2  # random tiny models saturate early (llama: -5.90 -> -5.58)
    handle.restore()
    assert target_logprob(lm) == pytest.approx(before, abs=1e-6)


def test_default_layer_is_70_percent_of_depth():
    lm = tiny_model("llama")  # 4 layers -> round(2.8) = 3
    hp = FineTune.default_hparams(lm.model.config)
    assert hp.layers == [3]
    assert hp.parallel_edits == 8
    handle = FineTune(FTHparams(layers=None, steps=1)).apply(lm.model, lm.tokenizer, CASE)
    assert handle.changed == [lm.layout.layers[3].mlp_out_name + ".weight"]
    handle.restore()


CASES = [CASE,
         EditCase(case_id="2", task="t", prompt="Paris is the capital of", subject="Paris",
                  target_new="Italy and Spain", ground_truth="France"),
         EditCase(case_id="3", task="t", prompt="Toko Yasuda, the", subject="Toko Yasuda",
                  target_new="violin", ground_truth="guitar")]


def edited_weights(lm, handle) -> dict[str, torch.Tensor]:
    params = dict(lm.model.named_parameters())
    return {n: params[n].detach().clone() for n in handle.changed}


@pytest.mark.parametrize("objective,frozen,extra", [
    ("target_masked", True, {}),
    ("prompt_last", True, {"norm_constraint": 2e-3, "weight_decay": 0.5}),
    ("target_masked", False, {"fused_vocab_loss": False}),
])
@pytest.mark.parametrize("arch", ARCHS)
def test_parallel_edits_equal_one_at_a_time(arch, objective, frozen, extra):
    """Cases optimised together (different lengths, padded) end where each ends alone, including
    a case that stops early on min_loss while the others go on."""
    lm = tiny_model(arch)
    hp = FTHparams(**{"layers": [1, 2], "steps": 6, "lr": 2e-2, "norm_constraint": None,
                      "objective": objective, "frozen_prefix": frozen, **extra})
    before = snapshot(lm.model)
    if objective == "target_masked":  # loss = -target_logprob: pick a min_loss that one case
        # crosses after its first step, so it stops while the others run on
        after_one = []
        for case in CASES:
            handle = FineTune(dataclasses.replace(hp, steps=1)).apply(lm.model, lm.tokenizer, case)
            after_one.append(-target_logprob(lm, case))
            handle.restore()
        start = [-target_logprob(lm, c) for c in CASES]
        k = max(range(3), key=lambda i: start[i] - after_one[i])
        hp = dataclasses.replace(hp, min_loss=(start[k] + after_one[k]) / 2)
    alone = []
    for case in CASES:
        handle = FineTune(hp).apply(lm.model, lm.tokenizer, case)
        alone.append(edited_weights(lm, handle))
        handle.restore()
    together = FineTune(dataclasses.replace(hp, parallel_edits=3))
    assert together.edits_per_call == 3
    n = 0
    for case, expected, handle in zip(CASES, alone, together.apply_many(lm.model, lm.tokenizer, CASES)):
        got = edited_weights(lm, handle)
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-4)  # changes ~1e-1
        handle.restore()
        assert all(torch.equal(p, before[k]) for k, p in lm.model.named_parameters())
        n += 1
    assert n == 3


@pytest.mark.parametrize("hp,match", [
    (FTHparams(layers=[4]), r"ft: hyperparameter layers: layer 4 is out of range for a model with 4 "
                            r"layers \(0 \.\. 3\)"),
    (FTHparams(layers=[-1]), r"layers: layer -1 is out of range"),
    (FTHparams(layers=[0], objective="full"), "objective must be one of prompt_last, target_masked, got 'full'"),
    (FTHparams(layers=[0], parallel_edits=0), "parallel_edits must be >= 1 and <= 1024, got 0"),
    (FTHparams(layers=[0], norm_constraint=float("nan")), "norm_constraint must be a finite number"),
    (FTHparams(layers=[0], lr=float("inf")), "lr must be a finite number"),
    (FTHparams(layers=[0], steps=-5), "steps must be >= 0 and <= 100000, got -5"),
])
def test_bad_hparams_are_bench_errors_and_leave_the_model_alone(hp, match):
    lm = tiny_model("llama")
    before = snapshot(lm.model)
    with pytest.raises(BenchError, match=match):
        FineTune(hp).apply(lm.model, lm.tokenizer, CASE)
    assert all(torch.equal(p, before[n]) for n, p in lm.model.named_parameters())


def test_parallel_edits_default_keeps_the_extra_memory_bounded():
    from transformers import LlamaConfig

    # 4 float32 copies of the projection per case within 256 MiB, at most 8: SmolLM2-135M
    # (13.5 MiB per case) 8, a 7B-sized MLP (688 MiB) 1, a 1024 x 4096 one (64 MiB) 4.
    assert FineTune.default_hparams(LlamaConfig(hidden_size=576, intermediate_size=1536,
                                                num_hidden_layers=30)).parallel_edits == 8
    assert FineTune.default_hparams(LlamaConfig(hidden_size=4096, intermediate_size=11008,
                                                num_hidden_layers=32)).parallel_edits == 1
    assert FineTune.default_hparams(LlamaConfig(hidden_size=1024, intermediate_size=4096,
                                                num_hidden_layers=24)).parallel_edits == 4


def test_edit_handle_unknown_parameter():
    lm = tiny_model("gpt2")
    with pytest.raises(ValueError, match="unknown parameters"):
        EditHandle(lm.model, ["no.such.weight"])


def test_registry():
    assert get_editor_class("ft") is FineTune
    with pytest.raises(BenchError, match=r"unknown editor 'nope'; available: .*ft.*none"):
        get_editor_class("nope")


# --------------------------------------------------------------------------------------------
# Hyperparameter overrides
# --------------------------------------------------------------------------------------------


def test_hparam_args_are_coerced():
    args = parse_hparam_args(["steps=3", "layers=1,2", "norm_constraint=none", " lr = 1e-3 ",
                              "objective=target_masked", "min_loss=0"])
    assert args == {"steps": "3", "layers": "1,2", "norm_constraint": "none", "lr": "1e-3",
                    "objective": "target_masked", "min_loss": "0"}
    hp = override_hparams(FTHparams(layers=[7]), args)
    assert hp.steps == 3 and type(hp.steps) is int
    assert hp.layers == [1, 2]
    assert hp.norm_constraint is None
    assert hp.lr == 1e-3 and type(hp.lr) is float
    assert hp.min_loss == 0.0 and type(hp.min_loss) is float
    assert hp.objective == "target_masked"
    assert hparams_to_dict(hp)["layers"] == [1, 2]
    # other forms
    assert override_hparams(FTHparams(), {"layers": "[4]"}).layers == [4]
    assert override_hparams(FTHparams(), {"layers": "null"}).layers is None
    assert override_hparams(FTHparams(), {"steps": "1e2"}).steps == 100
    assert override_hparams(FTHparams(), {"norm_constraint": "5e-4"}).norm_constraint == 5e-4
    # the defaults object is not modified
    base = FTHparams()
    override_hparams(base, {"steps": "1"})
    assert base.steps == 25


def test_hparam_errors():
    with pytest.raises(BenchError, match=r"unknown hyperparameter 'step' for FTHparams; known: ") as err:
        override_hparams(FTHparams(), {"step": "3"})
    known = str(err.value).split("known: ")[1].split(", ")
    assert known == sorted(f.name for f in dataclasses.fields(FTHparams))
    assert {"layers", "lr", "norm_constraint", "objective", "steps"} <= set(known)
    with pytest.raises(BenchError, match="hyperparameter steps: expected int, got 'three'"):
        override_hparams(FTHparams(), {"steps": "three"})
    with pytest.raises(BenchError, match="hyperparameter lr: expected float"):
        override_hparams(FTHparams(), {"lr": "fast"})
    with pytest.raises(BenchError, match="hyperparameter layers: expected int, got 'x'"):
        override_hparams(FTHparams(), {"layers": "1,x"})
    for bad in ["steps", "=3", ""]:
        with pytest.raises(BenchError, match="--hparam expects key=value"):
            parse_hparam_args([bad])


def test_hparams_yaml_file(tmp_path):
    path = tmp_path / "hp.yaml"
    path.write_text("steps: 3\nlayers: [1, 2]\nnorm_constraint: null\nlr: 1e-3\n"
                    "weight_decay: 0\nobjective: target_masked\n")
    data = load_hparams_file(str(path))
    hp = override_hparams(FTHparams(), data)
    assert (hp.steps, hp.layers, hp.norm_constraint, hp.objective) == (3, [1, 2], None, "target_masked")
    assert hp.lr == 1e-3 and type(hp.lr) is float  # YAML reads 1e-3 as a string
    assert hp.weight_decay == 0.0 and type(hp.weight_decay) is float
    # a single layer given as a scalar
    path.write_text("layers: 2\n")
    assert override_hparams(FTHparams(), load_hparams_file(str(path))).layers == [2]
    # empty file, missing file, not a mapping, invalid YAML
    path.write_text("")
    assert load_hparams_file(str(path)) == {}
    assert load_hparams_file(None) == {}
    with pytest.raises(BenchError, match="hyperparameter file not found"):
        load_hparams_file(str(tmp_path / "nope.yaml"))
    path.write_text("- 1\n- 2\n")
    with pytest.raises(BenchError, match="must hold a mapping"):
        load_hparams_file(str(path))
    path.write_text("steps: [1\n")
    with pytest.raises(BenchError, match="not valid YAML"):
        load_hparams_file(str(path))
