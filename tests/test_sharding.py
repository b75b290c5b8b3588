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

from tests.tiny import tiny_model

FIXTURE_DATA = Path(__file__).parent / "fixtures" / "data"


def _bench(args: list[str], env: dict, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    cmd = (launcher or [sys.executable]) + ["-m", "bench", "run"] + args
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def _cases(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "cases.jsonl").read_text().splitlines()]
    for r in records:
        r.pop("time", None)  # wall-clock timings differ between runs
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
    assert summary_one["task_info"] == summary_two["task_info"]
