"""`bench` command line: every user error is one line on stderr, exit code 2, no traceback.

The error cases run as real `bench` subprocesses, all started together by one module fixture (each
costs an interpreter and a torch import); cheaper checks call bench.cli.main in-process.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest

from bench.cli import main
from tests.helpers import FIXTURE_DATA, finish, start_bench

FIX = str(FIXTURE_DATA)


def _cases(tmp, model_dir) -> dict[str, tuple[list, str]]:
    """name -> (bench arguments, regex the single stderr line must match)."""
    broken = tmp / "broken-data"
    shutil.copytree(FIXTURE_DATA / "counterfact", broken / "counterfact")
    (broken / "counterfact" / "counterfact-edit.json").write_text('[{"case_id": 1, "prompt": ')
    run = ["run", "--output-dir", tmp / "runs"]
    return {
        "unknown editor": (run + ["--editor", "nope", "--task", "counterfact", "--data-dir", FIX],
                           r"^bench: error: unknown editor 'nope'; available: .*ft.*none"),
        "unknown task": (run + ["--task", "counterfact,nope", "--data-dir", FIX],
                         r"^bench: error: unknown task 'nope'; available: convsent, counterfact, recast, recent, wikicounterfact, zsre, zsre_knowedit$"),
        "unknown holdout task": (run + ["--task", "counterfact", "--holdout", "zsre,nope", "--data-dir", FIX],
                                 r"^bench: error: unknown task 'nope'"),
        "missing data dir": (run + ["--task", "counterfact", "--data-dir", tmp / "no-such-dir"],
                             r"^bench: error: data directory from --data-dir does not exist: .*no-such-dir$"),
        "malformed data file": (run + ["--task", "counterfact", "--data-dir", broken],
                                r"^bench: error: .*counterfact-edit\.json is not valid JSON"),
        "bad --limit": (run + ["--limit", "ten"],
                        r"^bench run: error: argument --limit: expected an integer, got 'ten'$"),
        "bad --hparam": (run + ["--hparam", "steps"],
                         r"^bench: error: --hparam expects key=value, got 'steps'$"),
        # these two fail only once the model is loaded: the tiny checkpoint directory keeps it cheap
        "unknown hparam": (run + ["--task", "zsre", "--data-dir", FIX, "--model", model_dir,
                                  "--device", "cpu", "--hparam", "stepz=3"],
                           r"^bench: error: unknown hyperparameter 'stepz' for FTHparams; known: (\w+, )*layers, lr, "),
        "bad --device": (run + ["--task", "zsre", "--data-dir", FIX, "--model", model_dir, "--device", "tpu9"],
                         r"^bench: error: unknown device 'tpu9': use auto, cpu, cuda or cuda:N$"),
    }


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory, tiny_model_dir, session_cache):
    tmp = tmp_path_factory.mktemp("cli")
    cases = _cases(tmp, tiny_model_dir)
    # transformers' "Loading weights" progress bar would add stderr lines before the error
    env = dict(BENCH_CACHE=str(session_cache), BENCH_DATA="", HF_HUB_DISABLE_PROGRESS_BARS="1")
    procs = {name: start_bench(args, tmp, **env) for name, (args, _) in cases.items()}
    # and one run that succeeds: local checkpoint directory, `none` editor, one zsre case
    ok_args = ["run", "--editor", "none", "--task", "zsre", "--limit", "1", "--data-dir", FIX,
               "--model", tiny_model_dir, "--device", "cpu", "--output-dir", tmp / "ok-runs", "--name", "ok"]
    procs["ok"] = start_bench(ok_args, tmp, **env)
    results = {name: finish(p) for name, p in procs.items()}
    return tmp, cases, results


NAMES = ["unknown editor", "unknown task", "unknown holdout task", "missing data dir",
         "malformed data file", "bad --limit", "bad --hparam", "unknown hparam", "bad --device"]


@pytest.mark.parametrize("name", NAMES)
def test_error_is_one_line_exit_2(cli_results, name):
    tmp, cases, results = cli_results
    res = results[name]
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip("\n").split("\n")
    assert len(lines) == 1, res.stderr
    assert re.search(cases[name][1], lines[0]), lines[0]
    assert res.stdout == ""
    assert not (tmp / "runs").exists()  # no run directory left behind


def test_successful_run_from_local_checkpoint(cli_results, tiny_model_dir):
    tmp, _, results = cli_results
    res = results["ok"]
    assert res.returncode == 0, res.stderr
    (run_dir,) = (tmp / "ok-runs").iterdir()
    assert run_dir.name.startswith("ok-")
    assert f"results: {run_dir}" in res.stdout
    config = json.loads((run_dir / "config.json").read_text())
    assert config["argv"][:2] == ["run", "--editor"]
    assert config["model"]["spec"] == str(tiny_model_dir)
    assert len(config["model"]["source_hash"]) == 64  # sha256 of model.safetensors
    assert len((run_dir / "cases.jsonl").read_text().splitlines()) == 1
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["tasks"]["zsre"]["reliability"]["n"] == 1


# --------------------------------------------------------------------------------------------
# In-process: argument handling that needs no subprocess
# --------------------------------------------------------------------------------------------


def one_line_error(capsys, argv) -> str:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse errors
        code = exc.code
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.endswith("\n") and err.count("\n") == 1, err
    return err.strip()


def test_more_errors_in_process(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert re.match(r"bench: error: run directory .*no-run does not exist$",
                    one_line_error(capsys, ["run", "--resume", str(tmp_path / "no-run")]))
    assert one_line_error(capsys, ["run", "--batch-size", "0"]) == "bench: error: --batch-size must be at least 1"
    assert one_line_error(capsys, ["run", "--hparams-file", "nope.yaml"]) == \
        "bench: error: hyperparameter file not found: nope.yaml (presets for ft: easyedit-ft-l, easyedit-ft-m)"
    assert one_line_error(capsys, ["run", "--task-option", "zsre.nope=1"]) == \
        "bench: error: task 'zsre': unknown option 'nope'; known: strip_locality_prefix"
    assert one_line_error(capsys, ["run", "--task-option", "zsre=1"]) == \
        "bench: error: --task-option expects task.key=value, got 'zsre=1'"
    assert "invalid choice: 'maybe'" in one_line_error(capsys, ["run", "--instruction", "maybe"])
    assert "must be >= 0" in one_line_error(capsys, ["run", "--limit", "-1"])
    assert "expected a comma-separated list" in one_line_error(capsys, ["run", "--task", ","])
    assert "invalid choice" in one_line_error(capsys, ["list", "nope"])
    assert "required" in one_line_error(capsys, [])
    assert one_line_error(capsys, ["model", "--model", "not-a-model"]).startswith(
        "bench: error: unknown model 'not-a-model'")


def test_list_tasks_and_editors(capsys):
    assert main(["list", "tasks", "--data-dir", FIX]) == 0
    out = capsys.readouterr().out
    assert f"data directory: {FIX}" in out
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines()[2:] if line and not line[0].isspace()}
    assert rows["counterfact"] == "found" and rows["zsre"] == "found"
    assert main(["list", "editors"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert {"ft", "none"} <= set(names)


def test_hparam_flags_and_file_reach_run_options(tmp_path):
    from bench.cli import build_parser
    from bench.cli.common import options_from_args

    hp_file = tmp_path / "hp.yaml"
    hp_file.write_text("steps: 7\nlr: 1e-3\n")
    args = build_parser().parse_args(
        ["run", "--hparam", "steps=3", "--hparam", "layers=1,2", "--hparam", "norm_constraint=none",
         "--hparams-file", str(hp_file), "--limit", "0", "--task", "zsre,counterfact"])
    opts = options_from_args(args)
    # the file first, then each --hparam on top (still strings: typed against the editor's fields)
    assert opts.hparams == {"steps": "3", "lr": "1e-3", "layers": "1,2", "norm_constraint": "none"}
    assert opts.limit is None and opts.tasks == ["zsre", "counterfact"]


# --------------------------------------------------------------------------------------------
# Bad hyperparameters: one line, exit 2, before any model weights load
# --------------------------------------------------------------------------------------------


@pytest.fixture
def no_model_load(monkeypatch):
    """The run set-up may read a (tiny) model config, but loading weights fails the test."""
    import bench.session
    from bench.core.tiny import tiny_config

    def refuse(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(bench.session, "load_model", refuse)
    monkeypatch.setattr(bench.session, "load_config", lambda *a, **k: tiny_config("llama"))


BAD_HPARAMS = [
    ("ft", ["norm_constraint=nan"], "ft: hyperparameter norm_constraint must be a finite number, got nan"),
    ("ft", ["norm_constraint=-1"], "ft: hyperparameter norm_constraint must be >= 0, got -1.0"),
    ("ft", ["steps=-5"], "ft: hyperparameter steps must be >= 0, got -5"),
    ("ft", ["min_loss=nan"], "ft: hyperparameter min_loss must be a finite number, got nan"),
    ("ft", ["lr=inf"], "ft: hyperparameter lr must be a finite number, got inf"),
    ("ft", ["lr=nan"], "ft: hyperparameter lr must be a finite number, got nan"),
    ("ft", ["lr=0"], "ft: hyperparameter lr must be > 0, got 0.0"),
    ("ft", ["layers=99"], r"ft: hyperparameter layers: layer 99 is out of range for a model with 4 layers"),
    ("ft", ["parallel_edits=0"], "ft: hyperparameter parallel_edits must be >= 1, got 0"),
    ("ft", ["objective=bad"], "ft: hyperparameter objective must be one of prompt_last, target_masked, got 'bad'"),
    ("ft", ["steps=1.5"], "hyperparameter steps: expected int, got '1.5'"),
    ("rome", ["layer=99"], "rome: hyperparameter layer: layer 99 is out of range"),
    ("rome", ["mom2_dtype=int8"], "rome: hyperparameter mom2_dtype must be one of"),
    ("rome", ["context_counts=1,2", "context_lengths=5"], "context_lengths and context_counts must have the same length"),
    ("rome", ["v_stop_rule=never"], "rome: hyperparameter v_stop_rule must be one of loss, nll"),
    ("mend", ["modules=mlp_up"], "mend: hyperparameter modules must be one of mlp_in, mlp_out, got 'mlp_up'"),
    ("mend", ["batch_size=0"], "mend: hyperparameter batch_size must be >= 1, got 0"),
]


@pytest.mark.parametrize("editor,hparams,message", BAD_HPARAMS,
                         ids=[f"{e}-{'+'.join(h)}" for e, h, _ in BAD_HPARAMS])
def test_bad_hyperparameters_fail_before_the_model_loads(capsys, tmp_path, no_model_load, editor,
                                                         hparams, message):
    argv = ["run", "--editor", editor, "--task", "zsre", "--data-dir", FIX, "--output-dir",
            str(tmp_path / "runs")]
    for h in hparams:
        argv += ["--hparam", h]
    err = one_line_error(capsys, argv)
    assert re.search(message, err), err
    assert not (tmp_path / "runs").exists()


def test_hparams_file_that_is_a_directory_or_a_preset(capsys, tmp_path, no_model_load):
    assert one_line_error(capsys, ["run", "--hparams-file", str(tmp_path)]) == \
        f"bench: error: hyperparameter file {tmp_path} is a directory, not a file"
    err = one_line_error(capsys, ["run", "--editor", "rome", "--hparams-file", "no-such-preset"])
    assert err.startswith("bench: error: hyperparameter file not found: no-such-preset (presets for rome: ")
    # a shipped preset by name: its values reach the editor
    from bench.cli import build_parser
    from bench.cli.common import options_from_args

    args = build_parser().parse_args(["run", "--editor", "rome", "--hparams-file", "easyedit",
                                      "--hparam", "v_num_grad_steps=3"])
    opts = options_from_args(args)
    assert opts.hparams["layer"] == 5 and opts.hparams["mom2_adjustment"] is False
    assert opts.hparams["v_num_grad_steps"] == "3"  # --hparam on top of the preset
