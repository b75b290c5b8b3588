"""Leave-one-task-out (bench holdout-matrix, bench/holdout.py, reports/matrix.py) on tiny models:
a held-out task never reaches a training batch, the matrix command trains each editor once per
held-out task and reuses cached checkpoints and finished runs, bad input is one line, and the
report renders the matrix."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

import bench.runner as runner
import bench.session as session
from bench.cli import main
from bench.core.errors import BenchError
from bench.core.tiny import tiny_model
from bench.holdout import MatrixPlan, equal_training_hparams, print_matrix
from bench.session import RunOptions, training_data
from editors.base import EditContext
from editors.instructedit import InstructEdit
from editors.mend import Mend
from editors.mend.trainer import MetaTrainer
from reports import build_report
from reports.matrix import MATRIX_FORMAT, MATRIX_FORMAT_V1, MATRIX_METRICS
from tasks.instructions import instruct
from tests.test_benchmarks import FIXTURE_DATA, run_script
from tests.test_mend import FIXTURES, small_hparams

TASKS = ["counterfact", "zsre", "recast"]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture
def draws(monkeypatch) -> list[tuple[frozenset, list[str]]]:
    """Every training batch drawn: (the trainer's held-out tasks, the tasks of the batch)."""
    seen = []
    real = MetaTrainer.next_batch

    def spy(self):
        batch = real(self)
        seen.append((frozenset(self.holdout), [c.task for c in batch]))
        return batch

    monkeypatch.setattr(MetaTrainer, "next_batch", spy)
    return seen


@pytest.fixture
def trainings(monkeypatch) -> list[list[str]]:
    """The held-out tasks of every training of a learned editor (Mend.train, InstructEdit's too)."""
    calls = []
    real = Mend.train

    def spy(self, lm, ctx, **kw):  # partial=: the training state saved as it goes
        calls.append(list(ctx.training.holdout))
        return real(self, lm, ctx, **kw)

    monkeypatch.setattr(Mend, "train", spy)
    return calls


# --------------------------------------------------------------------------------------------
# The held-out task never reaches a training batch
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("held_out", TASKS)
@pytest.mark.parametrize("cls", [Mend, InstructEdit])
def test_held_out_task_never_reaches_a_training_batch(cls, held_out, tmp_path, draws):
    lm = tiny_model("llama")
    data = training_data(FIXTURES, [held_out])
    ctx = EditContext(cache_dir=tmp_path, training=data, log=lambda s: None,
                      instruct=lambda case, mode: instruct(case, mode, 0))
    cls(small_hparams(lm, max_steps=3, batch_size=5, val_cases=0)).prepare(lm, ctx)
    drawn = {t for _, batch in draws for t in batch}
    others = {"convsent", "counterfact", "recast", "recent", "zsre"} - {held_out}
    assert held_out not in data.tasks and set(data.tasks) == others  # every task with train data but T
    assert drawn == others and held_out not in drawn  # round robin: 15 draws reach all four
    assert ctx.notes["train_tasks"] == sorted(others) and ctx.notes["holdout_tasks"] == [held_out]


# --------------------------------------------------------------------------------------------
# bench holdout-matrix
# --------------------------------------------------------------------------------------------


def matrix_args(model_dir: Path, out: Path) -> list[str]:
    return ["holdout-matrix", "--editors", "instructedit,mend", "--tasks", ",".join(TASKS), "--limit", "2",
            "--model", str(model_dir), "--protocol", "teacher_forced", "--output-dir", str(out),
            "--hparam", "rank=8", "--hparam", "max_steps=2", "--hparam", "batch_size=2",
            "--hparam", "val_cases=2", "--hparam", "val_every=1"]


def config_of(run: Path) -> dict:
    return json.loads((run / "config.json").read_text())


def n_cases(run: Path) -> int:
    return sum(1 for line in (run / "cases.jsonl").read_text().splitlines() if line.strip())


@pytest.fixture
def run_calls(monkeypatch) -> list[str]:
    """Every run the matrix starts ("execute") or continues ("resume"), the real thing done."""
    calls = []
    real_execute, real_resume = runner.execute, runner.resume

    def execute(*a, **k):
        if k.get("resume_dir") is None:  # resume() goes through execute() too
            calls.append("execute")
        return real_execute(*a, **k)

    def resume(*a, **k):
        calls.append("resume")
        return real_resume(*a, **k)

    monkeypatch.setattr(runner, "execute", execute)
    monkeypatch.setattr(runner, "resume", resume)
    return calls


def test_matrix_trains_once_per_held_out_task_and_reuses_checkpoints_and_runs(
        tiny_model_dir, tmp_path, monkeypatch, capsys, draws, trainings, run_calls):
    monkeypatch.chdir(tmp_path)  # no ../shared/data here: the built-in sample of the three tasks
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "matrix"
    assert main(matrix_args(tiny_model_dir, out)) == 0
    printed = capsys.readouterr().out
    assert run_calls == ["execute"] * 9  # 3 held-out tasks x (instructedit seen, unseen; mend)

    # one training per (held-out task, editor); no batch ever holds the held-out task
    assert sorted(map(tuple, trainings)) == sorted([(t,) for t in TASKS] * 2)
    assert {next(iter(h)) for h, _ in draws} == set(TASKS) and all(len(h) == 1 for h, _ in draws)
    for held, batch in draws:
        assert not held & set(batch) and set(batch) <= set(TASKS)

    doc = json.loads((out / "matrix.json").read_text())
    assert doc["format"] == MATRIX_FORMAT and doc["editors"] == ["instructedit", "mend"] and doc["tasks"] == TASKS
    assert {t: {e: sorted(m) for e, m in by.items()} for t, by in doc["runs"].items()} == \
        {t: {"instructedit": ["seen", "unseen"], "mend": ["none"]} for t in TASKS}
    assert doc["training_hparams"]["patience"] == 0 and doc["training_hparams"]["time_budget_s"] == 0
    assert doc["training_hparams"]["max_steps"] == 2 and doc["same_training"] == {t: True for t in TASKS}
    assert doc["seeds"] == [0] and doc["multitask"] is False and doc["columns"] == TASKS
    assert "/" not in json.dumps(doc["runs"]) and all(
        "/" not in (x["checkpoint"] or "") for by in doc["training"].values() for s in by.values()
        for x in s.values())
    for task, by_editor in doc["runs"].items():
        for editor, modes in by_editor.items():
            for mode, by_seed in modes.items():
                assert list(by_seed) == ["0"]  # one seed: run names without it
                name = by_seed["0"]
                config = config_of(out / name)
                assert name.startswith(f"{editor}{'' if mode == 'none' else '-' + mode}-holdout-{task}-")
                assert [t["name"] for t in config["tasks"] if t["holdout"]] == [task]
                assert [t["name"] for t in config["tasks"]] == TASKS and n_cases(out / name) == 6
                assert task not in config["notes"]["train_tasks"]
                assert config["notes"]["checkpoint_source"] == ("cache" if mode == "unseen" else "trained")
                assert config["instruction_mode"] == ("unseen" if mode == "unseen" else "seen")
                assert config["editor"]["hparams"]["max_steps"] == 2
        # both editors trained alike: same tasks, steps and draws per task
        facts = [(x["0"]["train_tasks"], x["0"]["steps"], x["0"]["sampled"]) for x in doc["training"][task].values()]
        assert facts[0] == facts[1] and facts[0][1] == 2
    for title in ("Score (harmonic mean of Rel, Gen, Loc)", "reliability (Rel)"):
        assert f"{title} on the held-out task" in printed
    assert "instructedit (seen) − mend" in printed and "instructedit (unseen) − mend" in printed

    # again: every run is complete, nothing is trained or rerun
    run_calls.clear()
    trainings.clear()
    assert main(matrix_args(tiny_model_dir, out)) == 0
    assert run_calls == [] and trainings == []
    assert json.loads((out / "matrix.json").read_text())["runs"] == doc["runs"]
    assert capsys.readouterr().out.count("complete, kept") == 9

    # a lost run is made again from the cached checkpoint; a killed one is resumed
    lost = out / doc["runs"]["zsre"]["mend"]["none"]["0"]
    shutil.rmtree(lost)
    killed = out / doc["runs"]["counterfact"]["instructedit"]["unseen"]["0"]
    lines = (killed / "cases.jsonl").read_text().splitlines(keepends=True)
    (killed / "cases.jsonl").write_text("".join(lines[:-1]))
    assert main(matrix_args(tiny_model_dir, out)) == 0
    assert run_calls == ["resume", "execute"] and trainings == []  # checkpoints from the cache
    again = json.loads((out / "matrix.json").read_text())
    remade = out / again["runs"]["zsre"]["mend"]["none"]["0"]
    # (a new directory; it may carry the lost one's name when made within the same second)
    assert remade.is_dir() and config_of(remade)["notes"]["checkpoint_source"] == "cache" and n_cases(remade) == 6
    assert again["runs"]["counterfact"]["instructedit"]["unseen"]["0"] == killed.name and n_cases(killed) == 6
    assert "resuming " + killed.name in capsys.readouterr().out

    # the report renders the matrix from its file
    report = tmp_path / "report"
    assert main(["report", "--matrix", str(out / "matrix.json"), "-o", str(report), "--format", "all",
                 "--baseline", "none"]) == 0
    lb = json.loads((report / "leaderboard.json").read_text())["holdout_matrix"]
    # the step of the network each run uses (best validation of steps 1, 2), beside the steps trained
    assert all(r["steps"] == 2 and r["kept_step"] in (1, 2) for row in lb["rows"] for r in row["runs"])
    md = (report / "leaderboard.md").read_text()
    assert "| held out | run | trained on | steps | kept step | Score on its training tasks |\n" \
        "|:---|:---|:---|---:|---:|---:|\n" in md
    assert [r["holdout"] for r in lb["rows"]] == TASKS and "Leave-one-task-out matrix" in \
        (report / "index.html").read_text()


def test_columns_split_the_matrix_and_a_full_invocation_assembles_it(
        tiny_model_dir, tmp_path, monkeypatch, capsys, trainings, run_calls):
    """Two processes sharing the output directory make different columns; neither writes
    matrix.json; the full invocation afterwards trains and runs nothing and writes it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "matrix"
    assert main(matrix_args(tiny_model_dir, out) + ["--columns", "zsre"]) == 0
    assert run_calls == ["execute"] * 3 and sorted(map(tuple, trainings)) == [("zsre",)] * 2
    assert not (out / "matrix.json").exists() and "matrix.json not written" in capsys.readouterr().out
    assert sorted(p.name.rsplit("-", 2)[0] for p in out.iterdir()) == [
        "instructedit-seen-holdout-zsre", "instructedit-unseen-holdout-zsre", "mend-holdout-zsre"]
    run_calls.clear()
    assert main(matrix_args(tiny_model_dir, out) + ["--columns", ",".join(t for t in TASKS if t != "zsre")]) == 0
    assert run_calls == ["execute"] * 6 and not (out / "matrix.json").exists()
    run_calls.clear()
    trainings.clear()
    assert main(matrix_args(tiny_model_dir, out)) == 0
    assert run_calls == [] and trainings == []
    doc = json.loads((out / "matrix.json").read_text())
    assert sorted(doc["runs"]) == sorted(TASKS) and doc["same_training"] == {t: True for t in TASKS}


@pytest.mark.parametrize("args, message", [
    (["--tasks", "counterfact,nope"], r"unknown task 'nope'"),
    (["--tasks", "zsre"], r"--tasks needs at least two tasks"),
    (["--tasks", "zsre,zsre"], r"--tasks names zsre twice"),
    (["--tasks", "counterfact,zsre_knowedit"], r"task 'zsre_knowedit' has no train split"),
    (["--editors", "instructedit,nope"], r"unknown editor 'nope'"),
    (["--editors", "instructedit"], r"--editors needs at least two learned editors"),
    (["--editors", "mend,rome"], r"editor 'rome' does not learn"),
    (["--columns", "counterfact,recent"], r"--columns names 'recent', which is not one of --tasks"),
])
def test_bad_input_is_one_line_and_exit_2(args, message, capsys, tmp_path):
    code = main(["holdout-matrix", "--output-dir", str(tmp_path / "m")] + args)
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert err.startswith("bench: error: ") and re.search(message, err), err
    assert not (tmp_path / "m").exists()


def test_report_needs_run_directories_or_a_matrix(capsys, tmp_path):
    assert main(["report", "-o", str(tmp_path / "r")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == "bench: error: give run directories or --matrix MATRIX_JSON\n"
    (tmp_path / "matrix.json").write_text(json.dumps({"format": "something else"}))
    assert main(["report", "--matrix", str(tmp_path / "matrix.json"), "-o", str(tmp_path / "r")]) == 2
    assert "not an instructedit-bench/holdout-matrix/v2 file (as bench holdout-matrix writes)" in capsys.readouterr().err


def test_unequal_training_hyperparameters_are_refused(monkeypatch, tmp_path, tiny_load):
    """A model preset that gave MEND other defaults than InstructEdit would make the comparison
    unfair: the matrix stops before anything runs."""
    real = session.build_editor

    def skewed(name, overrides, config, model=None):
        editor = real(name, overrides, config, model)
        if name == "mend":
            editor.hparams.lr = 1e-3
        return editor

    monkeypatch.setattr(session, "build_editor", skewed)
    plan = MatrixPlan(["instructedit", "mend"], TASKS, tmp_path, RunOptions(), {"patience": 0})
    with pytest.raises(BenchError, match=r"would not train alike \(instructedit vs mend: lr 0.0001 vs 0.001\)"):
        equal_training_hparams(plan)
    monkeypatch.setattr(session, "build_editor", real)
    assert equal_training_hparams(plan)["patience"] == 0


# --------------------------------------------------------------------------------------------
# The report's matrix from fixture-like runs
# --------------------------------------------------------------------------------------------


def fake_run(folder: Path, name: str, editor: str, held_out: str, mode: str, rel: list[float]) -> str:
    """A finished run directory: `editor` trained on every task of the two but `held_out`, with
    the given reliability per case on the held-out task (generality = reliability, locality 1)."""
    tasks = ["counterfact", "zsre"]
    run = folder / name
    run.mkdir(parents=True)
    records = []
    for task in tasks:
        values = rel if task == held_out else [1.0] * len(rel)
        for i, v in enumerate(values):
            records.append({"task": task, "case_id": f"{task}-{i}", "error": None,
                            "pre": {"reliability": 0.0, "generality": 0.0, "locality": 1.0},
                            "post": {"reliability": v, "generality": v, "locality": 1.0},
                            "time": {"edit_s": 0.1}})
    (run / "cases.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    def mean(task, m):
        xs = [r["post"][m] for r in records if r["task"] == task]
        return {"pre": 0.0 if m != "locality" else 100.0, "post": 100 * sum(xs) / len(xs), "ci": [0.0, 100.0],
                "n": len(xs)}

    summary = {"tasks": {t: {m: mean(t, m) for m in ("reliability", "generality", "locality")} for t in tasks},
               "task_info": {t: {"holdout": t == held_out, "n_cases": len(rel)} for t in tasks}}
    config = {"model": {"spec": "tiny", "source_hash": "0" * 64}, "metric_definitions": "v1", "mode": "single",
              "editor": {"name": editor, "hparams": {}}, "instruction_mode": mode if mode != "none" else "seen",
              "tasks": [{"name": t, "holdout": t == held_out, "n_cases": len(rel)} for t in tasks],
              "notes": {"train_tasks": [t for t in tasks if t != held_out], "train_steps": 250}}
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "config.json").write_text(json.dumps(config))
    return name


def test_report_renders_the_matrix_from_fixture_like_runs(tmp_path):
    folder = tmp_path / "m"
    n = 20
    runs: dict = {}
    for task in ("counterfact", "zsre"):
        for editor, mode, rel in (("instructedit", "seen", [1.0] * n), ("instructedit", "unseen", [1.0, 0.0] * (n // 2)),
                                  ("mend", "none", [0.0] * n)):
            name = f"{editor}-{mode}-holdout-{task}-20260101-000000"
            runs.setdefault(task, {}).setdefault(editor, {})[mode] = fake_run(folder, name, editor, task, mode, rel)
    # a v1 file (one seed, no seed level), as the committed matrix was written: read as v2
    doc = {"format": MATRIX_FORMAT_V1, "editors": ["instructedit", "mend"], "tasks": ["counterfact", "zsre"],
           "runs": runs, "command": "bench holdout-matrix --output-dir /home/someone/m"}
    (folder / "matrix.json").write_text(json.dumps(doc))
    out = build_report([], tmp_path / "report", baseline="none", fmt="all", matrix=folder / "matrix.json")

    mx = json.loads((out.parent / "leaderboard.json").read_text())["holdout_matrix"]
    assert [r["holdout"] for r in mx["rows"]] == ["counterfact", "zsre"] and mx["metrics"] == list(MATRIX_METRICS)
    for row in mx["rows"]:
        assert [r["run"] for r in row["runs"]] == ["instructedit (seen)", "instructedit (unseen)", "mend"]
        assert row["runs"][0]["trained_on"] == [t for t in ("counterfact", "zsre") if t != row["holdout"]]
        seen, unseen = row["differences"]
        assert (seen["a"], seen["b"], unseen["a"]) == ("instructedit (seen)", "mend", "instructedit (unseen)")
        rel = seen["scores"]["reliability"]
        # every case +100 points: the interval is a point, far from zero
        assert rel["diff"] == 100.0 and rel["ci"] == [100.0, 100.0] and rel["p"] < 0.05 and rel["mark"] == "▲"
        half = unseen["scores"]["reliability"]
        assert half["diff"] == 50.0 and half["ci"][0] > 0 and half["n"] == n
        assert row["runs"][2]["scores"]["reliability"]["post"] == 0.0
    # 2 held-out tasks x 2 differences x 4 metrics, Holm over all of them
    assert mx["n_tests"] == 2 * 2 * 4

    md = (out.parent / "leaderboard.md").read_text()
    assert "## Leave-one-task-out matrix" in md and "instructedit (seen) − mend" in md
    assert "+100.0 ▲ [+100.0, +100.0]" in md and "/home/someone" not in md
    # the text matrix `bench holdout-matrix` prints at the end: the same differences
    printed: list[str] = []
    print_matrix(doc, folder, log=printed.append)
    text = "\n".join(printed)
    # seen − mend: +100 in Score, reliability and generality on both held-out tasks; unseen: +50
    assert text.count("+100.0 ▲ [+100.0, +100.0]") == 3 * 2 and text.count("+50.0 ") >= 2 * 2, text

    html = out.read_text()
    assert html.count('class="matrix holdout-matrix"') == len(MATRIX_METRICS)
    assert "Leave-one-task-out matrix" in html and "/home/someone" not in html


# --------------------------------------------------------------------------------------------
# benchmarks/validation_curve.py
# --------------------------------------------------------------------------------------------


def test_validation_curve_on_a_tiny_checkpoint(tiny_model_dir, tmp_path):
    args = ["--model", tiny_model_dir, "--data-dir", FIXTURE_DATA, "--editor", "mend",
            "--train-tasks", "counterfact,recast", "--steps", "4", "--val-every", "2", "--cache", tmp_path,
            "--hparam", "rank=8", "--hparam", "batch_size=2", "--hparam", "val_cases=2"]
    res = run_script("validation_curve.py", *args, "--json", tmp_path / "curve.json")
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [line for line in res.stdout.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| step | val loss | edit acc") and [r.split(" | ")[0] for r in rows[1:]] == ["| 2", "| 4"]
    assert "trained on counterfact, recast" in res.stdout and "checkpoint trained" in res.stdout
    curve = json.loads((tmp_path / "curve.json").read_text())
    assert curve["train_tasks"] == ["counterfact", "recast"] and [h["step"] for h in curve["history"]] == [2, 4]
    assert curve["hparams"]["patience"] == 0 and curve["hparams"]["time_budget_s"] == 0
    # again: the cached network is loaded and its recorded curve printed, nothing trained
    again = run_script("validation_curve.py", *args)
    assert again.returncode == 0 and "checkpoint cache" in again.stdout
    assert [line for line in again.stdout.splitlines() if line.startswith("| ")] == rows
    bad = run_script("validation_curve.py", *args[:6], "--train-tasks", "zsre_knowedit", "--steps", "2")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "no train split" in bad.stderr
