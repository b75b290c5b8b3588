"""lm-eval regression (bench/regression/) on a tiny model and tests/fixtures/data.

A test-only editor that sharpens the output distribution (scales the LM head by 8) stands in for
a destructive edit: it must show up as a higher perplexity, and both modes must leave every
weight exactly as it was.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import bench.regression.corpus as corpus
import bench.session
import editors
from bench.cli import main
from bench.core.errors import BenchError
from bench.core.io import read_corpus, read_jsonl
from bench.regression import RegressionOptions
from bench.regression.docs import build_fact_retention_docs
from bench.regression.suite import LMSuite
from bench.runner import execute
from bench.session import RunOptions
from editors.base import EditHandle, Editor, param_name
from tests.helpers import FIXTURE_DATA
from bench.core.tiny import CORPUS, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass
class ScaleHeadHparams:
    factor: float = 8.0


class ScaleHead(Editor):
    """Destructive on purpose: multiplies the output embedding (LM head) by `factor`."""

    name = "scale-head"
    Hparams = ScaleHeadHparams

    def apply(self, model, tokenizer, case) -> EditHandle:
        name = param_name(model, model.get_output_embeddings())
        handle = EditHandle(model, [name])
        with torch.no_grad():
            dict(model.named_parameters())[name].mul_(self.hparams.factor)
        return handle


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(model, snap) -> bool:
    now = model.state_dict()
    return now.keys() == snap.keys() and all(torch.equal(now[k], snap[k]) for k in snap)


@pytest.fixture
def tiny_lm(monkeypatch):
    """The run loads this one tiny Llama, so the test can inspect its weights afterwards; the
    destructive ScaleHead is registered as the editor "scale-head"."""
    monkeypatch.setitem(editors.BUILTIN, "scale-head", f"{__name__}:ScaleHead")
    lm = tiny_model("llama")
    monkeypatch.setattr(bench.session, "load_model", lambda *a, **k: lm)
    monkeypatch.setattr(bench.session, "load_config", lambda *a, **k: lm.model.config)
    return lm


@pytest.fixture
def corpus_file(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(CORPUS))
    return path


def _opts(tmp_path, **kw) -> RunOptions:
    base = dict(editor="scale-head", tasks=["counterfact"], limit=2, data_dir=str(FIXTURE_DATA),
                output_dir=str(tmp_path / "runs"), batch_size=8)
    base.update(kw)
    return RunOptions(**base)


# --------------------------------------------------------------------------------------------
# Suite construction
# --------------------------------------------------------------------------------------------


def test_fact_retention_docs_are_seeded_and_well_formed():
    docs = build_fact_retention_docs(FIXTURE_DATA, ["counterfact", "recent"], seed=0)
    again = build_fact_retention_docs(FIXTURE_DATA, ["counterfact", "recent"], seed=0)
    assert docs == again and docs
    assert build_fact_retention_docs(FIXTURE_DATA, ["counterfact", "recent"], seed=1) != docs or len(docs) < 3
    for d in docs:
        assert 2 <= len(d["choices"]) <= 4
        assert len({c.lower() for c in d["choices"]}) == len(d["choices"])
        assert d["task"] in ("counterfact", "recent")
    # probes of the edited cases are left out
    edited = {(d["task"], d["case_id"]) for d in docs[:1]}
    fewer = build_fact_retention_docs(FIXTURE_DATA, ["counterfact", "recent"], seed=0, exclude=edited)
    assert not edited & {(d["task"], d["case_id"]) for d in fewer}


def test_read_corpus_formats(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("first doc\nline two\n\n\nsecond doc\n")
    assert read_corpus(txt) == ["first doc\nline two", "second doc"]
    lines = tmp_path / "lines.txt"  # no blank line: one document per line
    lines.write_text("first doc\nsecond doc\n")
    assert read_corpus(lines) == ["first doc", "second doc"]
    jl = tmp_path / "b.jsonl"
    jl.write_text('{"text": "one"}\n\n{"text": "two"}\n')
    assert read_corpus(jl) == ["one", "two"]
    with pytest.raises(BenchError, match="not found"):
        read_corpus(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(BenchError, match="no documents"):
        read_corpus(tmp_path / "empty.txt")


# --------------------------------------------------------------------------------------------
# End to end through lm-eval
# --------------------------------------------------------------------------------------------


def test_single_mode_detects_damage_and_restores(tmp_path, tiny_lm, corpus_file):
    snap = _snapshot(tiny_lm.model)
    opts = _opts(tmp_path, limit=3, regression=["fact_retention", "bench_perplexity"],
                 regression_sample=2, lm_limit=8, regression_corpus=str(corpus_file))
    run = execute(opts, argv=["regress"], log=lambda m: None, label="regress-test")
    assert _same(tiny_lm.model, snap)
    block = json.loads((run / "regression.json").read_text())
    assert block["restored_bit_exact"] is True
    assert block["mode"] == "single" and block["n_edits_applied"] == 3 and block["n_evaluated"] == 2
    assert sum(e["evaluated"] for e in block["edits"]) == 2
    ppl = block["results"]["bench_perplexity"]
    bpb = ppl["bits_per_byte"]
    assert bpb["after"] > bpb["before"] and bpb["diff"] > 2 * bpb["diff_stderr"] > 0
    assert ppl["word_perplexity"]["diff"] > 0
    assert len(ppl["bits_per_byte"]["after_per_edit"]) == 2
    fr = block["results"]["fact_retention"]["acc"]
    assert 0 <= fr["before"] <= 1 and fr["stderr_method"] == "paired per-doc differences"
    # files: config, one case record per edit, raw lm-eval output, summary block
    cases = [json.loads(line) for line in (run / "cases.jsonl").read_text().splitlines()]
    assert len(cases) == 3 and all("post" in c for c in cases)
    assert (run / "regression" / "lm_eval-before.json").exists()
    assert (run / "regression" / "fact_retention.jsonl").exists()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["regression"]["results"]["bench_perplexity"]["bits_per_byte"]["diff"] > 0
    assert "counterfact" in summary["tasks"]


def test_sequential_mode_generated_corpus_and_restore(tmp_path, tiny_lm, monkeypatch):
    monkeypatch.setattr(corpus, "CORPUS_DOCS", 4)
    monkeypatch.setattr(corpus, "CORPUS_NEW_TOKENS", 24)
    snap = _snapshot(tiny_lm.model)
    opts = _opts(tmp_path, limit=3, seed=3, mode="sequential", lm_limit=8,
                 regression=["fact_retention", "bench_perplexity"])
    run = execute(opts, argv=["regress"], log=lambda m: None)
    assert _same(tiny_lm.model, snap)
    block = json.loads((run / "regression.json").read_text())
    assert block["restored_bit_exact"] is True
    assert block["n_evaluated"] == 1 and block["n_edits_applied"] == 3
    assert "generated from the unedited model" in block["suite"]["bench_perplexity"]["source"]
    docs = read_jsonl(run / "regression" / "perplexity_corpus.jsonl")
    assert len(docs) == 4
    # three stacked x8 scalings: far sharper, far worse on text the unedited model wrote
    bpb = block["results"]["bench_perplexity"]["bits_per_byte"]
    assert bpb["after"] > bpb["before"] + 1.0
    # the corpus is seeded: a second generation gives the same text
    again = corpus.generated_corpus(tiny_lm, seed=3, n_docs=4, new_tokens=24)
    assert [d["text"] for d in docs] == again
    # and every case was scored on the model holding all three edits
    cases = [json.loads(line) for line in (run / "cases.jsonl").read_text().splitlines()]
    assert len(cases) == 3 and all("post" in c for c in cases)


def test_run_regression_hook(tmp_path, tiny_lm, corpus_file, monkeypatch):
    snap = _snapshot(tiny_lm.model)
    opts = _opts(tmp_path, regression=["bench_perplexity"], mode="sequential",
                 lm_limit=4, regression_corpus=str(corpus_file))
    run = execute(opts, argv=["run"], log=lambda m: None)
    assert _same(tiny_lm.model, snap)
    summary = json.loads((run / "summary.json").read_text())
    reg = summary["regression"]
    assert reg["mode"] == "sequential" and reg["lm_tasks"] == ["bench_perplexity"]
    assert reg["results"]["bench_perplexity"]["bits_per_byte"]["diff"] > 0
    assert (run / "regression.json").exists()


def test_unknown_and_unloadable_lm_tasks(tmp_path, capsys, tiny_lm):
    rc = main(["regress", "--editor", "none", "--task", "counterfact", "--limit", "1",
               "--data-dir", str(FIXTURE_DATA), "--output-dir", str(tmp_path),
               "--lm-tasks", "fact_retention,no_such_lm_task"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.count("\n") == 0 and "no_such_lm_task" in err and err.startswith("bench: error:")
    assert not any(tmp_path.iterdir())  # failed before creating a run directory
    # a real lm-eval task whose data cannot be reached offline: one line naming it and the cause
    reg = RegressionOptions(lm_tasks=["arc_easy"], lm_limit=2)
    try:
        LMSuite(tiny_lm, reg, tmp_path / "r", FIXTURE_DATA, ["counterfact"])
    except BenchError as exc:
        msg = str(exc)
    else:
        pytest.skip("arc_easy's data is in the local datasets cache")
    assert "arc_easy" in msg and "could not load its data" in msg and "\n" not in msg


def test_weights_fingerprint_reads_zero_dim_buffers():
    # Gemma-3 keeps its embedding scale as a 0-dim buffer; the fingerprint must hash it, and see it change.
    from bench.regression.hook import weights_fingerprint

    module = torch.nn.Linear(2, 2)
    module.register_buffer("scale", torch.tensor(25.3), persistent=False)
    before = weights_fingerprint(module)
    assert weights_fingerprint(module) == before
    module.scale.fill_(26.0)
    assert weights_fingerprint(module) != before


def test_generated_corpus_bar_advances_per_batch_and_only_when_generating(tmp_path, monkeypatch, tiny_lm):
    bars = []

    class Spy(corpus.tqdm):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.updates, self.postfixes = [], []
            bars.append(self)

        def update(self, n=1):
            self.updates.append(n)
            return super().update(n)

        def set_postfix_str(self, s="", refresh=True):
            self.postfixes.append(s)
            return super().set_postfix_str(s, refresh)

    monkeypatch.setattr(corpus, "tqdm", Spy)
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path))
    logs = []
    texts = corpus.generated_corpus(tiny_lm, seed=5, log=logs.append, n_docs=20, new_tokens=12)
    (bar,) = bars
    assert bar.total == 20 and bar.updates == [8, 8, 4] and bar.n == 20  # one step per batch
    assert "token 1/12 of this batch" in bar.postfixes  # and the batch's decoding steps show
    assert len(logs) == 1 and logs[0].startswith("generating the perplexity corpus")
    # from the cache: the same text, no bar, no "generating" line
    assert corpus.generated_corpus(tiny_lm, seed=5, log=logs.append, n_docs=20, new_tokens=12) == texts
    assert len(bars) == 1 and len(logs) == 1
