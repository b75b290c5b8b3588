"""MEMIT on tiny random models (Llama, GPT-2 Conv1D, GPT-NeoX layouts)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import editors.rome.layer_stats as layer_stats
from bench.core.cases import EditCase
from bench.core.errors import BenchError
from bench.core.tiny import ARCHS, tiny_config, tiny_model
from bench.runner import Job, run_cases
from editors import get_editor_class
from editors.base import EditContext
from editors.memit import AlphaEdit, Memit
from editors.memit.rows import CaseRows
from editors.memit.solve import memit_update, scaled_inverse
from editors.memit.values import optimise_z
from editors.rome import Rome

CASE = EditCase(case_id="1", task="t", prompt="The mother tongue of Danielle Darrieux",
                subject="Danielle Darrieux", target_new="English", ground_truth="French")
CASE2 = EditCase(case_id="3", task="t", prompt="Toko Yasuda plays the", subject="Toko Yasuda",
                 target_new="piano")
CASE3 = EditCase(case_id="4", task="t", prompt="Barack Obama was born in", subject="Barack Obama",
                 target_new="Paris")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    """One cache directory for the module: statistics of each tiny model are computed once."""
    return tmp_path_factory.mktemp("memit-cache")


def tiny_hparams(cls, lm, **changes):
    hp = cls.default_hparams(lm.model.config)
    # Random tiny models have hidden states of norm ~5 and near-uniform outputs: let the delta
    # grow (no clamp, no decay) and write the edit nearly in full (a small lambda).
    base = dict(layers=[1, 2], mom2_n_samples=400, v_num_grad_steps=20, context_lengths=[4],
                context_counts=[3], clamp_norm_factor=1e4, v_weight_decay=0.0)
    if cls is Memit:
        base["mom2_update_weight"] = 0.1
    base.update(changes)
    return dataclasses.replace(hp, **base)


def prepared(cls, lm, cache, **changes):
    editor = cls(tiny_hparams(cls, lm, **changes))
    editor.prepare(lm, EditContext(cache_dir=cache, log=lambda s: None))
    return editor


def next_token(lm, prompt):
    ids = lm.tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        return lm.model(ids).logits[0, -1].argmax().item()


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_same(model, before):
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


@pytest.mark.parametrize("arch", ARCHS)
def test_one_layer_one_edit_moves_the_prediction_and_restores(arch, shared_cache):
    lm = tiny_model(arch)
    editor = prepared(Memit, lm, shared_cache, layers=[1], v_num_grad_steps=30)
    before = snapshot(lm.model)
    target = lm.tokenizer(" " + CASE.target_new).input_ids[0]
    assert next_token(lm, CASE.prompt) != target

    handle = editor.apply(lm.model, lm.tokenizer, CASE)

    changed = [n for n, p in lm.model.named_parameters() if not torch.equal(p, before[n])]
    assert changed == handle.changed == [lm.layout.layers[1].mlp_out_name + ".weight"]
    assert next_token(lm, CASE.prompt) == target
    json.dumps(handle.info)  # the case record's "edit" entry
    assert {"steps", "loss", "target_prob", "z_s", "keys_s", "solve_s"} <= set(handle.info)
    handle.restore()
    assert_same(lm.model, before)


def test_batched_z_equals_each_case_alone(shared_cache):
    """One optimisation for three cases gives each the z (and steps) it gets alone, although
    they stop at different steps (a stopped case's rows leave the batch)."""
    lm = tiny_model("llama")
    editor = prepared(Memit, lm, shared_cache, v_stop_rule="nll", v_stop_threshold=5.95)
    st = editor._state
    cases = [CASE, CASE2, CASE3]

    def z_of(batch):
        rows = CaseRows.build(lm.tokenizer, batch, st.templates)
        return optimise_z(lm.model, st.layout, editor.hparams, rows, st.layers[-1], st.prefix)

    together, infos = z_of(cases)
    steps = [info["steps"] for info in infos]
    assert len(set(steps)) > 1, steps  # the cases stop at different steps
    for c, case in enumerate(cases):
        alone, alone_info = z_of([case])
        assert alone_info[0]["steps"] == steps[c]
        assert (together[c] - alone[0]).norm() / alone[0].norm() < 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_fast_path_equals_plain_path(arch, shared_cache):
    """Context prefix, tokens before the subject and blocks up to L computed once per call
    give the same z as whole sequences through the whole model, for a batch of two cases."""
    got = {}
    for reuse in (True, False):
        lm = tiny_model(arch)
        editor = prepared(Memit, lm, shared_cache, reuse_context_prefix=reuse, v_num_grad_steps=8)
        handle = editor.apply_batch(lm.model, lm.tokenizer, [CASE, CASE2])
        assert [c["prefix_reused"] for c in handle.info["cases"]] == [reuse, reuse]
        got[reuse] = (torch.stack([lm.layout.layers[i].mlp_out.weight.detach().clone() for i in (1, 2)]),
                      [c["loss"] for c in handle.info["cases"]])
    w_fast, loss_fast = got[True]
    w_plain, loss_plain = got[False]
    assert loss_fast == pytest.approx(loss_plain, rel=1e-4)
    assert (w_fast - w_plain).norm() / w_plain.norm() < 1e-4


def test_apply_batch_of_one_equals_apply_and_restores_exactly(shared_cache):
    lm = tiny_model("llama")
    editor = prepared(Memit, lm, shared_cache, v_num_grad_steps=5)
    before = snapshot(lm.model)
    names = editor._state.names

    handle = editor.apply(lm.model, lm.tokenizer, CASE)
    single = {n: dict(lm.model.named_parameters())[n].detach().clone() for n in names}
    handle.restore()
    assert_same(lm.model, before)

    handle = editor.apply_batch(lm.model, lm.tokenizer, [CASE])
    for n in names:
        torch.testing.assert_close(dict(lm.model.named_parameters())[n], single[n], rtol=1e-6, atol=1e-7)
    assert handle.changed == names
    assert len(handle.info["cases"]) == 1 and handle.info["cases"][0]["steps"] == 4
    json.dumps(handle.info)
    assert {"z_s", "keys_s", "solve_s", "layers"} <= set(handle.info)
    handle.restore()
    assert_same(lm.model, before)


def test_apply_many_yields_each_case_alone(shared_cache):
    """Single mode with several cases per call: each handle holds that case's edit alone, equal
    to applying the case by itself."""
    lm = tiny_model("llama")
    editor = prepared(Memit, lm, shared_cache, v_num_grad_steps=5, parallel_edits=2)
    assert editor.edits_per_call == 2
    before = snapshot(lm.model)
    names = editor._state.names
    together = []
    for handle in editor.apply_many(lm.model, lm.tokenizer, [CASE, CASE2]):
        together.append(torch.cat([dict(lm.model.named_parameters())[n].detach().flatten() for n in names]))
        assert handle.info["z_cases"] == 2
        handle.restore()
        assert_same(lm.model, before)
    for case, weights in zip([CASE, CASE2], together):
        handle = editor.apply(lm.model, lm.tokenizer, case)
        alone = torch.cat([dict(lm.model.named_parameters())[n].detach().flatten() for n in names])
        handle.restore()
        assert (weights - alone).norm() / alone.norm() < 1e-4


def target_logprob(lm, case):
    """Teacher-forced log-probability of the target tokens after the prompt."""
    prompt = lm.tokenizer(case.prompt).input_ids
    target = lm.tokenizer(" " + case.target_new).input_ids
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(torch.tensor([prompt + target])).logits[0].float(), -1)
    return sum(logp[len(prompt) - 1 + j, t].item() for j, t in enumerate(target))


def test_batch_of_cases_in_one_update(shared_cache):
    """apply_batch writes every case of the call in one update per layer: each case's target
    becomes more likely after its prompt (the first case's becomes the prediction), and the
    handle lists each case's facts in order."""
    lm = tiny_model("llama")
    editor = prepared(Memit, lm, shared_cache, v_num_grad_steps=30)
    cases = [CASE, CASE2, CASE3]
    before = snapshot(lm.model)
    pre = [target_logprob(lm, c) for c in cases]
    handle = editor.apply_batch(lm.model, lm.tokenizer, cases)
    post = [target_logprob(lm, c) for c in cases]
    assert all(b > a for a, b in zip(pre, post)), (pre, post)
    assert next_token(lm, CASE.prompt) == lm.tokenizer(" " + CASE.target_new).input_ids[0]
    assert len(handle.info["cases"]) == 3 and all(c["z_norm"] > 0 for c in handle.info["cases"])
    handle.restore()
    assert_same(lm.model, before)


def test_update_is_the_least_squares_solution():
    """The push-through form equals the direct solve R^T K (lambda C + K^T K)^-1."""
    torch.manual_seed(0)
    d, h, n = 12, 5, 3
    a = torch.randn(d, 4 * d, dtype=torch.float64)
    c = a @ a.T / a.shape[1]
    keys, resid = torch.randn(n, d, dtype=torch.float64), torch.randn(n, h, dtype=torch.float64)
    direct = resid.T @ keys @ torch.linalg.inv(7.0 * c + keys.T @ keys)
    torch.testing.assert_close(memit_update(keys, resid, scaled_inverse(c, 7.0)), direct)


def test_key_statistics_are_shared_with_rome(tmp_path, monkeypatch):
    """One statistics file per layer: MEMIT (and AlphaEdit) read what ROME computed."""
    lm = tiny_model("llama")
    ctx = EditContext(cache_dir=tmp_path, log=lambda s: None)
    rome = Rome(dataclasses.replace(Rome.default_hparams(lm.model.config), layer=1, mom2_n_samples=400,
                                    context_lengths=[4], context_counts=[3]))
    rome.prepare(lm, ctx)

    def boom(*a, **k):
        raise AssertionError("recomputed")

    monkeypatch.setattr(layer_stats, "compute_moments", boom)
    for cls in (Memit, AlphaEdit):
        ctx = EditContext(cache_dir=tmp_path, log=lambda s: None)
        cls(tiny_hparams(cls, lm, layers=[1])).prepare(lm, ctx)
        assert ctx.notes[cls.name]["stats_loaded_from_cache"]
    assert len(list((tmp_path / "stats").glob("*.safetensors"))) == 1


@pytest.mark.parametrize("name,override,match", [
    ("memit", {"layers": [4]}, "layer 4 is out of range"),
    ("memit", {"layers": []}, "at least one layer"),
    ("memit", {"layers": [2, 1]}, "strictly increasing"),
    ("memit", {"mom2_update_weight": 0.0}, "mom2_update_weight must be > 0"),
    ("memit", {"context_counts": [1, 2]}, "same length"),
    ("alphaedit", {"nullspace_threshold": -1e-3}, "nullspace_threshold must be >= 0"),
    ("alphaedit", {"layers": [-1]}, "layer -1 is out of range"),
])
def test_bad_hyperparameters_are_one_line_errors(name, override, match):
    cls = get_editor_class(name)
    config = tiny_config("llama")
    editor = cls(dataclasses.replace(cls.default_hparams(config), **override))
    with pytest.raises(BenchError, match=match) as err:
        editor.check(config)
    assert "\n" not in str(err.value)


def test_registered_with_model_shaped_defaults():
    config = tiny_config("llama")
    for name in ("memit", "alphaedit"):
        cls = get_editor_class(name)
        assert cls.batch_edits
        hp = cls.default_hparams(config)
        assert hp.layers == [1, 2, 3] and hp.v_loss_layer == 3  # 4 layers: from 1, at most 5


def test_subject_not_in_prompt():
    lm = tiny_model("gpt2")
    editor = Memit(tiny_hparams(Memit, lm))
    bad = EditCase(case_id="2", task="t", prompt="The capital of France is", subject="Toko Yasuda",
                   target_new="Rome")
    with pytest.raises(BenchError, match="subject 'Toko Yasuda' not found in prompt"):
        editor.apply_batch(lm.model, lm.tokenizer, [CASE, bad])


def test_single_mode_through_the_runner(shared_cache):
    """The runner's single mode hands the editor `edits_per_call` cases at once (apply_many);
    every case is evaluated with its own edit and the model is left as it was."""
    lm = tiny_model("llama")
    editor = prepared(Memit, lm, shared_cache, v_num_grad_steps=3, parallel_edits=2)
    before = snapshot(lm.model)
    records = list(run_cases(lm, editor, [Job(CASE, False), Job(CASE3, False)], batch_size=8))
    assert [r["error"] for r in records] == [None, None]
    assert [r["edit"]["z_cases"] for r in records] == [2, 2]
    assert all(r["edit"]["steps"] == 2 for r in records)
    assert_same(lm.model, before)


# --------------------------------------------------------------------------------------------
# A norm between the MLP and the residual stream (Gemma-2/3)
# --------------------------------------------------------------------------------------------


def test_through_post_norm_lands_the_residual_where_the_norm_passes_it():
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    from editors.memit.keys import through_post_norm

    torch.manual_seed(0)
    norm = Gemma3RMSNorm(16)
    with torch.no_grad():
        norm.weight.normal_(0.0, 0.5)
    out = torch.randn(3, 16) * 0.1  # a small MLP output, as Gemma's are: the norm scales it up
    with torch.no_grad():
        reachable = norm(out + 0.02 * torch.randn(3, 16))  # a target the norm can produce
        resid = reachable - norm(out)
        d = through_post_norm(norm, out, resid)
        torch.testing.assert_close(norm(out + d), reachable, rtol=1e-3, atol=1e-3)
        # written as it is (the residual taken for the projection's own output), it misses
        assert (norm(out + resid) - reachable).norm() > 10 * (norm(out + d) - reachable).norm()


def tiny_gemma3():
    import transformers

    from bench.core.tiny import tiny_tokenizer
    from bench.core.models import model_from_config

    tok = tiny_tokenizer()
    config = transformers.Gemma3TextConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
        pad_token_id=0, bos_token_id=0, eos_token_id=0)
    return model_from_config(config, tok, seed=0)


def test_memit_writes_through_gemmas_post_feed_forward_norm(shared_cache):
    """On Gemma-3 the MLP output is normed before it joins the stream: MEMIT finds the norm and
    maps each layer's residual through it, so the edit still takes, and restores exactly."""
    lm = tiny_gemma3()
    editor = prepared(Memit, lm, shared_cache, layers=[1, 2], v_num_grad_steps=30)
    assert set(editor._state.post_norms) == {1, 2}
    before = snapshot(lm.model)
    target = lm.tokenizer(" " + CASE.target_new).input_ids[0]
    assert next_token(lm, CASE.prompt) != target
    handle = editor.apply(lm.model, lm.tokenizer, CASE)
    assert next_token(lm, CASE.prompt) == target
    handle.restore()
    assert_same(lm.model, before)


# --------------------------------------------------------------------------------------------
# kl_position: where the KL term reads "{subject} is a" (docs/memit.md)
# --------------------------------------------------------------------------------------------


def batch_update(cls, lm, cache, **changes) -> torch.Tensor:
    """Every edited weight's change after apply_batch of two cases, flattened (then restored)."""
    editor = prepared(cls, lm, cache, v_num_grad_steps=8, kl_factor=1.0, **changes)
    before = snapshot(lm.model)
    handle = editor.apply_batch(lm.model, lm.tokenizer, [CASE, CASE2])
    params = dict(lm.model.named_parameters())
    delta = torch.cat([(params[n].detach() - handle.original(n)).flatten() for n in handle.changed])
    handle.restore()
    assert_same(lm.model, before)
    return delta


def test_kl_position_changes_the_update_on_both_paths(shared_cache):
    """The two positions give different updates; each gives the same update with and without
    the fast path (where the essence row is fed from its subject's last token on)."""
    deltas = {(position, reuse): batch_update(Memit, tiny_model("llama"), shared_cache,
                                              kl_position=position, reuse_context_prefix=reuse)
              for position in ("after_prompt", "subject_last") for reuse in (True, False)}
    for position in ("after_prompt", "subject_last"):
        fast, plain = deltas[position, True], deltas[position, False]
        assert (fast - plain).norm() / plain.norm() < 1e-4, position  # measured: 2e-7
    after, subject = deltas["after_prompt", False], deltas["subject_last", False]
    assert (after - subject).norm() / after.norm() > 1e-2  # measured: 8e-2
    rows = CaseRows.build(tiny_model("llama").tokenizer, [CASE], ["{}"], "subject_last")
    essence = rows.seqs[-1]
    assert rows.is_essence(1) and essence.kl_pos == essence.lookup < len(essence.ids) - 1


@pytest.mark.parametrize("name", ["memit", "alphaedit"])
def test_unknown_kl_position_fails_before_the_model_loads(name, capsys, tmp_path, monkeypatch):
    import bench.session
    from bench.cli import main
    from tests.helpers import FIXTURE_DATA

    def refuse(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(bench.session, "load_model", refuse)
    monkeypatch.setattr(bench.session, "load_config", lambda *a, **k: tiny_config("llama"))
    code = main(["run", "--editor", name, "--task", "zsre", "--data-dir", str(FIXTURE_DATA),
                 "--output-dir", str(tmp_path / "runs"), "--hparam", "kl_position=last"])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert err.strip() == (f"bench: error: {name}: hyperparameter kl_position must be one of "
                           "after_prompt, subject_last, got 'last'")
    assert not (tmp_path / "runs").exists()


def test_easyedit_preset_is_easyedits_memit_with_the_kl_term_at_the_subject():
    from bench.session import build_editor, hparams_source

    config = tiny_config("llama")
    config.num_hidden_layers = 32  # the preset's layers 4-8 must exist
    hp = build_editor("memit", hparams_source("memit", "easyedit"), config).hparams
    assert hp.kl_position == "subject_last"
    assert (hp.layers, hp.v_lr, hp.v_weight_decay, hp.clamp_norm_factor, hp.mom2_update_weight,
            hp.context_lengths, hp.context_counts) == ([4, 5, 6, 7, 8], 0.5, 1e-3, 4.0, 15000.0, [10], [5])
    assert build_editor("memit", {}, config).hparams.kl_position == "after_prompt"
