"""Hostile input (issue 29): every input a user controls is checked where it enters, with one
line naming what is wrong and exit code 2, before any model loads where possible; never a
traceback, a hang, or a result recorded from invalid input.

Options, environment variables, files and run directories. Everything runs in-process
(bench.cli.main) on the tiny model (`tiny_load`: no real model loads) and the fixture data.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from bench.cli import main
from bench.core.errors import BenchError
from tests.helpers import FIXTURE_DATA, REPO

FIX = str(FIXTURE_DATA)
FIXTURE_RUN = REPO / "tests" / "fixtures" / "runs" / "ft-fixture"


def cli(argv: list, capsys) -> tuple[int, list[str], str]:
    """(exit code, non-blank stderr lines, stdout) of `bench ARGV` run in-process."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse
        code = exc.code
    out, err = capsys.readouterr()
    return code, [line for line in err.splitlines() if line.strip()], out


def assert_one_line(result, pattern: str) -> None:
    code, lines, _ = result
    assert code == 2, (code, lines)
    assert len(lines) == 1, lines
    assert re.search(pattern, lines[0]), lines[0]


def run_args(tmp_path: Path, *extra, task: str = "counterfact", limit: int = 2) -> list:
    return ["run", "--editor", "none", "--task", task, "--limit", limit, "--data-dir", FIX,
            "--output-dir", tmp_path / "runs", "--protocol", "teacher_forced", *extra]


def no_run_written(tmp_path: Path) -> bool:
    return not list((tmp_path / "runs").glob("*/summary.json")) if (tmp_path / "runs").exists() else True


# --------------------------------------------------------------------------------------------
# 1, 2: --device, --seed
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device, pattern", [
    ("meta", r"^bench: error: unknown device 'meta': use auto, cpu, cuda or cuda:N$"),
    ("mps", r"^bench: error: device 'mps' requested but MPS is not available on this machine$"),
    ("cuda:7", r"^bench: error: device 'cuda:7' requested but (CUDA is not available|this machine has \d CUDA)"),
    ("cuda:", r"^bench: error: unknown device 'cuda:'"),
    ("", r"^bench: error: unknown device ''"),
])
def test_device_is_checked_before_the_model_loads(tmp_path, capsys, tiny_load, device, pattern):
    import torch

    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    if device == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    assert_one_line(cli(run_args(tmp_path, "--device", device), capsys), pattern)
    assert tiny_load == []  # nothing loaded
    assert no_run_written(tmp_path)


def test_cuda_index_beyond_the_machines_devices(tmp_path, capsys, tiny_load, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert_one_line(cli(run_args(tmp_path, "--device", "cuda:7"), capsys),
                    r"^bench: error: device 'cuda:7' requested but this machine has 1 CUDA device\(s\) \(cuda:0 .. cuda:0\)$")
    assert tiny_load == []


def test_model_subcommand_checks_the_device_before_loading(capsys, monkeypatch):
    from bench.core import models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    assert_one_line(cli(["model", "--device", "meta"], capsys), r"^bench: error: unknown device 'meta'")


@pytest.mark.parametrize("seed", ["99999999999999999999", "-1", str(2**32)])
def test_seed_out_of_range_is_one_line(tmp_path, capsys, tiny_load, seed):
    assert_one_line(cli(run_args(tmp_path, "--seed", seed), capsys),
                    r"^bench run: error: argument --seed: must be between 0 and 4294967295, got ")
    assert tiny_load == []


def test_seed_range_is_checked_for_library_callers_too():
    from bench.session import RunOptions

    with pytest.raises(BenchError, match="--seed must be between 0 and 4294967295"):
        RunOptions(seed=2**70).check()


# --------------------------------------------------------------------------------------------
# 3: output directories, $BENCH_CACHE, report -o
# --------------------------------------------------------------------------------------------


def test_output_dir_that_cannot_be_written_is_one_line(tmp_path, capsys, tiny_load):
    afile = tmp_path / "afile"
    afile.write_text("x")
    cases = [("/proc/bench-out", r"--output-dir /proc/bench-out cannot be written"),
             ("/sys/bench-out", r"--output-dir /sys/bench-out cannot be written"),
             (afile / "sub", r"--output-dir .*afile/sub lies below .*afile, which is not a directory"),
             (afile, r"--output-dir .*afile is not a directory"),
             ("", r"--output-dir is empty")]
    for path, pattern in cases:
        if str(path).startswith(("/proc", "/sys")) and not Path(str(path)).parent.is_dir():
            continue  # not Linux
        args = run_args(tmp_path)
        args[args.index("--output-dir") + 1] = path
        assert_one_line(cli(args, capsys), r"^bench: error: " + pattern)
    assert tiny_load == []


def test_holdout_matrix_output_dir_on_a_file(tmp_path, capsys, tiny_load):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert_one_line(cli(["holdout-matrix", "--output-dir", afile, "--tasks", "zsre,counterfact",
                           "--data-dir", FIX], capsys), r"^bench: error: --output-dir .*afile is not a directory$")
    assert tiny_load == []


def test_bench_cache_on_a_file(tmp_path, capsys, tiny_load, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("x")
    monkeypatch.setenv("BENCH_CACHE", str(afile))
    assert_one_line(cli(run_args(tmp_path), capsys), r"^bench: error: \$BENCH_CACHE .*afile is not a directory$")
    assert tiny_load == []
    assert no_run_written(tmp_path)


def test_report_output_on_a_file(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert_one_line(cli(["report", FIXTURE_RUN, "-o", afile], capsys),
                    r"^bench: error: report output directory \(-o\) .*afile is not a directory$")
    assert afile.read_text() == "x"


# --------------------------------------------------------------------------------------------
# 4: --resume
# --------------------------------------------------------------------------------------------


@pytest.fixture
def finished_run(tmp_path, capsys, tiny_load) -> Path:
    """A finished 2-case run of the `none` editor on the fixture counterfact data."""
    code, lines, _ = cli(run_args(tmp_path, "--name", "r"), capsys)
    assert code == 0, lines
    (path,) = (tmp_path / "runs").iterdir()
    return path


def test_empty_resume_is_an_error(tmp_path, capsys, tiny_load):
    assert_one_line(cli(["run", "--resume", "", "--output-dir", tmp_path / "runs"], capsys),
                    r"^bench: error: --resume needs a run directory, got ''$")
    assert tiny_load == [] and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("extra, named", [
    (["--editor", "rome"], "--editor"),
    (["--hparam", "lr=1"], "--hparam"),
    (["--hparams-file", "easyedit"], "--hparams-file"),
    (["--task", "zsre"], "--task"),
    (["--model", "gemma3-270m"], "--model"),
    (["--protocol", "wild"], "--protocol"),
    (["--mode", "sequential"], "--mode"),
    (["--editor", "none"], "--editor"),  # even equal to the run's own value
    (["--edito", "ft", "--seed=3", "--limit", "5"], "--editor, --seed"),  # abbreviated; --limit allowed
])
def test_resume_refuses_options_that_would_change_the_run(finished_run, capsys, tiny_load, extra, named):
    before = (finished_run / "config.json").read_text()
    calls = len(tiny_load)
    assert_one_line(cli(["run", "--resume", finished_run, *extra], capsys),
                    r"^bench: error: --resume continues a run with the options in its config.json and "
                    r"takes only --limit \(to extend it\); drop " + re.escape(named) + " or start a new run$")
    assert len(tiny_load) == calls
    assert (finished_run / "config.json").read_text() == before


def test_resume_limit_extends_but_never_narrows_below_finished_cases(finished_run, capsys, tiny_load):
    assert_one_line(cli(["run", "--resume", finished_run, "--limit", "1"], capsys),
                    r"^bench: error: --limit 1 is below the 2 cases counterfact has already finished in ")
    config = json.loads((finished_run / "config.json").read_text())
    assert config["limit"] == 2 and config["tasks"][0]["n_cases"] == 2
    code, lines, _ = cli(["run", "--resume", finished_run, "--limit", "3"], capsys)
    assert code == 0, lines
    config = json.loads((finished_run / "config.json").read_text())
    summary = json.loads((finished_run / "summary.json").read_text())
    assert config["limit"] == 3 and config["tasks"][0]["n_cases"] == 3
    assert summary["task_info"]["counterfact"]["n_cases"] == summary["task_info"]["counterfact"]["planned_cases"] == 3


@pytest.mark.parametrize("change, pattern", [
    (lambda c: c.pop("editor"), r"config.json lacks its editor \(editor.name and editor.hparams\)$"),
    (lambda c: c["options"].__setitem__("limit", "abc"), r"config.json: options.limit is str 'abc', not int \| None$"),
    (lambda c: c["options"].__setitem__("hparams", [1]), r"config.json: options.hparams is list '\[1\]', not dict$"),
    (lambda c: c["options"].__setitem__("editor", "ft"),
     r"config.json names two editors \(editor.name 'none', options.editor 'ft'\)"),
    (lambda c: c["editor"].__setitem__("hparams", ["x"]), r"config.json lacks its editor"),
    (lambda c: c["options"].__setitem__("seed", 2**40), r"--seed must be between 0 and 4294967295"),
    (lambda c: c["options"].__setitem__("device", "meta"), r"unknown device 'meta'"),
    (lambda c: c.__setitem__("argv", "run"), r"config.json argv must be a list of strings$"),
])
def test_invalid_config_on_resume_is_one_line(finished_run, capsys, tiny_load, change, pattern):
    path = finished_run / "config.json"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))
    summary = (finished_run / "summary.json").read_text()
    calls = len(tiny_load)
    assert_one_line(cli(["run", "--resume", finished_run], capsys), r"^bench: error: .*" + pattern)
    assert len(tiny_load) == calls
    assert (finished_run / "summary.json").read_text() == summary


# --------------------------------------------------------------------------------------------
# 5: hangs: FIFOs, YAML bombs, deep nesting
# --------------------------------------------------------------------------------------------

needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")


@needs_fifo
def test_hparams_file_fifo_is_refused_before_opening(tmp_path, capsys, tiny_load):
    fifo = tmp_path / "hp.yaml"
    os.mkfifo(fifo)
    assert_one_line(cli(run_args(tmp_path, "--hparams-file", fifo), capsys),
                    r"^bench: error: hyperparameter file .*hp.yaml is not a regular file \(a FIFO, socket or device\)$")
    assert tiny_load == []


@needs_fifo
def test_run_with_a_fifo_for_cases_is_refused_by_resume_and_report(finished_run, tmp_path, capsys, tiny_load):
    (finished_run / "cases.jsonl").unlink()
    os.mkfifo(finished_run / "cases.jsonl")
    pattern = r"^bench: error: JSONL file .*cases.jsonl is not a regular file \(a FIFO, socket or device\)$"
    assert_one_line(cli(["report", finished_run, "-o", tmp_path / "report"], capsys), pattern)
    (finished_run / "summary.json").unlink()
    assert_one_line(cli(["report", finished_run, "-o", tmp_path / "report"], capsys), pattern)
    assert_one_line(cli(["run", "--resume", finished_run], capsys), pattern)


@needs_fifo
def test_config_fifo_is_refused(finished_run, capsys, tiny_load):
    (finished_run / "config.json").unlink()
    os.mkfifo(finished_run / "config.json")
    assert_one_line(cli(["run", "--resume", finished_run], capsys), r"config.json is not a regular file")


BOMB = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{x}: &{x} [{', '.join([f'*{p}'] * 9)}]\n" for p, x in zip("abcdefgh", "bcdefghi"))


YAML = r"is not valid YAML: "


@pytest.mark.parametrize("text, pattern", [
    (BOMB + "layers: *i\n", YAML + r"more than 100,000 values once its aliases are expanded"),
    ("lr: &x [1, *x]\n", YAML + r"an alias refers to the value that holds it"),
    ("lr: " + "[" * 5000 + "]" * 5000 + "\n", YAML + r"nested too deeply"),
    ("lr: " + "[" * 100 + "]" * 100 + "\n", YAML + r"nested deeper than 64 levels"),
    ("lr: 2001-13-01\n", YAML + r"invalid value: ValueError"),
    ("lr: 1" + "0" * 5000 + "\n", YAML + r"invalid value: ValueError"),
    ("lr: 1\n" + "#" * (1 << 20) + "\n", r"is larger than 1,048,576 bytes"),
], ids=["alias bomb", "recursive alias", "deep 5000", "deep 100", "bad date", "huge int", "huge file"])
def test_hostile_hparams_yaml_is_one_line(tmp_path, capsys, tiny_load, text, pattern):
    path = tmp_path / "hp.yaml"
    path.write_text(text)
    assert_one_line(cli(run_args(tmp_path, "--hparams-file", path), capsys),
                    r"^bench: error: hyperparameter file .*hp.yaml " + pattern)
    assert tiny_load == []


def test_empty_hparams_file_name_is_an_error(tmp_path, capsys, tiny_load):
    assert_one_line(cli(run_args(tmp_path, "--hparams-file", ""), capsys),
                    r"^bench: error: --hparams-file is empty")


def test_yaml_limits_apply_to_model_presets_and_cards(tmp_path):
    from bench.core.presets import parse_preset
    from tasks.card import parse_card

    for parse in (parse_preset, parse_card):
        path = tmp_path / "x.yaml"
        path.write_text(BOMB + "description: *i\n")
        with pytest.raises(BenchError, match="invalid YAML"):
            parse(path)


# --------------------------------------------------------------------------------------------
# 6: cache memo, data records
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("memo", [b"\xff\xfe\x00 not utf-8", b"[1, 2]", b'{"a": ', None])
def test_unreadable_hash_memo_is_started_afresh(tmp_path, monkeypatch, memo):
    from bench.core.io import file_sha256

    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("BENCH_CACHE", str(cache))
    if memo is None:
        (cache / "file-hashes.json").mkdir()  # a directory in its place: the digest, not remembered
    else:
        (cache / "file-hashes.json").write_bytes(memo)
    target = tmp_path / "weights.bin"
    target.write_bytes(b"abc")
    want = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert file_sha256(target) == want
    assert file_sha256(target) == want


def hostile_data(tmp_path: Path) -> Path:
    """The fixture data with counterfact's first records made hostile (JSON literals NaN and
    Infinity where text and ids belong, a 1 MB prompt)."""
    data = tmp_path / "data"
    shutil.copytree(FIXTURE_DATA, data)
    path = data / "counterfact" / "counterfact-edit.json"
    records = json.loads(path.read_text())
    records[0]["target_new"] = float("nan")
    records[1]["case_id"] = float("inf")
    records[2]["prompt"] = records[2]["subject"] + " x" * 500_000
    records[3]["locality_ground_truth"] = float("-inf")
    path.write_text(json.dumps(records))  # Python writes the literals NaN, Infinity, -Infinity
    assert "NaN" in path.read_text() and "Infinity" in path.read_text()
    return data


def test_nonfinite_and_oversized_records_are_skipped_with_reasons(tmp_path):
    from tasks.registry import load_split

    split = load_split("counterfact", "eval", hostile_data(tmp_path))
    reasons = {s.index: s.reason for s in split.skipped}
    assert reasons == {0: "non-finite number (NaN or Infinity) in field 'target_new'",
                       1: "non-finite number (NaN or Infinity) in field 'case_id'",
                       2: "prompt is longer than 2000 characters (1,000,013)",
                       3: "non-finite number (NaN or Infinity) in field 'locality_ground_truth'"}
    assert [c.case_id for c in split.cases] == ["205", "206"]


def test_nonfinite_records_are_never_scored(tmp_path, capsys, tiny_load):
    args = run_args(tmp_path, "--name", "r", limit=6)
    args[args.index("--data-dir") + 1] = hostile_data(tmp_path)
    code, lines, _ = cli(args, capsys)
    assert code == 0, lines
    (run,) = (tmp_path / "runs").iterdir()
    ids = [json.loads(line)["case_id"] for line in (run / "cases.jsonl").read_text().splitlines()]
    assert ids == ["205", "206"]
    task = json.loads((run / "config.json").read_text())["tasks"][0]
    assert task["skipped"] == 4 and task["skipped_reasons"]["non-finite number (NaN or Infinity) in field 'case_id'"] == 1


def test_field_filters_refuse_nonfinite_numbers():
    from tasks.fields import RecordError, _text, first_alias, fill_blank

    for call in (lambda: first_alias([float("nan")]), lambda: fill_blank(float("inf"))):
        with pytest.raises(ValueError, match="non-finite"):
            call()
    with pytest.raises(RecordError, match="non-finite"):
        _text(float("nan"), "target_new")


# --------------------------------------------------------------------------------------------
# 7: bench model '', bench list models with a broken presets folder
# --------------------------------------------------------------------------------------------


def test_model_with_an_empty_name(capsys, monkeypatch, tiny_load, tmp_path):
    from bench.core import models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    assert_one_line(cli(["model", ""], capsys), r"^bench: error: the model name is empty")
    assert_one_line(cli(["model", "--model", " "], capsys), r"^bench: error: the model name is empty")
    assert_one_line(cli(run_args(tmp_path, "--model", ""), capsys), r"^bench: error: --model is empty")


@pytest.mark.parametrize("content", ["description: [unclosed\n", "a: b\n", BOMB + "description: *i\n"])
def test_list_models_with_a_broken_presets_folder(tmp_path, capsys, monkeypatch, content):
    folder = tmp_path / "presets"
    folder.mkdir()
    (folder / "broken.yaml").write_text(content)
    monkeypatch.setenv("BENCH_MODEL_PRESETS", str(folder))
    code, lines, out = cli(["list", "models"], capsys)
    assert_one_line((code, lines, out), r"^bench: error: malformed model preset file\(s\): broken \(see above\)$")
    assert "smollm2-135m" in out and re.search(r"broken\s+\(malformed: ", out)


def test_presets_folder_that_is_not_a_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("BENCH_MODEL_PRESETS", str(tmp_path / "missing"))
    assert_one_line(cli(["list", "models"], capsys),
                    r"^bench: error: \$BENCH_MODEL_PRESETS .*missing is not a directory")


# --------------------------------------------------------------------------------------------
# Found by the fuzz (tests/test_fuzz_cli.py) beyond the examples
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["99999999999999999999", "0", "5000"])
def test_threads_out_of_range_is_one_line(capsys, value):
    assert_one_line(cli(["--threads", value, "list", "editors"], capsys),
                    r"^bench: error: argument --threads: must be between 1 and 4096, got ")


def test_list_data_dir_is_not_silently_ignored(capsys, tmp_path):
    assert_one_line(cli(["list", "models", "--data-dir", tmp_path / "nope"], capsys),
                    r"^bench: error: --data-dir applies to `bench list tasks` only, not to `bench list models`$")


@pytest.mark.parametrize("extra, pattern", [
    (["--max-new-tokens", "99999999999999999999"], r"--max-new-tokens must be at most 1024 tokens, got "),
    (["--fluency", "100000"], r"--fluency must be at most 1024 tokens, got 100000$"),
])
def test_generation_lengths_are_bounded(tmp_path, capsys, tiny_load, extra, pattern):
    """A huge count generated without end (a hang) once the model was loaded."""
    args = run_args(tmp_path, *extra)
    args[args.index("--protocol") + 1] = "wild"
    assert_one_line(cli(args, capsys), r"^bench: error: " + pattern)
    assert tiny_load == []


@pytest.mark.parametrize("extra, pattern", [
    (["--max-new-tokens", "4", "--fluency", "3"],
     r"--max-new-tokens, --fluency only apply to generated answers, which only --protocol wild makes"),
    (["--wild-scorer", "exact_match"], r"--wild-scorer only applies to generated answers"),
    (["--regression-corpus", "corpus.txt"], r"--regression-corpus only applies to the lm-eval regression"),
    (["--lm-limit", "5"], r"--lm-limit only applies to the lm-eval regression"),
])
def test_options_the_run_would_not_use_are_errors(tmp_path, capsys, tiny_load, extra, pattern):
    assert_one_line(cli(run_args(tmp_path, *extra), capsys), r"^bench: error: " + pattern)
    assert tiny_load == [] and no_run_written(tmp_path)


def test_an_argument_that_is_not_utf8_is_one_line(capsys, tmp_path):
    """Python hands an undecodable byte of the command line over as a lone surrogate, which no
    config.json, page or table can hold: refused where it enters."""
    assert_one_line(cli(["report", FIXTURE_RUN, "-o", tmp_path / "r", "--title", "a\udcffb"], capsys),
                    r"^bench: error: argument 'a\\udcffb' is not UTF-8 text")
    assert not (tmp_path / "r").exists()


def test_error_messages_stay_one_line(capsys, tmp_path):
    assert_one_line(cli(["list", "x\ny"], capsys), r"^bench list: error: argument what: invalid choice: 'x\\ny'")
    assert_one_line(cli(["run", "--data-dir", tmp_path / "a\nb"], capsys),
                    r"^bench: error: data directory from --data-dir does not exist: .*a\\nb$")


def test_run_files_with_lone_surrogates_are_refused(tmp_path, capsys):
    """A config.json or cases.jsonl escaping a lone surrogate (\\udcff) would break the report's
    UTF-8 pages and tables: one line naming the file instead."""
    for name in ("config.json", "cases.jsonl"):
        run = tmp_path / name / "run"
        shutil.copytree(FIXTURE_RUN, run)
        path = run / name
        old = '"ft"' if name == "config.json" else '"The capital'
        path.write_text(path.read_text().replace(old, old[:1] + "\\udcff" + old[1:], 1))
        assert_one_line(cli(["report", run, "-o", tmp_path / "out"], capsys),
                        r"^bench: error: .*" + re.escape(name) + r".* holds text that is not valid Unicode")
