"""The answer cache (bench.core.answer_cache): the unedited model's answers kept across runs give
the same records as generating them, are found only under the same model, cases and settings,
and a cache that cannot be used costs a warning, never the run."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import replace
from pathlib import Path

import pytest

import bench.core.answer_cache as answer_cache
import bench.evaluation
from bench.core.answer_cache import AnswerCache
from bench.core.cases import EditCase, PromptAnswer
from bench.core.errors import BenchError
from bench.core.generation import Generation, StopRules
from bench.core.tiny import tiny_model
from bench.core.wild import WildSettings
from bench.runner import execute
from bench.session import RunOptions
from tests.helpers import FIXTURE_DATA, without_time

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(tmp_path: Path, name: str, log=lambda s: None, **changes) -> list[dict]:
    opts = dict(editor="ft", tasks=["counterfact", "zsre"], model="tiny", device="cpu", limit=3,
                data_dir=str(FIXTURE_DATA), output_dir=str(tmp_path / "runs"), batch_size=4,
                hparams={"steps": "2", "layers": "1"}, run_name=name)
    opts.update(changes)
    path = execute(RunOptions(**opts), log=log)
    return [json.loads(line) for line in (path / "cases.jsonl").read_text().splitlines()]


def _without_source(records: list[dict]) -> list[dict]:
    """Records as compared across runs: no timings, and not where the unedited answers came from."""
    return sorted((without_time(r) for r in records), key=lambda r: (r["task"], r["case_id"]))


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "cache"
    monkeypatch.setenv("BENCH_CACHE", str(path))
    return path


@pytest.fixture
def unedited_generations(monkeypatch) -> list[int]:
    """How many cases' answers each call that generates unedited answers decoded."""
    calls: list[int] = []
    real = bench.evaluation.generate_cases

    def counting(model, tokenizer, cases, settings, batch_size=32, earlier=None, **kw):
        if earlier is None:
            calls.append(len(cases))
        return real(model, tokenizer, cases, settings, batch_size, earlier=earlier, **kw)

    monkeypatch.setattr(bench.evaluation, "generate_cases", counting)
    return calls


@pytest.mark.parametrize("mode", ["single", "sequential"])
def test_a_second_run_reads_the_unedited_answers_and_records_the_same(tmp_path, tiny_load, fresh_cache,
                                                                        unedited_generations, mode):
    first = _run(tmp_path, "first", mode=mode)
    n = len(first)
    assert n >= 4 and sum(unedited_generations) == n
    assert {r["wild"]["unedited_answers"] for r in first} == {"generated"}
    with sqlite3.connect(fresh_cache / answer_cache.FILE) as db:
        assert db.execute("SELECT COUNT(*) FROM answers").fetchone()[0] == n
    unedited_generations.clear()
    second = _run(tmp_path, "second", mode=mode)
    assert unedited_generations == []  # nothing generated on the unedited model
    assert {r["wild"]["unedited_answers"] for r in second} == {"cached"}
    summary = json.loads(next((tmp_path / "runs").glob("second-*/summary.json")).read_text())
    assert sum(i["wild"]["unedited_answers_cached"] for i in summary["task_info"].values()) == n
    assert _without_source(second) == _without_source(first)
    fresh = _run(tmp_path, "fresh", mode=mode, answer_cache=False)
    assert sum(unedited_generations) == n
    assert {r["wild"]["unedited_answers"] for r in fresh} == {"generated"}
    assert _without_source(fresh) == _without_source(first)


def _case(**changes) -> EditCase:
    case = EditCase(case_id="1", task="zsre", prompt="Who wrote Hamlet?", subject="Hamlet", target_new="Marlowe",
                    ground_truth="Shakespeare", rephrase_prompts=("Hamlet was written by whom?",),
                    locality=(PromptAnswer("Where is Paris?", "France"),))
    return replace(case, **changes)


def test_the_key_changes_with_everything_the_answers_depend_on(tmp_path, monkeypatch):
    lm = tiny_model("llama")
    cache = AnswerCache(tmp_path / "a.sqlite")
    settings = WildSettings(rules=StopRules(max_new_tokens=8, stop_strings=(". ",)))
    base = cache.key(lm, _case(), settings)
    assert cache.key(lm, _case(), WildSettings(rules=StopRules(8, (". ",)))) == base
    # the gold answers do not change what the unedited model says
    assert cache.key(lm, _case(target_new="Bacon", locality=(PromptAnswer("Where is Paris?", "Europe"),)),
                     settings) == base
    other = [
        cache.key(tiny_model("llama", seed=1), _case(), settings),
        cache.key(tiny_model("gpt2"), _case(), settings),
        cache.key(lm, _case(prompt="Who wrote Macbeth?"), settings),
        cache.key(lm, _case(rephrase_prompts=()), settings),
        cache.key(lm, _case(locality=(PromptAnswer("Where is Rome?", "Italy"),)), settings),
        cache.key(lm, _case(), WildSettings(rules=StopRules(9, (". ",)))),
        cache.key(lm, _case(), WildSettings(rules=StopRules(8, ()))),
        cache.key(lm, _case(), WildSettings(rules=StopRules(8, (". ",), at_newline=False))),
        cache.key(lm, _case(), WildSettings(rules=StopRules(8, (". ",)), fluency_tokens=20)),
        cache.key(lm, _case(), WildSettings(rules=StopRules(8, (". ",)), decode_batch=4)),
    ]
    monkeypatch.setattr(answer_cache, "code_fingerprint", lambda: "other code")
    other.append(cache.key(lm, _case(), settings))
    assert len({base, *other}) == len(other) + 1


def test_entries_round_trip_and_unreadable_ones_are_generated_again(tmp_path):
    lm = tiny_model("llama")
    cache = AnswerCache(tmp_path / "a.sqlite")
    settings = WildSettings(rules=StopRules(max_new_tokens=8))
    gens = [Generation("Marlowe", "newline", 2, (5, 6)), Generation("", "eos", 0, ()),
            Generation("France", "max_new_tokens", 8, tuple(range(8)))]
    assert cache.get(lm, _case(), settings) is None
    cache.put(lm, _case(), settings, gens, None)
    assert cache.get(lm, _case(), settings) == (gens, None)
    assert AnswerCache(tmp_path / "a.sqlite").get(lm, _case(), settings) == (gens, None)  # another process
    cache.put(lm, _case(), settings, gens[:2], None)  # not one answer per probe: not used
    assert cache.get(lm, _case(), settings) is None
    with sqlite3.connect(tmp_path / "a.sqlite") as db:
        db.execute("UPDATE answers SET value = '{not json'")
    assert cache.get(lm, _case(), settings) is None
    assert cache.problem is None


def test_a_cache_file_that_is_not_a_database_costs_one_warning_not_the_run(tmp_path, tiny_load, fresh_cache):
    fresh_cache.mkdir()
    (fresh_cache / answer_cache.FILE).write_text("this is not a database\n" * 100)
    lines: list[str] = []
    records = _run(tmp_path, "broken", log=lines.append)
    warnings = [line for line in lines if "answer cache" in line]
    assert len(warnings) == 1 and "cannot be used" in warnings[0]
    assert len(records) >= 4 and {r["wild"]["unedited_answers"] for r in records} == {"generated"}
    assert all(r["error"] is None for r in records)


def test_no_answer_cache_needs_the_wild_protocol(tmp_path, tiny_load):
    with pytest.raises(BenchError, match="--no-answer-cache only appl"):
        _run(tmp_path, "x", protocols=["teacher_forced"], answer_cache=False)


def test_the_reference_paths_neither_read_nor_fill_the_cache(tmp_path, tiny_load, fresh_cache):
    """Benchmarks and identity tests compare what the reference paths generate: nothing cached."""
    from bench.core.decoding import reference_paths

    with reference_paths():
        first = _run(tmp_path, "reference")
    assert {r["wild"]["unedited_answers"] for r in first} == {"generated"}
    assert not (fresh_cache / answer_cache.FILE).exists() or \
        sqlite3.connect(fresh_cache / answer_cache.FILE).execute("SELECT COUNT(*) FROM answers").fetchone()[0] == 0
    _run(tmp_path, "floor")  # fills it
    with reference_paths():
        again = _run(tmp_path, "reference-again")
    assert {r["wild"]["unedited_answers"] for r in again} == {"generated"}
