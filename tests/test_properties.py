"""Property tests: random input yields cases, counted skips or one BenchError, never a traceback.

Random records in each loader's layout (fields missing, blank, of the wrong JSON type, nested)
go through the registry (loader + field mapping) from a temporary data directory laid out as
the cards expect; random text goes to `read_records` and `parse_card` (also as mutated copies
of the real cards); random `--hparam` strings go through the hyperparameter parser. Every
record must come out as a case or as a counted skip. Fast: under ~20 s in all.
"""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from bench.core.errors import BenchError
from bench.core.hparams import check_hparams, override_hparams, parse_hparam_args
from editors.ft import FTHparams
from editors.rome import RomeHparams
from tasks import registry
from tasks.card import TaskCard, parse_card
from tasks.loaders import read_records
from tasks.registry import get_card, load_split

SETTINGS = settings(max_examples=100, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
CARDS_DIR = Path(registry.__file__).parent / "cards"

# --------------------------------------------------------------------------------- strategies

# A tiny vocabulary, so that a subject is often inside its prompt and some records are valid.
WORDS = ["a", "b", "a b", "The a is", "b of a", "nq question: a b", "Paris", "1989", "x </s> y"]
BLANKS = ["", " ", "\t\n", "\u200b", "\ufeff", "\u2060", "\u00ad", "\x00", "\u3164", "\u200b "]
texts = st.one_of(st.sampled_from(WORDS), st.sampled_from(BLANKS), st.text(max_size=10))
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), texts)
json_values = st.recursive(
    scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                     st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=8)
# mostly plausible text, sometimes anything (missing is handled by optional keys)
value = st.one_of(texts, texts, texts, json_values)
text_lists = st.one_of(st.lists(texts, max_size=3), st.lists(st.lists(texts, max_size=2), max_size=2))
extra_keys = st.dictionaries(st.text(max_size=6), json_values, max_size=2)


def record(fields: dict) -> st.SearchStrategy[dict]:
    """A record whose layout fields are each present (with a random value) or missing, plus a
    few random extra keys."""
    return st.builds(lambda extra, rec: {**extra, **rec}, extra_keys,
                     st.fixed_dictionaries({}, optional=fields))


probe_groups = st.one_of(
    st.dictionaries(st.sampled_from(["Reasoning", "Subject_Aliasing", "Relation_Specificity",
                                     "Forgetfulness", "Logical_Generalization"]),
                    st.one_of(st.lists(record({"prompt": st.one_of(texts, st.lists(texts, max_size=2)),
                                               "ground_truth": st.one_of(texts, text_lists)}), max_size=2),
                              st.none()),
                    max_size=2),
    json_values)

# One valid record per layout: mutated copies of these give mostly-valid files, so that cases,
# duplicates and single-field failures are all common (fully random records rarely map).
VALID = {
    "easyedit_counterfact": [{"case_id": 1, "prompt": "The a is", "subject": "a", "target_new": "b",
                              "ground_truth": "c", "rephrase_prompt": "a is", "locality_prompt": "The b is",
                              "locality_ground_truth": "d"}],
    "mend_zsre": [{"subject": "a", "src": "What is a?", "rephrase": "a is what?", "alt": "b",
                   "answers": ["c"], "loc": "nq question: who is b", "loc_ans": "d"}],
    "knowedit_recent": [{"subject": "a", "prompt": "The a is", "target_new": "b", "ground_truth": ["c"],
                         "rephrase": "a is",
                         "portability": {"Reasoning": [{"prompt": "p", "ground_truth": [["x", "y"]]}]},
                         "locality": {"Relation_Specificity": [{"prompt": "q", "ground_truth": "z"}]}}],
    "knowedit": [{"subject": "a", "prompt": "The a is", "target_new": "b", "ground_truth": "c",
                  "rephrase": "a is",
                  "portability": {"Subject_Aliasing": [{"prompt": "The A is", "ground_truth": "b"}],
                                  "Reasoning": [{"prompt": ["p"], "ground_truth": [["x", "y"]]}]},
                  "locality": {"Relation_Specificity": [{"prompt": "q", "ground_truth": ["z"]}],
                               "Forgetfulness": None}},
                 {"subject": "a", "prompt": "What is a?", "target_new": "b", "ground_truth": ["c"],
                  "rephrase_prompt": "a is what?", "cond": "c >> b || What is a?",
                  "locality": {"Relation_Specificity": [{"prompt": "a rank", "ground_truth": ["genus"]}]},
                  "portability": {"Reasoning": [{"prompt": "p", "ground_truth": "x"}]}}],
    "convsent": [{"ent": "a", "pos": ["I like a."], "neg": ["I hate a."]},
                 {"subject": "a", "prompt": "What about a? positively", "target_new": "I like a.",
                  "metric_kwargs": {"inner_q": "a?", "inner_all_qa": ["a? </s> good", "a? </s> bad"],
                                    "outer_all_qa": ["b? </s> ok"], "inner_target": [0, 0],
                                    "all_target": [0, 1]}}],
}


@st.composite
def mutated(draw, bases: list[dict]) -> dict:
    """A valid record with up to three fields deleted or replaced (nested ones included)."""
    rec = copy.deepcopy(draw(st.sampled_from(bases)))
    for _ in range(draw(st.integers(0, 3))):
        target = rec
        if draw(st.booleans()):  # sometimes one level down (metric_kwargs, probe groups)
            nested = [v for v in rec.values() if isinstance(v, dict) and v]
            if nested:
                target = draw(st.sampled_from(nested))
        key = draw(st.one_of(st.sampled_from(sorted(target)), st.text(max_size=4)))
        if key in target and draw(st.booleans()):
            del target[key]
        else:
            target[key] = draw(st.one_of(value, text_lists))
    return rec


RANDOM_LAYOUTS: dict[str, st.SearchStrategy[dict]] = {
    "easyedit_counterfact": record({
        "case_id": st.one_of(st.integers(0, 5), texts, json_values), "prompt": value, "subject": value,
        "target_new": value, "ground_truth": value, "rephrase_prompt": value,
        "locality_prompt": value, "locality_ground_truth": value}),
    "mend_zsre": record({
        "subject": value, "src": value, "rephrase": value, "alt": value,
        "answers": st.one_of(st.lists(st.one_of(texts, json_values), max_size=2), value),
        "loc": value, "loc_ans": value}),
    "knowedit_recent": record({
        "subject": value, "prompt": value, "target_new": st.one_of(value, text_lists),
        "ground_truth": st.one_of(value, text_lists), "rephrase": st.one_of(value, text_lists),
        "portability": probe_groups, "locality": probe_groups}),
    "knowedit": record({
        "subject": value, "prompt": value, "target_new": st.one_of(value, text_lists),
        "ground_truth": st.one_of(value, text_lists), "rephrase": st.one_of(value, text_lists),
        "rephrase_prompt": value, "portability": probe_groups, "locality": probe_groups}),
    "convsent": st.one_of(
        record({"ent": value, "pos": st.one_of(st.lists(texts, max_size=2), value),
                "neg": st.one_of(st.lists(texts, max_size=2), value)}),
        record({"subject": value, "prompt": value, "target_new": value,
                "metric_kwargs": st.one_of(json_values, record({
                    "inner_q": value,
                    "inner_all_qa": st.one_of(st.lists(texts, max_size=3), value),
                    "outer_all_qa": st.one_of(st.lists(texts, max_size=3), value),
                    "inner_target": st.one_of(st.lists(st.integers(0, 1), max_size=3), value),
                    "all_target": st.one_of(st.lists(st.integers(0, 1), max_size=3), value)}))})),
}

LAYOUTS = {schema: st.one_of(mutated(VALID[schema]), mutated(VALID[schema]), random)
           for schema, random in RANDOM_LAYOUTS.items()}

OPTIONS = {"zsre": st.one_of(st.none(), st.fixed_dictionaries(
               {"strip_locality_prefix": st.sampled_from([True, False, "true", "0", "off"])})),
           "convsent": st.one_of(st.none(), st.fixed_dictionaries(
               {"target_sentiment": st.sampled_from(["positive", "negative"])}))}


def encoded(records: list, ascii_only: bool, bom: bool) -> bytes:
    body = json.dumps(records, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    return (b"\xef\xbb\xbf" if bom else b"") + body


# --------------------------------------------------------------------------------- loaders + mapping


def expected_total(card: TaskCard, split: str, holdout: bool, n: int) -> int | None:
    """How many records the split covers (each a case or a skip); None for a hash rule."""
    rule = card.rule(split, holdout, sample=False)
    if rule.all:
        return n
    if rule.slice is not None:
        start, stop = rule.slice
        return len(range(n)[start:stop])
    return None


@pytest.mark.parametrize("task", ["counterfact", "recast", "zsre", "recent", "convsent",
                                  "wikicounterfact", "zsre_knowedit"])
@SETTINGS
@given(data=st.data())
def test_random_records_are_cases_or_counted_skips(task, data):
    card = get_card(task)
    layout = LAYOUTS[card.schema]
    options = data.draw(OPTIONS.get(task, st.none()), label="options")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        sizes = {}
        for key, candidates in card.files.items():
            records = data.draw(st.lists(layout, min_size=1, max_size=6), label=key)
            path = root / candidates[0]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(encoded(records, data.draw(st.booleans()), data.draw(st.booleans())))
            sizes[key] = len(records)
        requests = [(s, False) for s in registry.SPLITS if card.rule(s, False, False) is not None]
        if "holdout_eval" in card.splits:
            requests.append(("eval", True))
        loaded = {}
        for split, holdout in requests:
            try:
                ts = load_split(task, split, root, holdout=holdout, options=options)
            except BenchError as exc:
                assert str(exc) and "\n" not in str(exc)  # one line
                continue
            n = sizes[card.rule(split, holdout, False).file]
            assert all(s.reason and "\n" not in s.reason for s in ts.skipped), ts.skipped
            assert all(0 <= s.index < n for s in ts.skipped)
            total = expected_total(card, split, holdout, n)
            if total is not None:
                assert len(ts.cases) + len(ts.skipped) == total, (split, holdout)
            loaded[(split, holdout)] = ts
        # hash rule: train and eval together cover every record once (an id-less record is
        # reported in eval only)
        if card.splits.get("eval") and card.splits["eval"].salt and len(loaded) >= 2:
            tr, ev = loaded.get(("train", False)), loaded.get(("eval", False))
            if tr is not None and ev is not None:
                covered = len(tr.cases) + len(tr.skipped) + len(ev.cases) + len(ev.skipped)
                assert covered == sizes[card.splits["eval"].file]


@SETTINGS
@given(options=st.dictionaries(st.one_of(st.sampled_from(["strip_locality_prefix", "x"]), st.text(max_size=4)),
                               json_values, max_size=2))
def test_random_options_raise_only_bench_error(options):
    for task in ("zsre", "counterfact"):
        try:
            load_split(task, "eval", None, holdout=task == "zsre", options=options)
        except BenchError:
            pass


# --------------------------------------------------------------------------------- read_records


@SETTINGS
@given(content=st.one_of(st.binary(max_size=120), st.text(max_size=80).map(str.encode),
                         st.lists(json_values, max_size=4).map(
                             lambda v: json.dumps(v).encode("utf-8", "surrogatepass")),
                         st.lists(json_values, max_size=4).map(
                             lambda v: "\n".join(json.dumps(x, ensure_ascii=False) for x in v).encode(
                                 "utf-8", "surrogatepass"))),
       suffix=st.sampled_from([".json", ".jsonl"]), bom=st.booleans(), cut=st.integers(0, 200))
@example(content=b"[" * 100_000, suffix=".json", bom=False, cut=200)
@example(content=b"[" + b"1" * 5000 + b"]", suffix=".json", bom=False, cut=10_000)
@example(content=b"\xff\xfe[\x00]\x00", suffix=".json", bom=False, cut=200)
def test_read_records_random_text(content, suffix, bom, cut):
    data = (b"\xef\xbb\xbf" if bom else b"") + content
    if cut < 200:
        data = data[:cut]  # truncated files too
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"data{suffix}"
        path.write_bytes(data)
        try:
            records = read_records(path)
        except BenchError as exc:
            assert "data" in str(exc) and "\n" not in str(exc)
            return
        assert records and all(isinstance(r, dict) for r in records)


# --------------------------------------------------------------------------------- parse_card


def _paths(node, prefix=()):
    """Every (key/index path) inside a parsed card, for mutation."""
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


REAL_CARDS = {p.stem: yaml.safe_load(p.read_text(encoding="utf-8")) for p in sorted(CARDS_DIR.glob("*.yaml"))}
card_values = st.one_of(json_values, st.sampled_from(["{{ x", "{{ src }}", "{% if %}", "zsre",
                                                        "eval", "data", [0, None], [3, 1], {"file": "data"},
                                                        "strip_locality_prefix"]))


@SETTINGS
@given(text=st.text(max_size=200))
@example(text="name: x\nwhen: 2001-13-01\n")
@example(text="{1: 2, a: 3}")
@example(text="[" * 5000)
@example(text="\ufeffname: card")
def test_parse_card_random_text(text):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "card.yaml"
        path.write_text(text, encoding="utf-8")
        try:
            parse_card(path)
        except BenchError:
            pass


@SETTINGS
@given(data=st.data(), name=st.sampled_from(sorted(REAL_CARDS)))
def test_parse_card_mutated_real_cards(data, name):
    card = copy.deepcopy(REAL_CARDS[name])
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        paths = [p for p in _paths(card) if p]
        path = data.draw(st.sampled_from(paths), label="path")
        parent = card
        for k in path[:-1]:
            parent = parent[k]
        if data.draw(st.booleans(), label="delete") and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            # a copy: sampled_from hands out the same object, which a later mutation may change
            parent[path[-1]] = copy.deepcopy(data.draw(card_values, label="value"))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.yaml"
        path.write_text(yaml.safe_dump(card, allow_unicode=True), encoding="utf-8")
        try:
            parsed = parse_card(path)
        except BenchError:
            return
    # a mutated card that parses must still load its sample with cases, skips or a BenchError
    if not parsed.has_sample:
        return
    saved = registry.list_cards()
    registry._CARDS[name] = parsed
    try:
        for split in registry.SPLITS:
            try:
                load_split(name, split, None)
            except BenchError:
                pass
    finally:
        registry._CARDS.clear()
        registry._CARDS.update(saved)
        registry._SPLIT_CACHE.clear()  # its key names the card, not the card's contents


# --------------------------------------------------------------------------------- hparams

HPARAM_VALUES = st.one_of(
    st.text(max_size=12), st.integers().map(str), st.floats().map(str),
    st.sampled_from(["nan", "inf", "-inf", "1e999", "-1", "0", "29", "30", "-30", "-31", "[1, 2]",
                     "[", "[]", "none", "null", "true", "off", "0x10", "1" * 5000, "1e308", "1.5",
                     "prompt_last", "target_masked", "loss", "float64", "mean"]))


def hparam_items(cls) -> st.SearchStrategy[list[str]]:
    names = list(cls.__dataclass_fields__) + ["bogus", "", " "]
    item = st.one_of(st.builds(lambda k, sep, v: f"{k}{sep}{v}", st.sampled_from(names),
                               st.sampled_from(["=", " = ", "=="]), HPARAM_VALUES),
                     st.text(max_size=20))
    return st.lists(item, max_size=4)


@pytest.mark.parametrize("cls", [FTHparams, RomeHparams])
@SETTINGS
@given(data=st.data())
def test_hparam_strings_raise_only_bench_error(cls, data):
    items = data.draw(hparam_items(cls), label="items")
    try:
        hp = override_hparams(cls(), parse_hparam_args(items))
        check_hparams(hp, n_layers=30)
    except BenchError as exc:
        assert str(exc)


def test_caches_are_not_polluted():
    """The mutated cards above restore the registry: the real zsre card is back."""
    assert get_card("zsre").options == {"strip_locality_prefix": False}
    assert len(load_split("counterfact", "eval", None).cases) == 4
