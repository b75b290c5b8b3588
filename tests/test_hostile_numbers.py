"""Hostile input, round two (issue 29): numbers, hyperparameter bounds, model files, debris, the
judge and the network. Every input is refused with one line (exit 2) where it enters, before any
model loads where possible, and nothing numerically broken is recorded as a result: a NaN or inf in
the weights an edit changed, or in what the edited model reads, fails that case with a reason.
Tiny models and the fixture data only; no network (the hub is replaced by functions that fail)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import bench.session
import editors
from bench.cli import main
from bench.core.debris import remove_stale_temporaries
from bench.core.distributed import Shard
from bench.core.errors import BenchError
from bench.core.hparams import hparams_to_dict
from bench.core.layout import find_layout
from bench.core.models import _gguf_to_safetensors
from bench.core.presets import converted_dir
from bench.core.tiny import tiny_config, tiny_model
from bench.runner import execute
from bench.session import RunOptions, build_editor, edit_context, gather_tasks, training_data, training_note
from editors.base import EditHandle, Editor, param_name
from editors.mend import Mend
from editors.mend.checkpoint import save_checkpoint
from tasks import sources
from tasks.registry import NOT_NAMED, get_card
from tests.helpers import FIXTURE_DATA

pytestmark = pytest.mark.usefixtures("one_thread")

FIX = str(FIXTURE_DATA)


def one_line_error(capsys, argv: list[str]) -> str:
    """`bench ARGV` in-process: exit 2 and exactly one line on stderr, which is returned."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    assert code == 2, (code, out, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("bench: error: "), err
    return lines[0]


@pytest.fixture
def no_model_load(monkeypatch):
    """The run set-up may read a (tiny) model config, but loading weights fails the test."""

    def refuse(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(bench.session, "load_model", refuse)
    monkeypatch.setattr(bench.session, "load_config", lambda *a, **k: tiny_config("llama"))


def run_argv(tmp_path, *extra: str) -> list[str]:
    return ["run", "--task", "zsre", "--data-dir", FIX, "--output-dir", str(tmp_path / "runs"),
            "--device", "cpu", *extra]


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------
# Hyperparameter bounds: endless or crashing values refused before the model loads
# --------------------------------------------------------------------------------------------

BOUNDS = [
    ("ft", ["steps=1e30"], "ft: hyperparameter steps must be >= 0 and <= 100000, got 1000000000000000019884624838656"),
    ("ft", ["parallel_edits=1e9"], "ft: hyperparameter parallel_edits must be >= 1 and <= 1024"),
    ("ft", ["layers="], "ft: hyperparameter layers must name at least one value, got an empty list"),
    ("ft", ["layers=[]"], "ft: hyperparameter layers must name at least one value"),
    ("mend", ["batch_size=1e30"], "mend: hyperparameter batch_size must be >= 1 and <= 4096"),
    ("mend", ["max_steps=1e30"], "mend: hyperparameter max_steps must be >= 0 and <= 1000000"),
    ("mend", ["rank=1e12"], "mend: hyperparameter rank must be >= 1 and <= 65536"),
    ("mend", ["layers=[]"], "mend: hyperparameter layers must name at least one value"),
    ("mend", ["modules="], "mend: hyperparameter modules must name at least one value"),
    ("instructedit", ["layers="], "instructedit: hyperparameter layers must name at least one value"),
    ("instructedit", ["val_every=1e30"], "instructedit: hyperparameter val_every must be >= 1 and <= 1000000"),
    ("rome", ["v_num_grad_steps=1e30"], "rome: hyperparameter v_num_grad_steps must be >= 1 and <= 10000"),
    ("rome", ["context_counts=1e9,1"], "rome: hyperparameter context_counts must be >= 0 and <= 1000"),
    ("rome", ["mom2_n_samples=1e30"], "rome: hyperparameter mom2_n_samples must be >= 1 and <= 10000000"),
    ("memit", ["layers=[]"], "memit: hyperparameter layers must name at least one layer"),  # memit had it
    ("memit", ["layers=1", "parallel_edits=1e30"], "memit: hyperparameter parallel_edits must be >= 1 and <= 1024"),
    ("alphaedit", ["layers=1", "v_num_grad_steps=1e9"], "alphaedit: hyperparameter v_num_grad_steps must be"),
]


@pytest.mark.parametrize("editor,hparams,message", BOUNDS, ids=[f"{e}-{'+'.join(h)}" for e, h, _ in BOUNDS])
def test_endless_or_empty_hyperparameters_fail_before_the_model_loads(capsys, tmp_path, no_model_load,
                                                                       editor, hparams, message):
    argv = run_argv(tmp_path, "--editor", editor)
    for h in hparams:
        argv += ["--hparam", h]
    assert message in one_line_error(capsys, argv)
    assert not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------------------------
# Numerically broken edits: an error with a reason, never a score
# --------------------------------------------------------------------------------------------


@dataclass
class BreakHparams:
    bad_case: str = "*"  # the case whose edit breaks the model ("*": every case, "": none)
    how: str = "weights"  # weights: a NaN written into a weight; hook: a forward hook that outputs NaN


class BreakingEditor(Editor):
    """Scales one MLP projection a little (a harmless edit); for the `bad_case`, also breaks the
    model: a NaN in the weight, or (how=hook) a forward hook whose output is NaN."""

    name = "breaking"
    Hparams = BreakHparams
    kinds = ("weights", "modules")

    def apply(self, model, tokenizer, case) -> EditHandle:
        module = find_layout(model).layers[1].mlp_out
        bad = self.hparams.bad_case in ("*", case.case_id)
        if self.hparams.how == "hook":
            handle = EditHandle(model, [], modules=True)
            if bad:
                module.register_forward_hook(lambda mod, args, out: out * float("nan"))
            return handle
        handle = EditHandle(model, [param_name(model, module)])
        with torch.no_grad():
            module.weight.mul_(1.01)
            if bad:
                module.weight[0, 0] = float("nan")
        return handle


@pytest.fixture
def breaking(monkeypatch):
    monkeypatch.setitem(editors.BUILTIN, "breaking", "tests.test_hostile_numbers:BreakingEditor")


def options(tmp_path, **changes) -> RunOptions:
    base = dict(editor="ft", tasks=["counterfact"], model="tiny", device="cpu", limit=3, data_dir=FIX,
                output_dir=str(tmp_path / "runs"), batch_size=4, protocols=["teacher_forced"])
    base.update(changes)
    return RunOptions(**base)


def assert_failed_unscored(record: dict, why: str) -> None:
    assert record["error"] is not None and record["error"].startswith("numerically broken edit: ")
    assert why in record["error"] and record["error"].endswith("; not scored")
    assert "post" not in record and "post" not in record.get("predictions", {})


def test_ft_with_a_learning_rate_that_overflows_fails_its_cases(tmp_path, tiny_load):
    """`ft --hparam lr=1e30 norm_constraint=0`: the weights stay finite, the activations do not;
    every post-edit prediction used to be end-of-text and locality 0, recorded as a result."""
    path = execute(options(tmp_path, hparams={"lr": "1e30", "norm_constraint": "0", "steps": "2",
                                              "layers": "1"}), log=lambda s: None)
    records = read_lines(path / "cases.jsonl")
    assert len(records) == 3
    for r in records:  # every logit finite but equal: the square of an activation overflows in the norm
        assert_failed_unscored(r, "the output of block 1 is ")
        assert "beyond 1.8e+19 (the activations overflow)" in r["error"]
    summary = json.loads((path / "summary.json").read_text())
    assert summary["tasks"]["counterfact"] == {} and summary["task_info"]["counterfact"]["errors"] == 3


@pytest.mark.parametrize("how,protocols,why", [
    ("weights", ["teacher_forced"], "NaN or infinite values in the changed weight(s) model.layers.1.mlp.down_proj.weight"),
    ("hook", ["teacher_forced"], "post-edit log-probabilities are NaN or infinite"),
    ("hook", ["wild"], "the output of block 1 is NaN or infinite"),  # no log-probabilities to read
])
def test_a_broken_edit_fails_its_case_and_the_others_are_scored(tmp_path, tiny_load, breaking, how, protocols, why):
    wild = {"max_new_tokens": 3} if "wild" in protocols else {}  # the cap is an option of the wild protocol only
    path = execute(options(tmp_path, editor="breaking", hparams={"bad_case": "202", "how": how},
                           protocols=protocols, **wild), log=lambda s: None)
    records = {r["case_id"]: r for r in read_lines(path / "cases.jsonl")}
    assert_failed_unscored(records["202"], why)
    for case_id in ("201", "203"):  # restored after the broken edit: the next edits are scored
        assert records[case_id]["error"] is None
        assert all(math.isfinite(v) for v in records[case_id]["post"].values())
    summary = json.loads((path / "summary.json").read_text())
    assert summary["task_info"]["counterfact"]["errors"] == 1
    assert all(s["n"] == 2 for s in summary["tasks"]["counterfact"].values())


@pytest.mark.parametrize("how", ["weights", "hook"])
def test_a_broken_sequential_batch_is_undone_and_fails_its_cases(tmp_path, tiny_load, breaking, monkeypatch, how):
    """Sequential mode: the batch whose edit breaks the model is restored at once (its handle:
    weights, modules, the editor's state) and its cases fail; the run goes on from the model as it
    was, so the later edits and every checkpoint read finite numbers."""
    loaded, load = [], bench.session.load_model  # tiny_load's: a fresh tiny Llama
    monkeypatch.setattr(bench.session, "load_model", lambda *a, **k: loaded.append(load(*a, **k)) or loaded[-1])
    path = execute(options(tmp_path, editor="breaking", hparams={"bad_case": "202", "how": how}, mode="sequential",
                           limit=4, locality_probes=2), log=lambda s: None)
    records = {r["case_id"]: r for r in read_lines(path / "cases.jsonl")}
    assert_failed_unscored(records["202"], "")
    for case_id in ("201", "203", "204"):
        assert records[case_id]["error"] is None
        assert records[case_id]["post"] and all(math.isfinite(v) for v in records[case_id]["post"].values())
    checkpoints = read_lines(path / "checkpoints.jsonl")
    assert checkpoints[-1]["n_edits"] == 4 and checkpoints[-1]["n_applied"] == 3
    # the model is back to its unedited weights, without hooks, at the end of the run
    reference = dict(tiny_model("llama").model.named_parameters())
    (lm,) = loaded
    assert all(torch.equal(p, reference[n]) for n, p in lm.model.named_parameters())
    assert not any(m._forward_hooks for m in lm.model.modules())
    # the three good edits held at the last checkpoint (1.01 each), the broken one did not
    change = checkpoints[-1]["weight_change"]
    if how == "weights":
        assert list(change) == ["model.layers.1.mlp.down_proj.weight"]
        assert change["model.layers.1.mlp.down_proj.weight"] == pytest.approx(1.01 ** 3 - 1, rel=1e-3)


def test_float16_on_cpu_is_refused_before_the_model_loads(capsys, tmp_path, no_model_load):
    line = one_line_error(capsys, run_argv(tmp_path, "--dtype", "float16"))
    assert line == ("bench: error: --dtype float16 is not supported on CPU (edits overflow its range); "
                    "use float32 or bfloat16, or a GPU")


# --------------------------------------------------------------------------------------------
# MEND: a diverging training, hyperparameters against a given checkpoint, corrupt checkpoints
# --------------------------------------------------------------------------------------------


def mend_hparams(lm, **changes):
    base = dict(rank=8, max_steps=3, batch_size=2, val_cases=0, time_budget_s=0)
    return dataclasses.replace(Mend.default_hparams(lm.model.config), **{**base, **changes})


def test_mend_training_that_diverges_stops_with_one_line(tmp_path):
    """`mend --hparam edit_lr=1e30`: the first step's edits overflow, the network turns NaN; it
    used to train on and save a network whose every edit was NaN."""
    lm = tiny_model("llama")
    ctx = edit_context(RunOptions(holdout=["recast"]), Mend(mend_hparams(lm)), FIXTURE_DATA, Shard(), lambda s: None)
    ctx = dataclasses.replace(ctx, cache_dir=tmp_path)
    with pytest.raises(BenchError, match=r"^training diverged at step 1: the editor network's weights are "
                                         r"no longer finite \(loss nan\); lower edit_lr, lr or lr_lr$"):
        Mend(mend_hparams(lm, edit_lr=1e30)).prepare(lm, ctx)
    assert not list((tmp_path / "editors").glob("*.safetensors"))  # nothing saved


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    """A MEND checkpoint for the tiny Llama (an untrained network; trained with lr=1e-3)."""
    lm = tiny_model("llama")
    hp = dataclasses.replace(Mend.default_hparams(lm.model.config), lr=1e-3)
    editor = Mend(hp)
    torch.manual_seed(0)
    editor.setup(lm)
    stem = tmp_path / "ckpt" / "mend-test"
    save_checkpoint(stem, editor.network, {"editor": "mend", "hparams": hparams_to_dict(hp),
                                           "model": {"identity": lm.identity}, "steps": 0})
    return stem


def test_a_given_checkpoint_is_used_as_trained(checkpoint, capsys, tmp_path, no_model_load):
    """`mend --hparam checkpoint=X --hparam edit_lr=1e30` gave the checkpoint's results while
    config.json recorded 1e30: the step sizes are the checkpoint's (learned), so the value is
    refused; one left at its default takes the checkpoint's value."""
    line = one_line_error(capsys, run_argv(tmp_path, "--editor", "mend", "--hparam", f"checkpoint={checkpoint}",
                                           "--hparam", "edit_lr=1e30"))
    assert line == (f"bench: error: mend: checkpoint {checkpoint} was trained with other hyperparameters: "
                    "edit_lr=1e+30 (trained with 0.0001); a loaded network is used as trained: drop these "
                    "values, or train a new network without checkpoint=")
    config = tiny_config("llama")
    editor = build_editor("mend", {"checkpoint": str(checkpoint)}, config)
    assert editor.hparams.lr == 1e-3  # what the network was trained with, as config.json will record
    assert build_editor("instructedit", {"checkpoint": str(checkpoint), "lr": "1e-3"}, config).hparams.lr == 1e-3


@pytest.mark.parametrize("damage,message", [
    ("truncated json", "checkpoint meta"),
    ("json list", "not a instructedit-bench/meta-editor/v1 checkpoint"),
    ("garbage safetensors", "is not a readable safetensors file"),
    ("empty safetensors", "is not a readable safetensors file"),
])
def test_a_corrupt_checkpoint_is_one_line_before_the_model_loads(checkpoint, capsys, tmp_path, no_model_load,
                                                                 damage, message):
    js, st = checkpoint.with_suffix(".json"), checkpoint.with_suffix(".safetensors")
    if damage == "truncated json":
        js.write_text(js.read_text()[:40])
        message = f"{js} is not valid JSON"
    elif damage == "json list":
        js.write_text("[1, 2, 3]")
    elif damage == "garbage safetensors":
        st.write_bytes(os.urandom(4096))
    else:
        st.write_bytes(b"")
    line = one_line_error(capsys, run_argv(tmp_path, "--editor", "mend", "--hparam", f"checkpoint={checkpoint}"))
    assert message in line


# --------------------------------------------------------------------------------------------
# Model files
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("content,message", [
    (b"this is a text file, not a model\n", "it does not start with the GGUF magic bytes (not a GGUF file)"),
    (b"", "the file is empty"),
    (b"GGUF\x03\x00\x00\x00", "truncated (8 bytes, shorter than the GGUF header)"),  # cut after its version
])
def test_a_gguf_that_is_text_empty_or_truncated_is_one_line(capsys, tmp_path, content, message):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(content)
    line = one_line_error(capsys, run_argv(tmp_path, "--model", str(gguf)))
    assert line == f"bench: error: cannot read GGUF file {gguf}: {message}"


def test_a_gguf_cut_after_its_header_is_one_error_line(capsys, tmp_path):
    """A header and metadata that parse, tensors cut short: the reader's own error, one line."""
    gguf = tmp_path / "cut.gguf"
    # version 3, 1 tensor, 1 metadata entry whose key length runs past the end of the file
    gguf.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + (1).to_bytes(8, "little") + (1).to_bytes(8, "little")
                     + (1 << 40).to_bytes(8, "little"))
    try:
        code = main(run_argv(tmp_path, "--model", str(gguf)))
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("bench: error: ")]
    assert code == 2 and "Traceback" not in err
    assert len(errors) == 1 and errors[0].startswith(f"bench: error: cannot read GGUF file {gguf}: ")


@pytest.mark.parametrize("edit,message", [
    ('{"num_hidden_layers": "abc"}', "num_hidden_layers"),
    ('{"num_hidden_layers": 0}', "num_hidden_layers must be a positive integer, got 0"),
    ('{"hidden_size": -32}', "hidden_size must be a positive integer, got -32"),
    ("not json", "is not a valid JSON file"),
])
def test_a_model_directory_with_a_broken_config_is_one_line(capsys, tmp_path, tiny_model_dir, edit, message):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    if edit == "not json":
        (model / "config.json").write_text("{not json")
    else:
        config = json.loads((model / "config.json").read_text())
        config.update(json.loads(edit))
        (model / "config.json").write_text(json.dumps(config))
    line = one_line_error(capsys, run_argv(tmp_path, "--model", str(model)))
    assert line.startswith("bench: error: ") and message in line
    line = one_line_error(capsys, ["model", str(model)])  # `bench model DIR` loads it whole
    assert line.startswith("bench: error: ") and message in line


# --------------------------------------------------------------------------------------------
# Debris: temporaries of killed conversions are removed by the next one
# --------------------------------------------------------------------------------------------


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporaries_of_dead_processes_are_removed_at_the_next_conversion(tmp_path, capsys):
    dead, alive = _dead_pid(), os.getppid()
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"not a gguf")  # the conversion fails, after the clean-up
    models = converted_dir(gguf.name, "0" * 64).parent
    models.mkdir(parents=True, exist_ok=True)
    stale_dir = models / f"tiny-000000000000.{dead}.tmp"
    (stale_dir / "sub").mkdir(parents=True)
    (stale_dir / "sub" / "model.safetensors").write_bytes(b"x" * 1000)
    stale_file = models / f"file-hashes.json.{dead}.tmp"
    stale_file.write_text("{}")
    live = models / f"tiny-111111111111.{alive}.tmp"  # a conversion still running elsewhere
    live.mkdir()
    unrelated = models / "notes.tmp"
    unrelated.write_text("kept")
    with pytest.raises(BenchError, match="cannot read GGUF file"):
        _gguf_to_safetensors(gguf)
    assert not stale_dir.exists() and not stale_file.exists()
    assert live.is_dir() and unrelated.is_file()
    assert "removed 2 temporary file(s) left by killed processes" in capsys.readouterr().err
    live.rmdir()
    assert remove_stale_temporaries(tmp_path / "no-such-folder") == []


# --------------------------------------------------------------------------------------------
# The judge
# --------------------------------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_judge_stops_the_run_before_anything_loads(capsys, tmp_path, no_model_load):
    url = f"http://127.0.0.1:{_closed_port()}/v1"
    line = one_line_error(capsys, run_argv(tmp_path, "--protocol", "wild", "--judge-url", url,
                                           "--judge-model", "j"))
    assert line.startswith(f"bench: error: the judge endpoint {url}/chat/completions cannot be reached (")
    assert line.endswith("waited at most 10 s); start it or drop --judge-url")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("extra,message", [
    (["--protocol", "teacher_forced", "--judge-url", "http://127.0.0.1:9/v1", "--judge-model", "j"],
     "--judge-url judges generated answers, which only --protocol wild makes"),
    (["--protocol", "teacher_forced", "--judge", "tiny"], "--judge judges generated answers"),
    (["--judge-model", "j"], "--judge-model names the model a --judge-url endpoint serves"),
])
def test_a_judge_option_the_run_would_not_use_is_an_error(capsys, tmp_path, no_model_load, extra, message):
    assert message in one_line_error(capsys, run_argv(tmp_path, *extra))


# --------------------------------------------------------------------------------------------
# The network: what a run uses never depends on whether the hub answers
# --------------------------------------------------------------------------------------------


@pytest.fixture
def online_without_network(monkeypatch):
    """The hub is not marked offline, but nothing answers: every request raises a connection
    error (and is counted)."""
    for name in sources.OFFLINE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    calls = []

    def no_connection(*args, **kwargs):
        calls.append(args)
        raise ConnectionError("[Errno 101] Network is unreachable")

    monkeypatch.setattr(sources, "get_hf_file_metadata", no_connection, raising=False)  # (new in issue 29)
    monkeypatch.setattr(sources, "hf_hub_download", no_connection)
    monkeypatch.setattr(sources, "_hub_unreachable", False)
    return calls


def test_tasks_not_named_are_never_fetched(online_without_network):
    logs = []
    found = gather_tasks(RunOptions(), FIXTURE_DATA, logs.append)
    assert online_without_network == []  # not even tried
    assert list(found) == ["convsent", "counterfact", "recast", "recent", "zsre"]
    assert [line.split("'")[1] for line in logs] == ["wikicounterfact", "zsre_knowedit"]
    assert all(line.startswith("left out: task '") and NOT_NAMED in line for line in logs)
    logs.clear()
    found = gather_tasks(RunOptions(), None, logs.append)  # no data directory: the samples
    assert online_without_network == []
    assert {n: s["data"] for n, s in found.items()} == dict.fromkeys(["counterfact", "recast", "zsre"],
                                                                      "built-in sample")
    (line,) = logs
    assert line.startswith(f"no data directory (--data-dir, $BENCH_DATA, ../shared/data); {NOT_NAMED}; "
                           "using the built-in sample records for counterfact, recast, zsre")


def test_a_hub_that_does_not_answer_is_one_line_once(online_without_network):
    with pytest.raises(BenchError) as info:
        gather_tasks(RunOptions(tasks=["wikicounterfact"]), None, lambda s: None)
    line = str(info.value)
    assert "\n" not in line and line.startswith("task 'wikicounterfact': no data directory, no cached copy, and "
                                                "cannot reach the Hugging Face hub to download ")
    assert "no answer within 10 s (ConnectionError: [Errno 101] Network is unreachable)" in line
    assert len(online_without_network) == 1  # one request with a short timeout, no retries
    remote = get_card("wikicounterfact").remotes[0]
    with pytest.raises(BenchError, match="it could not be reached earlier in this process"):
        sources.download(remote, "test")
    assert len(online_without_network) == 1  # the next file does not ask again


def test_the_training_mixture_is_what_is_found_locally_and_the_run_says_so(online_without_network):
    logs = []
    lm = tiny_model("llama")
    ctx = edit_context(RunOptions(holdout=["recast"]), Mend(mend_hparams(lm)), FIXTURE_DATA, Shard(), logs.append)
    assert ctx.training.tasks == ["convsent", "counterfact", "recent", "zsre"]
    assert logs == ["train splits: convsent, counterfact, recent, zsre (held out: recast); not found here, so "
                    "not used: wikicounterfact (never fetched for training: --task NAME or bench data fetch "
                    "NAME fetches one)"]
    assert online_without_network == []
    assert training_note(training_data(FIXTURE_DATA, [])).startswith(
        "train splits: convsent, counterfact, recast, recent, zsre; not found here")
