"""ROME on tiny random models of the three supported layouts (Llama, GPT-2 Conv1D, GPT-NeoX)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import bench.core.samples as samples
import editors.rome.layer_stats as layer_stats
from bench.core.io import read_corpus
from bench.core.cases import EditCase
from bench.core.errors import BenchError
from bench.session import build_editor, hparams_source
from editors.base import EditContext
from editors.rome import Rome, rank_one_update
from editors.rome.contexts import context_templates
from editors.rome.hparams import KL_POSITIONS, RomeHparams
from editors.rome.inputs import build_sequences
from editors.rome.tokens import find_subject, last_token_in_span
from bench.core.tiny import ARCHS, tiny_config, tiny_model

CASE = EditCase(case_id="1", task="t", prompt="The mother tongue of Danielle Darrieux",
                subject="Danielle Darrieux", target_new="English", ground_truth="French")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_hparams(lm, **changes):
    hp = Rome.default_hparams(lm.model.config)
    # Random tiny models have MLP outputs of norm ~0.01: let the delta grow (no clamp, no decay).
    base = dict(mom2_n_samples=400, v_num_grad_steps=30, context_lengths=[4],
                context_counts=[3], clamp_norm_factor=1e4, v_weight_decay=0.0)
    base.update(changes)
    for k, v in base.items():
        setattr(hp, k, v)
    return hp


def ctx_for(tmp_path):
    return EditContext(cache_dir=tmp_path, log=lambda s: None)


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    """One cache directory for the module: statistics of each tiny model are computed once."""
    return tmp_path_factory.mktemp("rome-cache")


def next_token(lm, prompt):
    ids = lm.tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        return lm.model(ids).logits[0, -1].argmax().item()


@pytest.mark.parametrize("arch", ARCHS)
def test_edit_one_weight_target_and_exact_restore(arch, shared_cache):
    lm = tiny_model(arch)
    editor = Rome(tiny_hparams(lm))
    editor.prepare(lm, ctx_for(shared_cache))
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    target_first = lm.tokenizer(" " + CASE.target_new).input_ids[0]
    assert next_token(lm, CASE.prompt) != target_first

    handle = editor.apply(lm.model, lm.tokenizer, CASE)

    changed = [n for n, p in lm.model.named_parameters() if not torch.equal(p, before[n])]
    assert changed == handle.changed
    assert changed == [lm.layout.layers[editor.hparams.layer].mlp_out_name + ".weight"]
    assert next_token(lm, CASE.prompt) == target_first

    handle.restore()
    for n, p in lm.model.named_parameters():
        assert torch.equal(p, before[n]), n


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("mom2", [False, True])
def test_update_maps_key_to_value(arch, mom2, shared_cache):
    """After the update the projection sends the residual key (by default the bare prompt's) to
    v* (bias included), for Linear and Conv1D."""
    lm = tiny_model(arch)
    editor = Rome(tiny_hparams(lm, mom2_adjustment=mom2, v_num_grad_steps=3))
    editor.prepare(lm, ctx_for(shared_cache))
    edit = editor.compute(lm.model, lm.tokenizer, CASE)
    handle = editor.write(lm.model, edit)
    module = lm.layout.layers[editor.hparams.layer].mlp_out
    with torch.no_grad():
        out = module(edit.residual_key[None])[0]
    torch.testing.assert_close(out, edit.value, rtol=1e-4, atol=1e-4)
    # the handle carries the edit's facts for the case record
    assert handle.info["steps"] == edit.info["steps"] and {"key_s", "value_s", "update_s"} <= set(handle.info)


@pytest.mark.parametrize("arch", ARCHS)
def test_context_prefix_reuse_is_exact(arch, shared_cache):
    """Reusing the context texts' keys/values gives the same k* and v* as full sequences, also
    for a second edit applied on top of the first (the cache is rebuilt for the changed model)."""
    case2 = EditCase(case_id="3", task="t", prompt="Toko Yasuda plays the", subject="Toko Yasuda",
                     target_new="piano")
    got = {}
    for reuse in (True, False):
        lm = tiny_model(arch)
        editor = Rome(tiny_hparams(lm, reuse_context_prefix=reuse, v_num_grad_steps=5))
        editor.prepare(lm, ctx_for(shared_cache))
        assert editor._state.prefix is not None if reuse else editor._state.prefix is None
        out = []
        for case in (CASE, case2):  # sequential: no restore in between
            edit = editor.compute(lm.model, lm.tokenizer, case)
            editor.write(lm.model, edit)
            assert edit.info["prefix_reused"] == reuse
            out.append((edit.key, edit.value))
        got[reuse] = out
    for (k1, v1), (k2, v2) in zip(got[True], got[False]):
        torch.testing.assert_close(k1, k2, rtol=1e-4, atol=1e-5)
        # Adam amplifies float rounding in near-zero gradient coordinates a little.
        assert (v1 - v2).norm() / v2.norm() < 1e-3


@pytest.mark.parametrize("residual_key", ["prompt", "mean"])
def test_residual_key_is_mapped_exactly_to_the_value(residual_key, shared_cache):
    """"prompt" (ROME's code): the bare prompt's key maps to v*; "mean" (the paper): k* does."""
    lm = tiny_model("llama")
    editor = Rome(tiny_hparams(lm, residual_key=residual_key, v_num_grad_steps=5))
    editor.prepare(lm, ctx_for(shared_cache))
    edit = editor.compute(lm.model, lm.tokenizer, CASE)
    editor.write(lm.model, edit)
    mapped = edit.residual_key
    assert torch.equal(mapped, edit.key) == (residual_key == "mean")
    weight = lm.layout.layers[editor.hparams.layer].mlp_out.weight
    torch.testing.assert_close(weight.float() @ mapped, edit.value, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_fixed_tokens_reuse_without_contexts_is_exact(arch, shared_cache):
    """With no context texts, the tokens before the subject's last token are still run once per
    edit and reused by every step: v* equals the full-sequence optimisation."""
    got = {}
    for reuse in (True, False):
        lm = tiny_model(arch)
        editor = Rome(tiny_hparams(lm, reuse_context_prefix=reuse, v_num_grad_steps=5,
                                   context_lengths=[], context_counts=[]))
        editor.prepare(lm, ctx_for(shared_cache))
        edit = editor.compute(lm.model, lm.tokenizer, CASE)
        got[reuse] = (edit.key, edit.value)
    torch.testing.assert_close(got[True][0], got[False][0], rtol=1e-4, atol=1e-5)
    assert (got[True][1] - got[False][1]).norm() / got[False][1].norm() < 1e-3


@pytest.mark.parametrize("use_c", [False, True])
def test_conv1d_update_equals_linear(use_c):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    d_in, d_out = 6, 4
    linear = nn.Linear(d_in, d_out)
    conv = Conv1D(d_out, d_in)
    with torch.no_grad():
        conv.weight.copy_(linear.weight.T)
        conv.bias.copy_(linear.bias)
    k, v = torch.randn(d_in), torch.randn(d_out)
    a = torch.randn(d_in, 3 * d_in)
    c_inv = torch.linalg.inv(a @ a.T / a.shape[1]) if use_c else None
    rank_one_update(linear, k, v, c_inv)
    rank_one_update(conv, k, v, c_inv)
    torch.testing.assert_close(conv.weight.T, linear.weight)
    with torch.no_grad():
        torch.testing.assert_close(linear(k[None])[0], v, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(conv(k[None])[0], v, rtol=1e-5, atol=1e-5)


def test_key_statistics_and_contexts_are_cached(tmp_path, monkeypatch):
    lm = tiny_model("llama")
    hp = tiny_hparams(lm)
    ctx1 = ctx_for(tmp_path)
    Rome(hp).prepare(lm, ctx1)
    info = ctx1.notes["rome"]
    assert info["stats_tokens"] == hp.mom2_n_samples and not info["stats_loaded_from_cache"]
    assert len(info["context_templates"]) == 1 + sum(hp.context_counts)

    def boom(*a, **k):
        raise AssertionError("recomputed")

    monkeypatch.setattr(layer_stats, "compute_moments", boom)
    monkeypatch.setattr(samples, "sample_batches", boom)  # no text sampled again either
    ctx2 = ctx_for(tmp_path)
    editor = Rome(hp)
    editor.prepare(lm, ctx2)
    assert ctx2.notes["rome"]["stats_loaded_from_cache"]
    assert ctx2.notes["rome"]["stats_tokens"] == hp.mom2_n_samples
    assert ctx2.notes["rome"]["context_templates"] == info["context_templates"]
    assert list((tmp_path / "stats").glob("*.safetensors"))
    assert len(list((tmp_path / "samples").glob("*.safetensors"))) == 2  # contexts, statistics text


def test_context_templates_reproducible():
    lm = tiny_model("gpt_neox")
    a = context_templates(lm.model, lm.tokenizer, None, [5, 10], [10, 10], seed=3, cache_dir=None)
    b = context_templates(lm.model, lm.tokenizer, None, [5, 10], [10, 10], seed=3, cache_dir=None)
    assert a == b and len(a) == 21 and a[0] == "{}"
    assert all(t.endswith(". {}") and t.count("{}") == 1 for t in a[1:])


def test_subject_not_in_prompt(tmp_path):
    lm = tiny_model("gpt2")
    editor = Rome(tiny_hparams(lm, mom2_adjustment=False))
    bad = EditCase(case_id="2", task="t", prompt="The capital of France is", subject="Toko Yasuda",
                   target_new="Rome")
    with pytest.raises(BenchError, match="subject 'Toko Yasuda' not found in prompt"):
        editor.apply(lm.model, lm.tokenizer, bad)


def test_subject_last_token_with_and_without_leading_space():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    prompt = "The mother tongue of Danielle Darrieux is"
    start, end = find_subject(prompt, "Danielle Darrieux")
    # Byte-level BPE: the space is part of the following token.
    bpe = tiny_model("llama").tokenizer
    ids = bpe(prompt).input_ids
    j = last_token_in_span(bpe, prompt, start, end)
    assert bpe.decode(ids[: j + 1]).endswith("Darrieux") and not bpe.decode(ids[j + 1:]).startswith("x")
    # Word-level on whitespace: no token carries a space.
    words = prompt.split()
    wl = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]"] + words)}, unk_token="[UNK]"))
    wl.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=wl, unk_token="[UNK]")
    assert last_token_in_span(tok, prompt, start, end) == words.index("Darrieux")
    # Case-insensitive fallback.
    assert find_subject("danielle darrieux speaks", "Danielle Darrieux") == (0, 17)


def test_stats_corpus_file_jsonl_and_plain(tmp_path):
    lm = tiny_model("gpt2")
    plain = tmp_path / "corpus.txt"
    plain.write_text("The Eiffel Tower is in Paris.\nDanielle Darrieux spoke French.\n" * 20)
    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": line}) for line in plain.read_text().splitlines()))
    assert read_corpus(plain) == read_corpus(jsonl)
    ctx = ctx_for(tmp_path)
    Rome(tiny_hparams(lm, stats_corpus=str(jsonl), mom2_n_samples=100)).prepare(lm, ctx)
    assert ctx.notes["rome"]["stats_tokens"] == 100
    with pytest.raises(BenchError, match="stats_corpus file not found"):
        Rome(tiny_hparams(lm, stats_corpus=str(tmp_path / "missing.txt"))).prepare(lm, ctx_for(tmp_path))


def test_runner_records_notes_and_case_errors(tmp_path, monkeypatch):
    """`bench run --editor rome` on the tiny Llama and the fixture CounterFact data."""
    import bench.session
    from bench.runner import execute
    from bench.session import RunOptions
    from tests.helpers import FIXTURE_DATA

    monkeypatch.setattr(bench.session, "load_model", lambda *a, **k: tiny_model("llama"))
    monkeypatch.setattr(bench.session, "load_config", lambda *a, **k: tiny_config("llama"))
    opts = RunOptions(editor="rome", tasks=["counterfact"], model="tiny", device="cpu", limit=2,
                      data_dir=str(FIXTURE_DATA), output_dir=str(tmp_path / "runs"),
                      hparams={"mom2_n_samples": "300", "v_num_grad_steps": "2",
                               "context_counts": "2", "context_lengths": "4"}, batch_size=4)
    path = execute(opts, argv=["run"], log=lambda s: None)
    config = json.loads((path / "config.json").read_text())
    notes = config["notes"]["rome"]
    assert notes["stats_tokens"] == 300 and len(notes["context_templates"]) == 3
    records = [json.loads(line) for line in (path / "cases.jsonl").read_text().splitlines()]
    assert len(records) == 2
    for r in records:  # an edit either succeeded or failed with a one-line reason
        assert ("post" in r) != bool(r["error"])


@pytest.mark.parametrize("rule,threshold,expected", [
    ("loss", 0.0, 4),    # ROME's loop: the last of the 5 iterations only evaluates the loss
    ("nll", 0.0, 5),     # the harness's earlier loop: every iteration that does not stop updates
    ("loss", 1e9, 0),    # stops at once on the total loss
    ("nll", 1e9, 0),
])
def test_value_stop_rule_and_steps_in_the_case_record(rule, threshold, expected, shared_cache):
    lm = tiny_model("llama")
    editor = Rome(tiny_hparams(lm, v_num_grad_steps=5, v_stop_rule=rule, v_stop_threshold=threshold))
    editor.prepare(lm, ctx_for(shared_cache))
    handle = editor.apply(lm.model, lm.tokenizer, CASE)
    assert handle.info["steps"] == expected
    assert set(handle.info) >= {"loss", "nll", "kl", "steps", "key_s", "value_s", "update_s"}
    handle.restore()


# --------------------------------------------------------------------------------------------
# kl_position: where the KL term reads "{subject} is a" (docs/rome.md)
# --------------------------------------------------------------------------------------------


def test_kl_position_reads_the_essence_prompt_at_its_end_or_at_the_subject():
    lm = tiny_model("llama")
    _, after = build_sequences(lm.tokenizer, CASE, ["{}"], "after_prompt")
    _, subject = build_sequences(lm.tokenizer, CASE, ["{}"], "subject_last")
    assert after.ids == subject.ids and after.lookup == subject.lookup
    assert after.kl_pos == len(after.ids) - 1  # the token "a": the next word's distribution
    assert subject.kl_pos == subject.lookup < after.kl_pos  # the reference's position
    assert lm.tokenizer.decode(subject.ids[: subject.kl_pos + 1]) == CASE.subject
    assert RomeHparams().kl_position == "after_prompt"  # the default is unchanged


def test_kl_position_changes_the_update_on_both_paths(shared_cache):
    """The two positions give different edits (only v* changes: the keys do not read the KL
    prompt); each position gives the same edit with and without the fast path."""
    deltas = {}
    for position in KL_POSITIONS:
        for reuse in (True, False):
            lm = tiny_model("llama")
            editor = Rome(tiny_hparams(lm, kl_position=position, reuse_context_prefix=reuse,
                                       v_num_grad_steps=8, kl_factor=1.0))
            editor.prepare(lm, ctx_for(shared_cache))
            handle = editor.apply(lm.model, lm.tokenizer, CASE)
            [name] = handle.changed
            deltas[position, reuse] = dict(lm.model.named_parameters())[name].detach() - handle.original(name)
            handle.restore()
    for position in KL_POSITIONS:
        fast, plain = deltas[position, True], deltas[position, False]
        assert (fast - plain).norm() / plain.norm() < 1e-4, position  # measured: 2e-7
    after, subject = deltas["after_prompt", False], deltas["subject_last", False]
    assert (after - subject).norm() / after.norm() > 1e-3  # measured: 7e-3


def test_unknown_kl_position_fails_before_the_model_loads(capsys, tmp_path, monkeypatch):
    """`--hparam kl_position=...` outside its choices: one line, exit 2, no model loaded."""
    import bench.session
    from bench.cli import main
    from tests.helpers import FIXTURE_DATA

    def refuse(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(bench.session, "load_model", refuse)
    monkeypatch.setattr(bench.session, "load_config", lambda *a, **k: tiny_config("llama"))
    code = main(["run", "--editor", "rome", "--task", "zsre", "--data-dir", str(FIXTURE_DATA),
                 "--output-dir", str(tmp_path / "runs"), "--hparam", "kl_position=subject_first"])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert err.strip() == ("bench: error: rome: hyperparameter kl_position must be one of "
                           "after_prompt, subject_last, got 'subject_first'")
    assert not (tmp_path / "runs").exists()
    with pytest.raises(BenchError, match="kl_position must be one of"):
        build_sequences(tiny_model("llama").tokenizer, CASE, ["{}"], "end")


def test_easyedit_preset_reads_the_kl_term_at_the_subject():
    config = tiny_config("llama")
    config.num_hidden_layers = 32  # the preset's layer 5 must exist
    hp = build_editor("rome", hparams_source("rome", "easyedit"), config).hparams
    assert hp.kl_position == "subject_last" and hp.layer == 5 and hp.mom2_adjustment is False
    assert build_editor("rome", {}, config).hparams.kl_position == "after_prompt"


def spy_bars(module, monkeypatch) -> list:
    """Every tqdm bar `module` makes, recording its update() and set_postfix_str() calls."""
    bars = []

    class Spy(module.tqdm):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.updates = []
            bars.append(self)

        def update(self, n=1):
            self.updates.append(n)
            return super().update(n)

    monkeypatch.setattr(module, "tqdm", Spy)
    return bars


def test_statistics_text_bar_moves_during_generation(monkeypatch):
    """The sampling bar advances after every decoding step, by exactly the tokens kept."""
    lm = tiny_model("llama")
    bars = spy_bars(layer_stats, monkeypatch)
    batches = []
    real = layer_stats.sample_batches

    def counted(*a, **k):
        for rows in real(*a, **k):
            batches.append(len(rows))
            yield rows

    monkeypatch.setattr(layer_stats, "sample_batches", counted)
    docs = layer_stats.sample_documents(lm.model, lm.tokenizer, 300, seed=0)
    (bar,) = bars
    assert bar.total == 300 and bar.n == sum(map(len, docs)) >= 300
    assert sum(bar.updates) == bar.n  # no correction after a batch: the counts were exact
    assert len(bar.updates) > 10 * len(batches)  # per decoding step, not per batch
    assert max(bar.updates[1:]) <= layer_stats.SAMPLE_BATCH


def test_statistics_text_says_cached_only_when_read_from_the_cache(tmp_path, monkeypatch):
    lm = tiny_model("llama")
    common = dict(corpus=None, n_samples=200, dtype_name="float32", seed=0)
    logs = []
    layer_stats.layer_stats(lm.model, lm.tokenizer, lm.layout, lm.identity, [1], cache_dir=tmp_path,
                            log=logs.append, **common)
    (text_file,) = (tmp_path / "samples").glob("stats-text-*.safetensors")
    sampling = [line for line in logs if "text from the model" in line]
    assert sampling == [f"rome: sampling 200 tokens of text from the model for key statistics "
                        f"(seed 0; to be cached as {text_file})"]
    assert not any("read from the cache" in line for line in logs)

    def boom(*a, **k):
        raise AssertionError("sampled again")

    monkeypatch.setattr(layer_stats, "sample_batches", boom)
    logs.clear()  # another layer: new statistics, the same text
    layer_stats.layer_stats(lm.model, lm.tokenizer, lm.layout, lm.identity, [2], cache_dir=tmp_path,
                            log=logs.append, **common)
    assert not any("sampling" in line for line in logs)
    assert any(line.startswith(f"rome: key-statistics text read from the cache: {text_file} (")
               for line in logs)

    monkeypatch.undo()
    logs.clear()  # no cache directory: sampled, and said not to be cached
    layer_stats.layer_stats(lm.model, lm.tokenizer, lm.layout, lm.identity, [1], cache_dir=None,
                            log=logs.append, **common)
    assert [line for line in logs if "text from the model" in line] == [
        "rome: sampling 200 tokens of text from the model for key statistics (seed 0; not cached)"]
