"""IKE (in-context knowledge editing) and ICE (k = 0) on tiny models: hyperparameter checks,
retrieval, the context's format, exclusion of the case itself, exact restore, the view of the
probes, the sequential memory (accumulation, overflow, saved state, reattach) and runs through
the runner, single and sequential (killed and resumed)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

import editors
from bench.core.cases import EditCase, PromptAnswer
from bench.core.errors import BenchError
from bench.core.models import model_from_config
from bench.core.probes import evaluate_cases
from bench.core.snapshot import model_fingerprint
from bench.core.tiny import tiny_config, tiny_tokenizer
from bench.runner import execute, resume
from bench.session import RunOptions, build_editor, hparams_source
from editors.base import CombinedHandle, EditContext, TrainingData
from editors.ike import IKE, RETRIEVERS, IkeHparams
from editors.ike.demos import quotas
from editors.ike.retrievers import TfidfRetriever
from tests.helpers import FIXTURE_DATA, without_time
from tests.helpers import jsonl_lines as lines_of

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def case(cid: str, subject: str, prompt: str, target: str, task: str = "t", rephrase=(), locality=(),
         portability=()) -> EditCase:
    return EditCase(case_id=cid, task=task, prompt=prompt, subject=subject, target_new=target,
                    rephrase_prompts=tuple(rephrase), locality=tuple(PromptAnswer(p, a) for p, a in locality),
                    portability=tuple(PromptAnswer(p, a) for p, a in portability))


TRAIN = [
    case("t0", "Eiffel Tower", "The Eiffel Tower is located in the country of", "Italy",
         rephrase=["Where is the Eiffel Tower? It is in"], locality=[("The capital of France is", "Paris")]),
    case("t1", "Michael Jordan", "Michael Jordan plays basketball for", "Boston",
         rephrase=["Michael Jordan is a player of"], locality=[("Barack Obama was born in", "Hawaii")]),
    case("t2", "Danielle Darrieux", "The mother tongue of Danielle Darrieux is", "English",
         rephrase=["Danielle Darrieux speaks"], locality=[("The mother tongue of Toko Yasuda is", "Japanese")]),
    case("t3", "Toko Yasuda", "Toko Yasuda plays the", "piano",
         rephrase=["The instrument Toko Yasuda plays is the"], locality=[("London is the capital of", "England")]),
    case("t4", "Barack Obama", "Barack Obama was born in", "Kenya",
         rephrase=["The birthplace of Barack Obama is"], locality=[("Michael Jordan plays", "basketball")]),
    case("t5", "Madrid", "The Autonomous University of Madrid is located in", "France",
         rephrase=["The Autonomous University of Madrid is in"], locality=[("Paris is in", "France")]),
    case("t6", "London", "London is the capital of", "Spain",
         rephrase=["The country whose capital is London is"], locality=[("The capital of Spain is", "Madrid")]),
    case("t7", "French", "French is spoken in", "Japan",
         rephrase=["People in which country speak French?"], locality=[("English is spoken in", "England")]),
]
QUERY = case("q1", "Eiffel Tower", "The Eiffel Tower is located in the city of", "London",
             rephrase=["The Eiffel Tower stands in the city of"],
             locality=[("The mother tongue of Danielle Darrieux is", "French")],
             portability=[("The Eiffel Tower's city is the capital of", "England")])
OTHERS = [case(f"q{i}", s, p, t) for i, (s, p, t) in enumerate([
    ("Toko Yasuda", "Toko Yasuda is a citizen of", "Chile"),
    ("Barack Obama", "Barack Obama plays", "golf"),
    ("Danielle Darrieux", "Danielle Darrieux was born in", "Oslo"),
    ("Michael Jordan", "Michael Jordan speaks", "Dutch"),
    ("London", "London is located on the river", "Seine"),
], start=2)]


def long_tiny(arch: str = "llama"):
    """The tiny model with 4096 positions: room for a context of several demonstrations (the
    tiny tokenizer spends a token on every few characters of text it was not trained on)."""
    config = tiny_config(arch)
    config.max_position_embeddings = 4096
    return model_from_config(config, tiny_tokenizer(), seed=0)


@pytest.fixture(scope="module")
def lm():
    return long_tiny()


def make(lm, train=TRAIN, tasks=("t",), **hp) -> IKE:
    hp.setdefault("probe_reserve", 0)
    editor = IKE(IkeHparams(**hp))
    editor.check(lm.model.config)
    editor.prepare(lm, EditContext(cache_dir=Path("unused"), log=lambda s: None,
                                   training=TrainingData(tasks=list(tasks), load=lambda task: list(train))))
    return editor


def new_fact(c: EditCase) -> str:
    return f"New Fact: {c.prompt} {c.target_new}\nPrompt: "


# --------------------------------------------------------------------------------------------
# Hyperparameters
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, message", [
    ({"k": "-1"}, "k must be >= 0 and <= 512, got -1"),
    ({"k": "many"}, "expected int"),
    ({"k": "513"}, "k must be >= 0 and <= 512, got 513"),
    ({"retriever": "bm25"}, "retriever must be one of embedding, tfidf"),
    ({"selection": "best"}, "selection must be one of"),
    ({"order": "sideways"}, "order must be one of"),
    ({"copy_ratio": "-1"}, "copy_ratio must be >= 0"),
    ({"update_ratio": "nan"}, "must be a finite number"),
    ({"copy_ratio": "0", "update_ratio": "0", "retain_ratio": "0"}, "must be > 0 with selection=proportional"),
    ({"seed": "-2"}, "seed must be >= 0"),
    ({"max_context_tokens": "-5"}, "max_context_tokens must be >= 0"),
    ({"probe_reserve": "256"}, "leaves no room for a context"),
    ({"overflow": "truncate"}, "overflow must be one of drop, error"),
    ({"without_train": "skip"}, "without_train must be one of error, ice"),
    ({"echo_fact": "maybe"}, "expected true/false"),
    ({"nope": "1"}, "unknown hyperparameter 'nope'"),
])
def test_bad_hyperparameters_are_one_line_errors(overrides, message):
    with pytest.raises(BenchError, match=message) as err:
        build_editor("ike", overrides, tiny_config("llama"))
    assert "\n" not in str(err.value)


def test_defaults_presets_and_zero_ratios_without_demonstrations():
    editor = build_editor("ike", {}, tiny_config("llama"))
    assert isinstance(editor, IKE) and editor.kinds == ("context",) and editor.reads_train_split
    hp = editor.hparams
    assert (hp.k, hp.retriever, hp.selection, hp.order, hp.ratios()) == (
        16, "tfidf", "proportional", "similar_last", {"copy": 1.0, "update": 3.0, "retain": 4.0})
    assert build_editor("ike", hparams_source("ike", "ice"), tiny_config("llama")).hparams.k == 0
    easy = build_editor("ike", hparams_source("ike", "easyedit"), tiny_config("llama")).hparams
    assert (easy.k, easy.selection, easy.order, easy.echo_fact) == (32, "retrieved", "similar_first", False)
    paper = build_editor("ike", hparams_source("ike", "paper"), tiny_config("llama")).hparams
    assert (paper.k, paper.selection, paper.echo_fact) == (32, "proportional", True)
    # k = 0 needs no demonstration proportions
    build_editor("ike", {"k": "0", "copy_ratio": "0", "update_ratio": "0", "retain_ratio": "0"}, tiny_config("llama"))


def test_quotas_follow_the_papers_proportions():
    paper = {"copy": 1, "update": 3, "retain": 4}
    assert quotas(32, paper) == {"copy": 4, "update": 12, "retain": 16}
    assert quotas(16, paper) == {"copy": 2, "update": 6, "retain": 8}
    assert sum(quotas(5, paper).values()) == 5
    assert quotas(4, {"copy": 1, "update": 3, "retain": 0}) == {"copy": 1, "update": 3, "retain": 0}


def test_another_retriever_can_be_registered(lm, monkeypatch):
    class Reverse(TfidfRetriever):
        name = "reverse"

        def scores(self, query):
            return -super().scores(query)

    monkeypatch.setitem(RETRIEVERS, "reverse", Reverse)
    editor = make(lm, k=1, retriever="reverse", copy_ratio=1, update_ratio=0, retain_ratio=0)
    handle = editor.apply(lm.model, lm.tokenizer, QUERY)
    assert handle.info["demonstrations"][0]["case_id"] != "t0"  # the least similar, by its own measure
    handle.restore()


# --------------------------------------------------------------------------------------------
# One edit: retrieval, format, exclusion, restore, view
# --------------------------------------------------------------------------------------------


# the same question worded a little differently: the nearest train case for any retriever
NEAR = case("t8", "Eiffel Tower", "Today the Eiffel Tower is located in the city of", "Rome",
            rephrase=["The Eiffel Tower is now in the city of"], locality=[("Paris is in", "France")])


@pytest.mark.parametrize("retriever", ["tfidf", "embedding"])
def test_retrieval_puts_the_most_similar_train_case_closest_to_the_query(lm, retriever):
    editor = make(lm, train=TRAIN + [NEAR], k=3, retriever=retriever)
    handle = editor.apply(lm.model, lm.tokenizer, QUERY)
    demos = handle.info["demonstrations"]
    assert len(demos) == 3 and demos[-1]["case_id"] == "t8"  # similar_last: nearest to the new fact
    assert [d["score"] for d in demos] == sorted(d["score"] for d in demos)
    assert handle.info["retriever"] == retriever
    handle.restore()
    first = make(lm, train=TRAIN + [NEAR], k=3, retriever=retriever, order="similar_first")
    handle = first.apply(lm.model, lm.tokenizer, QUERY)
    assert [d["case_id"] for d in handle.info["demonstrations"]] == [d["case_id"] for d in reversed(demos)]
    handle.restore()


def test_context_format_is_easyedits(lm):
    editor = make(lm, k=1, copy_ratio=1, update_ratio=0, retain_ratio=0)
    handle = editor.apply(lm.model, lm.tokenizer, QUERY)
    t0 = TRAIN[0]
    copy = f"New Fact: {t0.prompt} {t0.target_new}\nPrompt: {t0.prompt} {t0.target_new}\n\n"
    assert handle.context == copy + new_fact(QUERY)
    handle.restore()
    update = make(lm, k=1, copy_ratio=0, update_ratio=1, retain_ratio=0).apply(lm.model, lm.tokenizer, QUERY)
    assert update.context.startswith(f"New Fact: {t0.prompt} {t0.target_new}\nPrompt: {t0.rephrase_prompts[0]} "
                                     f"{t0.target_new}\n\n")
    update.restore()
    retain = make(lm, k=1, copy_ratio=0, update_ratio=0, retain_ratio=1).apply(lm.model, lm.tokenizer, QUERY)
    assert retain.context.startswith(f"New Fact: {t0.prompt} {t0.target_new}\n"
                                     "Prompt: The capital of France is Paris\n\n")
    retain.restore()
    echo = make(lm, k=1, copy_ratio=1, update_ratio=0, retain_ratio=0, echo_fact=True)
    handle = echo.apply(lm.model, lm.tokenizer, QUERY)
    fact = f"{QUERY.prompt} {QUERY.target_new}"
    assert handle.context == copy + f"New Fact: {fact}\nPrompt: {fact}\n\n" + new_fact(QUERY)
    handle.restore()


def test_proportional_selection_mixes_the_types_and_retrieved_takes_the_top_texts(lm):
    editor = make(lm, k=8)
    handle = editor.apply(lm.model, lm.tokenizer, QUERY)
    demos = handle.info["demonstrations"]
    assert Counter(d["type"] for d in demos) == {"copy": 1, "update": 3, "retain": 4}
    assert len({d["case_id"] for d in demos}) == 8  # one demonstration per train case
    handle.restore()
    retrieved = make(lm, k=3, selection="retrieved", order="similar_first")
    handle = retrieved.apply(lm.model, lm.tokenizer, QUERY)
    demos = handle.info["demonstrations"]
    assert len(demos) == 3 and demos[0]["case_id"] == "t0"
    assert [d["score"] for d in demos] == sorted((d["score"] for d in demos), reverse=True)
    handle.restore()


def test_a_type_no_train_case_can_give_goes_to_the_others(lm):
    bare = [case(c.case_id, c.subject, c.prompt, c.target_new) for c in TRAIN]  # no rephrase, no locality
    handle = make(lm, train=bare, k=4).apply(lm.model, lm.tokenizer, QUERY)
    assert [d["type"] for d in handle.info["demonstrations"]] == ["copy"] * 4
    assert handle.info["types_available"] == ["copy"]
    handle.restore()


def test_random_order_is_seeded(lm):
    runs = []
    for seed in (0, 0, 1):
        editor = make(lm, k=6, order="random", seed=seed)
        handle = editor.apply(lm.model, lm.tokenizer, QUERY)
        runs.append(handle.context)
        handle.restore()
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_ice_gives_only_the_new_fact_and_needs_no_train_split(lm):
    editor = IKE(IkeHparams(k=0))  # never prepared: no training data at all
    handle = editor.apply(lm.model, lm.tokenizer, QUERY)
    assert handle.context == new_fact(QUERY) == "New Fact: The Eiffel Tower is located in the city of London\nPrompt: "
    assert handle.info["demonstrations"] == [] and handle.info["retriever"] is None
    handle.restore()


def test_the_case_itself_is_never_a_demonstration(lm):
    same_id = case("q1", "Someone", "Someone works in", "Paris")
    same_fact = case("dup", QUERY.subject, QUERY.prompt, "Rome", rephrase=["x"], locality=[("y", "z")])
    editor = make(lm, train=TRAIN + [same_id, same_fact], k=10, selection="retrieved")
    handle = editor.apply(lm.model, lm.tokenizer, QUERY)
    ids = {d["case_id"] for d in handle.info["demonstrations"]}
    assert ids and not ids & {"q1", "dup"}
    assert "Rome" not in handle.context
    handle.restore()


def test_a_task_without_train_split(lm):
    editor = make(lm, tasks=("other",), k=2)
    with pytest.raises(BenchError, match="task 't' has no train split") as err:
        editor.apply(lm.model, lm.tokenizer, QUERY)
    assert "\n" not in str(err.value)
    assert editor.sequential_state()["facts"] == []  # a failed edit leaves no memory behind
    fallback = make(lm, tasks=("other",), k=2, without_train="ice")
    handle = fallback.apply(lm.model, lm.tokenizer, QUERY)
    assert handle.context == new_fact(QUERY) and "no train split" in handle.info["fallback"]
    handle.restore()


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
def test_apply_then_restore_leaves_the_model_and_the_memory_as_they_were(arch):
    lm = long_tiny(arch)
    editor = make(lm, k=4)
    before = model_fingerprint(lm.model)
    handle = editor.apply(lm.model, lm.tokenizer, QUERY)
    assert handle.kinds == ("context",) and handle.changed == []
    assert editor.sequential_state()["facts"][0]["case_id"] == "q1"
    handle.restore()
    assert model_fingerprint(lm.model) == before
    assert editor.sequential_state() == {"facts": [], "start": 0, "demos": [], "echo": ""}


def test_the_view_puts_the_context_in_front_of_every_probe(lm):
    editor = make(lm, k=2)
    handle = editor.apply(lm.model, lm.tokenizer, QUERY)
    seen = handle.view_case(QUERY)
    assert seen.prompt == handle.context + QUERY.prompt
    assert all(p.startswith(handle.context) for p in seen.rephrase_prompts)
    assert [pa.prompt for pa in seen.locality] == [handle.context + pa.prompt for pa in QUERY.locality]
    assert [pa.prompt for pa in seen.portability] == [handle.context + pa.prompt for pa in QUERY.portability]
    assert [pa.answer for pa in seen.locality] == [pa.answer for pa in QUERY.locality]
    bare, viewed = evaluate_cases(lm.model, lm.tokenizer, [QUERY, seen])
    assert bare.reliability.mean_logprob != viewed.reliability.mean_logprob
    handle.restore()


def test_overflow_drops_the_least_similar_demonstrations_or_fails(lm):
    full = make(lm, k=4)
    handle = full.apply(lm.model, lm.tokenizer, QUERY)
    tokens, demos = handle.info["context_tokens"], handle.info["demonstrations"]
    handle.restore()
    limited = make(lm, k=4, max_context_tokens=tokens - 1)
    handle = limited.apply(lm.model, lm.tokenizer, QUERY)
    assert handle.info["context_tokens"] <= tokens - 1 and handle.info["context_limit"] == tokens - 1
    assert handle.info["demos_dropped"][0]["case_id"] == demos[0]["case_id"]  # the least similar one
    assert len(handle.info["demonstrations"]) < 4
    handle.restore()
    with pytest.raises(BenchError, match="overflow=error"):
        make(lm, k=4, max_context_tokens=tokens - 1, overflow="error").apply(lm.model, lm.tokenizer, QUERY)
    with pytest.raises(BenchError, match="the new fact alone"):
        make(lm, k=4, max_context_tokens=3).apply(lm.model, lm.tokenizer, QUERY)


# --------------------------------------------------------------------------------------------
# Sequential memory
# --------------------------------------------------------------------------------------------


def test_sequential_memory_accumulates_and_restores(lm):
    editor = make(lm, k=1)
    before = model_fingerprint(lm.model)
    first = editor.apply_batch(lm.model, lm.tokenizer, [QUERY, OTHERS[0]])
    second = editor.apply_batch(lm.model, lm.tokenizer, [OTHERS[1]])
    assert isinstance(first, CombinedHandle) and first.kinds == ("context",)
    assert first.context == first.handles[-1].context
    lines = [f"New Fact: {c.prompt} {c.target_new}\n" for c in (QUERY, OTHERS[0], OTHERS[1])]
    assert second.context.endswith("".join(lines) + "Prompt: ")
    assert second.info["cases"][-1]["facts_in_context"] == 3 and second.info["cases"][-1]["facts_dropped"] == 0
    for handle in (second, first):
        handle.restore()
    assert editor.sequential_state()["facts"] == [] and model_fingerprint(lm.model) == before


def test_demonstrations_never_restate_a_fact_in_memory(lm):
    earlier = OTHERS[0]
    clash = case("clash", earlier.subject, earlier.prompt, "Peru", rephrase=["x"], locality=[("y", "z")])
    editor = make(lm, train=TRAIN + [clash], k=9, selection="retrieved")
    first = editor.apply_batch(lm.model, lm.tokenizer, [earlier])
    second = editor.apply_batch(lm.model, lm.tokenizer, [QUERY])
    assert "clash" not in {d["case_id"] for d in second.info["cases"][0]["demonstrations"]}
    assert "Peru" not in second.context
    second.restore()
    first.restore()


def test_overflow_drops_the_oldest_facts_and_records_it(lm):
    probe = make(lm, k=0)
    two = probe.apply_batch(lm.model, lm.tokenizer, OTHERS[:2])
    limit = two.handles[-1].info["context_tokens"]
    two.restore()
    editor = make(lm, k=0, max_context_tokens=limit)
    handles = [editor.apply_batch(lm.model, lm.tokenizer, [c]) for c in OTHERS[:4]]
    last = handles[-1].handles[-1].info
    assert last["facts_in_context"] <= 2 and last["facts_dropped"] == 4 - last["facts_in_context"]
    dropped = [i for h in handles for i in h.handles[-1].info.get("facts_dropped_now", [])]
    assert dropped == [c.case_id for c in OTHERS[:last["facts_dropped"]]]  # oldest first, each once
    context = handles[-1].context
    assert f"{OTHERS[0].prompt} {OTHERS[0].target_new}" not in context
    assert context.endswith(f"New Fact: {OTHERS[3].prompt} {OTHERS[3].target_new}\nPrompt: ")
    state = editor.sequential_state()
    assert len(state["facts"]) == 4 and state["start"] == last["facts_dropped"]  # the memory keeps them all
    for handle in reversed(handles):
        handle.restore()


def test_state_round_trips_through_json_and_reattach(lm):
    editor = make(lm, k=2, max_context_tokens=0)
    handles = [editor.apply_batch(lm.model, lm.tokenizer, [c]) for c in [QUERY] + OTHERS[:2]]
    state = json.loads(json.dumps(editor.sequential_state()))
    resumed = make(lm, k=2, max_context_tokens=0)
    resumed.load_sequential_state(state)
    back = resumed.reattach(lm.model, lm.tokenizer)
    assert back.context == handles[-1].context and back.kinds == ("context",)
    assert back.info["reattached"] and back.info["facts_in_context"] == 3
    # both continue alike
    a = editor.apply_batch(lm.model, lm.tokenizer, [OTHERS[2]])
    b = resumed.apply_batch(lm.model, lm.tokenizer, [OTHERS[2]])
    assert a.context == b.context and resumed.sequential_state() == editor.sequential_state()
    b.restore()
    back.restore()
    assert resumed.sequential_state()["facts"] == []
    assert IKE(IkeHparams()).reattach(lm.model, lm.tokenizer) is None  # nothing edited: nothing to put back
    for handle in [a] + handles[::-1]:
        handle.restore()


@pytest.mark.parametrize("state, message", [
    ({"facts": [{"case_id": "x"}]}, "malformed fact"),
    ({"facts": [], "start": 3}, "start=3"),
    ({"memory": []}, "unexpected sequential state"),
])
def test_a_malformed_state_is_refused(state, message):
    with pytest.raises(ValueError, match=message):
        IKE(IkeHparams()).load_sequential_state(state)


# --------------------------------------------------------------------------------------------
# Through the runner
# --------------------------------------------------------------------------------------------


def run_options(tmp_path, **changes) -> RunOptions:
    base = dict(editor="ike", tasks=["counterfact", "recent"], model="tiny", device="cpu", limit=None,
                data_dir=str(FIXTURE_DATA), output_dir=str(tmp_path / "runs"),
                hparams={"k": "2", "probe_reserve": "16"}, batch_size=4)
    base.update(changes)
    return RunOptions(**base)


def test_a_single_mode_run_records_the_demonstrations(tmp_path, tiny_load):
    path = execute(run_options(tmp_path), log=lambda s: None)
    records = lines_of(path / "cases.jsonl")
    assert records and all(r.get("error") is None for r in records)
    assert all(r["edit"]["facts_in_context"] == 1 and r["edit"]["demonstrations"] for r in records)
    notes = json.loads((path / "config.json").read_text())["notes"]["ike"]
    assert notes["retriever"] == "tfidf" and "counterfact" in notes["demonstration_tasks"]


class CrashingIKE(IKE):
    """IKE that dies (as a killed process would) when asked for its `fail_at`-th fact."""

    name = "ike-crash"
    fail_at: int | None = None

    def apply(self, model, tokenizer, case):
        if CrashingIKE.fail_at is not None and len(self._memory.facts) >= CrashingIKE.fail_at:
            raise KeyboardInterrupt("simulated crash")
        return super().apply(model, tokenizer, case)


def test_a_killed_sequential_run_resumes_exactly(tmp_path, tiny_load, monkeypatch):
    monkeypatch.setitem(editors.BUILTIN, "ike-crash", "tests.test_ike:CrashingIKE")
    seq = dict(editor="ike-crash", mode="sequential", edit_batch=2, eval_every=4, locality_probes=3,
               hparams={"k": "2", "probe_reserve": "16", "max_context_tokens": "110"})
    straight = execute(run_options(tmp_path / "a", **seq), log=lambda s: None)
    CrashingIKE.fail_at = 6  # after the checkpoint at 4 edits
    try:
        with pytest.raises(KeyboardInterrupt):
            execute(run_options(tmp_path / "b", **seq), log=lambda s: None)
    finally:
        CrashingIKE.fail_at = None
    crashed = next((tmp_path / "b" / "runs").iterdir())
    resume(crashed, log=lambda s: None)
    strip = without_time
    ra, rb = lines_of(straight / "cases.jsonl"), lines_of(crashed / "cases.jsonl")
    assert [strip(r) for r in ra] == [strip(r) for r in rb]
    ca, cb = lines_of(straight / "checkpoints.jsonl"), lines_of(crashed / "checkpoints.jsonl")
    assert [strip(c) for c in ca] == [strip(c) for c in cb]
    assert any(r["edit"].get("facts_dropped") for r in ra)  # the window was full: oldest facts dropped
