"""The runner on a tiny model and tests/fixtures/data: run files, summary, errors, resume."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest

import editors
from bench.core.errors import BenchError
from bench.core.runfiles import RunDir
from bench.runner import execute, resume, summarize_run
from bench.session import RunOptions
from bench.core.hparams import hparams_to_dict
from editors.ft import FineTune
from tests.helpers import FIXTURE_DATA, start, wait_for_lines
from bench.core.tiny import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

TASKS = ["counterfact", "zsre", "recent"]
N_CASES = {"counterfact": 6, "zsre": 1, "recent": 3}  # eval cases in the fixture data
FT_HPARAMS = {"steps": "2", "layers": "1"}


def options(tmp_path, **changes) -> RunOptions:
    base = dict(editor="ft", tasks=list(TASKS), model="tiny", device="cpu", limit=None,
                data_dir=str(FIXTURE_DATA), output_dir=str(tmp_path / "runs"),
                hparams=dict(FT_HPARAMS), batch_size=4)
    base.update(changes)
    return RunOptions(**base)


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def strip_volatile(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k not in ("wall_time_s", "memory")}


def test_run_writes_config_cases_and_summary(tmp_path, tiny_load):
    logs = []
    argv = ["run", "--task", ",".join(TASKS)]
    path = execute(options(tmp_path), argv=argv, log=logs.append)
    assert tiny_load == [("tiny", "cpu", "auto")]
    assert path.parent == tmp_path / "runs" and path.name.startswith("ft-counterfact+zsre+recent-")
    assert sorted(p.name for p in path.iterdir()) == ["cases.jsonl", "config.json", "run.lock", "summary.json"]

    config = json.loads((path / "config.json").read_text())
    assert config["argv"] == argv and config["command"] == "bench " + " ".join(argv)
    assert config["editor"]["name"] == "ft" and config["editor"]["uses_instructions"] is False
    hp = config["editor"]["hparams"]
    assert hp == {**hparams_to_dict(FineTune.default_hparams(tiny_model("llama").model.config)),
                  "layers": [1], "steps": 2}  # defaults, with the overrides typed
    assert config["metric_definitions"] == "easyedit-token-accuracy/v1"
    assert config["data_dir"] == str(FIXTURE_DATA)
    assert config["model"]["spec"] == "random:llama" and config["model"]["dtype"] == "float32"
    assert RunOptions(**config["options"]) == options(tmp_path)
    tasks = {t["name"]: t for t in config["tasks"]}
    assert list(tasks) == TASKS
    assert {n: t["n_cases"] for n, t in tasks.items()} == N_CASES
    assert {n: t["skipped"] for n, t in tasks.items()} == {"counterfact": 0, "zsre": 1, "recent": 1}
    assert tasks["recent"]["skipped_reasons"] == {"missing field 'prompt'": 1}
    hashes = tasks["counterfact"]["data_files"]
    assert "counterfact/counterfact-edit.json" in hashes
    assert all(len(h) == 64 and int(h, 16) >= 0 for h in hashes.values())
    for key in ("created", "versions", "seed", "limit", "instruction_mode", "notes"):
        assert key in config
    # the commit of the code that made the run, where that code is a git checkout (tests run in one)
    assert "git_commit" in config["versions"]

    records = read_lines(path / "cases.jsonl")
    _check_records(records)
    summary = json.loads((path / "summary.json").read_text())
    _check_summary(summary, config, records)
    memory = summary["memory"]  # the process's peak memory (on CPU: peak resident set)
    assert memory["peak_mb"] == memory["peak_rss_mb"] > 0 and "ru_maxrss" in memory["measured"]
    assert any("records skipped" in line for line in logs)  # the printed table notes skips
    assert any(f"results: {path}" == line for line in logs)


def _check_records(records: list[dict]) -> None:
    """cases.jsonl of the run above: one record per planned case, in order, with the metrics the
    case can have."""
    assert len(records) == sum(N_CASES.values())
    keys = [(r["task"], r["case_id"]) for r in records]
    assert len(set(keys)) == len(keys)
    assert [t for t, _ in keys] == [t for t in TASKS for _ in range(N_CASES[t])]
    for r in records:
        assert r["error"] is None and r["holdout"] is False
        assert r["case"]["case_id"] == r["case_id"]
        assert set(r["predictions"]) == {"pre", "post"}
        # FT: 8 cases per call by default; wild_s: both protocols by default
        assert set(r["time"]) == {"edit_s", "eval_s", "wild_s", "edits_together"}
        assert 0 <= r["edit"]["steps"] <= 2  # the handle's facts: FT's optimizer steps (2 at most)
        assert r["pre"].get("locality", 1.0) == 1.0
        assert all(0.0 <= v <= 1.0 for v in list(r["pre"].values()) + list(r["post"].values()))
        # a metric a case cannot have (no rephrase / portability prompt) is absent
        expected = {"reliability", "wild_reliability"}  # both protocols by default
        if r["case"]["locality"]:
            expected |= {"locality", "wild_locality", "wild_locality_correct"}
        if r["case"]["rephrase_prompts"]:
            expected |= {"generality", "wild_generality"}
        if r["case"]["portability"]:
            expected |= {"portability", "wild_portability"}
        if r["task"] == "counterfact":
            expected |= {"efficacy", "paraphrase", "neighborhood"}
        assert set(r["post"]) == set(r["pre"]) == expected


def _check_summary(summary: dict, config: dict, records: list[dict]) -> None:
    """summary.json of the run above: its means are the records' and its task facts the data's."""
    assert summary["config"] == {"model": "random:llama", "editor": "ft",
                                 "hparams": config["editor"]["hparams"], "seed": 0, "mode": "single",
                                 "metric_definitions": "easyedit-token-accuracy/v1"}
    assert set(summary["tasks"]) == set(TASKS)
    for task, metrics in summary["tasks"].items():
        recs = [r for r in records if r["task"] == task]
        assert set(metrics) == set().union(*(r["post"] for r in recs))
        for metric, s in metrics.items():
            assert set(s) == {"pre", "post", "ci", "n"}
            having = [r for r in recs if metric in r["post"]]
            assert s["n"] == len(having)
            mean = 100 * sum(r["post"][metric] for r in having) / len(having)
            assert s["post"] == pytest.approx(mean, abs=1e-4)
            assert s["ci"][0] <= s["post"] + 1e-9 and s["post"] <= s["ci"][1] + 1e-9
        assert metrics["locality"]["pre"] == 100.0
    info = summary["task_info"]
    zsre = dict(info["zsre"])
    wild = zsre.pop("wild")  # how the generated answers stopped
    assert wild["generations"] == sum(wild["stops"].values()) == 6  # 3 probes, pre and post
    assert zsre == {"holdout": False, "n_cases": 1, "planned_cases": 1, "errors": 0, "data": "real",
                    "skipped": 1, "skipped_reasons": {"missing field 'answers'": 1}}
    assert summary["data"] == "real"
    assert info["recent"]["skipped"] == 1 and info["counterfact"]["skipped"] == 0
    assert summary["tasks"]["recent"]["portability"]["n"] == 2  # recent-test-3 has none
    assert summary["tasks"]["recent"]["reliability"]["n"] == 3
    assert summary["tasks"]["counterfact"]["reliability"]["n"] == 6
    # a finished run's summary says so (bench.core.runfiles.completeness)
    assert strip_volatile(summary) == {**summarize_run(config, records), "complete": True,
                                       "finished_cases": len(records), "planned_cases": sum(N_CASES.values())}


def test_limit_and_holdout(tmp_path, tiny_load):
    path = execute(options(tmp_path, editor="none", tasks=["counterfact"], holdout=["zsre"], limit=2,
                           hparams={}), argv=[], log=lambda s: None)
    records = read_lines(path / "cases.jsonl")
    assert [(r["task"], r["holdout"]) for r in records] == [("counterfact", False)] * 2 + [("zsre", True)] * 2
    summary = json.loads((path / "summary.json").read_text())
    assert summary["task_info"]["zsre"]["holdout"] is True
    assert summary["task_info"]["zsre"]["skipped"] == 3  # the whole file is eval when held out
    # the `none` editor changes nothing: post == pre, locality agrees everywhere
    for r in records:
        assert r["post"] == r["pre"]
    assert summary["tasks"]["counterfact"]["locality"]["post"] == 100.0


def test_failed_edits_are_recorded_and_counted(tmp_path, tiny_load, monkeypatch):
    monkeypatch.setitem(editors.BUILTIN, "failing", "tests.helpers:FailingEditor")
    logs = []
    path = execute(options(tmp_path, editor="failing", tasks=["counterfact"], hparams={}),
                   argv=[], log=logs.append)
    records = read_lines(path / "cases.jsonl")
    failed = [r for r in records if r["error"]]
    assert len(records) == 6 and len(failed) == 3
    assert all(r["error"].startswith("refusing case") and "post" not in r and "pre" in r for r in failed)
    summary = json.loads((path / "summary.json").read_text())
    assert summary["task_info"]["counterfact"]["errors"] == 3
    assert summary["task_info"]["counterfact"]["n_cases"] == 6
    assert all(s["n"] == 3 for s in summary["tasks"]["counterfact"].values())
    assert any("3 case errors" in line for line in logs)


def test_option_errors(tmp_path, tiny_load):
    with pytest.raises(BenchError, match="--limit must be positive"):
        execute(options(tmp_path, limit=0), log=lambda s: None)
    with pytest.raises(BenchError, match="--instruction must be seen or unseen"):
        execute(options(tmp_path, instruction_mode="maybe"), log=lambda s: None)
    with pytest.raises(BenchError, match="unknown task 'nope'"):
        execute(options(tmp_path, holdout=["nope"]), log=lambda s: None)
    with pytest.raises(BenchError, match="unknown hyperparameter 'stepz'"):
        execute(options(tmp_path, hparams={"stepz": "1"}), log=lambda s: None)
    # bad input fails before the model is loaded, and nothing is written
    assert not tiny_load and not (tmp_path / "runs").exists()
    with pytest.raises(BenchError, match="does not exist"):
        resume(tmp_path / "no-such-run", log=lambda s: None)


# --------------------------------------------------------------------------------------------
# Crash safety
# --------------------------------------------------------------------------------------------


def write_lines(path: Path, lines: list[str]) -> None:
    path.write_bytes("".join(lines).encode())


def test_torn_last_line_is_dropped_and_truncated(tmp_path):
    run = RunDir(tmp_path)
    assert run.read_cases() == []
    good = [json.dumps({"task": "t", "case_id": str(i)}) + "\n" for i in range(3)]
    write_lines(run.cases_path, good + ['{"task": "t", "case_i'])
    assert [r["case_id"] for r in run.read_cases()] == ["0", "1", "2"]
    assert run.cases_path.read_text().endswith("case_i")  # a reader leaves the file alone
    assert [r["case_id"] for r in run.read_cases(repair=True)] == ["0", "1", "2"]
    assert run.cases_path.read_text() == "".join(good)  # the writer cuts the torn line away
    run.append_case({"task": "t", "case_id": "3"})
    assert [r["case_id"] for r in run.read_cases()] == ["0", "1", "2", "3"]

    # a complete object without its newline is treated as torn as well
    write_lines(run.cases_path, good + [json.dumps({"task": "t", "case_id": "9"})])
    assert [r["case_id"] for r in run.read_cases(repair=True)] == ["0", "1", "2"]
    assert run.cases_path.read_text() == "".join(good)

    # blank lines are fine; a corrupt line that is not the last one is an error
    write_lines(run.cases_path, [good[0], "\n", good[1]])
    assert len(run.read_cases()) == 2
    write_lines(run.cases_path, [good[0], "{oops\n", good[1]])
    with pytest.raises(BenchError, match=r"cases.jsonl: line 2 is not valid JSON"):
        run.read_cases()


def test_resume_after_sigkill_loses_and_repeats_nothing(tmp_path, tiny_model_dir):
    """A `bench run` is SIGKILLed in the middle of its 4th edit; a torn line is added; the resumed
    run ends with every case exactly once and the same records and summary as a straight run."""
    out = tmp_path / "killed"
    args = ["--editor", "ft", "--task", ",".join(TASKS), "--model", tiny_model_dir, "--device", "cpu",
            "--data-dir", FIXTURE_DATA, "--output-dir", out, "--limit", "0", "--batch-size", "4",
            "--hparam", "steps=2", "--hparam", "layers=1", "--name", "killed", "--protocol", "teacher_forced"]
    # 3 edits go through (0.2 s each), the 4th hangs in the editor until the kill. (Teacher forced:
    # in the wild, weight edits' records wait for their answers to be decoded together.)
    proc = start([sys.executable, "-m", "tests.helpers", "slow-run"] + args, cwd=tmp_path,
                 SLOW_EDIT_DELAY="0.2", SLOW_EDIT_HANG_AFTER="3")
    # Meanwhile, the same run straight through, in this process.
    straight = execute(options(tmp_path, model=str(tiny_model_dir), output_dir=str(tmp_path / "straight"),
                               protocols=["teacher_forced"]), argv=[], log=lambda s: None)
    try:
        run_path = wait_for_lines(lambda: out.glob("*/cases.jsonl"), 3, proc)
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate()  # SIGKILLed: it exits at once
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert run_path.name.startswith("killed-")
    done = read_lines(run_path / "cases.jsonl")
    total = sum(N_CASES.values())
    assert len(done) == 3 and [r["task"] for r in done] == ["counterfact"] * 3
    assert not (run_path / "summary.json").exists()  # SIGKILL: no finally block ran
    with open(run_path / "cases.jsonl", "a") as f:  # as if killed in the middle of a write
        f.write('{"task": "recent", "case_id": "recent-te')

    logs = []
    assert resume(run_path, log=logs.append) == run_path
    assert any(f"({len(done)} cases already done, {total - len(done)} to go)" in line for line in logs)
    records = read_lines(run_path / "cases.jsonl")
    reference = read_lines(straight / "cases.jsonl")
    assert [(r["task"], r["case_id"]) for r in records] == [(r["task"], r["case_id"]) for r in reference]
    assert records[: len(done)] == done  # finished cases untouched
    for r, ref in zip(records, reference):
        assert (r["pre"], r["post"], r["predictions"]) == (ref["pre"], ref["post"], ref["predictions"])
    summary = json.loads((run_path / "summary.json").read_text())
    ref_summary = json.loads((straight / "summary.json").read_text())
    assert strip_volatile(summary) == strip_volatile(ref_summary)

    # resuming a finished run runs nothing and rewrites the same summary
    logs.clear()
    resume(run_path, log=logs.append)
    assert any(f"({total} cases already done, 0 to go)" in line for line in logs)
    assert len(read_lines(run_path / "cases.jsonl")) == total
    assert strip_volatile(json.loads((run_path / "summary.json").read_text())) == strip_volatile(ref_summary)


def test_resume_with_a_larger_limit_extends_the_run(tmp_path, tiny_load):
    from bench.core.runfiles import RunDir

    first = execute(options(tmp_path, limit=2), log=lambda s: None)
    before = RunDir(first).read_cases()
    assert len(before) == sum(min(2, n) for n in N_CASES.values())
    resume(first, log=lambda s: None, limit=None)  # all cases
    after = RunDir(first).read_cases()
    assert len(after) == sum(N_CASES.values())
    assert after[: len(before)] == before  # finished cases kept, not rerun
    config = RunDir(first).read_config()
    assert config["limit"] is None and config["extended"][0]["limit"] is None
    assert {t["name"]: t["n_cases"] for t in config["tasks"]} == N_CASES
    summary = RunDir(first).read_summary()
    assert {t: i["n_cases"] for t, i in summary["task_info"].items()} == N_CASES


def test_resume_keeps_the_editor_hyperparameters_the_run_resolved(tmp_path, tiny_load, monkeypatch):
    """A default changed in the code after a run started does not reach its remaining cases."""
    from bench.core.runfiles import RunDir
    import dataclasses

    from editors.ft import FineTune

    first = execute(options(tmp_path, limit=1), log=lambda s: None)
    resolved = RunDir(first).read_config()["editor"]["hparams"]
    old_defaults = FineTune.default_hparams.__func__
    monkeypatch.setattr(FineTune, "default_hparams", classmethod(  # "a release changes a default"
        lambda cls, config: dataclasses.replace(old_defaults(cls, config), lr=resolved["lr"] * 10)))
    resume(first, log=lambda s: None, limit=None)
    assert RunDir(first).read_config()["editor"]["hparams"] == resolved


def test_parallel_edits_give_the_same_results_as_one_at_a_time(tmp_path, tiny_load):
    one = execute(options(tmp_path, tasks=["counterfact"], run_name="one"), log=lambda s: None)
    together = execute(options(tmp_path, tasks=["counterfact"], run_name="together",
                               hparams={**FT_HPARAMS, "parallel_edits": "4"}), log=lambda s: None)
    a, b = read_lines(one / "cases.jsonl"), read_lines(together / "cases.jsonl")
    assert [r["case_id"] for r in a] == [r["case_id"] for r in b]
    assert [r["time"].get("edits_together") for r in b] == [4, 4, 4, 4, 2, 2]  # 6 cases in calls of 4
    for ra, rb in zip(a, b):
        assert ra["predictions"] == rb["predictions"]
        for state in ("pre", "post"):
            assert ra[state] == pytest.approx(rb[state], abs=1e-4)
    sa, sb = (json.loads((p / "summary.json").read_text())["tasks"]["counterfact"] for p in (one, together))
    assert sa.keys() == sb.keys()
    for metric in sa:
        assert sa[metric]["post"] == pytest.approx(sb[metric]["post"], abs=1e-4), metric


class PickyEditor(editors.base.Editor):
    """Computes edits three at a time; refuses case id "202" (the whole call, and alone)."""

    name = "picky"
    Hparams = FineTune.Hparams
    edits_per_call = 3

    def apply(self, model, tokenizer, case):
        if case.case_id == "202":
            raise BenchError(f"refusing case {case.case_id}")
        return editors.base.EditHandle(model, [])

    def apply_many(self, model, tokenizer, cases):
        if any(c.case_id == "202" for c in cases):
            raise BenchError("refusing the call")
        yield from super().apply_many(model, tokenizer, cases)


def test_a_failing_joint_call_is_retried_case_by_case(tmp_path, tiny_load, monkeypatch):
    monkeypatch.setitem(editors.BUILTIN, "picky", "tests.test_runner:PickyEditor")
    path = execute(options(tmp_path, editor="picky", tasks=["counterfact"], hparams={}), log=lambda s: None)
    records = read_lines(path / "cases.jsonl")
    ids = [r["case_id"] for r in records]
    assert "202" in ids[:3] and len(records) == 6
    assert [r["case_id"] for r in records if r["error"]] == ["202"]
    assert records[ids.index("202")]["error"] == "refusing case 202"
    assert all("post" in r for r in records if not r["error"])


def test_a_run_in_use_cannot_be_resumed_by_a_second_process(tmp_path, tiny_model_dir, capsys):
    """While one `bench run` writes a run directory, `bench run --resume` of the same directory
    says in one line that it is in use (exit 2) and writes nothing; once the first process is
    gone (even SIGKILLed), the resume proceeds."""
    from bench.cli import main

    out = tmp_path / "busy"
    args = ["--editor", "ft", "--task", "counterfact", "--model", tiny_model_dir, "--device", "cpu",
            "--data-dir", FIXTURE_DATA, "--output-dir", out, "--limit", "0", "--batch-size", "4",
            "--hparam", "steps=2", "--hparam", "layers=1", "--hparam", "parallel_edits=1",
            "--name", "busy", "--protocol", "teacher_forced"]
    proc = start([sys.executable, "-m", "tests.helpers", "slow-run"] + args, cwd=tmp_path,
                 SLOW_EDIT_DELAY="0.1", SLOW_EDIT_HANG_AFTER="2")
    try:
        run_path = wait_for_lines(lambda: out.glob("*/cases.jsonl"), 2, proc)
        before = (run_path / "cases.jsonl").read_bytes()
        assert main(["run", "--resume", str(run_path)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "is in use by another bench process" in err, err
        assert (run_path / "cases.jsonl").read_bytes() == before  # the second process wrote nothing
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate()  # SIGKILLed: it exits at once
    finally:
        if proc.poll() is None:
            proc.kill()
    assert main(["run", "--resume", str(run_path)]) == 0
    records = read_lines(run_path / "cases.jsonl")
    keys = [(r["task"], r["case_id"]) for r in records]
    assert len(keys) == len(set(keys)) == N_CASES["counterfact"]  # every case exactly once


def test_a_run_stopped_by_sigterm_writes_its_summary_and_reports(tmp_path, tiny_model_dir):
    """SIGTERM in the middle of the 4th edit: the process saves the summary of its 3 finished
    cases, marked incomplete, says where they are and how to continue, and exits 143. `bench
    report` lists it as incomplete, unranked; without summary.json (as after SIGKILL) the report
    rebuilds the same summary from cases.jsonl."""
    from bench.cli import main
    from bench.cli.report import rebuild_summary

    out = tmp_path / "stopped"
    args = ["--editor", "ft", "--task", ",".join(TASKS), "--model", tiny_model_dir, "--device", "cpu",
            "--data-dir", FIXTURE_DATA, "--output-dir", out, "--limit", "0", "--batch-size", "4",
            "--hparam", "steps=2", "--hparam", "layers=1", "--name", "stopped", "--protocol", "teacher_forced"]
    proc = start([sys.executable, "-m", "tests.helpers", "slow-run"] + args, cwd=tmp_path,
                 SLOW_EDIT_DELAY="0.1", SLOW_EDIT_HANG_AFTER="3")
    try:
        run_path = wait_for_lines(lambda: out.glob("*/cases.jsonl"), 3, proc)
        os.kill(proc.pid, signal.SIGTERM)
        _, err = proc.communicate()  # no deadline: the hang ends with the signal
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err[-2000:]
    assert err.strip().splitlines()[-1] == (f"bench: interrupted: finished cases are saved in {run_path}; "
                                            f"continue with: bench run --resume {run_path}")
    records = read_lines(run_path / "cases.jsonl")
    assert [r["task"] for r in records] == ["counterfact"] * 3
    summary = json.loads((run_path / "summary.json").read_text())
    total = sum(N_CASES.values())
    assert (summary["complete"], summary["finished_cases"], summary["planned_cases"]) == (False, 3, total)
    assert {t: (i["n_cases"], i["planned_cases"]) for t, i in summary["task_info"].items()} == \
        {t: (3 if t == "counterfact" else 0, n) for t, n in N_CASES.items()}
    assert summary["tasks"]["counterfact"]["reliability"]["n"] == 3 and summary["tasks"]["zsre"] == {}
    config = json.loads((run_path / "config.json").read_text())
    assert strip_volatile(summary) == {**summarize_run(config, records), "complete": False,
                                       "finished_cases": 3, "planned_cases": total}

    def reported(name: str) -> dict:
        assert main(["report", str(run_path), "-o", str(tmp_path / name), "--baseline", "none"]) == 0
        (row,) = json.loads((tmp_path / name / "leaderboard.json").read_text())["groups"][0]["rows"]
        return row

    row = reported("report")
    assert (row["complete"], row["rank"], row["status"], row["summary_rebuilt"]) == \
        (False, None, f"incomplete (3 of {total} cases)", False)
    assert f"incomplete (3 of {total} cases)" in (tmp_path / "report" / "index.html").read_text()

    # as after SIGKILL: no summary.json; the report rebuilds the one SIGTERM wrote
    (run_path / "summary.json").unlink()
    rebuilt = rebuild_summary(run_path, config, records)
    assert rebuilt.pop("rebuilt").startswith("by bench report from cases.jsonl")
    assert rebuilt == strip_volatile(summary)
    row = reported("rebuilt")
    assert (row["complete"], row["rank"], row["status"], row["summary_rebuilt"]) == \
        (False, None, f"incomplete (3 of {total} cases)", True)
    assert not (run_path / "summary.json").exists()  # the report writes nothing into the run


class TogetherEditor(editors.base.Editor):
    """Computes edits three at a time; records the progress bar's postfix and count at each
    joint call (the runner's bar is the last one tests.test_runner.BARS holds)."""

    name = "together"
    Hparams = FineTune.Hparams
    edits_per_call = 3
    seen: list[tuple[str, int]] = []

    def apply(self, model, tokenizer, case):
        return editors.base.EditHandle(model, [])

    def apply_many(self, model, tokenizer, cases):
        TogetherEditor.seen.append((BARS[-1].postfix, BARS[-1].n))
        yield from super().apply_many(model, tokenizer, cases)


BARS: list = []


def test_the_progress_bar_says_when_edits_are_computed_together(tmp_path, tiny_load, monkeypatch):
    """While a joint edit is computed the bar has not moved: its postfix says why; it then counts
    each case as its evaluation finishes, and its rate is the average since the start."""
    import bench.runner

    class RecordingBar(bench.runner.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            BARS.append(self)

    monkeypatch.setattr(bench.runner, "tqdm", RecordingBar)
    monkeypatch.setitem(editors.BUILTIN, "together", "tests.test_runner:TogetherEditor")
    monkeypatch.setattr(TogetherEditor, "seen", [])
    execute(options(tmp_path, editor="together", tasks=["counterfact"], hparams={}), log=lambda s: None)
    # 6 cases in two joint calls: the bar at 0, then at 3, each time "editing 3 cases together"
    assert TogetherEditor.seen == [("counterfact: editing 3 cases together", 0),
                                   ("counterfact: editing 3 cases together", 3)]
    bar = BARS[-1]
    assert (bar.n, bar.total, bar.postfix, bar.smoothing) == (6, 6, "counterfact", 0)


@pytest.mark.parametrize("name", ["../../escape", "/abs/path", "a/b", "=cmd", ".hidden", "", "x" * 201])
def test_unsafe_run_names_are_refused_before_anything_runs(tmp_path, tiny_load, name):
    with pytest.raises(BenchError, match="run name .* must be one directory name"):
        execute(options(tmp_path, run_name=name), log=lambda s: None)
    assert tiny_load == [] and not (tmp_path / "runs").exists()
    assert not (tmp_path.parent / "escape").exists()


def test_task_options_reach_the_cases_and_the_config(tmp_path, tiny_load):
    """ZsRE locality is scored in its published form ("nq question: ..."), as EasyEdit does;
    --task-option zsre.strip_locality_prefix=true strips it, and config.json records it."""
    published = execute(options(tmp_path, tasks=["zsre"], run_name="published"), log=lambda s: None)
    stripped = execute(options(tmp_path, tasks=["zsre"], run_name="stripped",
                               task_options={"zsre": {"strip_locality_prefix": "true"}}), log=lambda s: None)
    (a,), (b,) = read_lines(published / "cases.jsonl"), read_lines(stripped / "cases.jsonl")
    assert a["case"]["locality"][0]["prompt"].startswith("nq question: ")
    assert b["case"]["locality"][0]["prompt"] == a["case"]["locality"][0]["prompt"][len("nq question: "):]
    tasks = {p: json.loads((p / "config.json").read_text())["tasks"][0]["options"] for p in (published, stripped)}
    assert tasks == {published: {"strip_locality_prefix": False}, stripped: {"strip_locality_prefix": True}}
