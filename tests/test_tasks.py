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
from tasks.card import SplitRule, merge_options, parse_card
from tasks.fields import fill_blank, first_alias, is_blank, probes
from tasks.instructions import pick_description, wrap_case, wrap_prompt
from tasks.loaders import get_loader, read_records
from tasks.registry import (data_file_hashes, get_card, list_cards, load_split, resolve_data_dir,
                            task_status)

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "data"
REAL_DATA = Path(os.environ.get("BENCH_DATA") or REPO.parent / "shared" / "data")
ALL_TASKS = ["convsent", "counterfact", "recast", "recent", "wikicounterfact", "zsre", "zsre_knowedit"]


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
        load_split("zsre_knowedit", "train", None)
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
    # the published form, as EasyEdit and MEND score it; stripping is the card option
    assert c.locality == (PromptAnswer("nq question: who wrote the odyssey", "Homer"),)
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


def assert_recast_disjoint(train, *evals) -> None:
    """No case id and no underlying CounterFact record is shared between recast's train split and
    `evals`: neither the record id nor the edit (subject + target_new, which also rules out the
    same subject + prompt + target_new)."""
    def record_id(case_id: str) -> str:
        return case_id.removeprefix("recast-train-").removeprefix("recast-")

    def edits(split):
        return {(c.subject, c.target_new) for c in split.cases}

    assert train.cases and all(c.case_id.startswith("recast-train-") for c in train.cases)
    for ev in evals:
        assert ev.cases and not set(ids(train)) & set(ids(ev))
        assert not {record_id(i) for i in ids(train)} & {record_id(i) for i in ids(ev)}
        assert not edits(train) & edits(ev)


def test_recast_train_split_disjoint_from_eval_on_fixture_data(tmp_path):
    """recast trains on counterfact-train.json recast, never on an edit that recast or counterfact
    evaluates: disjoint by case id, by record id and by edit, on the fixture records (the eval
    slice starts at record 5000, so the fixture's edit records are placed there) and on the
    built-in sample."""
    train = json.loads((FIXTURES / "counterfact" / "counterfact-train.json").read_text())
    edit = json.loads((FIXTURES / "counterfact" / "counterfact-edit.json").read_text())
    repeat = {**train[0], "case_id": 777}  # train record 101's edit again, under another id
    filler = [{**edit[0], "case_id": 300000 + i, "subject": f"Filler {i}", "prompt": f"Filler {i} is in"}
              for i in range(5000)]
    write_data(tmp_path, "counterfact/counterfact-train.json", train)
    write_data(tmp_path, "counterfact/counterfact-edit.json", filler + edit + [repeat])
    recast_train = load_split("recast", "train", tmp_path)
    recast_eval = load_split("recast", "eval", tmp_path)
    assert ids(recast_train) == ["recast-train-104"]  # 102, 103 broken; 101 repeated by eval record 777
    assert reasons(recast_train) == {0: "same subject/target_new as record 5006 of counterfact/counterfact-edit.json",
                                     1: "empty target_new", 2: "missing field 'locality_ground_truth'"}
    assert ids(recast_eval) == [f"recast-{r['case_id']}" for r in edit] + ["recast-777"]
    assert_recast_disjoint(recast_train, recast_eval, load_split("counterfact", "eval", tmp_path))
    # the train cases are the counterfact train records, recast by the same rule as eval
    (case,) = recast_train.cases
    cf = {c.case_id: c for c in load_split("counterfact", "train", tmp_path).cases}["104"]
    assert (case.prompt, case.rephrase_prompts, case.locality[0].prompt) == \
        (fill_blank(cf.prompt), (fill_blank(cf.rephrase_prompts[0]),), fill_blank(cf.locality[0].prompt))
    assert case.task == "recast" and case.target_new == cf.target_new
    assert set(data_file_hashes("recast", tmp_path, "train")) == {
        "counterfact/counterfact-train.json", "counterfact/counterfact-edit.json"}  # eval decides the skips
    # the built-in sample: recast trains on counterfact's sample train records
    sample_train, sample_eval = load_split("recast", "train", None), load_split("recast", "eval", None)
    assert ids(sample_train) == [f"recast-train-{900000 + i}" for i in range(4)]
    assert_recast_disjoint(sample_train, sample_eval, load_split("counterfact", "eval", None))


def test_disjoint_rule_is_checked(tmp_path):
    text = (REPO / "tasks" / "cards" / "recast.yaml").read_text()
    bad = tmp_path / "recast.yaml"
    bad.write_text(text.replace("by: [subject, target_new]}}\n  eval", "by: [colour]}}\n  eval"))
    with pytest.raises(BenchError, match="by must be a non-empty list of case fields"):
        parse_card(bad)
    bad.write_text(text.replace("disjoint: {file: edit, all: true,", "disjoint: {file: nope, all: true,"))
    with pytest.raises(BenchError, match="file 'nope' is not one of"):
        parse_card(bad)
    assert parse_card(REPO / "tasks" / "cards" / "recast.yaml").splits["train"].avoid_by == ("subject", "target_new")


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
    assert task_status("recast", None)["counts"] == {"train": 4, "eval": 4}
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
    # recast's train split: counterfact-train.json recast, without the 29 records that repeat an
    # edit (subject, target_new) of counterfact-edit.json (12 of recast's eval, 17 of counterfact's)
    recast_train = load_split("recast", "train", REAL_DATA)
    assert (len(recast_train.cases), len(recast_train.skipped)) == (9971, 29)
    assert_recast_disjoint(recast_train, recast, cf_eval)
    zs_train, zs_eval = load_split("zsre", "train", REAL_DATA), load_split("zsre", "eval", REAL_DATA)
    assert len(zs_train.cases) + len(zs_eval.cases) == 998
    assert not set(ids(zs_train)) & set(ids(zs_eval))
    zs_all = load_split("zsre", "eval", REAL_DATA, holdout=True)
    assert len(zs_all.cases) == 998 and sorted(s.index for s in zs_all.skipped) == [534, 723]
    assert all(s.reason for s in zs_all.skipped)


# ---------------------------------------------------------------------------------- blank values

CF_RECORD = {"case_id": 1, "prompt": "The capital of Norway is", "subject": "Norway",
             "target_new": "Bergen", "ground_truth": "Oslo",
             "rephrase_prompt": "Norway's seat of government is in",
             "locality_prompt": "The capital of Sweden is", "locality_ground_truth": "Stockholm"}
ZSRE_RECORD = {"subject": "Mount Fuji", "src": "In which country is Mount Fuji?",
               "rephrase": "Mount Fuji is located in which country?", "alt": "Chile",
               "answers": ["Japan"], "loc": "nq question: who wrote the odyssey", "loc_ans": "Homer"}
RECENT_RECORD = {"subject": "Quill Labs", "prompt": "The founder of Quill Labs is", "target_new": "Ana Ruiz"}
# only invisible characters: whitespace, zero-width space, BOM, word joiner, soft hyphen,
# right-to-left mark, a control character, a variation selector, a Hangul filler
BLANKS = ["", " ", "\t\n", "\u200b", "\ufeff", " \u2060 ", "\u00ad", "\u200f", "\x00", "\ufe0f", "\u3164",
          "\u3000", "\u200b\u200c\u200d"]


def write_data(root: Path, rel: str, records: list) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records))
    return path


def test_is_blank():
    assert all(is_blank(b) for b in BLANKS)
    assert not any(is_blank(t) for t in ("a", " a ", "\u200bx", "0", "\u00e9", "\u4e2d", "-"))


@pytest.mark.parametrize("blank", BLANKS)
@pytest.mark.parametrize("field", ["target_new", "prompt", "subject"])
def test_invisible_only_text_is_empty(tmp_path, field, blank):
    write_data(tmp_path, "counterfact/counterfact-train.json",
               [CF_RECORD, {**CF_RECORD, "case_id": 2, field: blank}])
    split = load_split("counterfact", "train", tmp_path)
    assert ids(split) == ["1"] and reasons(split) == {1: f"empty {field}"}


@pytest.mark.parametrize("field, reason", [
    ("rephrase_prompt", "empty rephrase prompt"),
    ("locality_prompt", "empty locality prompt"),
    ("locality_ground_truth", "empty locality answer"),
])
def test_invisible_only_probe_text_is_empty(tmp_path, field, reason):
    write_data(tmp_path, "counterfact/counterfact-train.json",
               [{**CF_RECORD, "case_id": i, field: blank} for i, blank in enumerate(BLANKS)])
    split = load_split("counterfact", "train", tmp_path)
    assert not split.cases and set(reasons(split).values()) == {reason}
    assert len(split.skipped) == len(BLANKS)


def test_blank_portability_is_empty(tmp_path):
    probe = lambda p, a: {"Reasoning": [{"prompt": p, "ground_truth": [[a]]}]}  # noqa: E731
    write_data(tmp_path, "recent/recent_test.json", [
        RECENT_RECORD,
        {**RECENT_RECORD, "portability": probe("\u200b", "x")},
        {**RECENT_RECORD, "portability": probe("Who founded Quill Labs?", " \ufeff")},
        {**RECENT_RECORD, "locality": {"Forgetfulness": [{"prompt": "\u2060", "ground_truth": "x"}]}},
        {**RECENT_RECORD, "rephrase": "\u200b"},
    ])
    split = load_split("recent", "eval", tmp_path)
    assert ids(split) == ["recent-test-0"]
    assert reasons(split) == {1: "empty portability prompt", 2: "empty portability answer",
                              3: "empty locality prompt", 4: "empty rephrase prompt"}


@pytest.mark.parametrize("blank", ["", " ", "\u200b"])
def test_blank_ground_truth_is_a_counted_skip(tmp_path, blank):
    write_data(tmp_path, "counterfact/counterfact-train.json",
               [CF_RECORD, {**CF_RECORD, "case_id": 2, "ground_truth": blank}])
    cf = load_split("counterfact", "train", tmp_path)
    assert ids(cf) == ["1"] and reasons(cf) == {1: "empty ground_truth"}
    write_data(tmp_path, "counterfact/counterfact-edit.json",
               [{**CF_RECORD, "case_id": 3, "ground_truth": blank}, CF_RECORD])
    assert reasons(load_split("counterfact", "eval", tmp_path)) == {0: "empty ground_truth"}
    write_data(tmp_path, "zsre/zsre_mend_train-1k.json", [
        ZSRE_RECORD, {**ZSRE_RECORD, "answers": [blank]}, {**ZSRE_RECORD, "answers": [blank, "Japan"]},
        {**ZSRE_RECORD, "answers": [None]}])
    zs = load_split("zsre", "eval", tmp_path, holdout=True)
    assert ids(zs) == ["zsre-0"]
    assert reasons(zs) == {1: "empty ground_truth", 2: "empty ground_truth", 3: "answers[0] is null"}


def test_recent_ground_truth_optional_but_not_blank(tmp_path):
    write_data(tmp_path, "recent/recent_test.json", [
        RECENT_RECORD, {**RECENT_RECORD, "ground_truth": None}, {**RECENT_RECORD, "ground_truth": ["Ana"]},
        {**RECENT_RECORD, "ground_truth": ""}, {**RECENT_RECORD, "ground_truth": [""]},
        {**RECENT_RECORD, "ground_truth": [["\u200b", "alias"]]},
    ])
    split = load_split("recent", "eval", tmp_path)
    assert [c.ground_truth for c in split.cases] == [None, None, "Ana"]  # absent: no ground truth
    assert reasons(split) == {3: "empty ground_truth", 4: "empty ground_truth", 5: "empty ground_truth"}


def test_convsent_blank_sides(tmp_path):
    write_data(tmp_path, "convsent/blender_train.json", [
        {"ent": "tea", "pos": ["I love tea."], "neg": ["Tea is dull."]},
        {"ent": "tea", "pos": ["\u200b"], "neg": ["Tea is dull."]},
        {"ent": "tea", "pos": ["I love tea."], "neg": [" "]},
        {"ent": "\u200b", "pos": ["I love it."], "neg": ["No."]},
    ])
    split = load_split("convsent", "train", tmp_path)
    assert reasons(split) == {1: "empty target_new", 2: "empty ground_truth", 3: "empty subject"}


# ---------------------------------------------------------------------------------- file reading


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_utf8_bom_accepted(tmp_path, suffix):
    recs = [CF_RECORD, {**CF_RECORD, "case_id": 2, "subject": "Noreg", "prompt": "Noreg's capital is"}]
    body = json.dumps(recs) if suffix == ".json" else "\n".join(json.dumps(r) for r in recs)
    path = tmp_path / f"bom{suffix}"
    path.write_bytes(b"\xef\xbb\xbf" + body.encode("utf-8"))
    assert read_records(path) == recs
    # through the registry too
    (tmp_path / "counterfact").mkdir()
    (tmp_path / "counterfact" / "counterfact-train.json").write_bytes(
        b"\xef\xbb\xbf" + json.dumps(recs).encode("utf-8"))
    assert ids(load_split("counterfact", "train", tmp_path)) == ["1", "2"]


def test_jsonl_line_separators_inside_strings(tmp_path):
    # JSON allows U+2028 and U+0085 unescaped in strings; only "\n" ends a .jsonl record
    recs = [{**CF_RECORD, "ground_truth": "Os\u2028lo\x85"}, CF_RECORD]
    path = tmp_path / "seps.jsonl"
    path.write_text("\r\n".join(json.dumps(r, ensure_ascii=False) for r in recs), encoding="utf-8")
    assert read_records(path) == recs


@pytest.mark.parametrize("suffix, content", [(".json", "[]"), (".json", " [ ]\n"), (".jsonl", ""),
                                             (".jsonl", "\n \n")])
def test_data_file_without_records_names_file(tmp_path, suffix, content):
    path = tmp_path / f"empty{suffix}"
    path.write_text(content)
    with pytest.raises(BenchError, match=rf"data file .*empty{suffix} holds no records"):
        read_records(path)


def test_empty_data_file_via_registry(tmp_path):
    write_data(tmp_path, "zsre/zsre_mend_train-1k.json", [])
    with pytest.raises(BenchError, match=r"zsre_mend_train-1k.json holds no records"):
        load_split("zsre", "eval", tmp_path)
    write_data(tmp_path, "convsent/blender_train.json", [])
    with pytest.raises(BenchError, match=r"blender_train.json holds no records"):
        load_split("convsent", "train", tmp_path)


def test_directory_where_a_file_is_expected(tmp_path):
    (tmp_path / "counterfact" / "counterfact-edit.json").mkdir(parents=True)
    with pytest.raises(BenchError, match=r"counterfact-edit.json is a directory, not a file"):
        load_split("counterfact", "eval", tmp_path)
    with pytest.raises(BenchError, match=r"counterfact-edit.json is a directory, not a file"):
        read_records(tmp_path / "counterfact" / "counterfact-edit.json")
    # a later candidate that is a real file still wins over an earlier directory
    (tmp_path / "recent" / "recent_test.json").mkdir(parents=True)
    write_data(tmp_path, "wiki_recent/recent_test.json", [RECENT_RECORD])
    assert ids(load_split("recent", "eval", tmp_path)) == ["recent-test-0"]


def test_data_dir_that_is_a_file(tmp_path, monkeypatch):
    monkeypatch.delenv("BENCH_DATA", raising=False)
    a_file = tmp_path / "data.json"
    a_file.write_text("[]")
    with pytest.raises(BenchError, match=r"--data-dir is not a directory: .*data.json"):
        resolve_data_dir(str(a_file))
    monkeypatch.setenv("BENCH_DATA", str(a_file))
    with pytest.raises(BenchError, match=r"\$BENCH_DATA is not a directory: .*data.json"):
        resolve_data_dir(None)


# ---------------------------------------------------------------------------------- card options


def test_zsre_locality_prefix_option(tmp_path):
    write_data(tmp_path, "zsre/zsre_mend_train-1k.json", [ZSRE_RECORD])
    default = load_split("zsre", "eval", tmp_path, holdout=True).cases[0]
    assert default.locality[0].prompt.startswith("nq question: ")
    stripped = load_split("zsre", "eval", tmp_path, holdout=True,
                          options={"strip_locality_prefix": "true"}).cases[0]
    assert stripped.locality == (PromptAnswer("who wrote the odyssey", "Homer"),)
    assert not stripped.locality[0].prompt.startswith("nq question")
    # cached per options: the default is still the published form
    again = load_split("zsre", "eval", tmp_path, holdout=True, options={"strip_locality_prefix": False})
    assert again.cases[0].locality == default.locality
    assert get_card("zsre").options == {"strip_locality_prefix": False}


@pytest.mark.parametrize("options, match", [
    ({"strip_prefix": "true"}, r"task 'zsre': unknown option 'strip_prefix'; known: strip_locality_prefix"),
    ({"strip_locality_prefix": "maybe"}, r"task 'zsre': option strip_locality_prefix: expected true/false, got 'maybe'"),
    ({"strip_locality_prefix": 1}, r"option strip_locality_prefix: expected true/false, got 1"),
])
def test_bad_options(tmp_path, options, match):
    write_data(tmp_path, "zsre/zsre_mend_train-1k.json", [ZSRE_RECORD])
    with pytest.raises(BenchError, match=match):
        load_split("zsre", "eval", tmp_path, holdout=True, options=options)
    with pytest.raises(BenchError, match="known: none"):
        load_split("counterfact", "eval", None, options={"x": "1"})


def test_option_coercion_follows_the_default():
    card = replace(get_card("zsre"), options={"flag": False, "n": 3, "x": 0.5, "s": "a", "l": [1]})
    got = merge_options(card, {"flag": " Yes ", "n": "7", "x": "2", "s": "b", "l": "kept"})
    assert got == {"flag": True, "n": 7, "x": 2.0, "s": "b", "l": "kept"}
    assert merge_options(card, {"flag": "off", "n": 4, "x": 1})["flag"] is False
    assert merge_options(card, {"s": 3})["s"] == "3"  # coerced as a hyperparameter would be
    for bad in ({"n": "1.5"}, {"n": True}, {"x": "abc"}, {"flag": "maybe"}):
        with pytest.raises(BenchError, match=r"task 'zsre': option \w+: expected"):
            merge_options(card, bad)


def test_convsent_option_override(tmp_path):
    write_data(tmp_path, "convsent/blender_train.json",
               [{"ent": "tea", "pos": ["I love tea."], "neg": ["Tea is dull."]}])
    assert load_split("convsent", "train", tmp_path).cases[0].target_new == "I love tea."
    neg = load_split("convsent", "train", tmp_path, options={"target_sentiment": "negative"})
    assert neg.cases[0].target_new == "Tea is dull."
    with pytest.raises(BenchError, match="target_sentiment must be positive or negative"):
        load_split("convsent", "train", tmp_path, options={"target_sentiment": "meh"})


def test_bad_card_template_and_options_rejected(tmp_path):
    text = (REPO / "tasks" / "cards" / "zsre.yaml").read_text()
    bad = tmp_path / "zsre.yaml"
    bad.write_text(text.replace('prompt: "{{ src }}"', 'prompt: "{{ src "'))
    with pytest.raises(BenchError, match=r"fields.prompt is not a valid template"):
        parse_card(bad)
    bad.write_text(text.replace("strip_locality_prefix: false", "- strip_locality_prefix"))
    with pytest.raises(BenchError, match="zsre.yaml"):
        parse_card(bad)
    bad.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))  # a BOM is fine
    assert parse_card(bad).options == {"strip_locality_prefix": False}


def test_blank_prompts_stay_blank_through_filters(tmp_path):
    # recast wraps prompts in fill_blank: a blank one must still be reported, not become ' ___'
    edit = [{**CF_RECORD, "case_id": 100 + i} for i in range(5000)]
    edit += [{**CF_RECORD, "case_id": 1, "rephrase_prompt": "\u200b"},
             {**CF_RECORD, "case_id": 2, "locality_prompt": " "}, {**CF_RECORD, "case_id": 3}]
    write_data(tmp_path, "counterfact/counterfact-edit.json", edit)
    recast = load_split("recast", "eval", tmp_path, holdout=True)
    assert ids(recast) == ["recast-3"]
    assert reasons(recast) == {5000: "empty rephrase prompt", 5001: "empty locality prompt"}
    # zsre: nothing after the "nq question: " prefix is empty in either form
    write_data(tmp_path, "zsre/zsre_mend_train-1k.json", [
        ZSRE_RECORD, {**ZSRE_RECORD, "loc": "nq question: "}, {**ZSRE_RECORD, "loc": "nq question: \u200b"}])
    for strip in ("false", "true"):
        zs = load_split("zsre", "eval", tmp_path, holdout=True, options={"strip_locality_prefix": strip})
        assert ids(zs) == ["zsre-0"]
        assert reasons(zs) == {1: "empty locality prompt", 2: "empty locality prompt"}
