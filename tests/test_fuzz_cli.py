"""Property-based fuzz of the `bench` command line (issue 29), driven in-process.

Each example is one `bench` invocation, `bench.cli.main(argv)`, with arguments drawn from the
real parser (its subcommands and their options, read from `build_parser()`, so a new option is
fuzzed too) and their values: plausible ones, hostile ones (out of range, empty, unknown names,
paths under /proc or below a file) and generated files written to a temporary directory:
hyperparameter YAML (alias bombs, deep nesting, FIFOs, not UTF-8, random mutations of a shipped
preset), data directories (truncated, not UTF-8 or randomly mutated task files, records with
NaN, Infinity or a 1 MB prompt), run directories to resume or report (a finished run with its
config.json or cases.jsonl corrupted, a FIFO in place of cases.jsonl), model files (text, empty,
truncated or random `.gguf`, checkpoint directories with a corrupted config.json or weights),
and the environment ($BENCH_CACHE, $BENCH_MODEL_PRESETS, $BENCH_DATA). Model loading is the tiny
Llama for the model presets (a valid invocation never loads a real model); any other model spec
goes through the real loaders.

Every invocation must end with exit code 0 or 2 (`bench model`: 1 for a preset mismatch), or
SystemExit 0/2 from argparse; never another exception (a traceback) and never a hang (an
invocation running longer than BENCH_FUZZ_HANG_S seconds). Exit code 2 ends stderr with one
`bench...: error: ...` line. An invocation with an input that is invalid for sure (each drawn
value knows whether it is) exits 2 and leaves no run directory with a summary.json behind, new
or changed.

CI runs a fixed budget (BENCH_FUZZ_EXAMPLES, default 150, derandomized: the same invocations every
time; well under a minute).
A larger exploration: BENCH_FUZZ_EXAMPLES=400 BENCH_FUZZ_COLLECT=1 python -m pytest -s
tests/test_fuzz_cli.py: random seeds, every failure collected rather than the first shrunk,
and a summary of the counts printed at the end.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import signal
import tempfile
import traceback
from collections import Counter
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.cli import build_parser, main
from tests.helpers import FIXTURE_DATA, REPO

BUDGET = int(os.environ.get("BENCH_FUZZ_EXAMPLES", "150"))
COLLECT = os.environ.get("BENCH_FUZZ_COLLECT") == "1"
HANG_S = int(os.environ.get("BENCH_FUZZ_HANG_S", "120"))
FIX = str(FIXTURE_DATA)
FIXTURE_RUNS = REPO / "tests" / "fixtures" / "runs"
PRESET_FILE = REPO / "editors" / "presets" / "ft" / "easyedit-ft-l.yaml"

STATS: Counter = Counter()  # invocations, outcomes, generated files
FAILURES: list[str] = []


class Hang(BaseException):
    """Raised by the alarm inside an invocation that runs too long (not an Exception: the code
    under test catches none of it)."""


@contextmanager
def alarm(seconds: int):
    def ring(signum, frame):
        raise Hang()

    previous = signal.signal(signal.SIGALRM, ring)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# --------------------------------------------------------------------------------------------
# The real parser
# --------------------------------------------------------------------------------------------


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


PARSER = build_parser()
COMMANDS = _subparsers(PARSER)


def optionals(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings and a.dest != "help"]


def positionals(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if not a.option_strings and not isinstance(a, argparse._SubParsersAction)]


# --------------------------------------------------------------------------------------------
# Values: (text, bad) where bad is True (invalid for sure), False (valid) or None (either)
# --------------------------------------------------------------------------------------------

# text a user could type: anything but NUL (a C string ends there), with a few undecodable bytes
# as Python hands them over (surrogate escapes)
TYPED = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=12) | \
    st.sampled_from(["\udcff", "a\udce9b", "-", "--", "=", " ", "\t", "..", "/", "~", "%s", "{}", "$HOME"])
HUGE = "99999999999999999999"
TABLE: dict[str, tuple[list[str], list[str], list[str]]] = {
    # dest: (valid, invalid for sure, either)
    "editor": (["none", "ft"], ["nope", "", "ft,none", "NONE"], []),
    "holdout": (["zsre"], ["nope", ","], []),
    "task": (["counterfact", "zsre", "counterfact,zsre"], ["nope", ",", "counterfact,nope"], []),
    "limit": (["1", "2"], ["-1", "x", "", "1.5"], [HUGE, "0"]),
    "device": (["cpu", "auto"], ["meta", "mps", "cuda:7", "tpu", "", "cuda:", "cuda:99999", "CPU"], []),
    "dtype": (["auto", "float32"], ["float8", "", "int8", "float16"], ["bfloat16"]),
    "seed": (["0", "7", "4294967295"], ["-1", "4294967296", HUGE, "x", "", "1e3"], []),
    "batch_size": (["1", "8"], ["0", "-1", "x"], [HUGE]),
    "protocol": (["teacher_forced", "wild", "teacher_forced,wild"], ["nope", ","], []),
    "max_new_tokens": (["4"], ["0", "-1", "x", HUGE, "100000"], []),
    "wild_scorer": (["exact_match", "token_f1"], ["nope"], ["judge"]),  # judge: valid with --judge
    "judge": ([], [], ["smollm2-135m"]),
    "judge_url": ([], [], ["http://127.0.0.1:9/"]),
    "judge_model": ([], [], ["m"]),
    "fluency": (["0", "3"], ["-1", "x", HUGE, "100000"], []),
    "lm_limit": (["200"], ["-1", "x"], ["1"]),
    "edit_batch": (["1"], ["0", "-1", "x"], ["2"]),
    "eval_every": (["0", "2"], ["-1", "x"], []),
    "locality_probes": (["0", "3"], ["-1", "x"], [HUGE]),
    "name": (["r1"], ["../x", "", "-x", "a/b", ".hidden", "a" * 300], []),
    "regression": ([], ["nope", ","], []),
    "task_option": (["zsre.strip_locality_prefix=true"],
                    ["x", "nope.x=1", "zsre.nope=1", "zsre.strip_locality_prefix=maybe", "=", "."], []),
    "lm_tasks": ([], ["nope", ","], []),
    "sample": ([], ["-1", "x"], []),
    "formats": ([], ["nope", ","], []),
    "max_steps": ([], ["-1", "x"], ["0", "1e30"]),
    "time_budget": ([], ["x", "nan", "-inf"], ["0", "inf", "-1"]),
    "threads": (["1"], ["0", "-1", "x", HUGE], []),
    "baseline": (["none"], ["bogus"], []),
    "title": ([], ["a\udcffb"], ["t", "<script>", "a\nb"]),
    "editors": ([], ["none,ft", "nope,mend", "", "mend"], []),
    "tasks": ([], ["nope", ","], ["counterfact,zsre"]),
    "columns": ([], ["nope", ","], []),
    "seeds": ([], ["x", "-1", ","], []),
}
# Valid and plausible values of commands that would train a learned editor or run lm-eval are
# left out by the generator (it keeps a known-invalid value in such invocations): the budget is
# for the command line, not for training.
# `bench run` is what users type most, and reaches furthest: drawn as often as all others together
WEIGHTED = sorted(COMMANDS) + ["run"] * (len(COMMANDS) - 1)
SLOW_COMMANDS = {"train", "regress", "ablate", "holdout-matrix", "analyze"}


class Files:
    """Generated files of one example (in its temporary directory), each with whether it is
    invalid for sure."""

    def __init__(self, draw, root: Path, template_run: Path, tiny_dir: Path):
        self.draw, self.root, self.template_run, self.tiny_dir = draw, root, template_run, tiny_dir
        self.n = 0

    def path(self, suffix: str = "") -> Path:
        self.n += 1
        return self.root / f"f{self.n}{suffix}"

    def corrupted(self, path: Path) -> Path:
        STATS["corrupted files"] += 1
        return path

    def mutate(self, raw: bytes) -> bytes:
        """A random edit of `raw`: truncated, bytes flipped, inserted or deleted."""
        kind = self.draw(st.sampled_from(["truncate", "flip", "insert", "delete"]))
        if not raw:
            return self.draw(st.binary(max_size=40))
        at = self.draw(st.integers(0, len(raw) - 1))
        if kind == "truncate":
            return raw[:at]
        if kind == "flip":
            return raw[:at] + bytes([raw[at] ^ self.draw(st.integers(1, 255))]) + raw[at + 1:]
        if kind == "insert":
            return raw[:at] + self.draw(st.binary(min_size=1, max_size=8)) + raw[at:]
        return raw[:at] + raw[at + self.draw(st.integers(1, 16)):]

    def fifo(self) -> Path:
        path = self.path(".fifo")
        os.mkfifo(path)
        return self.corrupted(path)

    # -- --hparams-file, --regression-corpus, --matrix ------------------------------------

    def hparams_file(self, editor: str) -> tuple[str, bool | None]:
        kind = self.draw(st.sampled_from(["valid", "empty mapping", "bomb", "deep", "fifo", "not utf-8",
                                          "unclosed", "list", "unknown key", "missing", "self alias",
                                          "mutated preset", "random bytes", "nan"]))
        path = self.path(".yaml")
        bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
            f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
        contents = {"valid": (b"steps: 1\n", editor != "ft"), "empty mapping": (b"{}\n", False),
                    "bomb": (bomb.encode() + b"steps: *i\n", True),
                    "deep": (b"steps: " + b"[" * 3000 + b"]" * 3000 + b"\n", True),
                    "not utf-8": (b"steps: \xff\xfe\n", True), "unclosed": (b"steps: [1, 2\n", True),
                    "list": (b"- steps\n- 1\n", True), "unknown key": (b"zzz_unknown: 1\n", True),
                    "self alias": (b"steps: &s [1, *s]\n", True), "nan": (b"lr: .nan\n", True)}
        if kind == "fifo":
            return str(self.fifo()), True
        if kind == "missing":
            return str(path), True
        if kind == "mutated preset":
            path.write_bytes(self.mutate(PRESET_FILE.read_bytes()))
            return str(self.corrupted(path)), None
        if kind == "random bytes":
            path.write_bytes(self.draw(st.binary(max_size=200)))
            return str(self.corrupted(path)), None
        raw, bad = contents[kind]
        path.write_bytes(raw)
        return str(self.corrupted(path) if bad else path), bad

    def text_file(self) -> tuple[str, bool | None]:
        kind = self.draw(st.sampled_from(["fifo", "missing", "not utf-8", "empty", "json", "random"]))
        if kind == "fifo":
            return str(self.fifo()), None
        path = self.path(".txt")
        if kind != "missing":
            path.write_bytes({"not utf-8": b"\xff\xfe text", "empty": b"", "json": b'{"text": 1}\n'}.get(
                kind, self.draw(st.binary(max_size=100))))
            self.corrupted(path)
        return str(path), None

    # -- --data-dir -----------------------------------------------------------------------

    def data_dir(self) -> tuple[str, bool | None, str]:
        """(path, bad, what): `bad` holds only when counterfact's eval file is read (see use)."""
        kind = self.draw(st.sampled_from(["fixture", "truncated", "not utf-8", "mutated", "hostile records",
                                          "missing", "file", "empty", "fifo"]))
        if kind == "fixture":
            return FIX, False, kind
        if kind == "missing":
            return str(self.path()), True, kind
        if kind == "file":
            path = self.path(".txt")
            path.write_text("x")
            return str(path), True, kind
        if kind == "fifo":
            return str(self.fifo()), True, kind
        root = self.path()
        if kind == "empty":
            root.mkdir()
            return str(root), None, kind
        shutil.copytree(FIXTURE_DATA, root)
        target = root / "counterfact" / "counterfact-edit.json"
        raw = target.read_bytes()
        if kind == "truncated":
            raw = raw[:self.draw(st.integers(0, len(raw.rstrip()) - 1))]
        elif kind == "not utf-8":
            raw = raw[:10] + b"\xff" + raw[10:]
        elif kind == "mutated":
            raw = self.mutate(raw)
        else:  # records the loader must skip with a reason: NaN, Infinity, a 1 MB prompt
            records = json.loads(raw)
            records[0]["target_new"] = float("nan")
            records[1]["case_id"] = float("inf")
            records[2]["prompt"] = records[2]["subject"] + " x" * 500_000
            raw = json.dumps(records).encode()
        target.write_bytes(raw)
        self.corrupted(target)
        return str(root), {"truncated": True, "not utf-8": True, "mutated": None}.get(kind, False), kind

    # -- run directories (--resume, bench report) -----------------------------------------

    def run_dir(self) -> tuple[str, bool | None]:
        kind = self.draw(st.sampled_from(["intact", "config not json", "no editor", "limit text",
                                          "hparams list", "two editors", "cases fifo", "cases bad line",
                                          "torn last line", "no summary", "config mutated", "cases mutated",
                                          "config dir", "missing", "empty dir", "not utf-8 config",
                                          "surrogate config", "surrogate case", "config symlink to /dev/zero"]))
        path = self.path()
        if kind == "missing":
            return str(path), True
        if kind == "empty dir":
            path.mkdir()
            return str(path), True
        shutil.copytree(self.template_run, path)
        config_path, cases_path = path / "config.json", path / "cases.jsonl"
        config = json.loads(config_path.read_text())
        bad: bool | None = True
        if kind == "intact":
            return str(path), False
        if kind == "config not json":
            config_path.write_text("{not json")
        elif kind == "not utf-8 config":
            config_path.write_bytes(b"\xff" + config_path.read_bytes())
        elif kind == "config dir":
            config_path.unlink()
            config_path.mkdir()
        elif kind == "surrogate config":
            config["command"] = "bench run \udcff"
            config_path.write_text(json.dumps(config))  # ensure_ascii: the escape \\udcff
        elif kind == "surrogate case":
            lines = cases_path.read_text().splitlines()
            record = json.loads(lines[0])
            record["case"]["prompt"] = "\udcff" + record["case"]["prompt"]
            cases_path.write_text("\n".join([json.dumps(record)] + lines[1:]) + "\n")
        elif kind == "config symlink to /dev/zero":
            config_path.unlink()
            config_path.symlink_to("/dev/zero")
        elif kind == "cases fifo":
            cases_path.unlink()
            os.mkfifo(cases_path)
        elif kind == "cases bad line":
            cases_path.write_text("garbage\n" + cases_path.read_text())
        elif kind == "torn last line":
            with open(cases_path, "a") as f:
                f.write('{"task": "counterfact", "case')
            bad = False
        elif kind == "no summary":
            (path / "summary.json").unlink()
            bad = False
        elif kind in ("config mutated", "cases mutated"):
            target = config_path if kind == "config mutated" else cases_path
            target.write_bytes(self.mutate(target.read_bytes()))
            bad = None
        else:
            change = {"no editor": lambda c: c.pop("editor"),
                      "limit text": lambda c: c["options"].__setitem__("limit", "abc"),
                      "hparams list": lambda c: c["options"].__setitem__("hparams", [1]),
                      "two editors": lambda c: c["options"].__setitem__("editor", "ft")}[kind]
            change(config)
            config_path.write_text(json.dumps(config))
        self.corrupted(path)
        return str(path), bad

    # -- --model ----------------------------------------------------------------------------

    def model(self) -> tuple[str, bool | None]:
        kind = self.draw(st.sampled_from(["preset", "tiny dir", "gguf text", "gguf empty", "gguf random",
                                          "gguf truncated", "hub id", "missing gguf", "empty",
                                          "dir bad config", "dir bad weights", "dir config list",
                                          "dir config text layers"]))
        if kind == "preset":
            return "smollm2-135m", False
        if kind == "tiny dir":
            return str(self.tiny_dir), False
        if kind == "hub id":
            return "nobody/no-such-model", True
        if kind == "empty":
            return "", True
        if kind.startswith("gguf") or kind == "missing gguf":
            path = self.path(".gguf")
            if kind != "missing gguf":
                path.write_bytes({"gguf text": b"hello, not a model\n", "gguf empty": b"",
                                  "gguf truncated": b"GGUF\x03\x00\x00\x00\x05"}.get(
                    kind, b"GGUF" + self.draw(st.binary(max_size=120))))
                self.corrupted(path)
            return str(path), True
        path = self.path()
        shutil.copytree(self.tiny_dir, path)
        if kind == "dir bad config":
            (path / "config.json").write_bytes(self.mutate((path / "config.json").read_bytes()))
            bad = None
        elif kind == "dir config list":
            (path / "config.json").write_text("[1, 2]")
            bad = True
        elif kind == "dir config text layers":
            config = json.loads((path / "config.json").read_text())
            config["num_hidden_layers"] = "abc"
            (path / "config.json").write_text(json.dumps(config))
            bad = True
        else:
            weights = next(path.glob("*.safetensors"))
            weights.write_bytes(self.mutate(weights.read_bytes()[:4096]))
            bad = True
        self.corrupted(path)
        return str(path), bad


# --------------------------------------------------------------------------------------------
# An invocation
# --------------------------------------------------------------------------------------------


class Invocation:
    def __init__(self, draw, files: Files, root: Path):
        self.draw, self.files, self.root = draw, files, root
        self.argv: list[str] = []
        self.command = ""
        self.bad: list[str] = []  # why the input is invalid for sure
        self.env: dict[str, str] = {}

    def value(self, dest: str, given: dict[str, str]) -> tuple[str, bool | None]:
        files, draw = self.files, self.draw
        if dest == "hparams_file":
            return files.hparams_file(given.get("editor", "ft"))
        if dest == "data_dir":
            path, bad, kind = files.data_dir()
            # a corrupted eval file is an error of a run that reads it; `list tasks` and `data
            # list` report it in their listing (exit 0), and other commands read other files
            reads_it = self.command == "run" and ("task" not in given
                                                  or "counterfact" in given.get("task", "").split(","))
            return path, (bad if kind in ("missing", "file", "fifo") or reads_it else None)
        if dest == "resume":
            if draw(st.integers(0, 5)) == 0:
                return "", True
            return files.run_dir()  # a copy: resuming writes into it
        if dest == "model":
            return files.model()
        if dest in ("output_dir", "output", "index"):
            kind = draw(st.sampled_from(["fresh", "fresh", "proc", "sys", "file", "below file", "empty",
                                         "long name", "newline"]))
            afile = self.root / "afile"
            afile.write_text("x")
            return {"fresh": (str(self.root / "out"), False), "proc": ("/proc/bench-fuzz", True),
                    "sys": ("/sys/bench-fuzz", True), "file": (str(afile), True),
                    "below file": (str(afile / "sub"), True), "empty": ("", True),
                    "long name": (str(self.root / ("n" * 300) / "x"), True),
                    "newline": (str(self.root / "a\nb"), False)}[kind]
        if dest in ("regression_corpus", "matrix"):
            path, bad = files.text_file()
            # without --regression, a corpus is an option the run would not use (bench run)
            return path, (True if dest == "regression_corpus" and self.command == "run" else bad)
        if dest == "hparam":
            editor = given.get("editor", "ft")
            text = draw(st.sampled_from(["steps=1", "x", "=1", "zzz=1", "lr=nan", "layers=[]", "steps=1e30",
                                         "lr=", "steps=abc"]))
            bad = {"steps=1": editor != "ft", "layers=[]": None, "steps=1e30": None}.get(text, True)
            return text, (True if editor == "none" else bad)
        valid, invalid, either = TABLE.get(dest, ([], [], []))
        roll = draw(st.integers(0, 19))  # mostly valid values, so that invocations get far
        for pool, bad, upto in ((valid, False, 11), (invalid, True, 16), (either, None, 18)):
            if pool and roll <= upto:
                text = draw(st.sampled_from(pool))
                break
        else:
            return draw(TYPED), None
        if bad is not True and self.command == "run":  # options a part of the run it does not make reads
            wild = "wild" in given.get("protocol", "wild").split(",")
            if dest in ("max_new_tokens", "wild_scorer") and not wild or \
                    dest == "fluency" and text != "0" and not wild or dest == "lm_limit" and text != "200":
                bad = True
        return text, bad

    def add(self, option: str, text: str, bad: bool | None, why: str) -> None:
        form = self.draw(st.integers(0, 5))
        if form == 0 and option.startswith("--") and not text.startswith("-"):
            self.argv.append(f"{option}={text}")
        else:
            self.argv += [option, text]
        if bad:
            self.bad.append(f"{why}={text!r}")

    def build(self, command: str) -> None:
        draw = self.draw
        parser = COMMANDS[command]
        self.command = command
        if draw(st.integers(0, 7)) == 0:
            text, bad = self.value("threads", {})
            self.add("--threads", text, bad, "--threads")
        self.argv.append(command)
        nested = _subparsers(parser)  # bench data list|fetch, bench analyze directions
        if nested:
            sub = draw(st.sampled_from(sorted(nested)))
            self.argv.append(sub)
            parser = nested[sub]
            if sub == "fetch":  # offline (tests/conftest.py): what it cannot fetch is one line
                self.argv += draw(st.lists(st.sampled_from(["zsre", "nope", "recent"]), max_size=2))
        for action in positionals(parser):
            self.positional(command, action)
        actions = optionals(parser)
        chosen = draw(st.lists(st.sampled_from(actions), max_size=5, unique_by=lambda a: a.dest)) if actions else []
        given: dict[str, str] = {}
        first = ("editor", "task", "protocol")  # values that decide whether others are valid
        for action in sorted(chosen, key=lambda a: a.dest not in first):
            option = draw(st.sampled_from(action.option_strings))
            if action.nargs == 0:
                self.argv.append(option)
                given[action.dest] = ""
                continue
            if action.choices is not None and action.dest not in TABLE:
                text, bad = draw(st.sampled_from([(str(c), False) for c in action.choices]
                                                 + [("nope", True), ("", True)]))
            else:
                text, bad = self.value(action.dest, given)
            given[action.dest] = text
            self.add(option, text, bad, option)
        if command == "run" and "resume" in given and any(d not in ("resume", "limit") for d in given):
            self.bad.append("--resume with options that would change the run")
        dests = {a.dest for a in optionals(parser)}
        if command in SLOW_COMMANDS and not self.bad:  # never train or run lm-eval: one sure error
            if "editor" in dests:
                self.add("--editor", "nope", True, "forced")
            elif "editors" in dests:
                self.add("--editors", "none,ft", True, "forced")
        if draw(st.integers(0, 9)) == 0:  # garbage: an unknown option, a stray word
            self.argv.append(draw(st.sampled_from(["--nope", "-x", "stray", "--", "--edit"])))
        self.environment(command)

    def positional(self, command: str, action: argparse.Action) -> None:
        draw = self.draw
        if command == "report":
            for _ in range(draw(st.integers(0, 2))):
                kind = draw(st.sampled_from(["fixture", "generated", "missing", "fifo"]))
                if kind == "fixture":
                    self.argv.append(str(FIXTURE_RUNS / draw(st.sampled_from(
                        ["ft-fixture", "rome-fixture", "none-fixture", "mend-fixture"]))))
                elif kind == "generated":
                    path, bad = self.files.run_dir()
                    self.argv.append(path)
                    if bad and ("missing" in path or not Path(path, "config.json").is_file()):
                        self.bad.append(f"run directory {path}")
                elif kind == "missing":
                    self.argv.append(str(self.root / "no-such-run"))
                    self.bad.append("missing run directory")
                else:
                    self.argv.append(str(self.files.fifo()))
                    self.bad.append("a FIFO as run directory")
        elif command == "model":
            if draw(st.booleans()):
                text, bad = self.files.model()
                self.argv.append(text)
                if bad:
                    self.bad.append(f"model {text!r}")
        elif action.choices:
            text = draw(st.sampled_from(sorted(action.choices) + ["nope", ""]))
            self.argv.append(text)
            if text not in action.choices:
                self.bad.append(f"{action.dest}={text!r}")
        elif action.nargs in ("*", "?"):
            self.argv += draw(st.lists(TYPED, max_size=1))
        else:
            self.argv.append(draw(TYPED))

    def environment(self, command: str) -> None:
        draw = self.draw
        if draw(st.integers(0, 5)) == 0:
            afile = self.root / "afile"
            afile.write_text("x")
            self.env["BENCH_CACHE"] = str(afile)
            if command in ("run", "model", "regress", "ablate", "train"):
                self.bad.append("$BENCH_CACHE is a file")
        if draw(st.integers(0, 6)) == 0:
            kind = draw(st.sampled_from(["missing", "bad yaml", "bomb"]))
            folder = self.root / "presets"
            if kind != "missing":
                folder.mkdir(exist_ok=True)
                (folder / "broken.yaml").write_text("a: [\n" if kind == "bad yaml" else
                                                    "a: &a [x, x]\nb: [*a, *a]\n" * 2)
                self.files.corrupted(folder / "broken.yaml")
            self.env["BENCH_MODEL_PRESETS"] = str(folder)
            if command == "list" and "models" in self.argv or kind == "missing" and command in ("run", "model"):
                self.bad.append(f"$BENCH_MODEL_PRESETS {kind}")
        if draw(st.integers(0, 6)) == 0:
            self.env["BENCH_DATA"] = draw(st.sampled_from([str(self.root / "nope"), "/proc/self/status", ""]))


def summaries(root: Path) -> dict[Path, bytes]:
    """Every summary.json below `root` (and in the copies resumed in place), with its content."""
    return {p: p.read_bytes() for p in root.rglob("summary.json") if p.is_file()}


def invoke(argv: list[str]) -> tuple[str, int | None, str, str]:
    """(outcome, exit code, stdout, stderr) of bench.cli.main(argv); outcome is "exit",
    "traceback" or "hang". stdout is strict UTF-8 and stderr backslash-escaping, as a UTF-8
    terminal's are."""
    import torch

    out_raw, err_raw = io.BytesIO(), io.BytesIO()
    out = io.TextIOWrapper(out_raw, encoding="utf-8", errors="strict", write_through=True)
    err = io.TextIOWrapper(err_raw, encoding="utf-8", errors="backslashreplace", write_through=True)
    threads = torch.get_num_threads()
    outcome, code, tb = "exit", None, ""
    try:
        with alarm(HANG_S), redirect_stdout(out), redirect_stderr(err):
            code = main(argv)
    except SystemExit as exc:
        code = exc.code
    except Hang:
        outcome = "hang"
    except BaseException:  # noqa: BLE001 - anything else is what the fuzz looks for
        outcome, tb = "traceback", traceback.format_exc()
    finally:
        torch.set_num_threads(threads)
    return outcome, code, out_raw.getvalue().decode("utf-8", "replace"), \
        err_raw.getvalue().decode("utf-8", "replace") + tb


# --------------------------------------------------------------------------------------------
# The test
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def template_run(tmp_path_factory, session_cache) -> Path:
    """A finished 3-case run of the `none` editor (tiny model), copied and corrupted by examples."""
    import bench.session
    from bench.core.tiny import tiny_config, tiny_model

    out = tmp_path_factory.mktemp("fuzz-template")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BENCH_CACHE", str(session_cache))
        mp.delenv("BENCH_DATA", raising=False)
        mp.setattr(bench.session, "load_model", lambda *a, **k: tiny_model("llama"))
        mp.setattr(bench.session, "load_config", lambda *a, **k: tiny_config("llama"))
        code = main(["run", "--editor", "none", "--task", "counterfact", "--limit", "3", "--data-dir", FIX,
                     "--protocol", "teacher_forced", "--output-dir", str(out), "--name", "template"])
    assert code == 0
    (path,) = out.iterdir()
    return path


@pytest.fixture
def model_loading(monkeypatch):
    """Model presets load the tiny Llama (never a real model); any other spec, the real loaders."""
    import bench.core.models as models
    import bench.session
    from bench.core.presets import find_preset
    from bench.core.tiny import tiny_config, tiny_model

    real_load, real_config = models.load_model, models.load_config

    def load(spec="smollm2-135m", device="auto", dtype="auto"):
        return tiny_model("llama") if find_preset(spec) is not None else real_load(spec, device, dtype)

    def config(spec="smollm2-135m"):
        return tiny_config("llama") if find_preset(spec) is not None else real_config(spec)

    for module in (models, bench.session):
        monkeypatch.setattr(module, "load_model", load)
        monkeypatch.setattr(module, "load_config", config)


def check(inv: Invocation, outcome: str, code, stdout: str, stderr: str, before: dict, after: dict) -> list[str]:
    """What is wrong with the outcome of `inv` (empty: nothing)."""
    problems = []
    last = ([line for line in stderr.splitlines() if line.strip()] or [""])[-1]
    if outcome != "exit":
        problems.append(f"{outcome}: {stderr.strip().splitlines()[-1] if stderr.strip() else ''}")
    elif code not in (0, 2) and not (code == 1 and "model" in inv.argv):
        problems.append(f"exit code {code!r}")
    elif code == 2 and (not re.match(r"^bench[\w\- ]*: error: ", last) or "Traceback" in stderr):
        problems.append(f"exit 2 without a one-line error: {last!r}")
    if inv.bad and outcome == "exit" and code == 0:
        problems.append(f"exit 0 from invalid input ({'; '.join(inv.bad)})")
    if inv.bad and any(before.get(p) != v for p, v in after.items()):
        problems.append(f"a summary.json written from invalid input ({'; '.join(inv.bad)})")
    return problems


@settings(max_examples=BUDGET, deadline=None, database=None, derandomize=not COLLECT,
          suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_the_command_line_never_tracebacks_hangs_or_accepts_invalid_input(
        data, template_run, model_loading, tiny_model_dir, session_cache):
    draw = data.draw
    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as mp:
        root = Path(tmp)
        mp.chdir(root)  # `runs/`, the default --output-dir, lands here
        files = Files(draw, root, template_run, tiny_model_dir)
        inv = Invocation(draw, files, root)
        if draw(st.integers(0, 12)) == 0:  # a few entirely random command lines
            inv.argv = draw(st.lists(st.one_of(TYPED, st.sampled_from(sorted(COMMANDS))), max_size=5))
        else:
            inv.build(draw(st.sampled_from(WEIGHTED)))
        for key, value in inv.env.items():
            mp.setenv(key, value)
        before = summaries(root)
        outcome, code, stdout, stderr = invoke(inv.argv)
        after = summaries(root)
    STATS["invocations"] += 1
    if os.environ.get("BENCH_FUZZ_LOG"):
        with open(os.environ["BENCH_FUZZ_LOG"], "a") as log:
            last = ([line for line in stderr.splitlines() if line.strip()] or [""])[-1]
            log.write(json.dumps({"argv": inv.argv, "bad": inv.bad, "outcome": outcome, "code": code,
                                  "last": last[:300]}) + "\n")
    STATS[f"outcome {outcome}" + (f" {code}" if outcome == "exit" else "")] += 1
    STATS["invalid for sure"] += bool(inv.bad)
    problems = check(inv, outcome, code, stdout, stderr, before, after)
    for p in problems:
        STATS[p.split(":")[0].split(" (")[0]] += 1
    if problems:
        report = f"bench {' '.join(map(repr, inv.argv))} env={inv.env}: " + "; ".join(problems)
        if COLLECT:
            FAILURES.append(report + ("\n" + stderr[-2000:] if outcome == "traceback" else ""))
            return
        pytest.fail(report + "\n" + stderr[-3000:])


def test_fuzz_summary():
    """Prints the counts (pytest -s); with BENCH_FUZZ_COLLECT=1, fails on any collected failure."""
    print("\nfuzz:", dict(sorted(STATS.items())))
    for failure in FAILURES:
        print("FAILURE:", failure)
    assert not FAILURES, f"{len(FAILURES)} failing invocations (printed above)"
