"""InstructEdit's own evidence (issue 26) on tiny models: the multi-task column of `bench
holdout-matrix` (nothing held out), training seeds (`--seeds`: one checkpoint per seed, cells over
seeds, the hierarchical bootstrap), a killed seeded matrix resuming, and the hierarchical
bootstrap itself."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

import bench.runner as runner
from bench.cli import main
from bench.holdout import print_matrix, run_complete
from editors.mend import Mend
from reports import build_report
from reports.hierarchical import (hierarchical_resamples, mean_difference, seeded_cell, seeded_difference,
                                  verdict)
from reports.matrix import matrix_view, read_matrix, run_dirs, training_table
from reports.runs import assign_labels, load_run
from reports.stats import MIN_PAIRS, percentile_interval
from tests.test_holdout import draws  # noqa: F401 - the training-batch spy fixture, shared

TWO = ["counterfact", "zsre"]
TRAINABLE = {"counterfact", "zsre", "recast"}  # the tasks with train data in the built-in sample


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture
def trainings(monkeypatch) -> list[tuple[tuple[str, ...], int]]:
    """(held-out tasks, seed) of every training of a learned editor."""
    calls = []
    real = Mend.train

    def spy(self, lm, ctx, **kw):
        calls.append((tuple(ctx.training.holdout), ctx.seed))
        return real(self, lm, ctx, **kw)

    monkeypatch.setattr(Mend, "train", spy)
    return calls


@pytest.fixture
def run_calls(monkeypatch) -> list[str]:
    calls = []
    real_execute, real_resume = runner.execute, runner.resume

    def execute(*a, **k):
        if k.get("resume_dir") is None:
            calls.append("execute")
        return real_execute(*a, **k)

    def resume(*a, **k):
        calls.append("resume")
        return real_resume(*a, **k)

    monkeypatch.setattr(runner, "execute", execute)
    monkeypatch.setattr(runner, "resume", resume)
    return calls


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)  # no ../shared/data: the built-in sample of the tasks
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path


def matrix_args(model_dir: Path, out: Path, tasks=TWO) -> list[str]:
    return ["holdout-matrix", "--editors", "instructedit,mend", "--tasks", ",".join(tasks), "--limit", "5",
            "--model", str(model_dir), "--protocol", "teacher_forced", "--output-dir", str(out),
            "--hparam", "rank=8", "--hparam", "max_steps=2", "--hparam", "batch_size=3",
            "--hparam", "val_cases=2", "--hparam", "val_every=1", "--hparam", "edit_lr=0.01"]


def posts(run: Path, task: str, metric: str) -> dict[str, float]:
    """case id -> post-edit value, read from cases.jsonl."""
    out = {}
    for line in (run / "cases.jsonl").read_text().splitlines():
        rec = json.loads(line) if line.strip() else None
        if rec and rec["task"] == task and not rec.get("error"):
            out[rec["case_id"]] = float(rec["post"][metric])
    return out


def view_of(out: Path) -> dict:
    doc = read_matrix(out / "matrix.json")
    runs = [load_run(p) for p in run_dirs(doc, out)]
    assign_labels(runs)
    return matrix_view(doc, out, runs)


def row_of(view: dict, name: str) -> dict:
    return next(r for r in view["rows"] if r["holdout"] == name)


# --------------------------------------------------------------------------------------------
# The multi-task column
# --------------------------------------------------------------------------------------------


def test_multitask_column_trains_on_every_task_and_averages_them(tiny_model_dir, workdir, capsys, draws,
                                                                 trainings, run_calls):
    out = workdir / "matrix"
    assert main(matrix_args(tiny_model_dir, out) + ["--multitask"]) == 0
    printed = capsys.readouterr().out
    # 2 held-out columns + none, each instructedit seen, unseen and mend; one training per column and editor
    assert run_calls == ["execute"] * 9
    assert sorted(trainings) == sorted([(("counterfact",), 0), (("zsre",), 0), ((), 0)] * 2)
    multi = [batch for held, batch in draws if not held]
    assert multi and {t for batch in multi for t in batch} == TRAINABLE  # every task with train data
    for held, batch in draws:
        assert not held & set(batch)

    doc = json.loads((out / "matrix.json").read_text())
    assert doc["columns"] == TWO + ["none"] and doc["multitask"] is True
    assert doc["same_training"] == {"counterfact": True, "zsre": True, "none": True}
    for editor, modes in doc["runs"]["none"].items():
        for mode, by_seed in modes.items():
            run = out / by_seed["0"]
            assert run.name.startswith(f"{editor}{'' if mode == 'none' else '-' + mode}-multitask-")
            config = json.loads((run / "config.json").read_text())
            assert not any(t["holdout"] for t in config["tasks"]) and sorted(config["notes"]["train_tasks"]) == \
                sorted(TRAINABLE)
    facts = [x["0"] for x in doc["training"]["none"].values()]
    assert facts[0]["sampled"] == facts[1]["sampled"] and set(facts[0]["sampled"]) == TRAINABLE

    view = view_of(out)
    assert [r["holdout"] for r in view["rows"]] == TWO + ["none: counterfact", "none: zsre", "none: mean over tasks"]
    # the mean row: the mean over tasks of the per-task paired differences, from the cases
    ie = out / doc["runs"]["none"]["instructedit"]["seen"]["0"]
    me = out / doc["runs"]["none"]["mend"]["none"]["0"]
    per_task = []
    for t in TWO:
        a, b = posts(ie, t, "reliability"), posts(me, t, "reliability")
        per_task.append(np.mean([a[k] - b[k] for k in sorted(a.keys() & b.keys())]) * 100)
        cell = next(d for d in row_of(view, f"none: {t}")["diffs"] if d["b"] == "mend" and "seen" in d["a"])
        assert cell["cells"]["reliability"]["diff"] == pytest.approx(per_task[-1])
    mean = row_of(view, "none: mean over tasks")
    d = next(d for d in mean["diffs"] if d["a"] == "instructedit (seen)")
    rel = d["cells"]["reliability"]
    assert rel["diff"] == pytest.approx(np.mean(per_task)) and rel["lo"] <= rel["diff"] <= rel["hi"]
    assert rel["verdict"] in ("significant", "not significant")
    assert any("Multi-task setting, instructedit (seen) − mend: reliability averaged over 2 tasks" in line
               for line in view["summary"])
    assert "none: mean over tasks" in printed and "Multi-task setting" in printed
    # the training table lists the multi-task column once per run, trained on every task
    head, body = training_table(view)
    assert [(r[0], r[1], r[2]) for r in body if r[0] == "none"] == [
        ("none", lab, "counterfact, recast, zsre") for lab in ("instructedit (seen)", "instructedit (unseen)", "mend")]


# --------------------------------------------------------------------------------------------
# Seeds
# --------------------------------------------------------------------------------------------


def naive_hierarchical(per_seed_pairs: list[tuple[np.ndarray, np.ndarray]], n_resamples=2000, seed=0) -> np.ndarray:
    """The documented two-stage draw (reports.hierarchical), one resample at a time."""
    rng = np.random.default_rng(seed)
    s_count = len(per_seed_pairs)
    drawn = rng.integers(0, s_count, size=(n_resamples, s_count))
    idx = {}
    for k in range(s_count):
        for s, (a, _) in enumerate(per_seed_pairs):
            idx[k, s] = rng.integers(0, len(a), size=(n_resamples, len(a)))
    out = np.empty(n_resamples)
    for r in range(n_resamples):
        vals = []
        for k in range(s_count):
            s = drawn[r, k]
            a, b = per_seed_pairs[s]
            i = idx[k, s][r]
            vals.append(a[i].mean() - b[i].mean())
        out[r] = np.mean(vals)
    return out


def test_seeds_give_their_own_checkpoints_and_cells_over_seeds(tiny_model_dir, workdir, capsys, trainings,
                                                               run_calls):
    out = workdir / "matrix"
    assert main(matrix_args(tiny_model_dir, out) + ["--seeds", "0,1"]) == 0
    printed = capsys.readouterr().out
    assert run_calls == ["execute"] * 12  # 2 seeds x 2 columns x 3 runs
    assert sorted(trainings) == sorted([((t,), s) for t in TWO for s in (0, 1)] * 2)
    doc = json.loads((out / "matrix.json").read_text())
    assert doc["seeds"] == [0, 1] and doc["same_training"] == {t: True for t in TWO}
    for task in TWO:
        for editor, modes in doc["runs"][task].items():
            for mode, by_seed in modes.items():
                assert sorted(by_seed) == ["0", "1"]
                for s, name in by_seed.items():
                    assert f"-holdout-{task}-seed{s}-" in name
                    assert json.loads((out / name / "config.json").read_text())["seed"] == int(s)
        # each seed its own checkpoint (the seed is part of the cache key), with other weights
        for editor, by_seed in doc["training"][task].items():
            names = {s: x["checkpoint"] for s, x in by_seed.items()}
            assert names["0"] != names["1"]
            t0, t1 = (load_file(str(workdir / "cache" / "editors" / names[s])) for s in ("0", "1"))
            assert t0.keys() == t1.keys() and any(not (t0[k] == t1[k]).all() for k in t0)

    view = view_of(out)
    assert view["seeds"] == [0, 1] and "hierarchical bootstrap" in view["rule"]
    for task in TWO:
        row = row_of(view, task)
        runs = {e: {s: out / doc["runs"][task][e][m][s] for s in ("0", "1")}
                for e, m in (("instructedit", "seen"), ("mend", "none"))}
        # a run's cell: the mean over seeds of the per-seed means, and the per-seed values
        col = next(c for c in row["columns"] if c["label"] == "instructedit (seen)")
        per_seed = [np.mean(list(posts(runs["instructedit"][s], task, "reliability").values())) * 100
                    for s in ("0", "1")]
        cell = col["cells"]["reliability"]
        assert cell["per_seed"] == pytest.approx(per_seed) and cell["post"] == pytest.approx(np.mean(per_seed))
        assert [x["seed"] for x in col["training"]] == [0, 1]
        # the difference: per seed over the shared cases, their mean and spread, the interval
        pairs = []
        for s in ("0", "1"):
            a, b = posts(runs["instructedit"][s], task, "reliability"), posts(runs["mend"][s], task, "reliability")
            keys = sorted(a.keys() & b.keys())
            pairs.append((np.array([a[k] for k in keys]), np.array([b[k] for k in keys])))
        diffs = [(a.mean() - b.mean()) * 100 for a, b in pairs]
        d = next(x for x in row["diffs"] if x["a"] == "instructedit (seen)")["cells"]["reliability"]
        assert d["per_seed"] == pytest.approx(diffs) and d["diff"] == pytest.approx(np.mean(diffs))
        assert d["sd_seeds"] == pytest.approx(np.std(diffs, ddof=1))
        if min(len(a) for a, _ in pairs) >= MIN_PAIRS:  # the sample: 4 counterfact cases, 5 zsre ones
            lo, hi = percentile_interval(naive_hierarchical(pairs))
            assert (d["lo"], d["hi"]) == pytest.approx((lo * 100, hi * 100)) and task == "zsre"
        else:
            assert d["lo"] is None and d["p"] is None and task == "counterfact"
        assert d["verdict"] == verdict(d)
    # the text matrix: the per-seed table, and a training row per seed
    assert "per seed (0, 1)" in printed
    head, body = training_table(view)
    assert head[:3] == ["held out", "run", "seed"]
    assert [(r[0], r[1], r[2]) for r in body if r[1] == "mend"] == [(t, "mend", s) for t in TWO for s in "01"]


def test_a_killed_seeded_matrix_resumes(tiny_model_dir, workdir, monkeypatch, capsys, trainings, run_calls):
    """A single-seed matrix first (its runs carry no seed in their names); then --seeds 0,1 reuses
    them for seed 0 and is killed in the middle of a run of seed 1; the same command again keeps
    every finished run and checkpoint, resumes the killed run and makes the rest."""
    out = workdir / "matrix"
    assert main(matrix_args(tiny_model_dir, out)) == 0
    assert run_calls == ["execute"] * 6 and len(trainings) == 4
    first = json.loads((out / "matrix.json").read_text())
    capsys.readouterr()
    run_calls.clear()
    trainings.clear()

    applied = {"n": 0}
    real_apply = Mend.apply

    def dying_apply(self, *a, **k):
        applied["n"] += 1
        if applied["n"] == 3 * 8 + 2:  # the second edit of seed 1's fourth run (8 edits in each before it)
            raise KeyboardInterrupt
        return real_apply(self, *a, **k)

    monkeypatch.setattr(Mend, "apply", dying_apply)
    assert main(matrix_args(tiny_model_dir, out) + ["--seeds", "0,1"]) == 130
    printed = capsys.readouterr()
    assert printed.out.count("complete, kept") == 6  # seed 0: the single-seed matrix's runs
    assert run_calls == ["execute"] * 4 and sorted(trainings) == [(("counterfact",), 1)] * 2 + [(("zsre",), 1)]
    killed = sorted(p for p in out.iterdir() if p.name.startswith("instructedit-seen-holdout-zsre-seed1-"))
    assert len(killed) == 1 and sum(1 for _ in (killed[0] / "cases.jsonl").open()) == 1 and not run_complete(killed[0])

    monkeypatch.setattr(Mend, "apply", real_apply)
    run_calls.clear()
    trainings.clear()
    assert main(matrix_args(tiny_model_dir, out) + ["--seeds", "0,1"]) == 0
    printed = capsys.readouterr().out
    assert run_calls == ["resume", "execute", "execute"]  # the killed run; then unseen and mend, zsre, seed 1
    assert trainings == [(("zsre",), 1)]  # mend's; instructedit's zsre checkpoint of seed 1 was made before the kill
    assert f"resuming {killed[0].name}" in printed and printed.count("complete, kept") == 9
    doc = json.loads((out / "matrix.json").read_text())
    assert doc["runs"]["zsre"]["instructedit"]["seen"] == {
        "0": first["runs"]["zsre"]["instructedit"]["seen"]["0"], "1": killed[0].name}
    assert all(run_complete(out / n) for by in doc["runs"].values()
               for modes in by.values() for seeds in modes.values() for n in seeds.values())

    # again: nothing trained or run; the report renders the seeded matrix
    run_calls.clear()
    trainings.clear()
    assert main(matrix_args(tiny_model_dir, out) + ["--seeds", "0,1"]) == 0 and run_calls == [] and trainings == []
    printed_lines: list[str] = []
    print_matrix(doc, out, log=printed_lines.append)
    assert "per seed (0, 1)" in "\n".join(printed_lines)
    report = build_report([], workdir / "report", baseline="none", fmt="all", matrix=out / "matrix.json")
    lb = json.loads((report.parent / "leaderboard.json").read_text())["holdout_matrix"]
    assert lb["seeds"] == [0, 1] and [r["run_dir"] for r in lb["rows"][1]["runs"][0]["seeds"]] == \
        [doc["runs"]["zsre"]["instructedit"]["seen"][s] for s in ("0", "1")]
    rel = lb["rows"][1]["differences"][0]["scores"]["reliability"]
    assert len(rel["per_seed"]) == 2 and rel["verdict"] in ("significant", "not significant")
    assert "**Per seed**" in (report.parent / "leaderboard.md").read_text()
    assert 'class="holdout-seeds"' in report.read_text()


# --------------------------------------------------------------------------------------------
# The hierarchical bootstrap
# --------------------------------------------------------------------------------------------


def test_hierarchical_bootstrap_counts_the_seed():
    """Every case of seed 0 differs by +1 point, every case of seed 1 by +3: the cases carry no
    variance, the seeds all of it. The resamples are the means of two seeds drawn with
    replacement: 1, 2 or 3 points; the interval spans the seeds, [1, 3]."""
    n = 20
    strata = [[[np.full(n, 0.51), np.full(n, 0.50)], [np.full(n, 0.53), np.full(n, 0.50)]]]
    res = hierarchical_resamples(strata, mean_difference) * 100
    assert set(np.round(res, 9)) == {1.0, 2.0, 3.0}
    assert np.mean(np.isclose(res, 2.0)) == pytest.approx(0.5, abs=0.05)
    d = seeded_difference(strata, mean_difference)
    assert d["diff"] == pytest.approx(2.0) and d["per_seed"] == pytest.approx([1.0, 3.0])
    assert (d["lo"], d["hi"]) == pytest.approx((1.0, 3.0)) and d["sig"] == 1 and d["seeds"] == 2
    assert d["sd_seeds"] == pytest.approx(np.std([1.0, 3.0], ddof=1))
    # one seed of +3 and one of -1: the interval reaches below zero, so no significance
    strata = [[[np.full(n, 0.53), np.full(n, 0.50)], [np.full(n, 0.49), np.full(n, 0.50)]]]
    d = seeded_difference(strata, mean_difference)
    assert d["lo"] == pytest.approx(-1.0) and d["hi"] == pytest.approx(3.0) and d["sig"] == 0
    # whereas a case bootstrap of the pooled cases would call it significant (+1, no case variance)
    pooled = np.concatenate([np.full(n, 0.53), np.full(n, 0.49)]) - 0.50
    assert pooled.mean() > 0 and np.quantile([np.random.default_rng(0).choice(pooled, 2 * n).mean()
                                              for _ in range(500)], 0.025) > 0


def test_hierarchical_bootstrap_matches_a_loop_and_averages_strata():
    rng = np.random.default_rng(5)
    pairs = [(rng.random(12), rng.random(12)), (rng.random(9), rng.random(9)), (rng.random(12), rng.random(12))]
    strata = [[[a, b] for a, b in pairs]]
    assert np.allclose(hierarchical_resamples(strata, mean_difference), naive_hierarchical(pairs))
    # one seed: a case bootstrap; a run's cell: the per-seed means and their mean
    cell = seeded_cell([[[pairs[0][0]]], [[pairs[1][0]]]], lambda m: m[0])
    assert cell["per_seed"] == pytest.approx([(pairs[0][0].mean() + pairs[1][0].mean()) / 2 * 100])
    assert cell["seeds"] == 1 and cell["lo"] < cell["post"] < cell["hi"]
    # strata (tasks): the statistic is the mean over strata of the per-seed values
    two = [[[pairs[0][0], pairs[0][1]], [pairs[2][0], pairs[2][1]]],
           [[pairs[1][0], pairs[1][1]], [pairs[1][1], pairs[1][0]]]]
    d = seeded_difference(two, mean_difference)
    want = [np.mean([pairs[0][0].mean() - pairs[0][1].mean(), pairs[1][0].mean() - pairs[1][1].mean()]),
            np.mean([pairs[2][0].mean() - pairs[2][1].mean(), pairs[1][1].mean() - pairs[1][0].mean()])]
    assert d["per_seed"] == pytest.approx([w * 100 for w in want]) and d["diff"] == pytest.approx(np.mean(want) * 100)
