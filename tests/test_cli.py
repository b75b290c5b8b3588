"""`bench` command line: every user error is one line on stderr, exit code 2, no traceback.

The error cases run as real `bench` subprocesses, all started together by one module fixture (each
costs an interpreter, and a torch import when it gets as far as a model); cheaper checks call
bench.cli.main in-process. Start-up: help, listings, data list and report import no torch.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass

import pytest

import editors
from bench.cli import build_parser, interrupted_message, main
from editors.base import KINDS, EditHandle, Editor
from tests.helpers import FIXTURE_DATA, REPO, finish, start_bench, subprocess_env

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
    ("ft", ["steps=-5"], "ft: hyperparameter steps must be >= 0 and <= 100000, got -5"),
    ("ft", ["min_loss=nan"], "ft: hyperparameter min_loss must be a finite number, got nan"),
    ("ft", ["lr=inf"], "ft: hyperparameter lr must be a finite number, got inf"),
    ("ft", ["lr=nan"], "ft: hyperparameter lr must be a finite number, got nan"),
    ("ft", ["lr=0"], "ft: hyperparameter lr must be > 0, got 0.0"),
    ("ft", ["layers=99"], r"ft: hyperparameter layers: layer 99 is out of range for a model with 4 layers"),
    ("ft", ["parallel_edits=0"], "ft: hyperparameter parallel_edits must be >= 1 and <= 1024, got 0"),
    ("ft", ["objective=bad"], "ft: hyperparameter objective must be one of prompt_last, target_masked, got 'bad'"),
    ("ft", ["steps=1.5"], "hyperparameter steps: expected int, got '1.5'"),
    ("rome", ["layer=99"], "rome: hyperparameter layer: layer 99 is out of range"),
    ("rome", ["mom2_dtype=int8"], "rome: hyperparameter mom2_dtype must be one of"),
    ("rome", ["context_counts=1,2", "context_lengths=5"], "context_lengths and context_counts must have the same length"),
    ("rome", ["v_stop_rule=never"], "rome: hyperparameter v_stop_rule must be one of loss, nll"),
    ("mend", ["modules=mlp_up"], "mend: hyperparameter modules must be one of mlp_in, mlp_out, got 'mlp_up'"),
    ("mend", ["batch_size=0"], "mend: hyperparameter batch_size must be >= 1 and <= 4096, got 0"),
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


# --------------------------------------------------------------------------------------------
# Start-up: what needs no model imports no torch (issue 30)
# --------------------------------------------------------------------------------------------

HEAVY = ("torch", "transformers", "lm_eval")
FIXTURE_RUNS = REPO / "tests" / "fixtures" / "runs"


def subcommands() -> list[str]:
    (action,) = [a for a in build_parser()._actions if a.dest == "command"]
    return list(action.choices)


def test_help_imports_no_torch(tmp_path):
    """The issue's check as typed: `python -X importtime -m bench --help 2>&1 | grep -E
    "torch|transformers"` shows nothing."""
    res = subprocess.run([sys.executable, "-X", "importtime", "-m", "bench", "--help"], cwd=tmp_path,
                         env=subprocess_env(), capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.startswith("usage: bench"), res.stderr[-2000:]
    imported = [line.rsplit("|", 1)[-1].strip() for line in res.stderr.splitlines()
                if line.startswith("import time:")]
    assert "bench.cli.run" in imported  # importtime did report
    assert [m for m in imported if m.split(".")[0] in HEAVY] == []
    assert not re.search("torch|transformers", res.stdout + res.stderr)


def test_commands_that_need_no_model_import_no_torch(tmp_path):
    """Every subcommand's --help, the three listings, data list and a report, one after another in
    one fresh interpreter: none of them loads torch, transformers or lm-eval."""
    runs = sorted(str(p) for p in FIXTURE_RUNS.glob("*-fixture"))
    commands = [["--help"], *[[sub, "--help"] for sub in subcommands()],
                ["list", "editors"], ["list", "models"], ["list", "tasks", "--data-dir", FIX],
                ["data", "list", "--data-dir", FIX], ["report", *runs, "-o", str(tmp_path / "report")]]
    script = textwrap.dedent("""
        import contextlib, io, json, sys
        from bench.cli import main
        heavy, out = json.loads(sys.argv[1]), {}
        for argv in json.loads(sys.argv[2]):
            with contextlib.redirect_stdout(io.StringIO()):
                try:
                    code = main(argv)
                except SystemExit as exc:
                    code = exc.code
            out[" ".join(argv[:2])] = [code, [m for m in heavy if m in sys.modules]]
        print(json.dumps(out))
    """)
    res = subprocess.run([sys.executable, "-c", script, json.dumps(HEAVY), json.dumps(commands)],
                         cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(got) == len(commands) and "report " + runs[0] in got
    assert {argv: result for argv, result in got.items() if result != [0, []]} == {}
    assert (tmp_path / "report" / "index.html").is_file()


def test_builtin_editor_info_is_complete():
    assert set(editors.BUILTIN) <= set(editors.BUILTIN_INFO), "describe every built-in in editors.BUILTIN_INFO"


@pytest.mark.parametrize("name", sorted(editors.BUILTIN))
def test_builtin_editor_info_equals_the_class(name):
    """`bench list editors` reads editors.BUILTIN_INFO instead of importing the editors: its kinds
    and flags must be the class's own attributes."""
    info = editors.BUILTIN_INFO[name]
    cls = editors.get_editor_class(name)
    assert info._replace(summary="") == editors.EditorInfo.of(cls), f"editors.BUILTIN_INFO[{name!r}]"
    assert set(info.kinds) <= set(KINDS) and info.summary


def test_list_editors_shows_what_each_edit_changes(capsys, monkeypatch):
    from importlib.metadata import EntryPoint

    ep = EntryPoint(name="scale", value="tests.test_entry_points:ScaleEditor", group=editors.ENTRY_POINT_GROUP)
    monkeypatch.setattr(editors, "entry_points", lambda group: [ep] if group == editors.ENTRY_POINT_GROUP else [])
    assert main(["list", "editors"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[1:]
            if line and not line[0].isspace()}
    assert set(rows) == set(editors.BUILTIN) | {"scale"}
    for name in editors.BUILTIN:
        assert rows[name][2] == ("+".join(editors.BUILTIN_INFO[name].kinds) or "nothing"), rows[name]
    assert rows["scale"][1:3] == ["tests.test_entry_points:ScaleEditor", "weights"]  # imported, it is third-party


def test_regress_defaults_are_bench_regressions():
    """bench.cli.regress copies them (importing bench.regression loads torch)."""
    from bench.cli import regress
    from bench.regression import DEFAULT_SAMPLE, DEFAULT_SUITE

    assert list(regress.DEFAULT_SUITE) == list(DEFAULT_SUITE) and regress.DEFAULT_SAMPLE == DEFAULT_SAMPLE


# --------------------------------------------------------------------------------------------
# Help texts
# --------------------------------------------------------------------------------------------


def help_text(capsys, sub: list[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        main([*sub, "--help"])
    assert exc.value.code == 0
    return " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("sub", [["run"], ["train"], ["regress"], ["ablate"], ["holdout-matrix"], ["list"],
                                 ["data", "list"], ["data", "fetch"]], ids=" ".join)
def test_data_dir_and_seed_are_explained(capsys, sub):
    text = help_text(capsys, sub)
    assert re.search(r"--data-dir DATA_DIR [^-]*\$BENCH_DATA, else \.\./shared/data", text), text
    if sub[0] not in ("list", "data"):
        assert re.search(r"--seed SEED random seed: ", text), text


def test_mode_has_no_alias(capsys):
    assert "--regression-mode" not in help_text(capsys, ["run"])
    assert "unrecognized arguments: --regression-mode" in one_line_error(
        capsys, ["run", "--regression-mode", "sequential"])


# --------------------------------------------------------------------------------------------
# Ctrl-C: the resume hint only where a run directory holds finished cases
# --------------------------------------------------------------------------------------------


@dataclass
class InterruptingHparams:
    interrupt_at: int = 2  # the n-th apply() raises KeyboardInterrupt, as Ctrl-C would


class InterruptingEditor(Editor):
    """Changes nothing; its `interrupt_at`-th edit is interrupted."""

    name = "interrupting"
    Hparams = InterruptingHparams
    kinds = ()

    def __init__(self, hparams=None):
        super().__init__(hparams)
        self.calls = 0

    def apply(self, model, tokenizer, case) -> EditHandle:
        self.calls += 1
        if self.calls == self.hparams.interrupt_at:
            raise KeyboardInterrupt
        return EditHandle(model, [])


def test_ctrl_c_in_a_run_says_where_the_cases_are_and_how_to_resume(capsys, tmp_path, tiny_load, monkeypatch):
    monkeypatch.setitem(editors.BUILTIN, "interrupting", "tests.test_cli:InterruptingEditor")
    argv = ["run", "--editor", "interrupting", "--task", "counterfact", "--data-dir", FIX, "--device", "cpu",
            "--protocol", "teacher_forced", "--output-dir", str(tmp_path / "runs")]
    assert main(argv) == 130
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert len((run_dir / "cases.jsonl").read_text().splitlines()) == 1  # the first case is saved
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == f"bench: interrupted: finished cases are saved in {run_dir}; continue with: bench run --resume {run_dir}"


def test_ctrl_c_before_a_run_directory_promises_nothing(capsys, tmp_path, monkeypatch):
    import bench.session
    from bench.core.tiny import tiny_config

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench.session, "load_model", interrupted)
    monkeypatch.setattr(bench.session, "load_config", lambda *a, **k: tiny_config("llama"))
    assert main(["run", "--task", "counterfact", "--data-dir", FIX, "--device", "cpu",
                 "--output-dir", str(tmp_path / "runs")]) == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == "bench: interrupted before a run directory was written: nothing to resume"
    assert "--resume" not in err and "saved" not in err
    assert not (tmp_path / "runs").exists()


def test_interrupted_message_names_resumable_runs_with_their_command(tmp_path):
    done, bare = tmp_path / "done", tmp_path / "bare"
    done.mkdir()
    bare.mkdir()  # created, config.json not yet written: nothing to resume there
    (done / "config.json").write_text("{}")
    matrix = build_parser().parse_args(["holdout-matrix"])
    assert interrupted_message(matrix, [done, bare, done]) == (
        f"bench: interrupted: finished cases are saved in {done}; continue with the same bench "
        "holdout-matrix command (finished runs are reused, unfinished ones resumed)")
    assert interrupted_message(build_parser().parse_args(["run"]), [bare]) == \
        "bench: interrupted before a run directory was written: nothing to resume"
    ablate = interrupted_message(build_parser().parse_args(["ablate"]), [done])
    assert ablate.endswith("bench ablate does not resume it: run the command again")



# --------------------------------------------------------------------------------------------
# `bench report` on what a newcomer has
# --------------------------------------------------------------------------------------------


def test_report_default_baseline_with_two_ft_runs_and_a_bogus_one(capsys, tmp_path):
    """Two FT runs and no --baseline: one is chosen and one line says which and how to choose
    another; --baseline that matches no run: one line listing the labels, exit 2."""
    ft = FIXTURE_RUNS / "ft-fixture"
    second = tmp_path / "ft-second"
    shutil.copytree(ft, second)
    runs = [str(second), str(ft), str(FIXTURE_RUNS / "rome-fixture")]
    assert main(["report", *runs, "-o", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == ["report: Baseline: ft (second) (run directory ft-second), chosen among the 2 ft runs "
                   "(default hyperparameters, first given); choose another with --baseline LABEL "
                   "('ft (second)', 'ft (fixture)') or --baseline none.",
                   f"report: {tmp_path / 'out' / 'index.html'}"]
    assert main(["report", *runs, "-o", str(tmp_path / "chosen"), "--baseline", "ft (fixture)"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"report: {tmp_path / 'chosen' / 'index.html'}"]
    assert one_line_error(capsys, ["report", *runs, "-o", str(tmp_path / "bogus"), "--baseline", "bogus"]) == (
        "bench: error: --baseline 'bogus' matches no run: name a run label ('ft (second)', 'ft (fixture)', "
        "'rome'), a run directory name or an editor name, or pass --baseline none")


def test_report_on_a_killed_run_rebuilds_its_summary(capsys, tmp_path):
    """A run SIGKILLed after 3 of its 14 cases has no summary.json: `bench report` rebuilds it
    from cases.jsonl, says so in one line, and marks the run incomplete; the run directory is
    left as it was."""
    killed = tmp_path / "ft-killed"
    shutil.copytree(FIXTURE_RUNS / "ft-fixture", killed)
    (killed / "summary.json").unlink()
    lines = (killed / "cases.jsonl").read_text().splitlines(keepends=True)
    (killed / "cases.jsonl").write_text("".join(lines[:3]) + '{"task": "counterfact", "case_i')  # torn last line
    before = sorted((p.name, p.read_bytes()) for p in killed.iterdir())
    assert main(["report", str(killed), str(FIXTURE_RUNS / "rome-fixture"), "-o", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "report: ft-killed: no summary.json (the run was stopped): rebuilt from cases.jsonl, " \
                     "incomplete (3 of 14 cases)"
    rows = {r["editor"]: r for r in json.loads((tmp_path / "out" / "leaderboard.json").read_text())["groups"][0]["rows"]}
    assert (rows["ft"]["status"], rows["ft"]["rank"], rows["ft"]["summary_rebuilt"]) == \
        ("incomplete (3 of 14 cases)", None, True)
    assert rows["rome"]["rank"] == 1
    assert sorted((p.name, p.read_bytes()) for p in killed.iterdir()) == before
