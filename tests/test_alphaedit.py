"""AlphaEdit on tiny random models: the null-space projection, the sequential state and its
checkpointing, the projector cache."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import editors.memit.nullspace as nullspace
from bench.core.tiny import tiny_model
from editors.base import EditContext
from editors.memit import AlphaEdit, Memit
from editors.memit.solve import alphaedit_base_inverse, alphaedit_update
from tests.helpers import FIXTURE_DATA
from tests.test_memit import CASE, CASE2, CASE3, assert_same, snapshot, tiny_hparams


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("alphaedit-cache")


def median_eigenvalue(lm, cache, layer: int) -> float:
    """A threshold leaving half of the tiny model's key space as the null space."""
    editor = Memit(tiny_hparams(Memit, lm, layers=[layer]))
    editor.prepare(lm, EditContext(cache_dir=cache, log=lambda s: None))
    return torch.linalg.eigvalsh(editor._state.stats[layer].mom2.double()).median().item()


def prepared(cls, lm, cache, **changes):
    editor = cls(tiny_hparams(cls, lm, **changes))
    editor.prepare(lm, EditContext(cache_dir=cache, log=lambda s: None))
    return editor


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_update_leaves_preserved_keys_alone(arch, shared_cache):
    """For keys in the span of C's large-eigenvalue directions (ordinary text's keys), the
    projection's output is unchanged by AlphaEdit's update and changed by MEMIT's."""
    lm = tiny_model(arch)
    threshold = median_eigenvalue(lm, shared_cache, 1)
    values, vectors = torch.linalg.eigh(
        prepared(Memit, lm, shared_cache, layers=[1])._state.stats[1].mom2.double())
    preserved = vectors[:, values >= threshold].float()
    torch.manual_seed(0)
    probe = (preserved @ torch.randn(preserved.shape[1], 16)).T  # 16 preserved keys
    module = lm.layout.layers[1].mlp_out
    with torch.no_grad():
        out_before = module(probe)
    changes = {}
    for cls, extra in ((AlphaEdit, {"nullspace_threshold": threshold}), (Memit, {})):
        editor = prepared(cls, lm, shared_cache, layers=[1], v_num_grad_steps=10, **extra)
        handle = editor.apply(lm.model, lm.tokenizer, CASE)
        with torch.no_grad():
            changes[cls.name] = ((module(probe) - out_before).norm() / out_before.norm()).item()
        assert handle.info["layers"][0]["update_norm"] > 1e-3  # both did write something
        handle.restore()
    assert changes["alphaedit"] < 1e-5, changes
    assert changes["memit"] > 1e-2, changes


def test_update_is_the_reference_solve():
    """The push-through form equals the reference code's solve
    (P (K^T K + K_p^T K_p) + l2 I) X = P K^T R, D = X^T, with and without earlier keys."""
    torch.manual_seed(0)
    d, h, n = 10, 4, 3
    basis = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))[0][:, :6]
    p = basis @ basis.T
    keys, resid = torch.randn(n, d, dtype=torch.float64), torch.randn(n, h, dtype=torch.float64)
    for earlier in (None, torch.randn(5, d, dtype=torch.float64)):
        kp = earlier.T @ earlier if earlier is not None else torch.zeros(d, d, dtype=torch.float64)
        x = torch.linalg.solve(p @ (keys.T @ keys + kp) + 2.5 * torch.eye(d, dtype=torch.float64),
                               p @ keys.T @ resid)
        got = alphaedit_update(keys, resid, p, alphaedit_base_inverse(p, kp if earlier is not None else None, 2.5))
        torch.testing.assert_close(got, x.T)


def test_sequential_state_grows_in_batches_only_and_rolls_back(shared_cache):
    lm = tiny_model("llama")
    editor = prepared(AlphaEdit, lm, shared_cache, v_num_grad_steps=5,
                      nullspace_threshold=median_eigenvalue(lm, shared_cache, 1) * 10)
    before = snapshot(lm.model)
    assert editor.sequential_state() == {}

    handle = editor.apply(lm.model, lm.tokenizer, CASE)  # single mode: nothing kept
    handle.restore()
    assert editor.sequential_state() == {} and not editor._preserved
    assert_same(lm.model, before)

    first = editor.apply_batch(lm.model, lm.tokenizer, [CASE, CASE2])
    state1 = editor.sequential_state()
    assert sorted(state1) == ["preserved.1", "preserved.2"]
    assert all(t.dtype == torch.float64 and t.shape == (64, 64) for t in state1.values())
    json.dumps(first.info)
    after_first = snapshot(lm.model)

    second = editor.apply_batch(lm.model, lm.tokenizer, [CASE3])
    state2 = editor.sequential_state()
    assert not torch.equal(state2["preserved.1"], state1["preserved.1"])

    second.restore()  # weights and state back to after the first batch, exactly
    assert_same(lm.model, after_first)
    assert all(torch.equal(editor.sequential_state()[k], state1[k]) for k in state1)
    first.restore()
    assert_same(lm.model, before)
    assert editor.sequential_state() == {}


def test_sequential_state_round_trips_and_resumes_exactly(shared_cache, tmp_path):
    """The state saved with safetensors and loaded into a fresh editor gives the next batch the
    same update as the editor that never stopped."""
    lm = tiny_model("llama")
    hp = dict(v_num_grad_steps=4, nullspace_threshold=median_eigenvalue(lm, shared_cache, 1) * 10)
    editor = prepared(AlphaEdit, lm, shared_cache, **hp)
    before = snapshot(lm.model)
    first = editor.apply_batch(lm.model, lm.tokenizer, [CASE, CASE2])
    save_file(editor.sequential_state(), str(tmp_path / "state.safetensors"))
    after_first = snapshot(lm.model)

    resumed = prepared(AlphaEdit, lm, shared_cache, **hp)
    resumed.load_sequential_state(load_file(str(tmp_path / "state.safetensors")))
    assert {k: v.tolist() for k, v in resumed.sequential_state().items()} == \
        {k: v.tolist() for k, v in editor.sequential_state().items()}

    results = []
    for ed in (editor, resumed):
        handle = ed.apply_batch(lm.model, lm.tokenizer, [CASE3])
        results.append({n: p.detach().clone() for n, p in lm.model.named_parameters() if n in handle.changed})
        handle.restore()
        assert_same(lm.model, after_first)
    for n in results[0]:
        torch.testing.assert_close(results[0][n], results[1][n], rtol=1e-6, atol=1e-7)
    first.restore()
    assert_same(lm.model, before)

    with pytest.raises(ValueError, match="unexpected sequential state entry"):
        resumed.load_sequential_state({"preserved.9": torch.zeros(64, 64)})
    resumed.load_sequential_state({})
    assert resumed.sequential_state() == {}


def test_apply_batch_of_one_equals_apply(shared_cache):
    lm = tiny_model("llama")
    editor = prepared(AlphaEdit, lm, shared_cache, v_num_grad_steps=5,
                      nullspace_threshold=median_eigenvalue(lm, shared_cache, 1) * 10)
    before = snapshot(lm.model)
    handle = editor.apply(lm.model, lm.tokenizer, CASE)
    single = {n: p.detach().clone() for n, p in lm.model.named_parameters() if n in handle.changed}
    handle.restore()
    handle = editor.apply_batch(lm.model, lm.tokenizer, [CASE])
    for n, w in single.items():
        torch.testing.assert_close(dict(lm.model.named_parameters())[n], w, rtol=1e-6, atol=1e-7)
    handle.restore()
    assert_same(lm.model, before)


def test_projectors_cached_next_to_the_statistics(tmp_path, monkeypatch):
    lm = tiny_model("llama")
    ctx = EditContext(cache_dir=tmp_path, log=lambda s: None)
    AlphaEdit(tiny_hparams(AlphaEdit, lm, nullspace_threshold=1e-3)).prepare(lm, ctx)
    notes = ctx.notes["alphaedit"]
    assert not notes["nullspace_loaded_from_cache"] and set(notes["nullspace_dim"]) == {"1", "2"}
    files = sorted(p.name for p in (tmp_path / "nullspace").glob("*.safetensors"))
    stats = sorted(p.stem for p in (tmp_path / "stats").glob("*.safetensors"))
    assert files == [f"{s}-null0.001.safetensors" for s in stats]

    def boom(*a, **k):
        raise AssertionError("recomputed")

    monkeypatch.setattr(nullspace, "null_projector", boom)
    ctx = EditContext(cache_dir=tmp_path, log=lambda s: None)
    AlphaEdit(tiny_hparams(AlphaEdit, lm, nullspace_threshold=1e-3)).prepare(lm, ctx)
    assert ctx.notes["alphaedit"]["nullspace_loaded_from_cache"]
    assert ctx.notes["alphaedit"]["nullspace_dim"] == notes["nullspace_dim"]
    # another threshold is another projector
    with pytest.raises(AssertionError, match="recomputed"):
        AlphaEdit(tiny_hparams(AlphaEdit, lm, nullspace_threshold=2e-3)).prepare(
            lm, EditContext(cache_dir=tmp_path, log=lambda s: None))


def test_zero_threshold_leaves_the_model_unchanged(shared_cache):
    """No null space (threshold 0): P = 0, so the update is zero."""
    lm = tiny_model("llama")
    editor = prepared(AlphaEdit, lm, shared_cache, nullspace_threshold=0.0, v_num_grad_steps=3)
    before = snapshot(lm.model)
    handle = editor.apply(lm.model, lm.tokenizer, CASE)
    assert_same(lm.model, before)
    assert [layer["update_norm"] for layer in handle.info["layers"]] == [0.0, 0.0]
    handle.restore()


def test_sequential_run_through_the_runner(tmp_path, tiny_load):
    """`bench run --mode sequential --edit-batch 3` with alphaedit on the tiny model: each call
    writes three cases, every case record carries its own facts and the call's timings, and the
    checkpoint holds the editor's preserved keys."""
    from bench.runner import execute
    from bench.session import RunOptions

    hparams = {"layers": "1,2", "mom2_n_samples": "300", "v_num_grad_steps": "3", "context_lengths": "4",
               "context_counts": "2", "nullspace_threshold": "1e9"}
    opts = RunOptions(editor="alphaedit", tasks=["counterfact"], model="tiny", device="cpu", limit=None,
                      data_dir=str(FIXTURE_DATA), output_dir=str(tmp_path / "runs"), hparams=hparams,
                      batch_size=4, mode="sequential", edit_batch=3, eval_every=0, locality_probes=3)
    path = execute(opts, log=lambda s: None)
    records = [json.loads(x) for x in (path / "cases.jsonl").read_text().splitlines() if x.strip()]
    assert records and all(not r["error"] for r in records)
    assert len(records) == 6 and all(r["edit"]["steps"] == 2 for r in records)
    calls = [r["edit"]["batch"] for r in records if "batch" in r["edit"]]  # on each call's first case
    assert len(calls) == 2 and all({"z_s", "keys_s", "solve_s"} <= set(c) for c in calls)
    state = load_file(str(path / "sequential" / "state.safetensors"))
    assert {k for k in state if k.startswith("editor.")} == {"editor.preserved.1", "editor.preserved.2"}


def test_kl_position_changes_the_update(shared_cache):
    from tests.test_memit import batch_update

    lm = tiny_model("llama")
    threshold = median_eigenvalue(lm, shared_cache, 1) * 10
    after, subject = (batch_update(AlphaEdit, tiny_model("llama"), shared_cache, kl_position=position,
                                   nullspace_threshold=threshold)
                      for position in ("after_prompt", "subject_last"))
    assert after.norm() > 0 and (after - subject).norm() / after.norm() > 1e-2  # measured: 6e-2


def test_easyedit_preset_is_easyedits_alphaedit_with_the_kl_term_at_the_subject():
    from bench.core.tiny import tiny_config
    from bench.session import build_editor, hparams_source

    config = tiny_config("llama")
    config.num_hidden_layers = 32  # the preset's layers 4-8 must exist
    hp = build_editor("alphaedit", hparams_source("alphaedit", "easyedit"), config).hparams
    assert hp.kl_position == "subject_last"
    assert (hp.layers, hp.v_lr, hp.v_weight_decay, hp.clamp_norm_factor, hp.nullspace_threshold,
            hp.l2) == ([4, 5, 6, 7, 8], 0.1, 0.5, 0.75, 2e-2, 10.0)
    assert build_editor("alphaedit", {}, config).hparams.kl_position == "after_prompt"
