"""Sequential (lifelong) mode on a tiny model and tests/fixtures/data: every case applied once,
checkpoints that score every edit made so far on the model holding them, fixed locality probes,
batch calls, and resume after a kill ending where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import signal
import sys
from dataclasses import dataclass, replace

import pytest
import torch
from hypothesis import given, settings, strategies as st
from safetensors.torch import load_file

import editors
from bench.cli import main
from bench.core.cases import EditCase, PromptAnswer
from bench.core.errors import BenchError
from bench.core.metrics import case_scores
from bench.core.probes import evaluate_cases
from bench.core.tiny import tiny_model
from bench.runner import execute, resume
from bench.session import RunOptions, build_editor
from editors.base import CombinedHandle, EditHandle, Editor
from tests.helpers import FIXTURE_DATA, start, wait_for_lines
from tests.helpers import jsonl_lines as lines, without_time

pytestmark = pytest.mark.usefixtures("one_thread")

TASKS = ["counterfact", "recent"]
N_CASES = 9  # 6 counterfact + 3 recent eval cases in the fixture data
# strong enough to move a tiny model's predictions, so edits interfere with each other
FT_STRONG = {"steps": "8", "layers": "1", "lr": "0.05", "norm_constraint": "0"}


def options(tmp_path, **changes) -> RunOptions:
    base = dict(editor="ft", tasks=list(TASKS), model="tiny", device="cpu", limit=None,
                data_dir=str(FIXTURE_DATA), output_dir=str(tmp_path / "runs"), hparams=dict(FT_STRONG),
                batch_size=4, mode="sequential", eval_every=3, locality_probes=5)
    base.update(changes)
    return RunOptions(**base)


def case_from(record: dict) -> EditCase:
    d = dict(record["case"])
    d["rephrase_prompts"] = tuple(d["rephrase_prompts"])
    d["locality"] = tuple(PromptAnswer(**p) for p in d["locality"])
    d["portability"] = tuple(PromptAnswer(**p) for p in d["portability"])
    return EditCase(**d)


def weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def fresh_after(cases: list[EditCase], n: int, editor: Editor):
    """A fresh tiny model with the first n edits applied in order, seeded as the run seeds them."""
    lm = tiny_model("llama")
    for i in range(n):
        torch.manual_seed(i)  # the run seeds each position with seed + position
        editor.apply_batch(lm.model, lm.tokenizer, [cases[i]])
    return lm


def test_every_case_applied_once_and_checkpoints_score_all_edits_so_far(tmp_path, tiny_load, monkeypatch):
    models = []
    import bench.session

    def load(spec="x", device="auto", dtype="auto"):
        models.append(tiny_model("llama"))
        return models[-1]

    monkeypatch.setattr(bench.session, "load_model", load)
    path = execute(options(tmp_path), log=lambda s: None)
    model = models[0].model
    assert all(torch.equal(p, q) for p, q in zip(weights(model).values(), weights(tiny_model("llama").model).values())), \
        "the model is back to its unedited weights after the run"

    records = lines(path / "cases.jsonl")
    assert [r["order"] for r in records] == list(range(N_CASES))  # each case once, in order
    assert len({(r["task"], r["case_id"]) for r in records}) == N_CASES
    checkpoints = lines(path / "checkpoints.jsonl")
    assert [c["n_edits"] for c in checkpoints] == [3, 6, 9]
    for c in checkpoints:  # every edit made so far is scored, not only the latest
        assert [x["case_id"] for x in c["cases"]] == [r["case_id"] for r in records[: c["n_edits"]]]
    # the locality probes are drawn once: the same prompts at every checkpoint
    probe_sets = [[(p["task"], p["case_id"], p["index"]) for p in c["probes"]] for c in checkpoints]
    assert probe_sets[0] == probe_sets[1] == probe_sets[2] and len(probe_sets[0]) == 5 + 2
    assert checkpoints[0]["weight_change"]["model.layers.1.mlp.down_proj.weight"] > 0

    # A checkpoint's scores are those of the model holding exactly the first n edits.
    cases = [case_from(r) for r in records]
    n = 6
    editor = build_editor("ft", FT_STRONG, tiny_model("llama").model.config)
    fresh = fresh_after(cases, n, editor)
    first = replace(cases[0], locality=())
    expected = case_scores(evaluate_cases(fresh.model, fresh.tokenizer, [first], counterfact=True)[0])
    got = checkpoints[1]["cases"][0]["post"]
    assert {k: got[k] for k in expected} == expected
    # ... and not those right after the case's own edit (later edits moved the model)
    only_first = tiny_model("llama")
    torch.manual_seed(0)
    editor.apply_batch(only_first.model, only_first.tokenizer, [cases[0]])
    alone = evaluate_cases(only_first.model, only_first.tokenizer, [first], counterfact=True)[0]
    after_six = evaluate_cases(fresh.model, fresh.tokenizer, [first], counterfact=True)[0]
    assert alone.reliability.mean_logprob != after_six.reliability.mean_logprob

    summary = json.loads((path / "summary.json").read_text())
    assert summary["config"]["mode"] == "sequential"
    seq = summary["sequential"]
    assert seq["planned_edits"] == N_CASES and [c["n_edits"] for c in seq["checkpoints"]] == [3, 6, 9]
    # the table at N edits: each case's scores on the model holding all edits, its own locality
    # prompts included (as single mode reads them); the curve reads locality on the fixed probes
    assert all("post" in r and "locality" in r["post"] for r in records if r["case"]["locality"])
    assert summary["tasks"]["counterfact"]["reliability"]["n"] == 6
    assert summary["tasks"]["counterfact"]["locality"]["n"] == 6
    assert summary["tasks"]["counterfact"]["reliability"] == checkpoints[-1]["summary"]["counterfact"]["reliability"]
    assert checkpoints[-1]["summary"]["counterfact"]["locality"]["n"] == 5
    assert "locality" not in checkpoints[0]["cases"][0]["post"]
    # a case's own locality after all edits, computed independently
    full = fresh_after(cases, N_CASES, editor)
    ev = evaluate_cases(full.model, full.tokenizer, [cases[0]], counterfact=True)[0]
    unedited = evaluate_cases(tiny_model("llama").model, full.tokenizer, [cases[0]], counterfact=True)[0]
    assert records[0]["post"]["locality"] == case_scores(ev, unedited)["locality"]
    assert records[0]["wild"]["generations"]["post"]["prompt"]["text"] == \
        checkpoints[-1]["cases"][0]["wild"]["generations"]["prompt"]["text"]


def test_edit_batch_calls_the_editor_with_batches(tmp_path, tiny_load, monkeypatch):
    calls = []

    class Recording(Editor):
        name = "recording"
        Hparams = dataclass(type("H", (), {}))
        batch_edits = True

        def apply_batch(self, model, tokenizer, cases):
            calls.append([c.case_id for c in cases])
            return EditHandle(model, [], info={"cases": [{"k": i} for i in range(len(cases))], "joint_s": 1})

    monkeypatch.setattr(editors, "get_editor_class", lambda name: Recording)
    import bench.options
    import bench.session
    monkeypatch.setattr(bench.session, "get_editor_class", lambda name: Recording)
    monkeypatch.setattr(bench.options, "get_editor_class", lambda name: Recording)  # RunOptions.check
    path = execute(options(tmp_path, editor="recording", hparams={}, edit_batch=2, eval_every=4),
                   log=lambda s: None)
    assert [len(c) for c in calls] == [2, 2, 2, 2, 1]
    records = lines(path / "cases.jsonl")
    assert [r["edit"]["k"] for r in records] == [0, 1] * 4 + [0]
    assert records[0]["edit"]["batch"] == {"joint_s": 1} and "batch" not in records[1]["edit"]
    assert all(r["time"]["edits_together"] == (1 if i == 8 else 2) for i, r in enumerate(records))
    assert [c["n_edits"] for c in lines(path / "checkpoints.jsonl")] == [4, 8, 9]


class RefusingEditor(Editor):
    """Adds 1e-3 to one weight per case; refuses case 202 (BenchError)."""

    name = "refusing"
    Hparams = dataclass(type("H", (), {}))

    def apply(self, model, tokenizer, case):
        if case.case_id == "202":
            raise BenchError(f"refusing case {case.case_id}")
        name = "model.layers.0.mlp.down_proj.weight"
        handle = EditHandle(model, [name])
        with torch.no_grad():
            dict(model.named_parameters())[name].add_(1e-3)
        return handle


def test_a_failing_case_in_a_batch_fails_alone(tmp_path, tiny_load, monkeypatch):
    monkeypatch.setitem(editors.BUILTIN, "refusing", "tests.test_sequential:RefusingEditor")
    models = []
    import bench.session

    def load(spec="x", device="auto", dtype="auto"):
        models.append(tiny_model("llama"))
        return models[-1]

    monkeypatch.setattr(bench.session, "load_model", load)
    path = execute(options(tmp_path, editor="refusing", hparams={}, edit_batch=3, eval_every=0),
                   log=lambda s: None)
    records = lines(path / "cases.jsonl")
    assert [r["case_id"] for r in records if r["error"]] == ["202"]
    assert "refusing case 202" in records[1]["error"]
    checkpoint = lines(path / "checkpoints.jsonl")[-1]
    assert checkpoint["n_edits"] == N_CASES and checkpoint["n_applied"] == N_CASES - 1
    assert "202" not in [c["case_id"] for c in checkpoint["cases"]]
    # the failed batch was undone and retried case by case: 8 edits of 1e-3 in all
    state = load_file(str(path / "sequential" / "state.safetensors"))
    name = "model.model.layers.0.mlp.down_proj.weight"
    unedited = dict(tiny_model("llama").model.named_parameters())[name[len("model."):]]
    assert torch.allclose(state[name] - unedited.detach(), torch.full_like(unedited, 8e-3), atol=1e-6)


@dataclass
class CounterHparams:
    step: float = 0.01


class StatefulEditor(Editor):
    """Adds (number of edits so far + 1) * step to one bias-free weight row per call: the change
    depends on the state the editor carries, so a resume that lost it would end elsewhere."""

    name = "stateful"
    Hparams = CounterHparams
    batch_edits = True
    fail_at: int | None = None

    def __init__(self, hparams=None):
        super().__init__(hparams)
        self.count = torch.zeros(1)

    def apply_batch(self, model, tokenizer, cases):
        if StatefulEditor.fail_at is not None and self.count.item() >= StatefulEditor.fail_at:
            raise KeyboardInterrupt("simulated crash")
        name = "model.layers.0.mlp.down_proj.weight"
        handle = EditHandle(model, [name])
        with torch.no_grad():
            dict(model.named_parameters())[name][0].add_((self.count.item() + 1) * self.hparams.step)
        self.count += len(cases)
        return handle

    def apply(self, model, tokenizer, case):
        return self.apply_batch(model, tokenizer, [case])

    def sequential_state(self):
        return {"count": self.count.clone()}

    def load_sequential_state(self, state):
        self.count = state["count"].clone()


def test_resume_restores_the_model_and_the_editor_state(tmp_path, tiny_load, monkeypatch):
    monkeypatch.setitem(editors.BUILTIN, "stateful", "tests.test_sequential:StatefulEditor")
    straight = execute(options(tmp_path / "a", editor="stateful", hparams={}, edit_batch=2, eval_every=4),
                       log=lambda s: None)
    StatefulEditor.fail_at = 6  # dies in its 4th call, after the checkpoint at 4 edits
    try:
        with pytest.raises(KeyboardInterrupt):
            execute(options(tmp_path / "b", editor="stateful", hparams={}, edit_batch=2, eval_every=4),
                    log=lambda s: None)
    finally:
        StatefulEditor.fail_at = None
    crashed = next((tmp_path / "b" / "runs").iterdir())
    assert [c["n_edits"] for c in lines(crashed / "checkpoints.jsonl")] == [4]
    assert len(lines(crashed / "cases.jsonl")) == 6  # two made after the checkpoint: lost on resume
    logs = []
    resume(crashed, log=logs.append)
    assert any("dropping 2 case records made after the last checkpoint (edit 4)" in x for x in logs)
    assert any("(4 edits already made, 5 to go)" in x for x in logs)
    a, b = (load_file(str(p / "sequential" / "state.safetensors")) for p in (straight, crashed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert b["editor.count"].item() == N_CASES
    ra, rb = lines(straight / "cases.jsonl"), lines(crashed / "cases.jsonl")
    assert [without_time(r) for r in ra] == [without_time(r) for r in rb]
    ca, cb = lines(straight / "checkpoints.jsonl"), lines(crashed / "checkpoints.jsonl")
    assert [without_time(c) for c in ca] == [without_time(c) for c in cb]


def test_sigkill_and_resume_ends_where_a_straight_run_ends(tmp_path, tiny_model_dir):
    """A sequential `bench run` is SIGKILLed while making its 6th edit (checkpoints at 2 and 4,
    the 5th edit's record written); the resumed run re-applies nothing the saved state holds and
    ends with the state, records and checkpoints of an uninterrupted run."""
    out = tmp_path / "killed"
    hp = [x for k, v in FT_STRONG.items() for x in ("--hparam", f"{k}={v}")]
    args = ["--editor", "ft", "--task", ",".join(TASKS), "--model", tiny_model_dir, "--device", "cpu",
            "--data-dir", FIXTURE_DATA, "--output-dir", out, "--limit", "0", "--batch-size", "4",
            "--mode", "sequential", "--eval-every", "2", "--locality-probes", "5", "--name", "killed", *hp]
    proc = start([sys.executable, "-m", "tests.helpers", "slow-run"] + args, cwd=tmp_path,
                 SLOW_EDIT_DELAY="0.05", SLOW_EDIT_HANG_AFTER="5")
    straight = execute(options(tmp_path, model=str(tiny_model_dir), output_dir=str(tmp_path / "straight"),
                               eval_every=2), log=lambda s: None)
    try:
        run_path = wait_for_lines(lambda: out.glob("*/cases.jsonl"), 5, proc)
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate()  # SIGKILLed: it exits at once
    finally:
        if proc.poll() is None:
            proc.kill()
    assert [c["n_edits"] for c in lines(run_path / "checkpoints.jsonl")] == [2, 4]
    logs = []
    resume(run_path, log=logs.append)
    assert any("(4 edits already made, 5 to go)" in x for x in logs)
    records, reference = lines(run_path / "cases.jsonl"), lines(straight / "cases.jsonl")
    assert [r["order"] for r in records] == list(range(N_CASES))
    assert [without_time(r) for r in records] == [without_time(r) for r in reference]
    got, want = lines(run_path / "checkpoints.jsonl"), lines(straight / "checkpoints.jsonl")
    assert [c["n_edits"] for c in got] == [2, 4, 6, 8, 9]
    assert [without_time(c) for c in got] == [without_time(c) for c in want]
    a, b = (load_file(str(p / "sequential" / "state.safetensors")) for p in (run_path, straight))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_default_apply_batch_applies_in_turn_and_restores_all():
    tiny_lm = tiny_model("llama")
    editor = build_editor("ft", {"steps": "3", "layers": "1", "lr": "0.05", "norm_constraint": "0"},
                          tiny_lm.model.config)
    before = weights(tiny_lm.model)
    cases = [EditCase("a", "t", "The Eiffel Tower is in", "Eiffel Tower", "Rome"),
             EditCase("b", "t", "Danielle Darrieux speaks", "Danielle Darrieux", "English")]
    handle = editor.apply_batch(tiny_lm.model, tiny_lm.tokenizer, cases)
    assert isinstance(handle, CombinedHandle) and len(handle.info["cases"]) == 2
    name = handle.changed[0]
    assert torch.equal(handle.original(name), before[name])
    assert not torch.equal(dict(tiny_lm.model.named_parameters())[name], before[name])
    handle.restore()
    assert all(torch.equal(p, before[n]) for n, p in tiny_lm.model.named_parameters())


@pytest.mark.parametrize("args, message", [
    (["--mode", "sequential", "--edit-batch", "0"], "--edit-batch must be at least 1"),
    (["--mode", "sequential", "--edit-batch", "2", "--eval-every", "3"], "must be a multiple of --edit-batch"),
    (["--mode", "sequential", "--eval-every", "-1"], "--eval-every must be >= 0"),
    (["--edit-batch", "4"], "belong to --mode sequential"),
    (["--mode", "sequential", "--retention-sample", "-2"], "--retention-sample must be >= 0"),
    (["--retention-sample", "5"], "--retention-sample belongs to --mode sequential"),
])
def test_bad_sequential_options_are_one_line_errors(tmp_path, capsys, args, message):
    rc = main(["run", "--editor", "none", "--task", "counterfact", "--data-dir", str(FIXTURE_DATA),
               "--output-dir", str(tmp_path), *args])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and message in err, err
    assert not any(tmp_path.iterdir())


def test_a_sequential_run_cannot_change_its_limit_on_resume(tmp_path, tiny_load):
    path = execute(options(tmp_path, limit=2, hparams={"steps": "1", "layers": "1"}), log=lambda s: None)
    with pytest.raises(BenchError, match="cannot change its --limit"):
        resume(path, limit=3, log=lambda s: None)


@given(st.integers(1, 60), st.integers(0, 70), st.integers(0, 2**31), st.data())
@settings(max_examples=200, deadline=None)
def test_the_retention_sample_is_a_seeded_subset_of_the_applied_edits(planned, size, seed, data):
    from bench.sequential.checkpoint import retention_sample

    applied = sorted(data.draw(st.sets(st.integers(0, planned - 1), min_size=1)))
    got = retention_sample(applied, size, seed, planned)
    assert got == sorted(got) and set(got) <= set(applied)
    assert len(got) == (len(applied) if size == 0 else min(size, len(applied)))
    assert got == retention_sample(applied, size, seed, planned)  # the same on a resumed run
    # an edit sampled among more applied ones is sampled among fewer that still hold it
    fewer = [i for i in applied if i <= max(got)]
    assert set(retention_sample(fewer, size, seed, planned)) >= set(got) & set(fewer)


def test_retention_sample_scores_a_sample_at_checkpoints_and_every_edit_at_the_last(tmp_path, tiny_load):
    path = execute(options(tmp_path, tasks=["counterfact"], limit=6, eval_every=2, retention_sample=3,
                           hparams={"steps": 1}), log=lambda s: None)
    checkpoints = lines(path / "checkpoints.jsonl")
    assert [c["n_edits"] for c in checkpoints] == [2, 4, 6]
    assert [len(c["cases"]) for c in checkpoints] == [2, 3, 6]
    assert [c.get("retention_sample") for c in checkpoints] == [None, {"size": 3, "seed": 0}, None]
    assert [c["n_applied"] for c in checkpoints] == [2, 4, 6]
    assert checkpoints[1]["summary"]["counterfact"]["reliability"]["n"] == 3
    summary = json.loads((path / "summary.json").read_text())
    assert summary["sequential"]["retention_sample"] == 3
    assert json.loads((path / "config.json").read_text())["sequential"]["retention_sample"] == 3

