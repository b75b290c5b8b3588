"""Task registry tests: cards, loaders, splits, instruction wrapping. Fast, no model.

Unit tests read only tests/fixtures/data and the built-in sample; the one test on the real data
(../shared/data or $BENCH_DATA) is skipped where that directory is absent.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import replace
from pathlib import Path

import pytest

from bench.core.cases import PromptAnswer
from bench.core.errors import BenchError
from tasks import registry
from tasks.card import SplitRule, parse_card
from tasks.fields import fill_blank, first_alias, probes
from tasks.instructions import pick_description, wrap_case, wrap_prompt
from tasks.loaders import get_loader, read_records
from tasks.registry import (data_file_hashes, get_card, list_cards, load_split, resolve_data_dir,
                            task_status)

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "data"
REAL_DATA = Path(os.environ.get("BENCH_DATA") or REPO.parent / "shared" / "data")
ALL_TASKS = ["convsent", "counterfact", "recast", "recent", "zsre"]


def ids(split):
    return [c.case_id for c in split.cases]


def reasons(split):
    return {s.index: s.reason for s in split.skipped}


# ---------------------------------------------------------------------------------- cards


def test_cards_listed_sorted_and_valid():
    cards = list_cards()
    assert list(cards) == ALL_TASKS
    for name, card in cards.items():
        assert card.name == name
        assert set(card.metrics) <= {"reliability", "generality", "locality", "portability", "counterfact"}
        assert len(card.instructions.pool(True)) == 9 and len(card.instructions.pool(False)) >= 1
        assert len(card.instructions.descriptions) == 10


def test_unknown_task_error():
    with pytest.raises(BenchError, match=r"unknown task 'nope'; available: convsent, counterfact"):
        get_card("nope")
    with pytest.raises(BenchError, match="unknown task"):
        load_split("nope", "eval", None)


def test_bad_card_rejected(tmp_path):
    text = (REPO / "tasks" / "cards" / "zsre.yaml").read_text()
    bad = tmp_path / "zsre.yaml"
    bad.write_text(text.replace("metrics: [reliability", "metrics: [fluency, reliability"))
    with pytest.raises(BenchError, match="metrics"):
        parse_card(bad)
    bad.write_text(text + "\nextra_key: 1\n")
    with pytest.raises(BenchError, match="unknown key"):
        parse_card(bad)


def test_unknown_split_and_missing_train():
    with pytest.raises(BenchError, match="unknown split 'test'"):
        load_split("counterfact", "test", None)
    with pytest.raises(BenchError, match="no train split"):
        load_split("recast", "train", None)
    with pytest.raises(BenchError, match="held out"):
        load_split("zsre", "train", None, holdout=True)


# ---------------------------------------------------------------------------------- data dir


def test_resolve_data_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("BENCH_DATA", raising=False)
    monkeypatch.chdir(tmp_path)  # no ../shared/data from here
    assert resolve_data_dir(None) == (None, True)
    assert resolve_data_dir(str(FIXTURES)) == (FIXTURES.resolve(), False)
    with pytest.raises(BenchError, match="does not exist"):
        resolve_data_dir(str(tmp_path / "absent"))
    monkeypatch.setenv("BENCH_DATA", str(FIXTURES))
    assert resolve_data_dir(None) == (FIXTURES.resolve(), False)
    monkeypatch.setenv("BENCH_DATA", str(tmp_path / "absent"))
    with pytest.raises(BenchError, match="BENCH_DATA"):
        resolve_data_dir(None)
    monkeypatch.delenv("BENCH_DATA")
    (tmp_path / "shared" / "data").mkdir(parents=True)
    (tmp_path / "main").mkdir()
    monkeypatch.chdir(tmp_path / "main")
    assert resolve_data_dir(None) == ((tmp_path / "shared" / "data").resolve(), False)


# ---------------------------------------------------------------------------------- loaders


def test_counterfact_loader_fixture():
    train = load_split("counterfact", "train", FIXTURES)
    assert ids(train) == ["101", "104"]
    assert reasons(train) == {1: "empty target_new", 2: "missing field 'locality_ground_truth'"}
    case = train.cases[0]
    assert case.rephrase_prompts == ("Norway's seat of government is in",)
    assert case.locality == (PromptAnswer("The capital of Sweden is", "Stockholm"),)
    assert case.ground_truth == "Oslo" and case.task == "counterfact"
    assert all(s.source == "counterfact/counterfact-train.json" for s in train.skipped)


def test_zsre_loader_fixture_skips_empty_targets():
    split = load_split("zsre", "eval", FIXTURES, holdout=True)  # holdout: all records
    assert ids(split) == ["zsre-0", "zsre-4", "zsre-5"]
    assert reasons(split) == {1: "empty target_new", 2: "empty locality answer",
                              3: "missing field 'answers'"}
    c = split.cases[0]
    assert (c.prompt, c.target_new, c.ground_truth) == ("In which country is Mount Fuji?", "Chile", "Japan")
    assert c.locality == (PromptAnswer("who wrote the odyssey", "Homer"),)  # prefix stripped
    assert c.locality[0].prompt and not c.locality[0].prompt.startswith("nq question")
    # "1989" must stay a string, not become an int through native rendering
    assert split.cases[1].locality[0].answer == "1989"


def test_recent_loader_fixture():
    train = load_split("recent", "train", FIXTURES)
    assert ids(train) == ["recent-train-0"] and reasons(train) == {1: "empty target_new"}
    test = load_split("recent", "eval", FIXTURES)
    assert ids(test) == ["recent-test-0", "recent-test-1", "recent-test-3"]
    assert reasons(test) == {2: "missing field 'prompt'"}
    leo, bridge, quill = test.cases
    assert leo.ground_truth == "Potsdam" and leo.rephrase_prompts == ("Leo Arons died in the city of",)
    assert [p.answer for p in leo.portability] == ["no", "Europe", "Berlin"]  # first alias
    assert leo.locality == (PromptAnswer("The name of the father of Leo Arons is", "Albert Arons"),)
    assert bridge.ground_truth == "unknown" and bridge.portability[0].answer == "Danish"
    assert bridge.locality[0].answer == "1.2 km" and bridge.rephrase_prompts == ()
    assert quill.ground_truth is None and quill.portability == () and quill.locality == ()


def test_convsent_loader_detects_both_layouts():
    train = load_split("convsent", "train", FIXTURES)  # {ent, pos, neg}
    assert reasons(train) == {2: "pos has no responses", 3: "missing field 'pos'"}
    jazz = train.cases[0]
    assert jazz.prompt == "What do you think of jazz music?" and jazz.subject == "jazz music"
    assert jazz.target_new.startswith("I love jazz") and jazz.ground_truth.startswith("I can't stand")
    assert len(jazz.rephrase_prompts) == 2 and all("jazz music" in p for p in jazz.rephrase_prompts)
    test = load_split("convsent", "eval", FIXTURES)  # reconstructed layout, third candidate file
    games = test.cases[0]
    assert games.subject in games.prompt and games.rephrase_prompts == ("How do you view board games?",)
    assert games.ground_truth == "Board games bore me to tears."
    assert games.locality == (PromptAnswer("What is your opinion of sushi?", "Sushi is delicious."),)
    assert test.cases[1].ground_truth is None


def test_convsent_negative_target_option_and_unknown_layout(tmp_path):
    raws = get_loader("convsent")(FIXTURES / "convsent" / "blender_train.json",
                                  {"target_sentiment": "negative"})
    assert raws[0].data["target_new"].startswith("I can't stand")
    assert raws[0].data["ground_truth"].startswith("I love jazz")
    assert raws[2].reason == "pos has no responses"  # the opposite side is needed as ground truth
    unknown = tmp_path / "x.json"
    unknown.write_text(json.dumps([{"topic": "a"}]))
    with pytest.raises(BenchError, match="x.json"):
        get_loader("convsent")(unknown, {})


def test_convsent_requires_both_sides():
    raws = get_loader("convsent")(FIXTURES / "convsent" / "blender_train.json", {})
    assert raws[2].data is None and raws[3].data is None


def test_jsonl_accepted(tmp_path):
    recs = json.loads((FIXTURES / "zsre" / "zsre_mend_train-1k.json").read_text())
    path = tmp_path / "z.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    assert read_records(path) == recs


@pytest.mark.parametrize("content, match", [
    ("[{\"a\": 1},", "not valid JSON"),
    ("{\"a\": 1}", "JSON list of objects"),
    ("[{\"a\": 1}, 3]", "record 1"),
])
def test_malformed_json_names_file(tmp_path, content, match):
    path = tmp_path / "broken.json"
    path.write_text(content)
    with pytest.raises(BenchError, match=match) as exc:
        read_records(path)
    assert "broken.json" in str(exc.value)


def test_malformed_jsonl_names_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(BenchError, match=r"broken.jsonl: line 2 \(record 1\)"):
        read_records(path)


def test_missing_file_names_file(tmp_path):
    with pytest.raises(BenchError, match="nothere.json"):
        read_records(tmp_path / "nothere.json")
    with pytest.raises(BenchError, match=r"counterfact/counterfact-edit.json"):
        load_split("counterfact", "eval", tmp_path)
    with pytest.raises(BenchError, match="recent_test.json.*wiki_recent/recent_test.json"):
        load_split("recent", "eval", tmp_path)
    with pytest.raises(BenchError, match="no built-in sample"):
        load_split("recent", "eval", None)


def test_malformed_data_file_via_registry(tmp_path):
    (tmp_path / "zsre").mkdir()
    (tmp_path / "zsre" / "zsre_mend_train-1k.json").write_text("not json")
    with pytest.raises(BenchError, match="zsre_mend_train-1k.json"):
        load_split("zsre", "eval", tmp_path)
    status = task_status("zsre", tmp_path)
    assert status["found"] and "zsre_mend_train-1k.json" in status["error"]


# ---------------------------------------------------------------------------------- splits


def test_sample_splits_disjoint_and_recast_uses_other_records():
    cf_train, cf_eval = load_split("counterfact", "train", None), load_split("counterfact", "eval", None)
    recast = load_split("recast", "eval", None)
    assert (len(cf_train.cases), len(cf_eval.cases), len(recast.cases)) == (4, 4, 4)
    underlying = [{c.case_id.removeprefix("recast-") for c in s.cases} for s in (cf_train, cf_eval, recast)]
    assert not (underlying[0] & underlying[1]) and not (underlying[1] & underlying[2])
    assert not (underlying[0] & underlying[2])
    zs_train, zs_eval = load_split("zsre", "train", None), load_split("zsre", "eval", None)
    assert not set(ids(zs_train)) & set(ids(zs_eval))
    assert len(load_split("zsre", "eval", None, holdout=True).cases) == 12


def test_hash_split_deterministic_and_disjoint(monkeypatch):
    card = get_card("zsre")
    # 50/50 buckets so the six fixture records land on both sides
    rules = {"train": SplitRule(file="data", salt="t", buckets=2, keep=(0, 1)),
             "eval": SplitRule(file="data", salt="t", buckets=2, keep=(1, 2))}
    monkeypatch.setitem(registry._CARDS, "zsre", replace(card, splits=rules))
    train, ev = load_split("zsre", "train", FIXTURES), load_split("zsre", "eval", FIXTURES)
    all_ids = {f"zsre-{i}" for i in range(6)}
    covered = set(ids(train)) | set(ids(ev)) | {f"zsre-{s.index}" for s in train.skipped + ev.skipped}
    assert covered == all_ids and not set(ids(train)) & set(ids(ev))
    assert len(train.skipped) + len(ev.skipped) == 3  # each skip reported once
    assert registry.hash_bucket("t", "zsre-0", 2) == registry.hash_bucket("t", "zsre-0", 2)
    # sha256 of "salt:case_id", so stable across processes (unlike hash())
    digest = hashlib.sha256(b"zsre-split-v1:zsre-0").hexdigest()
    assert registry.hash_bucket("zsre-split-v1", "zsre-0", 100) == int(digest, 16) % 100


def test_load_split_returns_fresh_lists():
    a = load_split("counterfact", "eval", None)
    a.cases.clear()
    assert len(load_split("counterfact", "eval", None).cases) == 4


# ---------------------------------------------------------------------------------- recast


def test_fill_blank_rule():
    assert fill_blank("The mother tongue of Danielle Darrieux is") == \
        'Fill in the blank: "The mother tongue of Danielle Darrieux is ___"\nAnswer:'


def test_recast_cases_from_sample():
    recast = load_split("recast", "eval", None)
    raw = json.loads((REPO / "tasks" / "samples" / "counterfact.json").read_text())[8]
    case = recast.cases[0]
    assert case.case_id == f"recast-{raw['case_id']}"
    assert case.prompt == fill_blank(raw["prompt"]) and case.target_new == raw["target_new"]
    assert case.rephrase_prompts == (fill_blank(raw["rephrase_prompt"]),)
    assert case.locality == (PromptAnswer(fill_blank(raw["locality_prompt"]), raw["locality_ground_truth"]),)
    assert case.subject in case.prompt


def test_knowedit_filters():
    assert first_alias("a") == "a" and first_alias(["b", "c"]) == "b" and first_alias([["d", "e"], ["f"]]) == "d"
    assert probes({"X": [{"prompt": ["p"], "ground_truth": [["a"]]}]}) == [{"prompt": "p", "answer": "a"}]
    with pytest.raises(ValueError):
        first_alias([])


# ---------------------------------------------------------------------------------- instructions


def test_wrap_case_touches_prompt_rephrase_portability_only():
    card = get_card("recent")
    case = load_split("recent", "eval", FIXTURES).cases[0]
    desc = pick_description(card, "seen", case.case_id, seed=0)
    w = wrap_case(case, card, desc)
    assert w.prompt == f"Task: recent\nDescription: {desc}\nInput: {case.prompt}"
    assert w.rephrase_prompts == tuple(wrap_prompt(card, desc, p) for p in case.rephrase_prompts)
    assert [p.prompt for p in w.portability] == [wrap_prompt(card, desc, p.prompt) for p in case.portability]
    assert [p.answer for p in w.portability] == [p.answer for p in case.portability]
    assert w.locality == case.locality
    assert (w.subject, w.target_new, w.ground_truth, w.case_id) == \
        (case.subject, case.target_new, case.ground_truth, case.case_id)
    assert w.instruction == desc and case.instruction is None and w.subject in w.prompt


def test_pick_description_deterministic_and_pools():
    card = get_card("counterfact")
    seen, unseen = set(card.instructions.pool(True)), set(card.instructions.pool(False))
    picks = {pick_description(card, "seen", str(i), 0) for i in range(200)}
    assert picks <= seen and len(picks) > 3
    assert pick_description(card, "unseen", "x", 1) in unseen
    assert pick_description(card, "seen", "k", 7) == pick_description(card, "seen", "k", 7)
    with pytest.raises(BenchError, match="instruction mode"):
        pick_description(card, "all", "k", 0)


# ---------------------------------------------------------------------------------- status


def test_task_status_sample_and_missing(tmp_path):
    s = task_status("counterfact", None)
    assert s["found"] and s["counts"] == {"train": 4, "eval": 4} and s["skipped"] == {"train": 0, "eval": 0}
    assert s["instructions"] == {"seen": 9, "unseen": 1} and "counterfact" in s["metrics"]
    assert task_status("recast", None)["counts"] == {"train": None, "eval": 4}
    assert task_status("zsre", None)["holdout_eval"] == 12
    missing = task_status("counterfact", tmp_path)
    assert not missing["found"] and "counterfact" in missing["missing"]
    assert missing["counts"] == {"train": None, "eval": None}
    assert not task_status("convsent", None)["found"]
    fx = task_status("zsre", FIXTURES)
    assert fx["found"] and fx["source"] == ["zsre/zsre_mend_train-1k.json"]


def test_data_file_hashes():
    h = data_file_hashes("counterfact", FIXTURES)
    assert set(h) == {"counterfact/counterfact-train.json", "counterfact/counterfact-edit.json"}
    assert all(len(v) == 64 for v in h.values())
    assert set(data_file_hashes("counterfact", FIXTURES, "eval")) == {"counterfact/counterfact-edit.json"}
    assert set(data_file_hashes("recast", None)) == {"sample/counterfact.json"}


# ---------------------------------------------------------------------------------- real data


@pytest.mark.skipif(not (REAL_DATA / "counterfact").is_dir(), reason="no real data directory")
def test_real_data_counts():
    cf_train = load_split("counterfact", "train", REAL_DATA)
    cf_eval = load_split("counterfact", "eval", REAL_DATA)
    recast = load_split("recast", "eval", REAL_DATA)
    assert (len(cf_train.cases), len(cf_eval.cases), len(recast.cases)) == (10000, 5000, 5000)
    cf_ids = [set(ids(s)) for s in (cf_train, cf_eval)]
    recast_ids = {i.removeprefix("recast-") for i in ids(recast)}
    assert not cf_ids[0] & cf_ids[1] and not cf_ids[1] & recast_ids and not cf_ids[0] & recast_ids
    zs_train, zs_eval = load_split("zsre", "train", REAL_DATA), load_split("zsre", "eval", REAL_DATA)
    assert len(zs_train.cases) + len(zs_eval.cases) == 998
    assert not set(ids(zs_train)) & set(ids(zs_eval))
    zs_all = load_split("zsre", "eval", REAL_DATA, holdout=True)
    assert len(zs_all.cases) == 998 and sorted(s.index for s in zs_all.skipped) == [534, 723]
    assert all(s.reason for s in zs_all.skipped)
