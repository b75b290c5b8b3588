"""The benchmark scripts stay runnable: each one imports (what it imports from the project
still exists) and answers --help; compare_runs.py decides equal / differing runs right; sweep.py
runs end to end on a tiny checkpoint and the fixture data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
SCRIPTS = sorted(p for p in BENCHMARKS.glob("*.py") if not p.name.startswith("_"))
FIXTURE_DATA = ROOT / "tests" / "fixtures" / "data"


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    # From the repository root, as the scripts are documented to run. No time limit: a busy
    # machine is slow, not wrong (pytest-timeout's guard catches a hang).
    return subprocess.run([sys.executable, str(BENCHMARKS / name), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True)


def test_the_benchmark_scripts():
    assert {p.name for p in SCRIPTS} == {"speed.py", "sweep.py", "compare_runs.py", "wild_cost.py",
                                         "batch_edit_speed.py", "edit_memory.py", "validation_curve.py", "kl_position.py",
                                         "eval_cost.py"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_benchmark_script_answers_help(script):
    res = run_script(script.name, "--help")
    assert res.returncode == 0, res.stderr
    assert "usage:" in res.stdout


# --------------------------------------------------------------------------------------------
# compare_runs.py
# --------------------------------------------------------------------------------------------


def record(task: str, case_id: str, post: dict, post_pred: str = " London") -> dict:
    return {"task": task, "case_id": case_id, "case": {"case_id": case_id, "task": task},
            "pre": {"reliability": 0.0, "locality": 1.0}, "post": post,
            "predictions": {"pre": {"prompt": " Paris", "rephrase": [], "locality": [" the euro"]},
                            "post": {"prompt": post_pred, "rephrase": [], "locality": [" the euro"]}},
            "error": None, "time": {"edit_s": 0.1, "eval_s": 0.1}}


def write_run(path: Path, records: list[dict]) -> Path:
    path.mkdir()
    (path / "cases.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def runs(tmp_path):
    base = [record("counterfact", "1", {"reliability": 1.0, "locality": 0.5}),
            record("zsre", "z1", {"reliability": 0.5, "locality": 1.0})]
    changed = [base[0], record("zsre", "z1", {"reliability": 0.5, "locality": 0.75})]
    return (write_run(tmp_path / "a", base), write_run(tmp_path / "b", base),
            write_run(tmp_path / "c", changed))


def test_compare_runs_equal(runs):
    a, b, _ = runs
    res = run_script("compare_runs.py", a, b)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "2 of 2 compared cases equal" in res.stdout


def test_compare_runs_names_a_differing_case(runs):
    a, _, c = runs
    res = run_script("compare_runs.py", a, c)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "zsre/z1: post.locality: 1.0 -> 0.75" in res.stdout
    assert "counterfact/1" not in res.stdout
    assert "| zsre | 1 | 0 | 1 | 0 | 0 |" in res.stdout


@pytest.mark.parametrize("how", [["--ignore-task-metric", "zsre:locality"], ["--ignore-metric", "locality"],
                                 ["--tolerance", "0.25"]])
def test_compare_runs_ignoring_the_metric(runs, how):
    a, _, c = runs
    res = run_script("compare_runs.py", a, c, *how)
    assert res.returncode == 0, res.stdout + res.stderr


def test_compare_runs_a_differing_prediction(tmp_path):
    a = write_run(tmp_path / "a", [record("zsre", "z1", {"reliability": 1.0})])
    b = write_run(tmp_path / "b", [record("zsre", "z1", {"reliability": 1.0}, post_pred=" Rome")])
    res = run_script("compare_runs.py", a, b)
    assert res.returncode == 1 and "predictions.post.prompt" in res.stdout
    # ignoring reliability also ignores the prompt's predictions it is read from
    assert run_script("compare_runs.py", a, b, "--ignore-metric", "reliability").returncode == 0


def test_compare_runs_a_differing_generation(tmp_path):
    def with_answer(text):
        r = record("zsre", "z1", {"reliability": 1.0})
        r["wild"] = {"generations": {"pre": {"prompt": {"text": " Paris", "stop": "eos", "tokens": 1}},
                                     "post": {"prompt": {"text": text, "stop": "eos", "tokens": 1}}}}
        return r

    a = write_run(tmp_path / "a", [with_answer(" Rome")])
    assert run_script("compare_runs.py", a, write_run(tmp_path / "b", [with_answer(" Rome")])).returncode == 0
    res = run_script("compare_runs.py", a, write_run(tmp_path / "c", [with_answer(" Oslo")]))
    assert res.returncode == 1 and "wild.generations.post" in res.stdout


def test_compare_runs_a_differing_checkpoint(tmp_path):
    """Sequential runs: checkpoint records are compared whole, less their time."""
    def with_checkpoint(path, answer, seconds):
        run = write_run(path, [record("zsre", "z1", {"reliability": 1.0})])
        cp = {"n_edits": 1, "cases": [{"case_id": "z1", "wild": {"prompt": answer}}], "time": {"eval_s": seconds}}
        (run / "checkpoints.jsonl").write_text(json.dumps(cp) + "\n")
        return run

    a = with_checkpoint(tmp_path / "a", " Rome", 1.0)
    res = run_script("compare_runs.py", a, with_checkpoint(tmp_path / "b", " Rome", 2.0))
    assert res.returncode == 0 and "checkpoints: 1 of 1 in both runs equal" in res.stdout
    res = run_script("compare_runs.py", a, with_checkpoint(tmp_path / "c", " Oslo", 1.0))
    assert res.returncode == 1 and "checkpoint at 1 edits differs in: cases" in res.stdout


def test_eval_cost_runs_bench_from_two_checkouts_and_compares_them(tiny_model_dir, tmp_path):
    """This checkout twice (as if it were another): the table has a row each, and the records agree."""
    res = run_script("eval_cost.py", "--checkout", ROOT, "--runs-dir", tmp_path, "--",
                     "--editor", "ft", "--model", tiny_model_dir, "--data-dir", FIXTURE_DATA,
                     "--task", "counterfact", "--limit", "2", "--hparam", "steps=1")
    assert res.returncode == 0, res.stderr
    assert "| before | 2 |" in res.stdout and "| this | 2 |" in res.stdout
    assert "| counterfact | 2 | 2 | 0 |" in res.stdout  # compared, equal, differing


# --------------------------------------------------------------------------------------------
# sweep.py
# --------------------------------------------------------------------------------------------


def test_sweep_runs_on_a_tiny_checkpoint(tiny_model_dir, tmp_path):
    out = tmp_path / "sweep.json"
    res = run_script("sweep.py", "--model", tiny_model_dir, "--data-dir", FIXTURE_DATA, "--editor", "ft",
                     "--task", "counterfact", "--sweep", "steps=1,2", "--cases", "2", "--threads", "1",
                     "--json", out)
    assert res.returncode == 0, res.stderr
    assert "| steps=1 | steps=1 | 2 |" in res.stdout and "| steps=2 | steps=2 | 2 |" in res.stdout
    data = json.loads(out.read_text())
    assert [r["steps"] for r in data["rows"]] == [1.0, 2.0]  # from each record's "edit" entry
    # the train split (fixture ids 101, 104), never the eval cases
    assert {r["case_id"] for r in data["records"]} == {"101", "104"}


def test_sweep_refuses_a_bad_value_before_loading(tiny_model_dir):
    res = run_script("sweep.py", "--model", tiny_model_dir, "--data-dir", FIXTURE_DATA, "--editor", "ft",
                     "--sweep", "steps=-1")
    assert res.returncode == 2
    assert "steps" in res.stderr and "Traceback" not in res.stderr


# --------------------------------------------------------------------------------------------
# speed.py
# --------------------------------------------------------------------------------------------


def test_speed_compare_runs_on_a_tiny_checkpoint(tiny_model_dir, tmp_path):
    # Compare mode drives bench.runner.run_cases: it broke once when run_cases began to take Jobs.
    out = tmp_path / "speed.json"
    res = run_script("speed.py", "--model", tiny_model_dir, "--data-dir", FIXTURE_DATA, "--editors", "ft",
                     "--cases", "1", "--threads", "1", "--no-warmup", "--json", out)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    assert out.exists()


def test_speed_phases_runs_on_a_tiny_checkpoint(tiny_model_dir):
    res = run_script("speed.py", "--phases", "--editor", "ft", "--model", tiny_model_dir, "--data-dir",
                     FIXTURE_DATA, "--cases", "1", "--threads", "1", "--hparam", "steps=1")
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
