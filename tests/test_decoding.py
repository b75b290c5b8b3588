"""The measuring paths at the compute floor (bench.core.decoding) give what the paths they
replace give: transformers' `generate`, every probe run whole (`reference_paths`)."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings, strategies as st

from bench.core.decoding import MIN_SHARED, plan_batches, reference_paths
from bench.core.generation import StopRules, StopCheck, _cut, generate, regenerate
from bench.core.probes import score_probes
from bench.core.tiny import tiny_model, tiny_tokenizer
from bench.runner import execute
from tests.helpers import jsonl_lines, without_time
from tests.test_view import seq_options

CONTEXT = ("The Eiffel Tower is located in the city of Paris. The mother tongue of Danielle Darrieux is "
           "French. Barack Obama was born in Hawaii. Michael Jordan plays basketball for Chicago. ")
PROMPTS = ["The Eiffel Tower is located in", "Danielle Darrieux spoke", "What is the capital of France?",
           "Toko Yasuda plays the", "Michael Jordan plays", "The author", "Paris"]


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def lm(request):
    torch.manual_seed(0)
    return tiny_model(request.param)


@given(st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=40), min_size=1, max_size=30),
       st.integers(1, 8), st.booleans(), st.integers(1, 6))
@settings(max_examples=200, deadline=None)
def test_plan_batches_covers_every_sequence_once_and_shares_only_a_common_prefix(seqs, batch, share, min_shared):
    plan = plan_batches(seqs, batch, share, min_shared=min_shared)
    seen = sorted(i for idx, _ in plan for i in idx)
    assert seen == list(range(len(seqs)))
    for idx, shared in plan:
        assert 1 <= len(idx) <= batch
        if shared:
            assert share and len(idx) > 1 and shared >= min_shared
            assert all(seqs[i][:shared] == seqs[idx[0]][:shared] for i in idx)
            assert all(len(seqs[i]) > shared for i in idx)  # every row keeps a token of its own


def test_rows_with_a_long_common_context_are_batched_together():
    a, b = [7] * 40, [8] * 40
    seqs = [a + [1], b + [1], a + [2, 3], b + [2], [5, 6]]
    plan = plan_batches(seqs, 8, share=True)
    assert sorted((sorted(idx), shared) for idx, shared in plan) == [([0, 2], 40), ([1, 3], 40), ([4], 0)]
    assert all(shared == 0 for _, shared in plan_batches(seqs, 8, share=False))


@given(st.lists(st.integers(0, 399), min_size=1, max_size=30), st.booleans(),
       st.lists(st.sampled_from(["\n", ".", " the", "Paris", "?"]), max_size=2))
@settings(max_examples=300, deadline=None)
def test_the_stop_check_fires_exactly_where_the_whole_text_first_holds_a_stop(tokens, at_newline, stops):
    tok = tiny_tokenizer()
    rules = StopRules(max_new_tokens=64, stop_strings=tuple(stops), at_newline=at_newline)
    check = StopCheck(tok, rules)
    first_check = next((k for k in range(1, len(tokens) + 1) if check(tokens[:k])), None)
    first_whole = next((k for k in range(1, len(tokens) + 1)
                        if _cut(tok.decode(tokens[:k], skip_special_tokens=True), rules)[1] is not None), None)
    assert first_check == first_whole


@pytest.mark.parametrize("batch", [1, 3, 128])
@pytest.mark.parametrize("rules", [StopRules(12), StopRules(9, stop_strings=(".", " the")),
                                   StopRules(6, at_newline=False)])
def test_generate_equals_transformers_generate(lm, batch, rules):
    prompts = PROMPTS + [CONTEXT + p for p in PROMPTS]
    ours = generate(lm.model, lm.tokenizer, prompts, rules, batch)
    with reference_paths():
        theirs = generate(lm.model, lm.tokenizer, prompts, rules, batch)
    assert ours == theirs
    assert generate(lm.model, lm.tokenizer, prompts, rules, batch, share_prefix=True) == theirs


def test_a_shared_context_gives_the_same_readings(lm):
    probes = [(CONTEXT + p, a) for p in PROMPTS for a in ("Paris", "French language")]
    shared = score_probes(lm.model, lm.tokenizer, probes, batch_size=5, share_prefix=True)
    with reference_paths():
        whole = score_probes(lm.model, lm.tokenizer, probes, batch_size=5, share_prefix=True)
    assert len(lm.tokenizer(CONTEXT)["input_ids"]) > MIN_SHARED
    assert [r.pred_ids for r in shared] == [r.pred_ids for r in whole]
    assert [r.mean_logprob for r in shared] == pytest.approx([r.mean_logprob for r in whole], abs=1e-4)


def test_regenerate_with_a_shared_context_keeps_what_is_reproduced_and_redecodes_the_rest(lm):
    prompts = [CONTEXT + p for p in PROMPTS]
    rules = StopRules(8)
    with reference_paths():
        truth = generate(lm.model, lm.tokenizer, prompts, rules)
    wrong = [truth[0].__class__("x", "max_new_tokens", 1, (5,))] + truth[1:]
    assert regenerate(lm.model, lm.tokenizer, prompts, wrong, rules, share_prefix=True) == truth


def _runs_agree(tmp_path, **options) -> None:
    """A run's case records (and checkpoints) are the same on the paths of this module and on
    the ones they replace."""
    out = {}
    for name, paths in (("floor", None), ("reference", reference_paths)):
        opts = seq_options(tmp_path / name, **options)
        with (paths() if paths else _nothing()):
            run = execute(opts, log=lambda s: None)
        out[name] = ([without_time(r) for r in jsonl_lines(run / "cases.jsonl")],
                     [{k: v for k, v in c.items() if k != "time"} for c in
                      (jsonl_lines(run / "checkpoints.jsonl") if (run / "checkpoints.jsonl").exists() else [])])
    assert json.dumps(out["floor"], sort_keys=True) == json.dumps(out["reference"], sort_keys=True)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("editor", ["ft", "tell"])
def test_single_runs_score_and_generate_as_the_reference_paths(tmp_path, tiny_load, editor, monkeypatch):
    import editors
    monkeypatch.setitem(editors.BUILTIN, "tell", "tests.test_view:TellContext")
    _runs_agree(tmp_path, editor=editor, mode="single", eval_every=50, locality_probes=50, limit=6,
                hparams={"steps": 2} if editor == "ft" else {})


@pytest.mark.parametrize("editor", ["ft", "tell"])
def test_sequential_runs_score_and_generate_as_the_reference_paths(tmp_path, tiny_load, editor, monkeypatch):
    import editors
    monkeypatch.setitem(editors.BUILTIN, "tell", "tests.test_view:TellContext")
    _runs_agree(tmp_path, editor=editor, limit=6, hparams={"steps": 2} if editor == "ft" else {})


def test_row_weights_read_each_row_with_its_own_version(lm):
    """Two edits of the same linear weights decoded in one batch give what each edit gives on
    its own (and the model keeps its weights)."""
    from bench.core import rowweights

    params = dict(lm.model.named_parameters())
    name = next(n for n, p in params.items() if n.endswith("mlp.down_proj.weight"))
    assert rowweights.supported(lm.model, [name])
    assert not rowweights.supported(lm.model, [next(n for n in params if "norm" in n)])
    before = params[name].detach().clone()
    versions = [{name: before + 0.5 * torch.randn_like(before)} for _ in range(2)]
    rules = StopRules(8)
    alone = []
    for version in versions:
        with torch.no_grad():
            params[name].copy_(version[name])
        alone.append(generate(lm.model, lm.tokenizer, PROMPTS, rules))
    with torch.no_grad():
        params[name].copy_(before)
    views = rowweights.RowWeights(lm.model, versions)
    which = [k % 2 for k in range(len(PROMPTS))]
    with views.active():
        together = generate(lm.model, lm.tokenizer, PROMPTS, rules, 4,
                            on_rows=lambda rows: views.select([which[r] for r in rows]))
    assert together == [alone[which[k]][k] for k in range(len(PROMPTS))]
    assert torch.equal(params[name], before)
    assert not dict(lm.model.named_modules())[name.rpartition(".")[0]]._forward_hooks
