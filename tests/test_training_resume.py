"""Learned editors (MEND, InstructEdit) save their training state every `checkpoint_every` steps
and on Ctrl-C, and the same command resumes from it: after Ctrl-C inside a step, after a first
Ctrl-C (which stops at the step boundary), and after SIGKILL of `bench train`, the resumed
training ends with exactly the checkpoint of an uninterrupted training (tensors compared bit
for bit). An interrupted command says in one line what was saved and how to continue."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bench.cli import build_parser, interrupted_message, main
from bench.core.errors import Interrupted
from bench.core.tiny import tiny_model
from editors.instructedit import InstructEdit
from editors.mend import Mend
from editors.mend.checkpoint import partial_path
from editors.mend.trainer import MetaTrainer
from tests.test_mend import FIXTURES, ctx_for, small_hparams

ROOT = Path(__file__).resolve().parent.parent
REAL_STEP = MetaTrainer.train_step

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def resume_hparams(lm):
    # 8 steps, validation at 3, 6 and 8 (best network and patience count in the state), the
    # training state saved at steps 2, 4 and 6
    return small_hparams(lm, max_steps=8, val_every=3, checkpoint_every=2, patience=4)


def stop_at_call(monkeypatch, n: int, action) -> list:
    """MetaTrainer.train_step runs `action()` instead of its n-th step; returns the call log."""
    calls = []

    def step(self, cases):
        calls.append(len(calls) + 1)
        if len(calls) == n:
            action()
        return REAL_STEP(self, cases)

    monkeypatch.setattr(MetaTrainer, "train_step", step)
    return calls


def ctrl_c():
    raise KeyboardInterrupt


def tensors(path) -> dict:
    return load_file(str(path))


def assert_same_checkpoint(a: Path, b: Path) -> None:
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k
    ma, mb = (untimed(json.loads(Path(p).with_suffix(".json").read_text())) for p in (a, b))
    for key in ("steps", "best_step", "stop_reason", "per_task", "final_validation", "cache_key",
                "history", "hparams"):
        assert ma[key] == mb[key], key


def untimed(value):
    """`value` without the wall-clock fields (elapsed_s, s_per_step)."""
    if isinstance(value, dict):
        return {k: untimed(v) for k, v in value.items() if k not in ("elapsed_s", "s_per_step")}
    if isinstance(value, list):
        return [untimed(v) for v in value]
    return value


@pytest.mark.parametrize("cls", [Mend, InstructEdit])
def test_ctrl_c_inside_a_step_then_resume_gives_the_uninterrupted_network(cls, tmp_path, monkeypatch):
    lm = tiny_model("llama")
    hp = resume_hparams(lm)
    straight = ctx_for(tmp_path / "straight")
    cls(hp).prepare(lm, straight)

    ctx = ctx_for(tmp_path / "stopped")
    stem = cls(hp).checkpoint_stem(lm, ctx)
    partial = partial_path(stem)
    assert partial.parent == stem.parent and partial.name == stem.name + ".partial.safetensors"
    stop_at_call(monkeypatch, 6, ctrl_c)  # steps 1-5 done, the state saved at step 4
    with pytest.raises(Interrupted) as caught:
        cls(hp).prepare(lm, ctx)
    assert caught.value.note == (f"training interrupted at step 5 of 8: saved {partial} (step 4); "
                                 "run the same command again to continue")
    assert partial.is_file() and not stem.with_suffix(".safetensors").exists()
    assert not list(partial.parent.glob("*.tmp"))

    calls = stop_at_call(monkeypatch, 0, None)
    again = ctx_for(tmp_path / "stopped")
    cls(hp).prepare(lm, again)
    assert len(calls) == 4  # steps 5-8 only
    assert again.notes["checkpoint_source"] == "trained"
    assert not partial.exists()  # the final checkpoint replaces the training state
    meta = json.loads(stem.with_suffix(".json").read_text())
    assert meta["resumed_at_step"] == 4
    assert_same_checkpoint(Path(straight.notes["checkpoint"]), Path(again.notes["checkpoint"]))


def test_first_ctrl_c_stops_after_the_step_and_saves_it(tmp_path, monkeypatch):
    # Python's own Ctrl-C handler, whatever the suite inherited: a test suite started in the
    # background of a script inherits SIGINT ignored, and the trainer rightly leaves an ignored
    # SIGINT alone (so this test would see no Ctrl-C at all).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _first_ctrl_c_stops_after_the_step_and_saves_it(tmp_path, monkeypatch)
    finally:
        signal.signal(signal.SIGINT, previous)


def _first_ctrl_c_stops_after_the_step_and_saves_it(tmp_path, monkeypatch):
    lm = tiny_model("llama")
    hp = resume_hparams(lm)
    straight = ctx_for(tmp_path / "straight")
    Mend(hp).prepare(lm, straight)

    ctx = ctx_for(tmp_path / "stopped")
    partial = partial_path(Mend(hp).checkpoint_stem(lm, ctx))
    calls = stop_at_call(monkeypatch, 3, lambda: signal.raise_signal(signal.SIGINT))
    with pytest.raises(Interrupted) as caught:
        Mend(hp).prepare(lm, ctx)
    assert len(calls) == 3  # the third step finished, no fourth began
    assert caught.value.note == (f"training interrupted at step 3 of 8: saved {partial}; "
                                 "run the same command again to continue")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored

    calls = stop_at_call(monkeypatch, 0, None)
    again = ctx_for(tmp_path / "stopped")
    Mend(hp).prepare(lm, again)
    assert len(calls) == 5
    assert_same_checkpoint(Path(straight.notes["checkpoint"]), Path(again.notes["checkpoint"]))


def test_unusable_training_state_is_ignored_and_disabled_saving(tmp_path, monkeypatch):
    lm = tiny_model("llama")
    hp = resume_hparams(lm)
    straight = ctx_for(tmp_path / "straight")
    Mend(hp).prepare(lm, straight)

    logs = []
    ctx = ctx_for(tmp_path / "garbage")
    ctx.log = logs.append
    partial = partial_path(Mend(hp).checkpoint_stem(lm, ctx))
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"not a safetensors file")
    Mend(hp).prepare(lm, ctx)
    assert any("cannot resume from" in line and "training from step 0" in line for line in logs)
    assert_same_checkpoint(Path(straight.notes["checkpoint"]), Path(ctx.notes["checkpoint"]))

    # checkpoint_every=0: nothing is saved, and Ctrl-C says so (same cache key as above)
    off = dataclasses.replace(hp, checkpoint_every=0)
    assert Mend(off).checkpoint_stem(lm, ctx) == Mend(hp).checkpoint_stem(lm, ctx)
    stop_at_call(monkeypatch, 3, ctrl_c)
    ctx = ctx_for(tmp_path / "off")
    with pytest.raises(Interrupted, match=r"^training interrupted at step 2 of 8: nothing saved yet "
                                          r"\(checkpoint_every=0\)"):
        Mend(off).prepare(lm, ctx)
    assert not (tmp_path / "off" / "editors").exists()


def test_interrupted_message_puts_what_training_saved_first(tmp_path):
    args = build_parser().parse_args(["train"])
    note = "training interrupted at step 4 of 8: saved x.partial.safetensors; run the same command again to continue"
    assert interrupted_message(args, [], note) == f"bench: {note}"
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    assert interrupted_message(build_parser().parse_args(["run"]), [run], note).splitlines() == [
        f"bench: {note}",
        f"bench: interrupted: finished cases are saved in {run}; continue with: bench run --resume {run}"]


KILL_SCRIPT = """
import os, signal, sys
from editors.mend.trainer import MetaTrainer
real, calls = MetaTrainer.train_step, []
def step(self, cases):
    calls.append(1)
    if len(calls) == int(os.environ["KILL_AT_CALL"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, cases)
MetaTrainer.train_step = step
from bench.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_bench_train_resumes_after_ctrl_c_and_sigkill(tiny_model_dir, tmp_path, monkeypatch, capsys):
    common = ["train", "--editor", "instructedit", "--model", str(tiny_model_dir), "--data-dir", str(FIXTURES),
              "--max-steps", "8", "--time-budget", "0", "--hparam", "rank=8", "--hparam", "val_cases=2",
              "--hparam", "batch_size=2", "--hparam", "val_every=3", "--hparam", "checkpoint_every=2"]

    def checkpoint_line(out: str) -> Path:
        (line,) = [x for x in out.splitlines() if x.startswith("checkpoint: ")]
        return Path(line.split(": ", 1)[1])

    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "straight"))
    assert main(common) == 0
    straight = checkpoint_line(capsys.readouterr().out)

    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "stopped"))
    with monkeypatch.context() as mp:  # Ctrl-C in step 4: steps 1-3 done, the state saved at step 2
        stop_at_call(mp, 4, ctrl_c)
        assert main(common) == 130
    err = capsys.readouterr().err.strip().splitlines()
    (partial,) = (tmp_path / "stopped" / "editors").glob("*.partial.safetensors")
    assert err[-1] == (f"bench: training interrupted at step 3 of 8: saved {partial} (step 2); "
                       "run the same command again to continue")

    # the same command, killed with SIGKILL in its 4th step (resumed at 2: steps 3-5 done, saved at 4)
    env = dict(os.environ, KILL_AT_CALL="4", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, *common], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert f"resuming training from {partial} at step 2 of 8" in proc.stdout + proc.stderr
    assert partial.is_file()

    assert main(common) == 0  # and once more: resumes at step 4, ends as the straight run
    out = capsys.readouterr()
    assert f"resuming training from {partial} at step 4 of 8" in out.out + out.err
    resumed = checkpoint_line(out.out)
    assert resumed.name == straight.name and not partial.exists()
    assert_same_checkpoint(straight, resumed)
