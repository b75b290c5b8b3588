"""The `lora` editor (peft adapters) on tiny models: hyperparameters, target roles, the edit, an
exact restore, sequential training of one adapter and its saved state, and runs through the runner."""

from __future__ import annotations

import json

import pytest
import torch
from peft.tuners.lora import LoraLayer

import editors
from bench.core.cases import EditCase
from bench.core.errors import BenchError
from bench.core.hparams import override_hparams
from bench.core.models import model_from_config
from bench.core.probes import encode_probe
from bench.core.snapshot import model_fingerprint
from bench.core.tiny import ARCHS, tiny_config, tiny_model, tiny_tokenizer
from editors.lora import LoRA, LoRAHparams, attention_roles, target_names
from tests.helpers import FIXTURE_DATA, without_time
from tests.helpers import jsonl_lines as lines_of

pytestmark = pytest.mark.usefixtures("one_thread")

CASE = EditCase(case_id="1", task="t", prompt="The mother tongue of Danielle Darrieux is",
                subject="Danielle Darrieux", target_new="English", ground_truth="French")
CASES = [CASE,
         EditCase(case_id="2", task="t", prompt="The Eiffel Tower is located in the city of",
                  subject="Eiffel Tower", target_new="London", ground_truth="Paris"),
         EditCase(case_id="3", task="t", prompt="Toko Yasuda plays the", subject="Toko Yasuda",
                  target_new="piano", ground_truth="guitar"),
         EditCase(case_id="4", task="t", prompt="Barack Obama was born in", subject="Barack Obama",
                  target_new="Chicago", ground_truth="Hawaii")]
PROBE = "Michael Jordan plays basketball for"
FAST = dict(steps=6, lr=5e-2, min_loss=0.0)  # tiny random models need a larger step to move


def editor(**changes) -> LoRA:
    return LoRA(LoRAHparams(**{**FAST, **changes}))


def target_logprob(lm, case=CASE) -> float:
    p, a = encode_probe(lm.tokenizer, case.prompt, case.target_new)
    with torch.no_grad():
        logits = lm.model(torch.tensor([p + a])).logits[0]
    logp = torch.log_softmax(logits[len(p) - 1: len(p) - 1 + len(a)].float(), -1)
    return logp.gather(1, torch.tensor(a)[:, None]).mean().item()


def logits(lm, text=PROBE) -> torch.Tensor:
    with torch.no_grad():
        return lm.model(torch.tensor([lm.tokenizer(text)["input_ids"]])).logits


def lora_layers(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]


# --------------------------------------------------------------------------------------------
# Hyperparameters
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides,message", [
    ({"rank": "0"}, "rank must be >= 1"),
    ({"alpha": "0"}, "alpha must be > 0"),
    ({"dropout": "1"}, "dropout must be >= 0 and < 1"),
    ({"lr": "nan"}, "lr must be a finite number"),
    ({"steps": "-1"}, "steps must be >= 0"),
    ({"layers": "1,4"}, "layer 4 is out of range"),
    ({"target_modules": "q,gate_proj"}, "target_modules must be one of"),
    ({"target_modules": ""}, "target_modules must name at least one of"),
    ({"seed": "-3"}, "seed must be >= 0"),
])
def test_bad_hyperparameters_are_one_line_errors_before_the_model_loads(overrides, message):
    hp = override_hparams(LoRAHparams(), overrides)
    with pytest.raises(BenchError) as err:
        LoRA(hp).check(tiny_config("llama"))  # a config only: no weights
    assert message in str(err.value) and "\n" not in str(err.value)


def test_defaults_are_easyedits_adapters_with_an_early_stop():
    hp = LoRAHparams()
    assert (hp.rank, hp.alpha, hp.dropout, hp.steps, hp.lr, hp.weight_decay) == (8, 32.0, 0.1, 70, 5e-3, 0.0)
    assert hp.layers == [] and hp.target_modules == ["q", "v"] and hp.min_loss == 1e-2
    LoRA(hp).check(tiny_config("llama"))


def test_registered_with_the_easyedit_preset():
    from bench.session import build_editor, hparams_source

    assert editors.get_editor_class("lora") is LoRA and LoRA.kinds == ("modules",)
    assert "easyedit" in editors.presets("lora")
    built = build_editor("lora", hparams_source("lora", "easyedit"), tiny_config("llama"))
    hp = built.hparams
    assert (hp.rank, hp.alpha, hp.steps, hp.lr, hp.layers, hp.target_modules, hp.min_loss) == \
        (8, 32.0, 70, 5e-3, [], ["q", "v"], 0.0)


# --------------------------------------------------------------------------------------------
# Target roles, from the structure
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch,expected", [
    ("llama", {"q": ["self_attn.q_proj"], "k": ["self_attn.k_proj"], "v": ["self_attn.v_proj"],
               "attn_out": ["self_attn.o_proj"]}),
    ("gemma3", {"q": ["self_attn.q_proj"], "k": ["self_attn.k_proj"], "v": ["self_attn.v_proj"],
                "attn_out": ["self_attn.o_proj"]}),
    ("gpt2", {"q": ["attn.c_attn"], "k": ["attn.c_attn"], "v": ["attn.c_attn"], "attn_out": ["attn.c_proj"]}),
    ("gpt_neox", {"q": ["attention.query_key_value"], "k": ["attention.query_key_value"],
                  "v": ["attention.query_key_value"], "attn_out": ["attention.dense"]}),
])
def test_attention_roles_are_found_from_the_data_flow(arch, expected):
    lm = tiny_model(arch)
    before = model_fingerprint(lm.model)
    assert attention_roles(lm.model, lm.layout) == expected
    assert model_fingerprint(lm.model) == before  # the probe leaves no hook behind


def test_attention_roles_do_not_depend_on_registration_order():
    """GPT-J registers k_proj, v_proj, q_proj (in that order); the probe still tells them apart."""
    from transformers import GPTJConfig

    tok = tiny_tokenizer()
    lm = model_from_config(GPTJConfig(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, rotary_dim=4,
                                      n_positions=64, bos_token_id=0, eos_token_id=0), tok)
    assert [n for n, _ in lm.model.transformer.h[0].attn.named_children()][:3] == ["k_proj", "v_proj", "q_proj"]
    assert attention_roles(lm.model, lm.layout) == {"q": ["attn.q_proj"], "k": ["attn.k_proj"],
                                                    "v": ["attn.v_proj"], "attn_out": ["attn.out_proj"]}


def test_target_names_cover_each_role_in_each_layer():
    lm = tiny_model("llama")
    assert target_names(lm.model, lm.layout, ["v", "mlp_in", "mlp_out"], [1, 3]) == [
        "model.layers.1.self_attn.v_proj", "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj",
        "model.layers.1.mlp.down_proj", "model.layers.3.self_attn.v_proj", "model.layers.3.mlp.gate_proj",
        "model.layers.3.mlp.up_proj", "model.layers.3.mlp.down_proj"]
    gpt2 = tiny_model("gpt2")  # q and v share the fused projection: adapted once
    assert target_names(gpt2.model, gpt2.layout, ["q", "v"], [0]) == ["transformer.h.0.attn.c_attn"]


# --------------------------------------------------------------------------------------------
# One edit
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_the_edit_raises_the_target_and_restore_is_exact(arch):
    lm = tiny_model(arch)
    before, out_before = model_fingerprint(lm.model), logits(lm)
    base = {n: (p, p.detach().clone()) for n, p in lm.model.named_parameters()}
    lp_before = target_logprob(lm)
    rng = torch.get_rng_state()
    handle = editor().apply(lm.model, lm.tokenizer, CASE)
    assert torch.equal(torch.get_rng_state(), rng)  # seeded on its own
    assert handle.kinds == ("modules",) and handle.changed == []
    assert target_logprob(lm) > lp_before + 0.25  # a random tiny model: about +0.45
    # The base weights did not move, got no gradient and stay frozen; only adapters were added.
    for name, (p, value) in base.items():
        assert torch.equal(p, value) and p.grad is None and not p.requires_grad, name
    assert not any(m.training for m in lm.model.modules())  # eval mode, the adapters' dropout too
    # q and v: two projections per block in Llama, one fused projection in GPT-2 and GPT-NeoX
    assert len(lora_layers(lm.model)) == lm.layout.num_layers * (2 if arch == "llama" else 1)
    info = handle.info
    blocks = lm.layout.blocks_name
    assert lora_layers(lm.model) == [f"{blocks}.{i}.{t}" for i in info["layers"] for t in info["targets"]]
    assert info["steps"] == FAST["steps"] and info["loss"] < info["loss_start"]
    assert info["adapter_params"] == sum(p.numel() for n, p in lm.model.named_parameters() if "lora_" in n)
    assert info["layers"] == list(range(lm.layout.num_layers)) and info["targets"]
    json.dumps(info)
    handle.restore()
    assert model_fingerprint(lm.model) == before and lora_layers(lm.model) == []
    assert not hasattr(lm.model, "peft_config")
    assert torch.equal(logits(lm), out_before)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_role_on_some_layers_restores_exactly(arch):
    lm = tiny_model(arch)
    before = model_fingerprint(lm.model)
    ed = editor(layers=[2, 3], target_modules=list(("q", "k", "v", "attn_out", "mlp_in", "mlp_out")), steps=2)
    handle = ed.apply(lm.model, lm.tokenizer, CASE)
    assert handle.reusable_blocks(lm.layout) == 2 and handle.first_block == 2
    blocks = {n[len(lm.layout.blocks_name) + 1:].split(".")[0] for n in lora_layers(lm.model)}
    assert blocks == {"2", "3"} and len(lora_layers(lm.model)) == 2 * (7 if arch == "llama" else 4)
    handle.restore()
    assert model_fingerprint(lm.model) == before


def test_the_model_in_training_mode_is_restored_too():
    lm = tiny_model("llama")
    lm.model.train()
    lm.model.model.layers[1].requires_grad_(True)
    before = model_fingerprint(lm.model)
    handle = editor(dropout=0.0, steps=1).apply(lm.model, lm.tokenizer, CASE)
    handle.restore()
    assert model_fingerprint(lm.model) == before


def test_a_bfloat16_model_gets_float32_adapters():
    lm = tiny_model("gpt2")
    lm.model.to(torch.bfloat16)
    before, lp_before = model_fingerprint(lm.model), target_logprob(lm)
    ed = editor()
    handle = ed.apply(lm.model, lm.tokenizer, CASE)
    assert {p.dtype for n, p in lm.model.named_parameters() if "lora_" in n} == {torch.float32}
    assert {v.dtype for v in ed.sequential_state().values()} == {torch.float32}
    assert target_logprob(lm) > lp_before + 0.25
    handle.restore()
    assert model_fingerprint(lm.model) == before


def test_a_failing_edit_leaves_the_model_as_it_was(monkeypatch):
    lm = tiny_model("llama")
    before = model_fingerprint(lm.model)
    ed = editor()

    def boom(*a, **k):
        raise BenchError("no")
    monkeypatch.setattr(ed, "_train", boom)
    with pytest.raises(BenchError):
        ed.apply(lm.model, lm.tokenizer, CASE)
    assert model_fingerprint(lm.model) == before and ed.sequential_state() == {}


def test_seeded_edits_repeat_exactly():
    a, b = tiny_model("llama"), tiny_model("llama")
    torch.manual_seed(1)
    ha = editor().apply(a.model, a.tokenizer, CASE)
    torch.manual_seed(2)  # the global RNG does not matter
    hb = editor().apply(b.model, b.tokenizer, CASE)
    assert torch.equal(logits(a), logits(b)) and ha.info == hb.info
    hb.restore()
    hc = editor(seed=1).apply(b.model, b.tokenizer, CASE)
    assert not torch.equal(logits(a), logits(b)) and hc.info["loss"] != ha.info["loss"]


def test_early_stop_at_min_loss():
    lm = tiny_model("llama")
    handle = editor(steps=50, min_loss=5.7).apply(lm.model, lm.tokenizer, CASE)  # starts at 5.9
    assert handle.info["loss_start"] > 5.7 and 0 < handle.info["steps"] < 10


# --------------------------------------------------------------------------------------------
# Sequential: one adapter trained on, its weights saved and put back
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_sequential_batches_train_one_adapter_and_the_state_round_trips(arch):
    lm = tiny_model(arch)
    before = model_fingerprint(lm.model)
    ed = editor()
    h1 = ed.apply_batch(lm.model, lm.tokenizer, CASES[:2])
    layers_after_first = lora_layers(lm.model)
    after_first = logits(lm)
    assert [c.keys() for c in h1.info["cases"]] == [{"loss"}] * 2 and h1.kinds == ("modules",)
    h2 = ed.apply_batch(lm.model, lm.tokenizer, CASES[2:])
    assert lora_layers(lm.model) == layers_after_first  # trained on, not stacked
    assert not torch.equal(logits(lm), after_first)
    state = ed.sequential_state()
    assert state and all(isinstance(v, torch.Tensor) for v in state.values())
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in state)
    expected = logits(lm)

    # A resumed run: a fresh model and editor, the saved state loaded and the adapter reattached.
    other = tiny_model(arch)
    fresh = model_fingerprint(other.model)
    resumed = editor()
    resumed.load_sequential_state(state)
    back = resumed.reattach(other.model, other.tokenizer)
    assert back.kinds == ("modules",) and back.first_block == 0
    assert torch.equal(logits(other), expected)
    assert not any(m.training for m in other.model.modules())
    # ... and both go on exactly alike.
    h3 = ed.apply_batch(lm.model, lm.tokenizer, [CASE])
    h3b = resumed.apply_batch(other.model, other.tokenizer, [CASE])
    assert torch.equal(logits(lm), logits(other)) and h3.info == h3b.info
    assert lora_layers(other.model) == layers_after_first

    # Restoring in reverse order: each later edit gives back the adapter weights it found.
    h3.restore()
    assert torch.equal(logits(lm), expected)
    h2.restore()
    assert torch.equal(logits(lm), after_first)
    h1.restore()
    assert model_fingerprint(lm.model) == before and ed.sequential_state() == {}
    h3b.restore()
    back.restore()
    assert model_fingerprint(other.model) == fresh and resumed.sequential_state() == {}


def test_an_empty_state_reattaches_nothing_and_bad_states_are_refused():
    lm = tiny_model("llama")
    ed = editor()
    ed.load_sequential_state({})
    assert ed.reattach(lm.model, lm.tokenizer) is None
    with pytest.raises(ValueError):
        ed.load_sequential_state({"preserved.1": torch.zeros(2)})
    saved = editor(rank=4)
    handle = saved.apply_batch(lm.model, lm.tokenizer, [CASE])
    state = saved.sequential_state()
    handle.restore()
    ed.load_sequential_state(state)  # saved with rank 4, resumed with rank 8
    before = model_fingerprint(lm.model)
    with pytest.raises(BenchError, match="rank"):
        ed.reattach(lm.model, lm.tokenizer)
    assert model_fingerprint(lm.model) == before


# --------------------------------------------------------------------------------------------
# Through the runner
# --------------------------------------------------------------------------------------------


def run_options(tmp_path, **changes):
    from bench.session import RunOptions

    base = dict(editor="lora", tasks=["counterfact"], model="tiny", device="cpu", limit=4,
                data_dir=str(FIXTURE_DATA), output_dir=str(tmp_path / "runs"),
                hparams={"steps": "3", "lr": "0.05", "layers": "2,3"}, batch_size=4)
    base.update(changes)
    return RunOptions(**base)


def test_a_single_mode_run(tmp_path, tiny_load):
    from bench.runner import execute

    path = execute(run_options(tmp_path), log=lambda s: None)
    records = lines_of(path / "cases.jsonl")
    assert records and all(r.get("error") is None for r in records)
    assert all(r["edit"]["steps"] <= 3 and r["edit"]["layers"] == [2, 3] for r in records)


class CrashingLoRA(LoRA):
    """LoRA that dies (as a killed process would) at its `fail_at`-th edit call."""

    name = "lora-crash"
    fail_at: int | None = None
    calls = 0

    def apply_batch(self, model, tokenizer, cases):
        CrashingLoRA.calls += 1
        if CrashingLoRA.fail_at is not None and CrashingLoRA.calls >= CrashingLoRA.fail_at:
            raise KeyboardInterrupt("simulated crash")
        return super().apply_batch(model, tokenizer, cases)


def test_a_killed_sequential_run_resumes_exactly(tmp_path, tiny_load, monkeypatch):
    from bench.runner import execute, resume

    monkeypatch.setitem(editors.BUILTIN, "lora-crash", "tests.test_lora:CrashingLoRA")
    seq = dict(editor="lora-crash", mode="sequential", edit_batch=1, eval_every=2, locality_probes=2, limit=5)
    straight = execute(run_options(tmp_path / "a", **seq), log=lambda s: None)
    CrashingLoRA.calls, CrashingLoRA.fail_at = 0, 4  # after the checkpoint at 2 edits
    try:
        with pytest.raises(KeyboardInterrupt):
            execute(run_options(tmp_path / "b", **seq), log=lambda s: None)
    finally:
        CrashingLoRA.fail_at = None
    crashed = next((tmp_path / "b" / "runs").iterdir())
    resume(crashed, log=lambda s: None)
    strip = without_time
    ra, rb = lines_of(straight / "cases.jsonl"), lines_of(crashed / "cases.jsonl")
    assert len(ra) == 5 and [strip(r) for r in ra] == [strip(r) for r in rb]
    ca, cb = lines_of(straight / "checkpoints.jsonl"), lines_of(crashed / "checkpoints.jsonl")
    assert [strip(c) for c in ca] == [strip(c) for c in cb]
    from safetensors.torch import load_file
    state = load_file(str(crashed / "sequential" / "state.safetensors"))
    assert any(k.startswith("editor.") and k.endswith(".lora_A.weight") for k in state)
    assert not any(k.startswith("model.") for k in state)  # no base weight was ever changed
