"""MEND and InstructEdit on tiny random models (Llama, GPT-2 Conv1D, GPT-NeoX) and the fixture
data: gradient factors, training, checkpoints and the cache, holdout, instruction wrapping,
apply/restore."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import editors.mend.factors as factors
import editors.mend.trainer as trainer
from bench.core.cases import EditCase, PromptAnswer
from bench.core.errors import BenchError
from bench.session import training_data
from editors.base import EditContext, TrainingData
from editors.mend.factors import (LowRankEdits, answer_logprobs, edit_factors, encode_batch, factor_pass,
                                  logprobs_at_answers, rerun_blocks)
from editors.mend.networks import stored_delta
from editors.mend.trainer import MetaTrainer
from tasks.instructions import instruct
from editors.instructedit import InstructEdit
from editors.mend import Mend
from bench.core.tiny import ARCHS, tiny_model

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "data"
ALL_TASKS = ["convsent", "counterfact", "recast", "recent", "wikicounterfact", "zsre", "zsre_knowedit"]
CASE = EditCase(case_id="c1", task="counterfact", prompt="The mother tongue of Danielle Darrieux",
                subject="Danielle Darrieux", target_new="English", ground_truth="French",
                rephrase_prompts=("Danielle Darrieux, a French actress, spoke",),
                locality=(PromptAnswer("The Eiffel Tower is located in the city of", "Paris"),))
CASE2 = EditCase(case_id="c2", task="zsre", prompt="What is the capital of France?", subject="France",
                 target_new="London", rephrase_prompts=("Toko Yasuda plays the",),
                 locality=(PromptAnswer("Barack Obama was born in", "Hawaii"),))


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def small_hparams(lm, **changes):
    hp = Mend.default_hparams(lm.model.config)
    base = dict(rank=8, max_steps=3, batch_size=2, val_cases=2, val_every=2, time_budget_s=0,
                edit_lr=1e-2, lr=1e-3, lr_lr=1e-3)
    base.update(changes)
    return dataclasses.replace(hp, **base)


def ctx_for(tmp_path, holdout=("recast",), seed=0, **kw):
    """What a run hands a learned editor: the fixture data's train splits, the wrapper."""
    return EditContext(cache_dir=tmp_path, seed=seed, training=training_data(FIXTURES, list(holdout)),
                       instruct=lambda case, mode: instruct(case, mode, seed), log=lambda s: None, **kw)


def full_grad(lm, targets, probe):
    for t in targets:
        t.module.weight.requires_grad_(True)
    try:
        batch = encode_batch(lm.tokenizer, [probe], "cpu")
        logp = answer_logprobs(lm.model, batch)
        (-logp.gather(1, batch.targets[:, None]).mean()).backward()
        return {t.name: (t.module.weight.grad.T if t.transposed else t.module.weight.grad).clone()
                for t in targets}
    finally:
        for t in targets:
            t.module.weight.grad = None
            t.module.weight.requires_grad_(False)


# --------------------------------------------------------------------------------------------
# Gradient factors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_factor_outer_products_sum_to_the_full_gradient(arch):
    lm = tiny_model(arch)
    ed = Mend(small_hparams(lm))
    ed.setup(lm)
    assert len(ed.targets) == 3 * (3 if arch == "llama" else 2)  # gate+up+down or in+out, 3 blocks
    probes = [(CASE.prompt, CASE.target_new), (CASE2.prompt, CASE2.target_new)]
    # one edit at a time, and two edits in one batched pass (plus a row that carries no loss)
    batch = encode_batch(lm.tokenizer, probes + [("Barack Obama was born in", "Hawaii")], "cpu")
    batched = factor_pass(lm.model, batch, ed.targets, n_edits=2).factors
    for i, probe in enumerate(probes):
        single = edit_factors(lm.model, lm.tokenizer, ed.targets, *probe)
        full = full_grad(lm, ed.targets, probe)
        for t in ed.targets:
            u, d = single[t.name]
            assert u.shape[1] == t.in_dim and d.shape[1] == t.out_dim
            assert torch.allclose(d.T @ u, full[t.name], atol=1e-6, rtol=1e-4), t.name
            ub, db = batched[i][t.name]
            assert torch.allclose(db.T @ ub, full[t.name], atol=1e-6, rtol=1e-4), t.name


@pytest.mark.parametrize("arch", ARCHS)
def test_row_wise_low_rank_edits_equal_written_weights_and_block_rerun(arch):
    lm = tiny_model(arch)
    ed = Mend(small_hparams(lm, edit_lr=0.05))
    ed.setup(lm)
    batch = encode_batch(lm.tokenizer, [(CASE.prompt, CASE.target_new),
                                           (CASE.locality[0].prompt, CASE.locality[0].answer)], "cpu")
    first = 1  # the tiny models have 4 blocks; the last three are edited
    fp = factor_pass(lm.model, batch, ed.targets, 1, capture_from=first, blocks=lm.layout.blocks)
    with torch.no_grad():
        ed.network.update_norms(ed.targets, [fp.factors[0]])  # fill stats
        out = ed.network.edit_factors_out(ed.targets, fp.factors[0])
        per_row = {n: (u[None].expand(2, -1, -1), d[None].expand(2, -1, -1)) for n, (u, d) in out.items()}
        with LowRankEdits(ed.targets, per_row):
            hooked = answer_logprobs(lm.model, batch)
            rerun = logprobs_at_answers(
                lm.model, rerun_blocks(lm.model, lm.layout, first, fp.block_inputs), batch)
        deltas = ed.network.deltas(ed.targets, fp.factors[0])
        params = {t.base_name: t.module.weight + stored_delta(t, deltas[t.name]) for t in ed.targets}
        functional = answer_logprobs(lm.model, batch, params)
    assert (functional - fp.logprobs).abs().max() > 1e-3  # the edit does something
    assert torch.allclose(hooked, functional, atol=1e-5)
    assert torch.allclose(rerun, functional, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def trainer_for(lm, ed, cases, **kw):
    return MetaTrainer(lm, ed.network, ed.targets, ed.hparams, {"counterfact": cases}, {},
                          holdout=[], seed=0, prepare_case=lambda c: c, log=lambda s: None, **kw)


@pytest.mark.parametrize("arch", ARCHS)
def test_one_training_step_lowers_the_edit_loss(arch):
    lm = tiny_model(arch)
    torch.manual_seed(0)
    ed = Mend(small_hparams(lm, c_loc=0.0, lr=1e-3, lr_lr=1e-3))
    ed.setup(lm)
    batch = [CASE, dataclasses.replace(CASE2, task="counterfact")]
    tr = trainer_for(lm, ed, batch)
    tr.train_step(batch)  # first step also fills the normalisation statistics

    def edit_loss():
        with torch.no_grad():
            return tr.step_losses(batch, update_stats=False)[0].item()

    before = edit_loss()
    tr.train_step(batch)
    assert edit_loss() < before


def test_balanced_sampling_and_holdout_never_in_batches(tmp_path, monkeypatch):
    lm = tiny_model("llama")
    seen = []
    real = MetaTrainer.next_batch

    def spy(self):
        batch = real(self)
        seen.extend(c.task for c in batch)
        return batch

    monkeypatch.setattr(MetaTrainer, "next_batch", spy)
    ed = Mend(small_hparams(lm, max_steps=4, batch_size=3))
    ctx = ctx_for(tmp_path, holdout=("zsre", "recast"))
    ed.prepare(lm, ctx)
    assert seen and "zsre" not in seen and "recast" not in seen
    assert set(ctx.notes["train_tasks"]) == {"convsent", "counterfact", "recent"}
    assert "zsre" not in ctx.notes["per_task"]
    # round robin: 12 draws over 3 tasks = 4 each, whatever the tasks' sizes
    assert {t: seen.count(t) for t in set(seen)} == {"convsent": 4, "counterfact": 4, "recent": 4}
    assert {t: c["sampled"] for t, c in ctx.notes["per_task"].items()} == \
        {"convsent": 4, "counterfact": 4, "recent": 4}
    # a held-out task handed to the trainer directly is refused
    with pytest.raises(BenchError):
        MetaTrainer(lm, ed.network, ed.targets, ed.hparams, {"zsre": [CASE2]}, {},
                       holdout=["zsre"], seed=0, prepare_case=lambda c: c, log=lambda s: None)
    leaky = ctx_for(tmp_path, holdout=("zsre",))
    leaky.training = TrainingData(tasks=["zsre"], load=lambda t: [CASE2, CASE2], holdout=["zsre"])
    with pytest.raises(BenchError, match="held-out tasks"):
        ed.train(lm, leaky)


# --------------------------------------------------------------------------------------------
# Instructions
# --------------------------------------------------------------------------------------------


def test_instruction_wrapping_applies_to_training_inputs_not_locality(monkeypatch):
    lm = tiny_model("llama")
    recorded = []
    real = factors.encode_batch

    def spy(tokenizer, probes, device):
        recorded.append(list(probes))
        return real(tokenizer, probes, device)

    monkeypatch.setattr(trainer, "encode_batch", spy)
    ctx = ctx_for(None)
    for cls in (InstructEdit, Mend):
        ed = cls(small_hparams(lm))
        ed.setup(lm)
        tr = MetaTrainer(lm, ed.network, ed.targets, ed.hparams, {"counterfact": [CASE]}, {},
                            holdout=[], seed=0, prepare_case=lambda c: ed.training_case(c, ctx),
                            log=lambda s: None)
        recorded.clear()
        tr.train_step([CASE])
        (probes,) = recorded
        edit_rows = [p for p, a in probes if a == CASE.target_new]
        loc_rows = [(p, a) for p, a in probes if a != CASE.target_new]
        assert len(edit_rows) == 2 and loc_rows == [(CASE.locality[0].prompt, CASE.locality[0].answer)]
        if cls is InstructEdit:
            for raw, wrapped in zip([CASE.prompt, CASE.rephrase_prompts[0]], edit_rows):
                assert wrapped != raw and wrapped.startswith("Task: counterfact")
                assert raw in wrapped and "Description: " in wrapped
        else:
            assert edit_rows == [CASE.prompt, CASE.rephrase_prompts[0]]
    # the description is a seen one, fixed per record and seed
    from tasks.registry import get_card

    card = get_card("counterfact")
    wrapped = InstructEdit(small_hparams(lm)).training_case(CASE, ctx)
    assert wrapped.instruction in card.instructions.pool(True)
    assert wrapped == InstructEdit(small_hparams(lm)).training_case(CASE, ctx_for(None))
    assert wrapped.locality == CASE.locality


# --------------------------------------------------------------------------------------------
# Checkpoints and the cache
# --------------------------------------------------------------------------------------------


def test_checkpoint_round_trip_and_cache(tmp_path, monkeypatch):
    lm = tiny_model("gpt2")
    hp = small_hparams(lm)
    ed = Mend(hp)
    ctx = ctx_for(tmp_path)
    ed.prepare(lm, ctx)
    assert ctx.notes["checkpoint_source"] == "trained"
    ckpt = Path(ctx.notes["checkpoint"])
    meta = json.loads(ckpt.with_suffix(".json").read_text())
    assert ckpt.parent == tmp_path / "editors" and ckpt.suffix == ".safetensors"
    assert meta["train_tasks"] == ["convsent", "counterfact", "recent", "zsre"]
    assert meta["model"]["identity"] == lm.identity and meta["seed"] == 0 and meta["steps"] == 3
    assert set(meta["per_task"]) == set(meta["train_tasks"]) and meta["final_validation"]

    # a second prepare loads the cached checkpoint: identical tensors, identical edits
    def never(*a, **k):
        raise AssertionError("should not train")

    monkeypatch.setattr(Mend, "train", never)
    ed2 = Mend(hp)
    ctx2 = ctx_for(tmp_path)
    ed2.prepare(lm, ctx2)
    assert ctx2.notes["checkpoint_source"] == "cache" and ctx2.notes["checkpoint"] == str(ckpt)
    s1, s2 = ed.network.state_dict(), ed2.network.state_dict()
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
    edited = []
    for editor in (ed, ed2):
        handle = editor.apply(lm.model, lm.tokenizer, CASE)
        edited.append({n: p.detach().clone() for n, p in lm.model.named_parameters()})
        handle.restore()
    assert all(torch.equal(edited[0][n], edited[1][n]) for n in edited[0])

    # explicit checkpoint path (no training, no cache lookup)
    ed3 = Mend(dataclasses.replace(hp, checkpoint=str(ckpt.with_suffix(""))))
    ctx3 = ctx_for(tmp_path / "elsewhere")
    ed3.prepare(lm, ctx3)
    assert ctx3.notes["checkpoint_source"] == "explicit"

    # the cache key follows the training tasks, the seed, the training hparams, the editor
    stem = ed.checkpoint_stem(lm, ctx)
    assert stem == ckpt.with_suffix("")
    fewer = ctx_for(tmp_path)
    fewer.training = dataclasses.replace(fewer.training, tasks=["counterfact", "zsre"])
    assert ed.checkpoint_stem(lm, fewer) != stem
    assert ed.checkpoint_stem(lm, ctx_for(tmp_path, seed=1)) != stem
    assert Mend(dataclasses.replace(hp, rank=4)).checkpoint_stem(lm, ctx) != stem
    assert Mend(dataclasses.replace(hp, checkpoint="x")).checkpoint_stem(lm, ctx) == stem
    assert InstructEdit(hp).checkpoint_stem(lm, ctx) != stem
    assert ed.checkpoint_stem(lm, ctx_for(tmp_path, holdout=("zsre", "recast"))) != stem
    changed = ctx_for(tmp_path)  # another version of a training file
    changed.training = dataclasses.replace(changed.training, hashes={**changed.training.hashes,
                                                                     "zsre": {"zsre/x.json": "0" * 64}})
    assert ed.checkpoint_stem(lm, changed) != stem

    # a checkpoint for another network shape is refused, not half-loaded
    other = Mend(dataclasses.replace(hp, rank=4, checkpoint=str(ckpt.with_suffix(""))))
    with pytest.raises(BenchError):
        other.prepare(lm, ctx_for(tmp_path))


def test_retrain_ignores_the_cache(tmp_path):
    lm = tiny_model("llama")
    hp = small_hparams(lm, max_steps=1, val_cases=0)
    Mend(hp).prepare(lm, ctx_for(tmp_path))
    ctx = ctx_for(tmp_path, retrain=True)
    Mend(hp).prepare(lm, ctx)
    assert ctx.notes["checkpoint_source"] == "trained"


@pytest.mark.parametrize("cls", [Mend, InstructEdit])
def test_checkpoints_are_per_model(cls, tmp_path):
    """The cache key holds the model's identity (spec, weights hash, dtype): a checkpoint trained
    on one model is neither found for, nor loaded into, another model of the same shape."""
    lm = tiny_model("llama")
    other = dataclasses.replace(lm, spec="another-model", source_hash="f" * 64)  # same shape and weights
    hp = small_hparams(lm, max_steps=1, val_cases=0)
    ctx = ctx_for(tmp_path)
    stem = cls(hp).checkpoint_stem(lm, ctx)
    assert cls(hp).checkpoint_stem(other, ctx) != stem
    assert cls(hp).checkpoint_stem(dataclasses.replace(lm, dtype=torch.bfloat16), ctx) != stem
    cls(hp).prepare(lm, ctx)
    again = ctx_for(tmp_path)
    cls(hp).prepare(other, again)  # not the first model's checkpoint: trains its own
    assert again.notes["checkpoint_source"] == "trained" and again.notes["checkpoint"] != ctx.notes["checkpoint"]
    explicit = cls(dataclasses.replace(hp, checkpoint=str(stem)))
    with pytest.raises(BenchError, match=r"checkpoint was trained on random:llama@.*, not on another-model@ffff"):
        explicit.prepare(other, ctx_for(tmp_path))


# --------------------------------------------------------------------------------------------
# Editing
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("cls", [Mend, InstructEdit])
def test_apply_changes_only_targets_and_restores_bit_exactly(arch, cls, tmp_path):
    lm = tiny_model(arch)
    ed = cls(small_hparams(lm, max_steps=2, val_cases=0))
    ed.prepare(lm, ctx_for(tmp_path))
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    handle = ed.apply(lm.model, lm.tokenizer, CASE)
    changed = {n for n, p in lm.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= set(handle.changed) == {t.name for t in ed.targets}
    handle.restore()
    assert all(torch.equal(p, before[n]) for n, p in lm.model.named_parameters())
    assert not any(p.requires_grad for p in lm.model.parameters())


def test_apply_before_prepare_is_an_error():
    lm = tiny_model("llama")
    with pytest.raises(BenchError):
        Mend(small_hparams(lm)).apply(lm.model, lm.tokenizer, CASE)


# --------------------------------------------------------------------------------------------
# CLI: bench train, then bench run finds the checkpoint
# --------------------------------------------------------------------------------------------


def test_bench_train_then_run_uses_the_cached_checkpoint(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from bench.cli import main

    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    common = ["--model", str(tiny_model_dir), "--data-dir", str(FIXTURES),
              "--hparam", "rank=8", "--hparam", "val_cases=2", "--hparam", "batch_size=2"]
    # no task held out: the run below (no --holdout either) trains on the same tasks
    assert main(["train", "--editor", "instructedit", "--max-steps", "2", "--time-budget", "0"]
                + common) == 0
    out = capsys.readouterr().out
    assert "checkpoint:" in out and "convsent, counterfact, recast, recent, zsre" in out
    assert main(["run", "--editor", "instructedit", "--limit", "1", "--task", "counterfact",
                 "--output-dir", str(tmp_path / "runs"), "--hparam", "max_steps=2",
                 "--hparam", "time_budget_s=0"] + common) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    config = json.loads((run_dir / "config.json").read_text())
    assert config["notes"]["checkpoint_source"] == "cache"
    assert config["notes"]["train_tasks"] == ["convsent", "counterfact", "recast", "recent", "zsre"]
