"""The edit-direction analysis (`bench analyze directions`, bench/directions.py,
reports/directions.py): the numbers on constructed directions with a known answer, the sketch,
and the command on a tiny model."""

from __future__ import annotations

import csv
import json
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from bench.cli import main
from bench.directions import Sketch
from reports.directions import analyze_set, pca_coordinates, unit_rows


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def constructed(n: int = 6):
    """Task a's edits point along e1, task b's along e2, each tilted by a known amount along e3;
    the held-out task h's along e1, tilted along e4."""
    tilt = np.linspace(-0.2, 0.2, n)
    rows, tasks = [], []
    for task, axis, spread in (("a", 0, 2), ("b", 1, 2), ("h", 0, 3)):
        for t in tilt:
            v = np.zeros(6)
            v[axis], v[spread] = 1.0, t
            rows.append(3.0 * v)  # lengths do not matter: every vector is made a unit direction
            tasks.append(task)
    return np.array(rows), tasks


def test_separable_directions_give_the_expected_numbers():
    x, tasks = constructed()
    res = analyze_set(x, tasks, held_out=["h"])
    u = unit_rows(x)
    # PCA coordinates, computed independently: the centred unit directions on their two leading
    # right singular vectors, each signed so that its largest loading is positive
    centred = u - u.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    for i in range(2):
        if vt[i][np.argmax(np.abs(vt[i]))] < 0:
            vt[i] = -vt[i]
    assert np.allclose(res["coords"], centred @ vt[:2].T, atol=1e-9)
    # a and b lie apart on PC1 (e1 - e2), h with a; the tilts spread along PC2
    c = res["coords"]
    a, b, h = (np.array(tasks) == t for t in "abh")
    assert c[b, 0].max() < 0 < c[a, 0].min() and np.allclose(c[a, 0].mean(), c[h, 0].mean(), atol=0.05)
    # separation of the training tasks: clean clusters, orthogonal task means
    assert res["train_tasks"] == ["a", "b"] and res["held_out"] == ["h"]
    assert res["silhouette_2d"] > 0.8 and res["silhouette_cosine"] > 0.9
    assert abs(res["mean_cosine"]["a"]["b"]) < 1e-9 and res["mean_cosine"]["a"]["a"] == pytest.approx(1.0)
    assert res["per_task"]["a"]["concentration"] == pytest.approx(np.linalg.norm(u[a].mean(axis=0)))
    # the held-out task falls on a: every edit nearest to a's mean, its mean close to a's
    place = res["placement"]["h"]
    assert place["nearest"] == {"a": 1.0, "b": 0.0} and place["nearest_mean"] == "a"
    assert place["mean_cosine"]["a"] > 0.95 and abs(place["mean_cosine"]["b"]) < 1e-9
    # as a cluster of its own it overlaps a: its silhouette is far below a clean one
    assert place["silhouette_cosine"] < 0.5
    assert res["explained_variance"][0] > res["explained_variance"][1] > 0


def test_directions_that_do_not_separate_give_a_low_silhouette():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 8))
    res = analyze_set(x, ["a", "b"] * 20)
    assert abs(res["silhouette_cosine"]) < 0.1 and res["placement"] == {}


def test_pca_pads_with_zeros_beyond_the_rank():
    coords, comps, explained = pca_coordinates(np.array([[1.0, 0.0], [0.0, 1.0]]), 2)
    assert coords.shape == (2, 2) and explained[0] == pytest.approx(1.0)
    assert np.allclose(np.abs(coords[:, 0]), np.sqrt(0.5))


def test_the_sketch_is_the_weights_update_between_two_random_maps():
    targets = [SimpleNamespace(name="w1", out_dim=40, in_dim=30), SimpleNamespace(name="w2", out_dim=3, in_dim=2)]
    sketch = Sketch(targets, 4, seed=7)
    g = torch.Generator().manual_seed(0)
    d1, u1 = torch.randn(5, 40, generator=g), torch.randn(5, 30, generator=g)
    d2, u2 = torch.randn(5, 3, generator=g), torch.randn(5, 2, generator=g)
    v = sketch.vector({"w1": (d1, u1), "w2": (d2, u2)})
    r_out, r_in = sketch.maps["w1"]
    assert sketch.maps["w2"] is None  # 3 x 2 <= 4 x 4: kept whole
    want = torch.cat([(r_out @ (d1.T @ u1) @ r_in.T).reshape(-1), (d2.T @ u2).reshape(-1)]).double().numpy()
    assert v.shape == (16 + 6,) and np.allclose(v, want, atol=1e-4)
    # the same seed, the same maps (every set and editor of an analysis shares them)
    assert np.allclose(Sketch(targets, 4, seed=7).vector({"w1": (d1, u1), "w2": (d2, u2)}), v)


def test_analyze_directions_on_a_tiny_model(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the built-in sample of the tasks
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "directions"
    args = ["analyze", "directions", "--editors", "instructedit,mend", "--tasks", "counterfact,zsre,recast",
            "--holdout", "zsre", "--n", "3", "--sketch", "4", "--model", str(tiny_model_dir), "--output-dir", str(out),
            "--hparam", "rank=8", "--hparam", "max_steps=2", "--hparam", "batch_size=2", "--hparam", "val_cases=2"]
    # without a cached checkpoint: one line naming it, nothing trained
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no trained checkpoint for held-out zsre" in err and "--train" in err
    assert main(args + ["--train"]) == 0
    printed = capsys.readouterr().out
    assert "instructedit update · seen" in printed

    doc = json.loads((out / "directions.json").read_text())
    assert doc["format"] == "instructedit-bench/directions/v1" and doc["holdout"] == ["zsre"]
    assert doc["n_per_task"] == 3 and doc["tasks"] == ["counterfact", "zsre", "recast"]
    assert {e: x["train_tasks"] for e, x in doc["editors"].items()} == {
        "instructedit": ["counterfact", "recast"], "mend": ["counterfact", "recast"]}
    kinds = {(s["editor"], s["kind"], s["condition"]) for s in doc["sets"]}
    assert kinds == {(e, k, c) for e, k in ((None, "gradient"), ("instructedit", "update"), ("mend", "update"))
                     for c in ("raw", "seen", "unseen")}
    for s in doc["sets"]:
        assert s["held_out"] == ["zsre"] and s["train_tasks"] == ["counterfact", "recast"] and s["n"] == 9
        assert set(s["placement"]["zsre"]["nearest"]) == {"counterfact", "recast"}
        assert s["silhouette_cosine"] is None or -1 <= s["silhouette_cosine"] <= 1
    # 9 edited weights' 4 x 4 sketches (the tiny model's weights are larger than 16 numbers)
    assert doc["dimensions"] == len(doc["edited_weights"]) * 16
    rows = list(csv.DictReader((out / "directions.csv").open()))
    assert len(rows) == 9 * 9 and {r["held_out"] for r in rows if r["task"] == "zsre"} == {"1"}
    summary = list(csv.DictReader((out / "summary.csv").open()))
    assert len(summary) == 9 and summary[0]["held_out"] == "zsre"
    svg = (out / "directions.svg").read_text()
    ET.fromstring(svg)  # well-formed
    assert svg.count("<title>") >= 81 and "zsre (held out)" in svg
    text = "".join((out / n).read_text() for n in ("directions.json", "directions.csv", "summary.csv", "directions.svg"))
    assert str(tmp_path) not in text  # no absolute machine paths
    # with and without the instruction the gradients differ (the prompt is different)
    grads = {c: np.array([[float(r["pc1"]), float(r["pc2"])] for r in rows
                          if r["kind"] == "gradient" and r["condition"] == c]) for c in ("raw", "seen")}
    assert not np.allclose(grads["raw"], grads["seen"])
    # the checkpoints are now cached: the same command without --train loads them
    assert main(args) == 0


def test_bad_input_is_one_line(capsys, tmp_path):
    for extra, message in ((["--holdout", "recent"], "--holdout recent is not one of --tasks"),
                           (["--editors", "instructedit,rome"], "editor 'rome' has no editor network"),
                           (["--n", "1"], "--n must be at least 2")):
        code = main(["analyze", "directions", "--output-dir", str(tmp_path / "d")] + extra)
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "d").exists()


def _doc(seed: int, sil: float, cos_ab: float, held_sil: float, nearest: str) -> dict:
    """A directions.json with one set, its numbers given."""
    mean_cosine = {"a": {"a": 1.0, "b": cos_ab, "h": 0.5}, "b": {"a": cos_ab, "b": 1.0, "h": 0.1},
                   "h": {"a": 0.5, "b": 0.1, "h": 1.0}}
    return {"seed": seed, "model": "m", "tasks": ["a", "b", "h"], "holdout": ["h"], "n_per_task": 6, "sketch": 0,
            "sets": [{"editor": "mend", "kind": "update", "condition": "seen", "tasks": ["a", "b", "h"],
                      "held_out": ["h"], "silhouette_2d": sil, "silhouette_cosine": sil / 2,
                      "mean_cosine": mean_cosine,
                      "placement": {"h": {"silhouette_2d": held_sil, "nearest_mean": nearest}}}]}


def test_the_seed_summary_is_each_numbers_mean_and_spread(tmp_path):
    from reports.directions_seeds import seed_summary, write_seed_summary

    docs = {0: _doc(0, 0.30, 0.20, 0.10, "a"), 1: _doc(1, 0.50, 0.40, -0.10, "a"), 2: _doc(2, 0.10, 0.30, None, "b")}
    (row,) = seed_summary(docs)
    assert (row["editor"], row["kind"], row["condition"], row["seeds"]) == ("mend", "update", "seen", [0, 1, 2])
    sil = row["silhouette_2d"]
    assert sil["per_seed"] == {0: 0.30, 1: 0.50, 2: 0.10}
    assert sil["mean"] == pytest.approx(0.30) and sil["sd"] == pytest.approx(0.20)  # sd of 0.3, 0.5, 0.1
    # the task-mean cosine: the mean over the 3 task pairs, then over seeds
    per = {s: (c + 0.5 + 0.1) / 3 for s, c in ((0, 0.2), (1, 0.4), (2, 0.3))}
    assert row["task_mean_cosine"]["per_seed"] == pytest.approx(per)
    assert row["task_mean_cosine"]["mean"] == pytest.approx(np.mean(list(per.values())))
    assert row["task_mean_cosine"]["sd"] == pytest.approx(np.std(list(per.values()), ddof=1))
    # a seed without a held-out silhouette is left out of its mean, not counted as 0
    assert row["held_out_silhouette_2d"]["per_seed"] == {0: 0.10, 1: -0.10}
    assert row["held_out_silhouette_2d"]["mean"] == pytest.approx(0.0)
    assert row["held_out_nearest"] == {0: "a", 1: "a", 2: "b"}
    files = write_seed_summary(tmp_path, docs)
    assert [f.name for f in files] == ["seeds.json", "seeds.csv"]
    (line,) = list(csv.DictReader((tmp_path / "seeds.csv").open()))
    assert line["silhouette_2d_mean"] == "0.3000" and line["silhouette_2d_sd"] == "0.2000"
    assert line["silhouette_2d_seed1"] == "0.5000" and line["held_out_nearest_seed2"] == "b"
    assert line["held_out_silhouette_2d_seed2"] == ""


def test_analyze_directions_over_seeds_on_a_tiny_model(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the built-in sample of the tasks
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "directions"
    args = ["analyze", "directions", "--editors", "instructedit,mend", "--tasks", "counterfact,zsre,recast",
            "--holdout", "zsre", "--n", "2", "--sketch", "4", "--model", str(tiny_model_dir), "--output-dir", str(out),
            "--hparam", "rank=8", "--hparam", "max_steps=2", "--hparam", "batch_size=2", "--hparam", "val_cases=2",
            "--seeds", "0,1"]
    assert main(args + ["--train"]) == 0
    docs = {s: json.loads((out / f"seed-{s}" / "directions.json").read_text()) for s in (0, 1)}
    assert [docs[s]["seed"] for s in (0, 1)] == [0, 1]
    # each seed's own checkpoints (the seed is part of the cache key)
    for editor in ("instructedit", "mend"):
        assert docs[0]["editors"][editor]["checkpoint"] != docs[1]["editors"][editor]["checkpoint"]
    summary = json.loads((out / "seeds.json").read_text())
    assert summary["seeds"] == [0, 1] and len(summary["sets"]) == 9
    mend_seen = next(r for r in summary["sets"] if (r["editor"], r["condition"]) == ("mend", "seen"))
    per_seed = {int(s): v for s, v in mend_seen["silhouette_2d"]["per_seed"].items()}
    assert per_seed == {s: next(x["silhouette_2d"] for x in docs[s]["sets"]
                                if (x["editor"], x["condition"]) == ("mend", "seen")) for s in (0, 1)}
    # again: both seeds' analyses are found and read, not redone (a killed analysis resumes)
    stamps = {s: (out / f"seed-{s}" / "directions.json").stat().st_mtime_ns for s in (0, 1)}
    capsys.readouterr()
    assert main(args) == 0
    assert capsys.readouterr().out.count("not redone") == 2
    assert stamps == {s: (out / f"seed-{s}" / "directions.json").stat().st_mtime_ns for s in (0, 1)}
    # another n is another analysis: redone (its checkpoints are cached, so no --train needed)
    assert main(args[:-2] + ["--seeds", "1", "--n", "3"]) == 0
    assert json.loads((out / "seed-1" / "directions.json").read_text())["n_per_task"] == 3


def test_bad_seeds_are_one_line(capsys, tmp_path):
    base = ["analyze", "directions", "--output-dir", str(tmp_path / "d"), "--seeds"]
    assert main(base + ["1,1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--seeds names a seed twice" in err, err
    for seeds in ("x", "-1", ","):
        with pytest.raises(SystemExit) as exc:  # argparse's usage error
            main(base + [seeds])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and "argument --seeds: expected comma-separated non-negative integers" in err
    assert not (tmp_path / "d").exists()
