"""Task data from published copies (card `source.remote`, tasks.sources), with no hub reachable.

* KnowEdit's layouts (ZsRE, WikiData_counterfact, WikiData_recent, ConvSent) read from a data
  directory laid out exactly as the hub repository (benchmark/...): each mapping pinned (prompt,
  target, rephrase, portability and locality probes), malformed sub-fields counted as skips;
* the same files found offline in a hub cache laid out as huggingface_hub writes it;
* a url source downloaded through `datasets`' own download cache from a local HTTP server;
* sha256 pins (a local or a fetched file that differs: one line, exit 2), the offline message
  (one line, exit 2, in process and in a subprocess), `bench data list`, and a run without a
  data directory marked as a built-in sample run.

Every record here is hand-made (invented entities), never a copy of a published record.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import huggingface_hub.constants
import huggingface_hub.errors
import pytest
import yaml

from bench.cli import main
from bench.core.cases import PromptAnswer
from bench.core.errors import BenchError
from bench.runner import execute
from bench.session import RunOptions, gather_tasks
from tasks import registry, sources
from tasks.card import Remote, parse_card
from tasks.registry import data_file_hashes, get_card, load_split, task_source
from tests.helpers import FIXTURE_DATA, run_bench

REVISION = "6d218881e60c7c8be836bd2befd598eb3b318be4"  # the cards' pinned KnowEdit commit

# ------------------------------------------------------------------------- hand-made records

CF_FULL = {
    "subject": "Orla Vesk", "prompt": "The occupation of Orla Vesk is", "target_new": "glassblower",
    "ground_truth": "cartographer", "rephrase": "Orla Vesk works as a",
    "portability": {
        "Subject_Aliasing": [{"prompt": "The occupation of O. Vesk is", "ground_truth": "glassblower"}],
        "Reasoning": [{"prompt": "The material Orla Vesk shapes at work is",
                       "ground_truth": [["glass", "molten glass"]]}],
        "Logical_Generalization": [{"prompt": "Is Orla Vesk a glassblower?",
                                    "ground_truth": [["yes"], ["true"]]}]},
    "locality": {
        "Relation_Specificity": [{"prompt": "The place of birth of Orla Vesk is",
                                  "ground_truth": [["Tarnholm", "Tarnholm town"]]}],
        "Forgetfulness": [{"prompt": "The occupation of Orla Vesk, which is not glassblower, is",
                           "ground_truth": "cartographer"}]},
}
WIKI_CF_TEST = [
    CF_FULL,
    # no portability at all and a null locality group: a case without portability probes
    {"subject": "Brin Aldo", "prompt": "Brin Aldo is a citizen of", "target_new": "Velmark",
     "ground_truth": "Osterra",
     "locality": {"Relation_Specificity": [{"prompt": "Brin Aldo was born in", "ground_truth": "1901"}],
                  "Forgetfulness": None}},
    {**CF_FULL, "portability": {"Reasoning": {"prompt": "x", "ground_truth": "y"}}},
    {**CF_FULL, "locality": {"Relation_Specificity": [{"prompt": "The sister of Orla Vesk is"}]}},
    {k: v for k, v in CF_FULL.items() if k != "target_new"},
    {**CF_FULL, "portability": {"Subject_Aliasing": [{"prompt": "O. Vesk works as", "ground_truth": []}]}},
    {**CF_FULL, "portability": [{"prompt": "x", "ground_truth": "y"}]},
    {**CF_FULL, "portability": {"Subject_Aliasing": [{"prompt": " ", "ground_truth": "glassblower"}]}},
    {**CF_FULL, "locality": {"Odd\nName": "x"}},  # a group name is quoted: the reason stays one line
]
WIKI_CF_SKIPS = {2: "portability.Reasoning is not a list",
                 3: "locality.Relation_Specificity[0] lacks ground_truth",
                 4: "missing field 'target_new'",
                 5: "portability.Subject_Aliasing[0].ground_truth: empty answer list",
                 6: "portability is not an object",
                 7: "empty portability prompt",
                 8: "locality.'Odd\\nName' is not a list"}
WIKI_CF_TRAIN = [{**CF_FULL, "subject": "Ivo Marr", "prompt": "The occupation of Ivo Marr is"}]

ZSRE_KE = [
    {"subject": "Quelloptera", "target_new": "Noctilidae", "prompt": "Which family does Quelloptera belong to?",
     "ground_truth": ["Umbridae"], "rephrase_prompt": "What family is Quelloptera in?",
     "cond": "Umbridae >> Noctilidae || Which family does Quelloptera belong to?",
     "locality": {"Relation_Specificity": [{"prompt": "The taxon rank of Quelloptera is", "ground_truth": ["genus"]},
                                           {"prompt": "Quelloptera taxon rank", "ground_truth": ["genus"]}]},
     "portability": {"Reasoning": [{"prompt": ["What is the common name of the family Quelloptera is in?"],
                                    "ground_truth": "night moths"}]}},
    {"subject": "Quelloptera", "target_new": "Noctilidae", "prompt": "Which family does Quelloptera belong to?",
     "ground_truth": []},
    {"subject": "Quelloptera", "target_new": "Noctilidae", "prompt": "Which family does Quelloptera belong to?",
     "rephrase_prompt": {"text": "?"}},
]

RECENT = [{
    "subject": "Tova Rhee", "prompt": "The place of death of Tova Rhee is", "target_new": "Kessel",
    "portability": {
        "Logical_Generalization": [{"prompt": "Is Tova Rhee still alive?", "ground_truth": [["no"], ["false"]]}],
        "Reasoning": [{"prompt": "The continent the place of death of Tova Rhee is on is",
                       "ground_truth": [["Europe", "European continent"]]}],
        "Subject_Aliasing": [{"prompt": "The place of death of Tova A. Rhee is",
                              "ground_truth": [["Kessel", "Kessel city"]]}]},
    "locality": {"Relation_Specificity": [{"prompt": "The father of Tova Rhee is",
                                           "ground_truth": [["Arn Rhee"]]}]},
}]

CONVSENT = [{"ent": "paper kites", "pos": ["I adore paper kites, they dance on the wind."],
             "neg": ["Paper kites are flimsy and dull."]}]

# where each file sits in the KnowEdit repository
HUB_FILES = {
    "benchmark/wiki_counterfact/train_cf.json": WIKI_CF_TRAIN,
    "benchmark/wiki_counterfact/test_cf.json": WIKI_CF_TEST,
    "benchmark/ZsRE/ZsRE-test-all.json": ZSRE_KE,
    "benchmark/wiki_recent/recent_train.json": RECENT,
    "benchmark/wiki_recent/recent_test.json": RECENT,
    "benchmark/Convsent/blender_train.json": CONVSENT,
    "benchmark/Convsent/blender_test.json": CONVSENT,
}


def write_tree(root: Path, files: dict[str, list]) -> Path:
    for rel, records in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(json.dumps(records), encoding="utf-8")
    return root


def reasons(split) -> dict[int, str]:
    return {s.index: s.reason for s in split.skipped}


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty hub cache of this test's own (huggingface_hub reads the constant at each call)."""
    cache = tmp_path / "hub-cache"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture
def no_data_dir(tmp_path, monkeypatch) -> Path:
    """A working directory with no ../shared/data next to it (and $BENCH_DATA unset)."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


def snapshot(cache: Path, files: dict[str, list]) -> Path:
    """The files as a hub cache holds zjunlp/KnowEdit at the pinned commit."""
    return write_tree(cache / "datasets--zjunlp--KnowEdit" / "snapshots" / REVISION, files)


def one_line(capsys, argv) -> str:
    assert main(argv) == 2
    out, err = capsys.readouterr()
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("bench: error: "), err
    return lines[0]


# ------------------------------------------------------------------------- KnowEdit mappings


def check_wikicounterfact(split, source: str) -> None:
    assert [c.case_id for c in split.cases] == ["wikicounterfact-test-0", "wikicounterfact-test-1"]
    assert reasons(split) == WIKI_CF_SKIPS
    assert {s.source for s in split.skipped} == {source}
    orla, brin = split.cases
    assert (orla.prompt, orla.subject, orla.target_new, orla.ground_truth) == (
        "The occupation of Orla Vesk is", "Orla Vesk", "glassblower", "cartographer")
    assert orla.rephrase_prompts == ("Orla Vesk works as a",)
    assert orla.portability == (  # every group, in file order; alias lists: the first alias
        PromptAnswer("The occupation of O. Vesk is", "glassblower"),
        PromptAnswer("The material Orla Vesk shapes at work is", "glass"),
        PromptAnswer("Is Orla Vesk a glassblower?", "yes"))
    assert orla.locality == (
        PromptAnswer("The place of birth of Orla Vesk is", "Tarnholm"),
        PromptAnswer("The occupation of Orla Vesk, which is not glassblower, is", "cartographer"))
    # no portability: no probe (the case has no portability score); a null group is absent
    assert brin.portability == () and brin.rephrase_prompts == ()
    assert brin.locality == (PromptAnswer("Brin Aldo was born in", "1901"),)


def test_knowedit_layouts_from_a_copy_of_the_hub_repository(tmp_path):
    """A data directory laid out as the hub repository: every KnowEdit task reads it."""
    data = write_tree(tmp_path / "KnowEdit", HUB_FILES)
    check_wikicounterfact(load_split("wikicounterfact", "eval", data),
                          "benchmark/wiki_counterfact/test_cf.json")
    assert [c.subject for c in load_split("wikicounterfact", "train", data).cases] == ["Ivo Marr"]

    zsre = load_split("zsre_knowedit", "eval", data)
    assert [c.case_id for c in zsre.cases] == ["zsre_knowedit-0"]
    assert reasons(zsre) == {1: "ground_truth: empty answer list", 2: "rephrase[0] is dict, not text"}
    q = zsre.cases[0]
    assert (q.prompt, q.target_new, q.ground_truth) == (
        "Which family does Quelloptera belong to?", "Noctilidae", "Umbridae")
    assert q.rephrase_prompts == ("What family is Quelloptera in?",)
    assert q.portability == (PromptAnswer("What is the common name of the family Quelloptera is in?",
                                          "night moths"),)
    assert q.locality == (PromptAnswer("The taxon rank of Quelloptera is", "genus"),
                          PromptAnswer("Quelloptera taxon rank", "genus"))
    with pytest.raises(BenchError, match="zsre_knowedit' has no train split"):
        load_split("zsre_knowedit", "train", data)

    (tova,) = load_split("recent", "eval", data).cases
    assert (tova.prompt, tova.target_new, tova.ground_truth) == (
        "The place of death of Tova Rhee is", "Kessel", None)  # knowledge insertion
    assert [(p.prompt, p.answer) for p in tova.portability] == [
        ("Is Tova Rhee still alive?", "no"),
        ("The continent the place of death of Tova Rhee is on is", "Europe"),
        ("The place of death of Tova A. Rhee is", "Kessel")]
    assert tova.locality == (PromptAnswer("The father of Tova Rhee is", "Arn Rhee"),)

    (kites,) = load_split("convsent", "eval", data).cases
    assert kites.prompt == "What do you think of paper kites?" and kites.subject == "paper kites"
    assert kites.target_new.startswith("I adore") and kites.ground_truth.startswith("Paper kites are")
    assert len(kites.rephrase_prompts) == 2 and kites.locality == () and kites.portability == ()

    src = task_source("wikicounterfact", data)
    assert (src["data"], src["origin"], src["location"]) == ("real", "data directory", str(data))
    assert src["verified"] is None  # KnowEdit's files have no pin yet
    assert src["licence"].startswith("MIT")


def test_hub_cache_is_read_offline_and_named_by_its_address(hub_cache, no_data_dir, capsys):
    snapshot(hub_cache, HUB_FILES)
    address = f"hf://datasets/zjunlp/KnowEdit@{REVISION}/benchmark/wiki_counterfact/test_cf.json"
    check_wikicounterfact(load_split("wikicounterfact", "eval", None), address)
    src = task_source("wikicounterfact", None)
    assert (src["data"], src["origin"], src["location"]) == ("real", "hub cache", "zjunlp/KnowEdit@6d218881")
    assert set(data_file_hashes("wikicounterfact", None, split="eval")) == {address}

    assert main(["data", "list"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()
            if line and not line.startswith((" ", "data directory", "hub:", "task "))}
    assert rows["wikicounterfact"].split()[1:3] == ["hub", "cache"]
    assert rows["counterfact"].split()[1:3] == ["built-in", "sample"]
    # offline, nothing to download: fetch checks the cached copy and says it has no pin yet
    assert main(["data", "fetch", "wikicounterfact"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("wikicounterfact: hub cache zjunlp/KnowEdit@6d218881") and "not pinned" in out


def test_a_cached_copy_that_fails_its_pin_is_one_line_exit_2(hub_cache, no_data_dir, monkeypatch, capsys):
    snapshot(hub_cache, HUB_FILES)
    card = get_card("zsre_knowedit")
    wrong = dataclasses.replace(card.remotes[0], sha256={"test": "0" * 64})
    monkeypatch.setitem(registry._CARDS, "zsre_knowedit", dataclasses.replace(card, remotes=(wrong,)))
    line = one_line(capsys, ["data", "fetch", "zsre_knowedit"])
    assert "ZsRE-test-all.json" in line and "the card pins " + "0" * 64 in line
    with pytest.raises(BenchError, match="the card pins"):
        load_split("zsre_knowedit", "eval", None)


# ------------------------------------------------------------------------- url sources


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def web(tmp_path):
    """A local HTTP server over tmp_path/site (no network beyond this machine)."""
    site = tmp_path / "site"
    site.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(site)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield site, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def test_url_source_downloads_into_the_datasets_cache(web, no_data_dir, tmp_path, monkeypatch, capsys):
    """counterfact's url source pointed at a local server: a run's first use of the task
    downloads each file through `datasets`' download cache and checks its pin (so does `bench
    data fetch`); the task then reads the cache, offline too."""
    datasets_config = pytest.importorskip("datasets.config")
    site, base = web
    shutil.copytree(FIXTURE_DATA / "counterfact", site / "data" / "counterfact")
    digests = {key: hashlib.sha256((site / "data" / f"counterfact/counterfact-{key}.json").read_bytes()).hexdigest()
               for key in ("train", "edit")}
    card = get_card("counterfact")
    remote = Remote(kind="url", location=base + "data/", revision=None,
                    files={k: f"counterfact/counterfact-{k}.json" for k in ("train", "edit")},
                    sha256=digests, licence="test licence", provenance="test provenance")
    monkeypatch.setitem(registry._CARDS, "counterfact", dataclasses.replace(card, remotes=(remote,)))
    monkeypatch.setattr(datasets_config, "DOWNLOADED_DATASETS_PATH", tmp_path / "datasets" / "downloads")
    monkeypatch.setattr(datasets_config, "HF_HUB_OFFLINE", False)
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")

    assert task_source("counterfact", None)["data"] == "built-in sample"  # not fetched yet
    logs = []
    found = gather_tasks(RunOptions(tasks=["counterfact"]), None, logs.append)
    assert (found["counterfact"]["data"], found["counterfact"]["origin"]) == ("real", "url cache")
    assert logs == ["no data directory (--data-dir, $BENCH_DATA, ../shared/data); published data "
                    "from the cache for counterfact"]
    assert main(["data", "fetch", "counterfact"]) == 0
    assert capsys.readouterr().out.startswith("counterfact: url cache 127.0.0.1:")
    shutil.rmtree(site / "data")  # from now on only the cache has it
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    src = task_source("counterfact", None)
    assert (src["origin"], src["verified"], src["licence"]) == ("url cache", True, "test licence")
    expected = [c.case_id for c in load_split("counterfact", "eval", FIXTURE_DATA).cases]
    assert [c.case_id for c in load_split("counterfact", "eval", None).cases] == expected

    # a server handing out other content than the card pins: one line, exit 2
    monkeypatch.delenv("HF_HUB_OFFLINE")
    (site / "data" / "counterfact").mkdir(parents=True)
    (site / "data" / "counterfact" / "counterfact-edit.json").write_text("[]")
    (site / "data" / "counterfact" / "counterfact-train.json").write_text("[]")
    assert main(["data", "fetch", "--force", "counterfact"]) == 2
    line = capsys.readouterr().err.strip("\n").split("\n")[-1]  # after the download's progress bar
    assert line.startswith("bench: error: task 'counterfact': http://127.0.0.1:")
    assert "counterfact-train.json" in line and f"the card pins {digests['train']}" in line


def test_hub_download_errors_are_one_line_and_an_unreachable_hub_is_tried_once(monkeypatch):
    calls = []

    def no_connection(*args, **kwargs):
        calls.append(args)
        raise huggingface_hub.errors.LocalEntryNotFoundError("no connection")

    monkeypatch.setattr(sources, "hf_hub_download", no_connection)
    monkeypatch.setattr(sources, "get_hf_file_metadata", lambda *a, **k: None)  # the hub answers the check
    monkeypatch.setattr(sources, "_hub_unreachable", False)
    remote = get_card("wikicounterfact").remotes[0]
    for key in ("train", "test"):
        with pytest.raises(BenchError, match=f"cannot reach the Hugging Face hub to download "
                                             f"benchmark/wiki_counterfact/{key}_cf.json"):
            sources.download(remote, key)
    assert len(calls) == 1  # the second file did not wait through the retries again

    def missing(*args, **kwargs):
        raise huggingface_hub.errors.EntryNotFoundError("404")

    monkeypatch.setattr(sources, "hf_hub_download", missing)
    monkeypatch.setattr(sources, "_hub_unreachable", False)
    with pytest.raises(BenchError, match=r"benchmark/wiki_counterfact/test_cf.json of dataset "
                                         r"zjunlp/KnowEdit at 6d2188.*: no such file in the repository$"):
        sources.download(remote, "test")


# ------------------------------------------------------------------------- pins, offline, list


def test_local_file_that_differs_from_the_pin_is_one_line_exit_2(capsys):
    """The fixture's hand-made counterfact files are not the published ones."""
    line = one_line(capsys, ["data", "fetch", "counterfact", "--data-dir", str(FIXTURE_DATA)])
    assert "counterfact/counterfact-train.json, counterfact/counterfact-edit.json" in line
    assert "differ from the published files the card pins" in line
    # a run reads them as before and records that they are not the published files
    src = task_source("counterfact", FIXTURE_DATA)
    assert (src["data"], src["verified"]) == ("real", False)


def test_offline_fetch_is_one_line_exit_2_in_process(no_data_dir, capsys):
    line = one_line(capsys, ["data", "fetch", "recent"])
    assert line == ("bench: error: cannot fetch recent: the hub is offline (HF_HUB_OFFLINE is set); "
                    "fetch where the hub is reachable, or supply a local directory with --data-dir or "
                    "$BENCH_DATA holding recent/recent_train.json, recent/recent_test.json")


def test_offline_fetch_is_one_line_exit_2_in_a_subprocess(tmp_path):
    res = run_bench(["data", "fetch", "wikicounterfact", "zsre_knowedit"], tmp_path,
                    HF_HUB_OFFLINE="1", BENCH_DATA="")
    assert res.returncode == 2 and res.stdout == "", res.stderr
    (line,) = res.stderr.strip("\n").split("\n")
    assert line.startswith("bench: error: cannot fetch wikicounterfact, zsre_knowedit: the hub is offline")
    assert "--data-dir or $BENCH_DATA" in line


def test_data_list_shows_origin_licence_and_provenance(tmp_path, capsys):
    data = write_tree(tmp_path / "data", {"benchmark/wiki_recent/recent_train.json": RECENT,
                                          "benchmark/wiki_recent/recent_test.json": RECENT})
    shutil.copytree(FIXTURE_DATA / "zsre", data / "zsre")
    assert main(["data", "list", "--data-dir", str(data)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"data directory: {data}"
    assert out[1] == "hub: offline (HF_HUB_OFFLINE is set): nothing is downloaded"
    rows = {line.split()[0]: i for i, line in enumerate(out) if line and not line.startswith(" ")}
    recent, zsre, wiki = out[rows["recent"]], out[rows["zsre"]], out[rows["wikicounterfact"]]
    assert recent.split()[1:3] == ["data", "directory"] and "benchmark/wiki_recent/recent_test.json" in recent
    assert "no sha256 pin to check against" in recent
    assert zsre.split()[1:3] == ["data", "directory"] and "sha256 differs from the card's pin" in zsre
    assert wiki.split()[1:4] == ["hub", "not", "cached"] and "bench data fetch wikicounterfact" in wiki
    assert out[rows["recent"] + 1].strip() == "licence: MIT (the licence of the zjunlp/KnowEdit dataset card)"
    assert out[rows["recent"] + 2].strip().startswith("provenance: KnowEdit (Zhang et al. 2024")


# ------------------------------------------------------------------------- bench run


def test_run_without_data_directory_says_so_in_one_line_and_marks_the_sample(
        no_data_dir, tmp_path, tiny_load, one_thread):
    logs = []
    opts = RunOptions(editor="none", model="tiny", device="cpu", limit=1, data_dir=None,
                      output_dir=str(tmp_path / "runs"))
    path = execute(opts, argv=["run"], log=logs.append)
    notes = [line for line in logs if line.startswith("no data directory")]
    assert notes == [
        "no data directory (--data-dir, $BENCH_DATA, ../shared/data) and the hub is offline "
        "(HF_HUB_OFFLINE is set); using the built-in sample records for counterfact, recast, zsre "
        "(numbers are not comparable); left out for want of data: convsent, recent, wikicounterfact, "
        "zsre_knowedit; `bench data fetch` gets the published data"]
    assert not any(line.startswith("left out") for line in logs)
    config = json.loads((path / "config.json").read_text())
    assert config["data"] == "built-in sample" and config["data_dir"] is None
    assert {t["name"]: t["data"] for t in config["tasks"]} == dict.fromkeys(
        ["counterfact", "recast", "zsre"], "built-in sample")
    source = config["tasks"][0]["source"]
    assert source["origin"] == "built-in sample" and "not benchmark data" in source["provenance"]


def test_named_task_without_data_is_an_error_others_are_left_out_in_one_line_each(no_data_dir):
    with pytest.raises(BenchError, match=r"^task 'recent': no data directory, no cached copy, and the "
                                         r"hub is offline \(HF_HUB_OFFLINE is set\); supply a local "
                                         r"directory .*recent/recent_train.json"):
        gather_tasks(RunOptions(tasks=["recent"]), None, print)
    logs = []
    found = gather_tasks(RunOptions(), FIXTURE_DATA, logs.append)
    assert list(found) == ["convsent", "counterfact", "recast", "recent", "zsre"]
    assert [line.split("'")[1] for line in logs] == ["wikicounterfact", "zsre_knowedit"]
    assert all(line.startswith("left out: task '") and "\n" not in line for line in logs)
    assert found["recent"]["origin"] == "data directory"


# ------------------------------------------------------------------------- card schema


@pytest.mark.parametrize("remote,message", [
    ({"hub": "zjunlp/KnowEdit", "revision": "main"}, "revision must be the commit sha"),
    ({"hub": "not a repo", "revision": REVISION}, "hub must be a repository id"),
    ({"url": "https://example.org/data/"}, "needs a sha256 pin for every file"),
    ({"url": "ftp://example.org/data/", "sha256": {"test": "a" * 64}}, "url must be an http"),
    ({"hub": "a/b", "revision": REVISION, "sha256": {"test": "XYZ"}}, "64 lowercase hex"),
    ({"hub": "a/b", "revision": REVISION, "files": {"other": "x.json"}}, "same keys as source.files"),
    ({"hub": "a/b", "revision": REVISION, "files": {"test": "../x.json"}}, "relative path inside"),
    ({"hub": "a/b", "url": "https://x/", "revision": REVISION}, "exactly one of hub"),
])
def test_card_remote_schema(tmp_path, remote, message):
    raw = yaml.safe_load((registry.CARDS_DIR / "zsre_knowedit.yaml").read_text(encoding="utf-8"))
    raw["source"]["remote"] = [{"files": {"test": "t.json"}, "licence": "l", "provenance": "p", **remote}]
    path = tmp_path / "zsre_knowedit.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    with pytest.raises(BenchError, match=message):
        parse_card(path)


def test_datasets_is_imported_late():
    """tasks/ imports huggingface_hub at the top, `datasets` (about 0.5 s) only for url sources."""
    code = ("import sys, tasks.registry; tasks.registry.task_source('zsre_knowedit', None); "
            "assert 'datasets' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(registry.__file__).parents[1],
                   env=dict(os.environ))
