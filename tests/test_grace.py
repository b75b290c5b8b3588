"""GRACE (editors/grace): the codebook rules on constructed keys, the lookup leaving every
uncovered position bit-identical, edits that make the target the answer, exact restore on every
tiny architecture, and sequential state that a resumed run puts back exactly."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

import editors
from bench.core.cases import EditCase
from bench.core.errors import BenchError
from bench.core.hparams import load_hparams_file, override_hparams
from bench.core.layout import find_layout
from bench.core.models import model_from_config
from bench.core.probes import encode_probe
from bench.core.snapshot import model_fingerprint
from bench.core.tiny import tiny_config, tiny_tokenizer
from bench.runner import execute, resume
from bench.session import RunOptions, build_editor
from editors.base import CombinedHandle
from editors.grace import Codebook, Grace, GraceAdaptor, GraceHparams, default_layer
from editors.grace.codebook import SPLIT_MARGIN
from editors.grace.editor import CodebookHandle
from tests.helpers import FIXTURE_DATA
from tests.helpers import jsonl_lines as lines, without_time

pytestmark = pytest.mark.usefixtures("one_thread")

ARCHS = ("llama", "gpt2", "gpt_neox", "gemma3")
# A middle block of the 4-block test models; their projection inputs are small (norm 0.05 to 0.6,
# the nearest other position 0.02 to 0.5 from an edit's key): a radius to match.
HP = GraceHparams(layer=1, eps=0.005, steps=20, min_loss=0.0)


def tiny(arch: str = "llama"):
    return model_from_config(tiny_config(arch), tiny_tokenizer(), seed=0)


def case(i: int, prompt: str, target: str) -> EditCase:
    return EditCase(case_id=str(i), task="counterfact", prompt=prompt, subject=prompt.split()[0], target_new=target)


# Single-token targets of the tiny tokenizer (a longer one's later tokens are read at positions
# the codebook does not replace; the real model carries them through its later blocks).
EIFFEL = case(1, "The Eiffel Tower is located in the city of", "English")
DARRIEUX = case(2, "The mother tongue of Danielle Darrieux is", "French")
OBAMA = case(3, "Barack Obama was born in", "Paris")
UNRELATED = "Michael Jordan plays basketball for Chicago."


def adaptors(model) -> list[GraceAdaptor]:
    return [m for m in model.modules() if isinstance(m, GraceAdaptor)]


@torch.no_grad()
def logits(lm, text: str) -> torch.Tensor:
    return lm.model(torch.tensor([lm.tokenizer(text)["input_ids"]])).logits[0]


# --------------------------------------------------------------------------------------------
# The rules, on constructed keys
# --------------------------------------------------------------------------------------------


def book_state(book: Codebook):
    t = book.tensors()
    return t["keys"].clone(), t["values"].clone(), t["radii"].clone(), list(book.labels)


def same_state(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a[:3], b[:3])) and a[3] == b[3]


def value(i: int) -> torch.Tensor:
    return torch.full((2,), float(i))


def test_the_rules_give_the_hand_computed_codebook_and_undo_each_step():
    book = Codebook(3, 2)
    steps = [  # (key, answer, expected action, entry)
        ((0.0, 0.0, 0.0), (1,), "added", 0),      # empty codebook
        ((5.0, 0.0, 0.0), (2,), "added", 1),      # d = 5 > eps + eps_0 = 2
        ((0.0, 1.5, 0.0), (1,), "expanded", 0),   # same answer, eps_0 = 1 < d = 1.5 <= 2: eps_0 = 1.5
        ((0.0, 1.0, 0.0), (1,), "kept", 0),       # same answer, d = 1 <= eps_0 = 1.5
        ((5.0, 1.2, 0.0), (3,), "split", 2),      # nearest is entry 1 at d = 1.2 <= 2, another answer
        ((5.0, 0.0, 0.0), (4,), "overwritten", 1),  # entry 1's own key, another answer
    ]
    history = [book_state(book)]
    for key, answer, action, entry in steps:
        change = book.update(torch.tensor(key), answer, 1.0, "coverage", init=value)
        assert (change.action, change.entry) == (action, entry), key
        history.append(book_state(book))
    keys, values, radii, labels = history[-1]
    assert torch.equal(keys, torch.tensor([[0.0, 0, 0], [5, 0, 0], [5, 1.2, 0]]))
    d = float(torch.tensor(1.2))  # the keys are float32
    assert radii.tolist() == [1.5, min(1.0, d / 2 - SPLIT_MARGIN), d / 2]
    assert labels == [(1,), (4,), (3,)]
    # entry 1's value was drawn again when it was overwritten; no value trained here otherwise
    assert torch.equal(values, torch.stack([value(0), value(1), value(2)]))
    # each change undone, last first, gives back every earlier codebook exactly
    changes = []
    book2 = Codebook(3, 2)
    for key, answer, _, _ in steps:
        changes.append(book2.update(torch.tensor(key), answer, 1.0, "coverage", init=value))
    for k in range(len(steps), 0, -1):
        assert same_state(book_state(book2), history[k])
        book2.undo(changes[k - 1])
    assert book2.size == 0 and same_state(book_state(book2), history[0])


def test_moving_average_moves_the_key_halfway_and_covers_the_new_input():
    book = Codebook(3, 2)
    book.update(torch.tensor([0.0, 0, 0]), (1,), 1.0, "moving_average", init=value)
    change = book.update(torch.tensor([0.0, 1.5, 0]), (1,), 1.0, "moving_average", init=value)
    assert change.action == "expanded" and change.distance == 1.5
    assert torch.equal(book.keys[:1], torch.tensor([[0.0, 0.75, 0]]))
    assert book.radii[:1].tolist() == [1.5]  # the reference's radius: the distance to the old key


def test_a_split_never_grows_a_radius():
    """The reference sets the older radius to d/2 - 1e-5 whatever it was; after an earlier split
    that could grow it over a conflicting neighbour's key. Here a split only shrinks."""
    book = Codebook(1, 2)
    book.update(torch.tensor([0.0]), (1,), 1.0, "coverage", init=value)
    book.update(torch.tensor([0.5]), (2,), 1.0, "coverage", init=value)  # split at d = 0.5
    assert book.radii.tolist()[:2] == [0.25 - SPLIT_MARGIN, 0.25]
    change = book.update(torch.tensor([-1.125]), (3,), 1.0, "coverage", init=value)  # d <= 1 + 0.25
    assert (change.action, change.nearest) == ("split", 0)
    # the reference would give entry 0 the radius 0.5625 - 1e-5, over entry 1's key at 0.5
    assert book.radii[:3].tolist() == [0.25 - SPLIT_MARGIN, 0.25, 0.5625]
    covered, nearest = book.lookup(torch.tensor([[0.5], [0.1], [-0.4], [-1.125], [3.0]]))
    assert nearest.tolist() == [1, 0, 0, 2, 1]
    assert covered.tolist() == [True, True, False, True, False]


# --------------------------------------------------------------------------------------------
# The adaptor at inference
# --------------------------------------------------------------------------------------------


def test_uncovered_positions_keep_the_layer_output_bit_for_bit():
    lm = tiny()
    handle = Grace(HP).apply(lm.model, lm.tokenizer, EIFFEL)
    (adaptor,) = adaptors(lm.model)
    seen = {}

    def keep(_module, args, out):
        seen["inner"] = out.clone()

    def keep_outer(_module, args, out):
        seen["x"], seen["outer"] = args[0], out

    adaptor.layer.register_forward_hook(keep)
    adaptor.register_forward_hook(keep_outer)
    # an unrelated text: no position is covered, the output is the wrapped projection's own
    logits(lm, UNRELATED)
    covered, _ = adaptor.codebook.lookup(seen["x"])
    assert not covered.any()
    assert seen["outer"] is not None and torch.equal(seen["outer"], seen["inner"])
    # the edit prompt inside a longer text: its last token is replaced, every other position kept
    logits(lm, EIFFEL.prompt + " and more words here")
    covered, _ = adaptor.codebook.lookup(seen["x"])
    n_prompt = len(lm.tokenizer(EIFFEL.prompt)["input_ids"])
    assert covered.tolist() == [k == n_prompt - 1 for k in range(covered.numel())]
    same = (seen["outer"][0] == seen["inner"][0]).all(-1)
    assert same.tolist() == [not c for c in covered.tolist()]
    assert torch.equal(seen["outer"][0, n_prompt - 1], adaptor.codebook.values[0])
    handle.restore()
    # ... and the whole model's logits on unrelated text equal the unedited model's, bit for bit
    edited = tiny()
    Grace(HP).apply(edited.model, edited.tokenizer, EIFFEL)
    assert torch.equal(logits(edited, UNRELATED), logits(tiny(), UNRELATED))


@pytest.mark.parametrize("arch", ARCHS)
def test_the_edit_makes_the_target_the_answer(arch):
    lm = tiny(arch)
    prompt_ids, (target,) = encode_probe(lm.tokenizer, EIFFEL.prompt, EIFFEL.target_new)
    before = torch.log_softmax(logits(lm, EIFFEL.prompt)[-1], -1)
    assert before.argmax() != target
    handle = Grace(HP).apply(lm.model, lm.tokenizer, EIFFEL)
    after = torch.log_softmax(logits(lm, EIFFEL.prompt)[-1], -1)
    assert after.argmax() == target and after[target] > before[target]
    info = handle.info
    assert info["action"] == "added" and info["codebook_size"] == 1 and info["layer"] == 1
    assert info["steps"] == HP.steps and info["loss"] < info["loss_start"]
    json.dumps(info)


def test_a_warm_value_starts_as_the_layer_output_at_the_key():
    lm = tiny()
    seen = {}
    handle = Grace(replace(HP, val_init="warm", steps=0)).apply(lm.model, lm.tokenizer, EIFFEL)
    (adaptor,) = adaptors(lm.model)
    adaptor.layer.register_forward_hook(lambda m, a, out: seen.setdefault("out", out.detach().clone()))
    logits(lm, EIFFEL.prompt)
    assert handle.info["steps"] == 0
    assert torch.allclose(adaptor.codebook.values[0], seen["out"][0, -1], atol=1e-6)


def test_generation_through_the_cache_decides_as_teacher_forcing_does():
    """The lookup is per position and causal: greedy decoding one token at a time through the
    key-value cache gives the tokens that the teacher-forced pass over the whole text predicts."""
    lm = tiny()
    Grace(HP).apply(lm.model, lm.tokenizer, EIFFEL)
    ids = torch.tensor([lm.tokenizer(EIFFEL.prompt)["input_ids"]])
    with torch.no_grad():
        out = lm.model.generate(ids, max_new_tokens=4, do_sample=False, use_cache=True,
                                pad_token_id=lm.tokenizer.pad_token_id)
        forced = lm.model(out).logits[0].argmax(-1)
    n = ids.shape[1]
    assert out[0, n].item() == encode_probe(lm.tokenizer, EIFFEL.prompt, EIFFEL.target_new)[1][0]
    assert out[0, n:].tolist() == forced[n - 1:-1].tolist()


# --------------------------------------------------------------------------------------------
# Restore
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_restore_is_exact(arch):
    lm = tiny(arch)
    before = model_fingerprint(lm.model)
    editor = Grace(HP)
    handle = editor.apply(lm.model, lm.tokenizer, EIFFEL)
    assert handle.kinds == ("modules",) and handle.first_block == 1
    assert model_fingerprint(lm.model) != before and len(adaptors(lm.model)) == 1
    handle.restore()
    assert model_fingerprint(lm.model) == before and not adaptors(lm.model)
    # the next single edit starts from an empty codebook again
    again = editor.apply(lm.model, lm.tokenizer, DARRIEUX)
    assert again.info["codebook_size"] == 1 and again.info["action"] == "added"
    again.restore()
    # several edits in one call (sequential), restored together
    combined = editor.apply_batch(lm.model, lm.tokenizer, [EIFFEL, DARRIEUX, OBAMA])
    assert isinstance(combined, CombinedHandle) and len(adaptors(lm.model)) == 1
    assert [c["codebook_size"] for c in combined.info["cases"]] == [1, 2, 3]
    combined.restore()
    assert model_fingerprint(lm.model) == before


def test_a_failed_edit_leaves_nothing_behind(monkeypatch):
    lm = tiny()
    before = model_fingerprint(lm.model)
    editor = Grace(HP)
    first = editor.apply(lm.model, lm.tokenizer, EIFFEL)
    book = adaptors(lm.model)[0].codebook
    kept = book_state(book)

    def boom(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(editor, "_train", boom)
    with pytest.raises(RuntimeError):
        editor.apply(lm.model, lm.tokenizer, DARRIEUX)
    assert same_state(book_state(book), kept)
    first.restore()
    with pytest.raises(RuntimeError):
        editor.apply(lm.model, lm.tokenizer, DARRIEUX)
    assert model_fingerprint(lm.model) == before


# --------------------------------------------------------------------------------------------
# Sequential: the codebook grows; its state round-trips
# --------------------------------------------------------------------------------------------


PROBES = [EIFFEL.prompt, DARRIEUX.prompt, OBAMA.prompt, UNRELATED]


def test_sequential_batches_grow_one_codebook_and_the_state_round_trips():
    lm = tiny()
    fresh = model_fingerprint(lm.model)
    editor = Grace(HP)
    first = editor.apply_batch(lm.model, lm.tokenizer, [EIFFEL, DARRIEUX])
    after_first = book_state(adaptors(lm.model)[0].codebook)
    # the same prompt with the same answer again (kept), and a new one (added)
    second = editor.apply_batch(lm.model, lm.tokenizer, [EIFFEL, OBAMA])
    (adaptor,) = adaptors(lm.model)
    # later edits of the installed codebook: kind modules, the same first block, no tree snapshot
    later = second.handles[0]
    assert isinstance(later, CodebookHandle) and later.kinds == ("modules",)
    assert later.reusable_blocks(find_layout(lm.model)) == 1 and second.kinds == ("modules",)
    assert [c["action"] for c in first.info["cases"] + second.info["cases"]] == ["added", "added", "kept", "added"]
    assert [c["codebook_size"] for c in second.info["cases"]] == [2, 3]
    state = editor.sequential_state()
    assert {k for k, v in state.items() if isinstance(v, torch.Tensor)} == {"keys", "values", "radii"}
    json.dumps(state["codebook"])
    outputs = [logits(lm, p) for p in PROBES]

    other = tiny()
    resumed = Grace(HP)
    resumed.load_sequential_state(state)
    back = resumed.reattach(other.model, other.tokenizer)
    assert back.kinds == ("modules",) and back.first_block == 1 and back.info["codebook_size"] == 3
    assert all(torch.equal(a, logits(other, p)) for a, p in zip(outputs, PROBES))
    again = resumed.sequential_state()
    assert all(torch.equal(state[k], again[k]) for k in ("keys", "values", "radii"))
    assert again["codebook"] == state["codebook"]
    # the next edit after the resume lands where it lands without the interruption
    more = resumed.apply_batch(other.model, other.tokenizer, [case(4, "Toko Yasuda plays the", "piano")])
    straight = editor.apply_batch(lm.model, lm.tokenizer, [case(4, "Toko Yasuda plays the", "piano")])
    assert more.info["cases"] == straight.info["cases"]
    assert all(torch.equal(logits(lm, p), logits(other, p)) for p in PROBES)
    # undoing a batch gives back the codebook before it; the handles together give the model back
    straight.restore()
    second.restore()
    assert same_state(book_state(adaptor.codebook), after_first)
    first.restore()
    assert model_fingerprint(lm.model) == fresh
    more.restore()
    back.restore()
    assert model_fingerprint(other.model) == fresh and resumed.sequential_state() == {}


def test_reattach_refuses_a_codebook_of_another_layer():
    lm = tiny()
    editor = Grace(HP)
    editor.apply(lm.model, lm.tokenizer, EIFFEL)
    state = editor.sequential_state()
    other = Grace(GraceHparams(layer=2, eps=HP.eps))
    other.load_sequential_state(state)
    with pytest.raises(BenchError, match="block 1"):
        other.reattach(tiny().model, lm.tokenizer)
    with pytest.raises(ValueError, match="not a GRACE codebook"):
        other.load_sequential_state({"keys": state["keys"]})
    assert Grace(HP).reattach(tiny().model, lm.tokenizer) is None  # nothing loaded


# A sequential run on the tiny model (also the SIGKILL resume test of tests/test_view.py)
SEQ_HPARAMS = {"layer": "1", "eps": "0.005", "steps": "5"}


def seq_options(tmp_path, editor: str) -> RunOptions:
    return RunOptions(editor=editor, tasks=["counterfact"], model="tiny", device="cpu", limit=None,
                      data_dir=str(FIXTURE_DATA), output_dir=str(tmp_path / "runs"),
                      hparams=dict(SEQ_HPARAMS), batch_size=4, mode="sequential",
                      eval_every=2, locality_probes=3, edit_batch=1, protocols=("teacher_forced", "wild"))


class CrashingGrace(Grace):
    name = "crashing-grace"
    crash_at: int | None = None

    def apply_batch(self, model, tokenizer, cases):
        att = self._attached(model)
        made = att.adaptor.codebook.size if att is not None else 0
        if CrashingGrace.crash_at is not None and made >= CrashingGrace.crash_at:
            raise KeyboardInterrupt("simulated crash")
        return super().apply_batch(model, tokenizer, cases)


def test_a_crashed_sequential_run_resumes_to_the_records_of_an_uninterrupted_one(tmp_path, tiny_load, monkeypatch):
    monkeypatch.setitem(editors.BUILTIN, "crashing-grace", "tests.test_grace:CrashingGrace")
    straight = execute(seq_options(tmp_path / "a", "crashing-grace"), log=lambda s: None)
    records = lines(straight / "cases.jsonl")
    assert [r["edit"]["codebook_size"] for r in records] == list(range(1, len(records) + 1))
    checkpoints = lines(straight / "checkpoints.jsonl")
    assert [c["n_edits"] for c in checkpoints] == [2, 4, 6]
    assert checkpoints[-1]["summary"]["counterfact"]["reliability"]["post"] > \
        checkpoints[-1]["summary"]["counterfact"]["reliability"]["pre"]
    CrashingGrace.crash_at = 5  # dies making its 6th edit, after the checkpoint at 4 edits
    try:
        with pytest.raises(KeyboardInterrupt):
            execute(seq_options(tmp_path / "b", "crashing-grace"), log=lambda s: None)
    finally:
        CrashingGrace.crash_at = None
    crashed = next((tmp_path / "b" / "runs").iterdir())
    assert [c["n_edits"] for c in lines(crashed / "checkpoints.jsonl")] == [2, 4]
    resume(crashed, log=lambda s: None)
    got, want = lines(crashed / "checkpoints.jsonl"), lines(straight / "checkpoints.jsonl")
    assert [without_time(c) for c in got] == [without_time(c) for c in want]
    assert [without_time(r) for r in lines(crashed / "cases.jsonl")] == [without_time(r) for r in records]
    a, b = (load_file(str(p / "sequential" / "state.safetensors")) for p in (straight, crashed))
    assert set(a) == set(b) == {"editor.keys", "editor.values", "editor.radii"}
    assert all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------------------------
# Hyperparameters, registry, preset
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, message", [
    ({"eps": "0"}, "eps must be > 0"),
    ({"eps": "nan"}, "finite"),
    ({"eps_expand": "decay"}, "eps_expand must be one of coverage, moving_average"),
    ({"val_init": "hot"}, "val_init must be one of cold, warm"),
    ({"layer": "4"}, "out of range"),
    ({"steps": "-1"}, "steps must be >= 0"),
    ({"lr": "0"}, "lr must be > 0"),
    ({"replacement": "replace_all"}, "unknown hyperparameter"),
])
def test_bad_hyperparameters_are_one_line_errors_before_any_model_loads(overrides, message):
    with pytest.raises(BenchError, match=message) as err:
        build_editor("grace", overrides, tiny_config("llama"))
    assert "\n" not in str(err.value)


def test_defaults_registry_and_preset():
    assert default_layer(30) == 25 and default_layer(32) == 27 and default_layer(4) == 3 and default_layer(1) == 0
    assert Grace.default_hparams(tiny_config("llama")).layer == 3
    assert editors.get_editor_class("grace") is Grace
    assert editors.describe_editor("grace").kinds == ("modules",)
    assert editors.BUILTIN_INFO["grace"]._replace(summary="") == editors.EditorInfo.of(Grace)
    preset = load_hparams_file(editors.presets("grace")["easyedit"])
    hp = override_hparams(GraceHparams(), preset)
    assert (hp.eps, hp.eps_expand, hp.val_init) == (1.0, "coverage", "cold")
    assert (hp.steps, hp.lr, hp.min_loss) == (50, 1.0, 0.0)
    assert math.isclose(GraceHparams().eps, 1.0)
