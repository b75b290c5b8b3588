"""An edit is a view of the model: the contract for editors that write weights, add modules or
hooks, or put a context in front of every prompt. Restore is exact (state_dict, module tree,
hooks, attributes); every evaluation path reads the edited model through the handle's view."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

import editors
from bench.core.cases import EditCase, PromptAnswer
from bench.core.generation import StopRules
from bench.core.layout import find_layout
from bench.core.metrics import case_scores
from bench.core.models import model_from_config
from bench.core.probes import evaluate_case
from bench.core.snapshot import model_fingerprint
from bench.core.tiny import tiny_config, tiny_tokenizer
from bench.core.wild import WildSettings, generate_cases
from bench.evaluation import Job
from bench.runner import execute, run_cases
from bench.session import RunOptions
from editors.base import CombinedHandle, EditHandle, Editor
from tests.helpers import FIXTURE_DATA
from tests.test_grace import SEQ_HPARAMS as GRACE_SEQ
from tests.test_wise import SEQ_HPARAMS as WISE_SEQ
from tests.helpers import jsonl_lines as lines, without_time

pytestmark = pytest.mark.usefixtures("one_thread")

VIEW_ARCHS = ("llama", "gpt2", "gpt_neox", "gemma3")

CASE = EditCase(case_id="c1", task="counterfact", prompt="The Eiffel Tower is located in",
                subject="The Eiffel Tower", target_new="Paris", ground_truth="London",
                rephrase_prompts=("Where is the Eiffel Tower? It is in",),
                locality=(PromptAnswer("Michael Jordan plays", "basketball"),),
                portability=(PromptAnswer("The tower's city is the capital of", "France"),))


def tiny(arch: str = "llama"):
    return model_from_config(tiny_config(arch), tiny_tokenizer(), seed=0)


# --------------------------------------------------------------------------------------------
# Test-only editors of each kind
# --------------------------------------------------------------------------------------------


@dataclass
class PushHparams:
    scale: float = 200.0


class PushHook(Editor):
    """A forward hook on the last block pushes every position's hidden state towards the target's
    first token (tied embeddings: it becomes the argmax): kind "modules", first block declared."""

    name = "push-hook"
    Hparams = PushHparams
    kinds = ("modules",)

    def apply(self, model, tokenizer, case) -> EditHandle:
        layout = find_layout(model)
        last = layout.num_layers - 1
        handle = EditHandle(model, [], {"hook": "last block"}, modules=True, first_block=last)
        token = tokenizer(" " + case.target_new, add_special_tokens=False)["input_ids"][0]
        direction = model.get_output_embeddings().weight[token].detach()
        direction = self.hparams.scale * direction / direction.norm()

        def push(_module, _args, output):
            if isinstance(output, tuple):
                return (output[0] + direction,) + tuple(output[1:])
            return output + direction

        layout.blocks[last].register_forward_hook(push)
        return handle


@dataclass
class ContextHparams:
    text: str = "Fact: the answer is Paris. "
    memory: list = field(default_factory=list)


class TellContext(Editor):
    """Puts a fixed text and the new fact in front of every prompt; keeps every fact so far in
    sequential mode (its whole context with each handle), and its memory as JSON state."""

    name = "tell"
    Hparams = ContextHparams
    kinds = ("context",)

    def __init__(self, hparams=None):
        super().__init__(hparams)
        self.facts: list[str] = []

    def _context(self) -> str:
        return self.hparams.text + "".join(f"{f}. " for f in self.facts)

    def apply(self, model, tokenizer, case) -> EditHandle:
        return EditHandle(model, [], {"facts": 1}, context=self._context() + f"{case.prompt} {case.target_new}. ")

    def apply_batch(self, model, tokenizer, cases) -> EditHandle:
        before = list(self.facts)

        def forget() -> None:
            self.facts = before

        handle = EditHandle(model, [], restore_fn=forget)
        self.facts += [f"{c.prompt} {c.target_new}" for c in cases]
        handle.context = self._context()
        handle.info = {"cases": [{"facts": len(self.facts)} for _ in cases]}
        return handle

    def sequential_state(self) -> dict:
        return {"facts": list(self.facts)}

    def load_sequential_state(self, state) -> None:
        self.facts = list(state.get("facts", []))

    def reattach(self, model, tokenizer) -> EditHandle:
        return EditHandle(model, [], context=self._context(), restore_fn=lambda: None)


class Everything(Editor):
    """All three kinds at once: a weight row written, a submodule added, an attribute set, a
    pre-hook registered and requires_grad flipped, and a context."""

    name = "everything"
    Hparams = PushHparams
    kinds = ("weights", "modules", "context")

    def apply(self, model, tokenizer, case) -> EditHandle:
        layout = find_layout(model)
        weight = next(n for n, _ in model.named_parameters() if n.startswith(layout.blocks_name + ".1."))
        handle = EditHandle(model, [weight], modules=True, first_block=1, context="Note: ")
        params = dict(model.named_parameters())
        with torch.no_grad():
            params[weight].mul_(1.5)
        layout.blocks[2].add_module("side_memory", nn.Linear(4, 4))
        layout.blocks[2].edited_by = "everything"
        layout.blocks[3].register_forward_pre_hook(lambda m, a: None)
        for p in model.parameters():
            p.requires_grad_(False)
        return handle


# --------------------------------------------------------------------------------------------
# Exact restore
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", VIEW_ARCHS)
@pytest.mark.parametrize("editor_cls", [PushHook, TellContext, Everything])
def test_apply_then_restore_leaves_the_model_exactly_as_it_was(arch, editor_cls):
    lm = tiny(arch)
    before = model_fingerprint(lm.model)
    handle = editor_cls().apply(lm.model, lm.tokenizer, CASE)
    assert handle.kinds == editor_cls.kinds
    if editor_cls is not TellContext:  # a context leaves the model itself alone
        assert model_fingerprint(lm.model) != before
    handle.restore()
    assert model_fingerprint(lm.model) == before


def test_the_fingerprint_sees_a_hook_left_behind():
    """Without the module snapshot a hook survives restore, and the fingerprint says so."""
    lm = tiny()
    before = model_fingerprint(lm.model)
    handle = EditHandle(lm.model, [])  # weights only: does not take the tree
    find_layout(lm.model).blocks[0].register_forward_hook(lambda m, a, o: o)
    handle.restore()
    assert model_fingerprint(lm.model) != before


def test_kinds_and_reuse_follow_what_the_handle_changed():
    lm = tiny()
    layout = find_layout(lm.model)
    assert EditHandle(lm.model, []).kinds == ()
    assert EditHandle(lm.model, []).reusable_blocks(layout) == layout.num_layers
    assert EditHandle(lm.model, [], modules=True).reusable_blocks(layout) == 0  # undeclared: no reuse
    assert EditHandle(lm.model, [], modules=True, first_block=2).reusable_blocks(layout) == 2
    assert EditHandle(lm.model, [], context="x").reusable_blocks(layout) == 0
    w = f"{layout.blocks_name}.3.mlp.down_proj.weight"
    assert EditHandle(lm.model, [w], modules=True, first_block=2).reusable_blocks(layout) == 2
    combined = CombinedHandle([EditHandle(lm.model, [w]), EditHandle(lm.model, [], context="a "),
                               EditHandle(lm.model, [], context="b ")])
    assert combined.kinds == ("weights", "context")
    assert combined.view_text("q") == "b q"  # the last handle's whole context
    assert combined.reusable_blocks(layout) == 0


def test_view_case_puts_the_context_before_every_probe_prompt():
    lm = tiny()
    seen = EditHandle(lm.model, [], context="C: ").view_case(CASE)
    assert seen.prompt == "C: " + CASE.prompt
    assert seen.rephrase_prompts == tuple("C: " + p for p in CASE.rephrase_prompts)
    assert [pa.prompt for pa in seen.locality] == ["C: " + pa.prompt for pa in CASE.locality]
    assert [pa.answer for pa in seen.locality] == [pa.answer for pa in CASE.locality]
    assert [pa.prompt for pa in seen.portability] == ["C: " + pa.prompt for pa in CASE.portability]
    assert EditHandle(lm.model, []).view_case(CASE) is CASE


# --------------------------------------------------------------------------------------------
# Every evaluation path reads the view
# --------------------------------------------------------------------------------------------


def wild_settings(tok) -> WildSettings:
    return WildSettings(rules=StopRules(max_new_tokens=6))


def one_record(lm, editor, reuse: bool = True) -> dict:
    job = Job(CASE, counterfact=True, wild=wild_settings(lm.tokenizer))
    return next(run_cases(lm, editor, [job], batch_size=4, reuse_unchanged_blocks=reuse))


@pytest.mark.parametrize("editor_cls", [PushHook, TellContext, Everything])
def test_post_edit_scores_are_those_of_the_view_and_the_fast_path_equals_the_plain_one(editor_cls):
    lm = tiny()
    fast = one_record(lm, editor_cls())
    plain = one_record(lm, editor_cls(), reuse=False)
    assert fast["post"] == plain["post"] and fast["wild"] == plain["wild"]
    # the same numbers computed by hand on the edited view
    handle = editor_cls().apply(lm.model, lm.tokenizer, CASE)
    seen = handle.view_case(CASE)
    post_eval = evaluate_case(lm.model, lm.tokenizer, seen, counterfact=True, batch_size=4)
    gens = generate_cases(lm.model, lm.tokenizer, [seen], wild_settings(lm.tokenizer), batch_size=4)[0]
    handle.restore()
    pre_eval = evaluate_case(lm.model, lm.tokenizer, CASE, counterfact=True, batch_size=4)
    want = case_scores(post_eval, pre_eval)
    assert {k: fast["post"][k] for k in want} == pytest.approx(want)
    assert fast["wild"]["generations"]["post"]["prompt"]["text"] == gens[0].text


def test_only_the_view_gives_the_answer_in_the_wild():
    """The hook makes the target the greedy answer: generated (not fed) answers show it only
    while the view is on, and the model is back afterwards."""
    lm = tiny()
    before = model_fingerprint(lm.model)
    record = one_record(lm, PushHook())
    assert record["pre"]["wild_reliability"] == 0.0
    assert record["post"]["wild_reliability"] == 1.0
    assert record["post"]["reliability"] > record["pre"]["reliability"]
    assert model_fingerprint(lm.model) == before


def test_the_regression_hook_reads_the_context():
    from bench.regression.hook import RegressionHook

    class Suite:
        def __init__(self):
            self.calls = []

        def evaluate(self, label, context=""):
            self.calls.append((label, context))
            return {}

    hook = RegressionHook.__new__(RegressionHook)
    hook.suite, hook.afters, hook.evaluated = Suite(), [], set()
    hook.sampled = {(CASE.task, CASE.case_id)}
    lm = tiny()
    hook.while_edited(CASE, EditHandle(lm.model, [], context="Told: "))
    assert hook.suite.calls == [("after-0", "Told: ")]


def test_lm_eval_requests_get_the_context_in_front():
    from lm_eval.api.instance import Instance

    from bench.regression.suite import with_context

    class Inner:
        tokenizer_name = "inner"

        def __init__(self):
            self.seen = []

        def loglikelihood(self, requests, disable_tqdm=False):
            self.seen += [("ll", r.args) for r in requests]
            return [(-1.5, False) for _ in requests]

        def generate_until(self, requests, disable_tqdm=False):
            self.seen += [("gen", r.args) for r in requests]
            return ["x" for _ in requests]

    inner = Inner()
    lm = with_context(inner, "CTX ")
    ll = Instance("loglikelihood", {}, ("Q:", " A"), 0)
    rolling = Instance("loglikelihood_rolling", {}, ("some text",), 0)
    gen = Instance("generate_until", {}, ("Q:", {"until": ["\n"]}), 0)
    assert lm.loglikelihood([ll]) == [(-1.5, False)]
    assert lm.loglikelihood_rolling([rolling]) == [-1.5]
    assert lm.generate_until([gen]) == ["x"]
    assert inner.seen == [("ll", ("CTX Q:", " A")), ("ll", ("CTX ", "some text")),
                          ("gen", ("CTX Q:", {"until": ["\n"]}))]
    assert lm.tokenizer_name == "inner"


# --------------------------------------------------------------------------------------------
# Sequential runs: checkpoints read the view; a resumed run reattaches it
# --------------------------------------------------------------------------------------------


def seq_options(tmp_path, editor: str, **changes) -> RunOptions:
    base = dict(editor=editor, tasks=["counterfact"], model="tiny", device="cpu", limit=None,
                data_dir=str(FIXTURE_DATA), output_dir=str(tmp_path / "runs"), hparams={},
                batch_size=4, mode="sequential", eval_every=2, locality_probes=3, edit_batch=1,
                protocols=("teacher_forced", "wild"))
    base.update(changes)
    return RunOptions(**base)


class CrashingTell(TellContext):
    name = "crashing-tell"
    crash_at: int | None = None

    def apply_batch(self, model, tokenizer, cases):
        if CrashingTell.crash_at is not None and len(self.facts) >= CrashingTell.crash_at:
            raise KeyboardInterrupt("simulated crash")
        return super().apply_batch(model, tokenizer, cases)


def test_sequential_checkpoints_read_the_context_and_resume_reattaches_it(tmp_path, tiny_load, monkeypatch):
    import bench.sequential as seq
    import bench.sequential.checkpoint  # noqa: F401  (its functions are spied on)
    import bench.sequential.locality  # noqa: F401

    monkeypatch.setitem(editors.BUILTIN, "crashing-tell", "tests.test_view:CrashingTell")
    given: dict[str, list[str]] = {"probes": [], "retention": [], "generated": []}

    def spy(mp, name, module, fn, prompts_of):
        def wrapped(*args, **kwargs):
            given[name] += prompts_of(*args, **kwargs)
            return fn(*args, **kwargs)
        mp.setattr(module, fn.__name__, wrapped)

    with pytest.MonkeyPatch.context() as mp:
        spy(mp, "probes", seq.locality, seq.locality.score_probes, lambda m, t, pairs, *a, **k: [p for p, _ in pairs])
        spy(mp, "retention", seq.checkpoint, seq.checkpoint.evaluate_cases, lambda m, t, cases, *a, **k: [c.prompt for c in cases])
        spy(mp, "generated", seq.checkpoint, seq.checkpoint.generate_cases, lambda m, t, cases, *a, **k: [c.prompt for c in cases])
        straight = execute(seq_options(tmp_path / "a", "crashing-tell"), log=lambda s: None)
    checkpoints = lines(straight / "checkpoints.jsonl")
    assert [c["n_edits"] for c in checkpoints] == [2, 4, 6]
    # The probes' unedited readings have nothing in front; at the checkpoints every fact so far
    # is in front of every prompt (retention is read at checkpoints only).
    facts = [f"{r['case']['prompt']} {r['case']['target_new']}. " for r in lines(straight / "cases.jsonl")]
    told = ContextHparams().text
    assert len([p for p in given["probes"] if not p.startswith(told)]) == 2 * 3  # 3 probes: answer and target_new read
    for name, prompts in given.items():
        at_checkpoints = [p for p in prompts if p.startswith(told)]
        assert at_checkpoints, name
        if name != "probes":
            assert at_checkpoints == prompts, name
        assert any(p.startswith(told + "".join(facts[:2])) and facts[2] not in p for p in at_checkpoints)
        assert any(p.startswith(told + "".join(facts)) for p in at_checkpoints)
    CrashingTell.crash_at = 5
    try:
        with pytest.raises(KeyboardInterrupt):
            execute(seq_options(tmp_path / "b", "crashing-tell"), log=lambda s: None)
    finally:
        CrashingTell.crash_at = None
    crashed = next((tmp_path / "b" / "runs").iterdir())
    from bench.runner import resume

    resume(crashed, log=lambda s: None)
    got, want = lines(crashed / "checkpoints.jsonl"), lines(straight / "checkpoints.jsonl")
    assert [without_time(c) for c in got] == [without_time(c) for c in want]
    assert [without_time(r) for r in lines(crashed / "cases.jsonl")] == \
        [without_time(r) for r in lines(straight / "cases.jsonl")]


def test_a_sequential_run_of_modules_ends_with_the_model_restored(tmp_path, monkeypatch):
    import bench.session

    monkeypatch.setitem(editors.BUILTIN, "push-hook", "tests.test_view:PushHook")
    models = []

    def load(spec="smollm2-135m", device="auto", dtype="auto"):
        models.append(tiny())
        return models[-1]

    monkeypatch.setattr(bench.session, "load_model", load)
    monkeypatch.setattr(bench.session, "load_config", lambda spec="smollm2-135m": tiny_config("llama"))
    fresh = model_fingerprint(tiny().model)
    run = execute(seq_options(tmp_path, "push-hook", protocols=("teacher_forced",)), log=lambda s: None)
    assert model_fingerprint(models[0].model) == fresh
    first = lines(run / "checkpoints.jsonl")[0]
    # the pushed hidden state makes each edit's target the answer while the hooks are on
    assert first["summary"]["counterfact"]["reliability"]["post"] > first["summary"]["counterfact"]["reliability"]["pre"]


@pytest.mark.parametrize("editor,hparams", [("ike", {"k": "2"}), ("lora", {"steps": "3", "rank": "2"}),
                                            ("grace", GRACE_SEQ), ("wise", WISE_SEQ)])
def test_a_killed_sequential_run_of_a_view_editor_resumes_to_the_same_numbers(tmp_path, tiny_model_dir,
                                                                               editor, hparams):
    """`bench run --mode sequential` of ike (a context), lora (modules), grace (a codebook) or wise
    (a side memory and its router) is SIGKILLed while making its 6th edit (checkpoints at 2 and
    4); the resumed run reattaches the saved view and ends with the checkpoints, records and
    state of an uninterrupted run."""
    import os
    import signal
    import sys

    from safetensors.torch import load_file

    from bench.runner import resume
    from tests.helpers import start, wait_for_lines

    out = tmp_path / "killed"
    hp = [x for k, v in hparams.items() for x in ("--hparam", f"{k}={v}")]
    args = ["--editor", editor, "--task", "counterfact", "--model", tiny_model_dir, "--device", "cpu",
            "--data-dir", FIXTURE_DATA, "--output-dir", out, "--limit", "0", "--batch-size", "4",
            "--mode", "sequential", "--eval-every", "2", "--locality-probes", "3", "--name", "killed", *hp]
    proc = start([sys.executable, "-m", "tests.helpers", "slow-run"] + args, cwd=tmp_path,
                 SLOW_EDIT_DELAY="0.05", SLOW_EDIT_HANG_AFTER="5", SLOW_EDITOR=editor)
    straight = execute(seq_options(tmp_path, editor, model=str(tiny_model_dir), hparams=dict(hparams),
                                   output_dir=str(tmp_path / "straight")), log=lambda s: None)
    try:
        run_path = wait_for_lines(lambda: out.glob("*/cases.jsonl"), 5, proc)
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert [c["n_edits"] for c in lines(run_path / "checkpoints.jsonl")] == [2, 4]
    resume(run_path, log=lambda s: None)
    got, want = lines(run_path / "checkpoints.jsonl"), lines(straight / "checkpoints.jsonl")
    assert [c["n_edits"] for c in got] == [2, 4, 6]
    assert [without_time(c) for c in got] == [without_time(c) for c in want]
    assert [without_time(r) for r in lines(run_path / "cases.jsonl")] == \
        [without_time(r) for r in lines(straight / "cases.jsonl")]
    a, b = (load_file(str(p / "sequential" / "state.safetensors")) for p in (run_path, straight))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("editor,key,value", [("lora", "steps", "1e30"), ("lora", "rank", "100000000"),
                                              ("grace", "steps", "1e30"), ("wise", "steps", "1e30"),
                                              ("wise", "save_freq", "1e30"), ("ike", "seed", "1e30"),
                                              ("ike", "probe_reserve", "1e30")])
def test_endless_settings_of_the_view_editors_are_refused_before_the_model_loads(editor, key, value):
    """A huge step count or size is a one-line error, never a run without end."""
    from bench.core.errors import BenchError
    from bench.session import build_editor

    with pytest.raises(BenchError, match=f"{key} must be"):
        build_editor(editor, {key: value}, tiny_config("llama"))
