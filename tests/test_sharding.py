"""A run split across 2 processes (torchrun, gloo on CPU) merges into the same results as a
1-process run of the same cases."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.core.tiny import tiny_model
from tests.helpers import without_time

FIXTURE_DATA = Path(__file__).parent / "fixtures" / "data"


def _bench(args: list[str], env: dict, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    cmd = (launcher or [sys.executable]) + ["-m", "bench", "run"] + args
    return subprocess.run(cmd, env=env, capture_output=True, text=True)  # no time limit: see tests/helpers.py


def _cases(run_dir: Path) -> list[dict]:
    records = [without_time(json.loads(line)) for line in (run_dir / "cases.jsonl").read_text().splitlines()]
    return sorted(records, key=lambda r: (r["task"], r["case_id"]))


@pytest.mark.skipif(shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists(),
                    reason="torchrun not installed")
def test_two_process_run_equals_one_process_run(tmp_path):
    model_dir = tmp_path / "tiny"
    lm = tiny_model("llama")
    lm.model.save_pretrained(model_dir)
    lm.tokenizer.save_pretrained(model_dir)
    env = dict(os.environ, OMP_NUM_THREADS="1", BENCH_CACHE=str(tmp_path / "cache"),
               HF_HUB_OFFLINE="1", PYTHONPATH=str(Path(__file__).parents[1]))
    common = ["--model", str(model_dir), "--data-dir", str(FIXTURE_DATA), "--editor", "ft",
              "--task", "counterfact,zsre", "--hparam", "steps=3", "--device", "cpu",
              "--output-dir", str(tmp_path / "runs")]
    one = _bench(common + ["--name", "one"], env)
    assert one.returncode == 0, one.stderr[-2000:]
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    two = _bench(common + ["--name", "two"], env,
                 launcher=[torchrun, "--nproc_per_node", "2", "--master_port", "29517"])
    assert two.returncode == 0, two.stderr[-2000:]

    (run_one,) = (tmp_path / "runs").glob("one-*")
    (run_two,) = (tmp_path / "runs").glob("two-*")
    assert not list(run_two.glob("cases.rank*.jsonl")), "shards were not merged"
    cases_one, cases_two = _cases(run_one), _cases(run_two)
    assert len(cases_one) == len(cases_two) > 2
    assert cases_one == cases_two
    summary_one = json.loads((run_one / "summary.json").read_text())
    summary_two = json.loads((run_two / "summary.json").read_text())
    assert summary_one["tasks"] == summary_two["tasks"]
    # the second run read the unedited model's answers the first one left in the answer cache
    cached = lambda summary: [i["wild"].pop("unedited_answers_cached") for i in summary["task_info"].values()]  # noqa: E731
    assert sum(cached(summary_one)) == 0 and sum(cached(summary_two)) == len(cases_two)
    assert summary_one["task_info"] == summary_two["task_info"]


def _train(args: list[str], env: dict, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    cmd = (launcher or [sys.executable]) + ["-m", "bench", "train"] + args
    return subprocess.run(cmd, env=env, capture_output=True, text=True)  # no time limit: see tests/helpers.py


@pytest.mark.skipif(shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists(),
                    reason="torchrun not installed")
@pytest.mark.parametrize("editor", ["mend", "instructedit"])
def test_two_process_meta_training_equals_one_process(tmp_path, editor):
    """`bench train` under torchrun: 2 processes share each batch (2 edits each), sum their
    gradients and merge their input statistics; the checkpoint equals a 1-process training."""
    from safetensors.torch import load_file

    model_dir = tmp_path / "tiny"
    lm = tiny_model("llama")
    lm.model.save_pretrained(model_dir)
    lm.tokenizer.save_pretrained(model_dir)
    common = ["--model", str(model_dir), "--data-dir", str(FIXTURE_DATA), "--editor", editor,
              "--device", "cpu", "--max-steps", "4", "--hparam", "batch_size=4", "--hparam", "val_every=2"]
    checkpoints = {}
    for name, launcher in (("one", None), ("two", "torchrun")):
        env = dict(os.environ, OMP_NUM_THREADS="1", BENCH_CACHE=str(tmp_path / name),
                   HF_HUB_OFFLINE="1", PYTHONPATH=str(Path(__file__).parents[1]))
        if launcher:
            torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
            launcher = [torchrun, "--nproc_per_node", "2", "--master_port", "29519"]
        done = _train(common, env, launcher)
        assert done.returncode == 0, done.stderr[-2000:]
        (path,) = (tmp_path / name / "editors").glob(f"{editor}-*.safetensors")
        checkpoints[name] = (load_file(path), json.loads(path.with_suffix(".json").read_text()))
    (one, meta_one), (two, meta_two) = checkpoints["one"], checkpoints["two"]
    assert meta_two["data_parallel_processes"] == 2 and "data_parallel_processes" not in meta_one
    assert meta_one["steps"] == meta_two["steps"] == 4
    assert meta_one["per_task"] == meta_two["per_task"]  # the same batches were drawn
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-6, msg=key)
