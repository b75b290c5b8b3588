"""The `wise` editor on tiny models: the router's choice of memory, the edit, exact restore,
knowledge sharding, the TIES merge, sequential accumulation, saved state and resume."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import editors
from bench.core.cases import EditCase, PromptAnswer
from bench.core.errors import BenchError
from bench.core.generation import StopRules, generate
from bench.core.hparams import load_hparams_file, override_hparams
from bench.core.layout import find_layout, weight_out_in
from bench.core.models import model_from_config
from bench.core.probes import evaluate_case, score_probes
from bench.core.snapshot import model_fingerprint
from bench.core.tiny import tiny_config, tiny_tokenizer
from bench.runner import execute, resume
from bench.session import RunOptions, build_editor
from editors.wise import Wise
from editors.wise.editor import MODULE_NAME
from editors.wise.masks import shard_mask
from editors.wise.merge import merge_deltas, merge_shards
from editors.wise.router import MAIN, SHARD, prefix_means
from tests.helpers import FIXTURE_DATA
from tests.helpers import jsonl_lines as lines, without_time

pytestmark = pytest.mark.usefixtures("one_thread")

# The tiny models' MLP activations are small (norms around 0.1), so their scores are too: margins
# and learning rate scaled to them, no norm constraint, one short context text.
TINY = {"lr": 300.0, "steps": 30, "context_lengths": [3], "alpha": 0.05, "beta": 0.3, "gamma": 0.1,
        "norm_constraint": 0.0, "irrelevant": "case"}

CASE = EditCase(case_id="c1", task="counterfact", prompt="The Eiffel Tower is located in",
                subject="The Eiffel Tower", target_new="Rome", ground_truth="Paris",
                rephrase_prompts=("Where is the Eiffel Tower? It is in",),
                locality=(PromptAnswer("Michael Jordan plays", "basketball"),))
OTHERS = [
    EditCase("c2", "counterfact", "The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "English",
             "French", locality=(PromptAnswer("Toko Yasuda plays the", "guitar"),)),
    EditCase("c3", "counterfact", "Barack Obama was born in", "Barack Obama", "Madrid", "Hawaii",
             locality=(PromptAnswer("What is the capital of France?", "Paris"),)),
    EditCase("c4", "counterfact", "Michael Jordan plays", "Michael Jordan", "guitar", "basketball",
             locality=(PromptAnswer("London is the capital of", "England"),)),
    EditCase("c5", "counterfact", "Autonomous University of Madrid is located in", "Autonomous University",
             "France", "Spain", locality=(PromptAnswer("The author wrote the", "book"),)),
]
UNRELATED = "Toko Yasuda plays the guitar and the question was asked"


def tiny(arch: str = "llama"):
    return model_from_config(tiny_config(arch), tiny_tokenizer(), seed=0)


def make(lm, **changes) -> Wise:
    hp = override_hparams(Wise.default_hparams(lm.model.config), {**TINY, **changes})
    editor = Wise(hp)
    editor.check(lm.model.config)
    return editor


def ids(lm, text: str) -> torch.Tensor:
    return torch.tensor([lm.tokenizer(text)["input_ids"]])


@torch.no_grad()
def logits(lm, text: str) -> torch.Tensor:
    return lm.model(input_ids=ids(lm, text)).logits


def side_state(editor: Wise):
    return editor._memory.state


# --------------------------------------------------------------------------------------------
# Hyperparameters
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("override, message", [
    ({"mask_ratio": "0"}, "mask_ratio must be > 0"),
    ({"merge_freq": "700"}, "merge_freq (700) must be a multiple of save_freq (500)"),
    ({"layer": "4"}, "layer 4 is out of range"),
    ({"merge_alg": "slerp"}, "merge_alg must be one of"),
    ({"score": "cosine"}, "score must be one of"),
    ({"lr": "nan"}, "lr must be a finite number"),
])
def test_bad_hyperparameters_are_one_line_errors_before_the_model_loads(override, message):
    with pytest.raises(BenchError) as err:
        build_editor("wise", override, tiny_config("llama"))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_defaults_preset_and_registry():
    editor = build_editor("wise", {}, tiny_config("llama"))
    assert editor.hparams.layer == 3  # 27/32 of the depth (25 of SmolLM2's 30)
    preset = load_hparams_file(editors.presets("wise")["easyedit"])
    hp = build_editor("wise", preset, tiny_config("llama")).hparams
    assert (hp.lr, hp.steps, hp.mask_ratio, hp.act_ratio, hp.score) == (1.0, 70, 0.2, 0.88, "activated")
    assert (hp.alpha, hp.beta, hp.gamma, hp.save_freq, hp.merge_freq, hp.merge_alg, hp.densities) == \
        (5.0, 20.0, 10.0, 500, 1000, "ties", 0.53)
    assert editors.BUILTIN_INFO["wise"]._replace(summary="") == editors.EditorInfo.of(Wise)
    assert editors.get_editor_class("wise") is Wise


# --------------------------------------------------------------------------------------------
# The router
# --------------------------------------------------------------------------------------------


def layer_inputs(lm, layer: int, text: str) -> torch.Tensor:
    """The MLP output projection's input at `layer` for `text`, (T, I)."""
    kept = {}
    proj = find_layout(lm.model).layers[layer].mlp_out
    hook = proj.register_forward_pre_hook(lambda m, a: kept.setdefault("x", a[0].detach()))
    try:
        logits(lm, text)
    finally:
        hook.remove()
    return kept["x"][0].float()


def test_the_router_sends_a_constructed_edited_input_to_the_side_memory_and_an_unrelated_one_to_the_main():
    lm = tiny()
    unedited = {t: logits(lm, t) for t in (CASE.prompt, UNRELATED)}
    editor = make(lm, steps=0)
    editor.apply(lm.model, lm.tokenizer, CASE)  # installs the side memory (no training)
    layer, state = editor._memory.module.layer, side_state(editor)
    x_edit, x_other = layer_inputs(lm, layer, CASE.prompt), layer_inputs(lm, layer, UNRELATED)
    # A task vector blind to every token of the unrelated input: v orthogonal to their span.
    q, _ = torch.linalg.qr(x_other.T)
    v = x_edit[-1] - q @ (q.T @ x_edit[-1])
    u = torch.randn(state.shape[0], generator=torch.Generator().manual_seed(0))
    delta = torch.outer(u, v) / v.norm()
    with torch.no_grad():
        state.shard.copy_(delta)
    edited_score = (x_edit @ delta.T).norm(dim=-1).mean().item()
    state.min_act = 0.5 * edited_score / editor.hparams.act_ratio  # threshold: half the edited score
    state.version += 1

    proj = find_layout(lm.model).layers[layer].mlp_out
    seen = {}
    after = proj.register_forward_hook(lambda m, a, out: seen.update(x=a[0].detach(), out=out.detach()))
    router = editor._memory.router
    router.trace = []
    try:
        got_edit = logits(lm, CASE.prompt)
        edit_out, edit_x = seen["out"][0], seen["x"][0]
        got_other = logits(lm, UNRELATED)
    finally:
        after.remove()
    edit_trace, other_trace = router.trace
    router.trace = None
    assert int(edit_trace["choice"][0, -1]) == SHARD
    assert (other_trace["choice"] == MAIN).all()
    # the side memory computed the edited input's last position: W x + delta x, not W x
    main_last = edit_x[-1] @ weight_out_in(proj).T
    assert torch.allclose(edit_out[-1], main_last + delta @ edit_x[-1], atol=1e-6)
    assert not torch.allclose(edit_out[-1], main_last, atol=1e-4)
    # the main memory computed every position of the unrelated input: bit for bit the unedited model
    assert torch.equal(got_other, unedited[UNRELATED])
    assert not torch.equal(got_edit, unedited[CASE.prompt])


def test_a_trained_edit_routes_its_prompt_to_the_side_memory_and_raises_the_target():
    lm = tiny()
    before = evaluate_case(lm.model, lm.tokenizer, CASE, counterfact=True)
    unedited = logits(lm, CASE.locality[0].prompt)
    editor = make(lm)
    handle = editor.apply(lm.model, lm.tokenizer, CASE)
    info = handle.info
    assert info["routed"] == "shard" and info["router_score"] > info["threshold"]
    assert info["shard"] == 0 and info["steps"] > 0 and info["irrelevant"] == "case"
    assert info["act_score"] > info["irrelevant_score"]  # the margin loss separated them
    after = evaluate_case(lm.model, lm.tokenizer, CASE, counterfact=True)
    assert after.reliability.mean_logprob > before.reliability.mean_logprob + 0.2
    # the locality prompt (the irrelevant input here) stays below the threshold: the main memory
    router = editor._memory.router
    router.trace = []
    assert torch.equal(logits(lm, CASE.locality[0].prompt), unedited)
    assert (router.trace[-1]["choice"] == MAIN).all()
    router.trace = None
    handle.restore()


def test_running_means_continue_across_cached_steps_and_skip_padding():
    tokens = torch.tensor([[0.0, 2.0, 4.0, 6.0], [1.0, 3.0, 5.0, 7.0]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    full, _, _ = prefix_means(tokens, mask)
    assert full[0].tolist() == [0.0, 2.0, 3.0, 4.0] and full[1].tolist() == [1.0, 2.0, 3.0, 4.0]
    head, sums, counts = prefix_means(tokens[:, :3], mask[:, :3])
    tail, _, _ = prefix_means(tokens[:, 3:], mask[:, 3:], sums[:, -1], counts[:, -1])
    assert torch.equal(tail[:, 0], full[:, 3])


def test_generation_with_the_cache_and_batches_read_the_edit_as_a_lone_full_pass():
    """Left-padded cached generation and right-padded probe batches give each prompt what it gets
    alone (routing reads the running mean of the real tokens up to each position)."""
    lm = tiny()
    editor = make(lm)
    editor.apply(lm.model, lm.tokenizer, CASE)
    prompts = [CASE.prompt, "Michael Jordan plays", CASE.rephrase_prompts[0], "The capital of"]
    rules = StopRules(max_new_tokens=6, at_newline=False)
    together = generate(lm.model, lm.tokenizer, prompts, rules, batch_size=4)
    alone = [generate(lm.model, lm.tokenizer, [p], rules, batch_size=1)[0] for p in prompts]
    assert [g.token_ids for g in together] == [g.token_ids for g in alone]
    # greedy decoding by full passes (no cache) gives the same tokens
    for prompt, gen in zip(prompts, alone):
        seq = lm.tokenizer(prompt)["input_ids"]
        for _ in range(len(gen.token_ids)):
            with torch.no_grad():
                seq.append(int(lm.model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1].argmax()))
        assert tuple(seq[len(seq) - len(gen.token_ids):]) == gen.token_ids
    pairs = [(p, " Rome") for p in prompts]
    batched = score_probes(lm.model, lm.tokenizer, pairs, batch_size=4)
    single = [score_probes(lm.model, lm.tokenizer, [pair], batch_size=1)[0] for pair in pairs]
    assert [r.pred_ids for r in batched] == [r.pred_ids for r in single]
    assert [r.mean_logprob for r in batched] == pytest.approx([r.mean_logprob for r in single], abs=1e-5)


# --------------------------------------------------------------------------------------------
# Exact restore
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "gemma3"])
def test_restore_removes_the_side_memory_exactly_and_base_weights_never_change(arch):
    lm = tiny(arch)
    before = model_fingerprint(lm.model)
    weights = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    editor = make(lm, steps=5, score="activated" if arch == "gemma3" else "delta")
    handle = editor.apply(lm.model, lm.tokenizer, CASE)
    assert handle.kinds == ("modules",) and handle.first_block == editor._memory.module.layer
    assert model_fingerprint(lm.model) != before
    assert isinstance(getattr(find_layout(lm.model).layers[handle.first_block].mlp, MODULE_NAME), torch.nn.Module)
    assert all(torch.equal(p, weights[n]) for n, p in lm.model.named_parameters())
    handle.restore()
    assert model_fingerprint(lm.model) == before
    assert editor._memory is None
    # a second single-mode edit installs a fresh side memory
    again = editor.apply(lm.model, lm.tokenizer, CASE)
    assert side_state(editor).count == 1
    again.restore()
    assert model_fingerprint(lm.model) == before


def test_each_sequential_handle_undoes_exactly_its_own_edit():
    lm = tiny()
    fresh = model_fingerprint(lm.model)
    editor = make(lm, steps=5, save_freq=2, merge_freq=2)
    handles = [editor.apply_batch(lm.model, lm.tokenizer, [c]) for c in [CASE, *OTHERS[:2]]]
    state = side_state(editor)
    three = ((state.count, state.shards, state.merges, state.min_act), state.tensors(), logits(lm, CASE.prompt))
    fourth = editor.apply_batch(lm.model, lm.tokenizer, [OTHERS[2]])  # closes a shard and merges
    assert (state.count, state.merges) == (4, 2)
    fourth.restore()
    assert (state.count, state.shards, state.merges, state.min_act) == three[0]
    now = state.tensors()
    assert now.keys() == three[1].keys() and all(torch.equal(now[k], three[1][k]) for k in now)
    assert torch.equal(logits(lm, CASE.prompt), three[2])
    for handle in reversed(handles):
        handle.restore()
    assert model_fingerprint(lm.model) == fresh


# --------------------------------------------------------------------------------------------
# Knowledge sharding and merging
# --------------------------------------------------------------------------------------------


def test_shard_masks_are_random_with_the_mask_ratio_and_disjoint_when_asked():
    shape = (64, 128)
    a, b = shard_mask(shape, 0.2, 0, 0), shard_mask(shape, 0.2, 0, 1)
    assert torch.equal(a, shard_mask(shape, 0.2, 0, 0))  # seeded by (seed, shard)
    assert not torch.equal(a, b) and not torch.equal(a, shard_mask(shape, 0.2, 1, 0))
    for m in (a, b):
        assert abs(m.float().mean().item() - 0.2) < 0.02
    assert abs((a & b).float().mean().item() - 0.04) < 0.01  # independent: overlap about ratio^2
    used, masks = None, []
    for shard in range(5):
        m = shard_mask(shape, 0.2, 0, shard, disjoint=True, used=used)
        assert int(m.sum()) == int(0.2 * 64 * 128)
        assert used is None or not (m & used).any()
        used = m if used is None else used | m
        masks.append(m)
    with pytest.raises(BenchError, match="unused entries left"):
        shard_mask(shape, 0.2, 0, 5, disjoint=True, used=used)


def test_ties_merge_of_two_shards_equals_the_hand_computed_merge():
    d1 = torch.tensor([[3.0, -1.0, 0.5], [2.0, 0.0, -4.0]])
    d2 = torch.tensor([[-1.0, -2.0, 1.0], [1.0, 3.0, 2.0]])
    # trim to the 3 largest magnitudes: [[3,0,0],[2,0,-4]] and [[0,-2,0],[0,3,2]]; weights 1/2;
    # elected signs of the weighted sums [[1.5,-1,0],[1,1.5,-1]]: + - + / + + -; disjoint mean
    want = torch.tensor([[3.0, -2.0, 0.0], [2.0, 3.0, -4.0]])
    assert torch.equal(merge_shards([d1, d2], None, "ties", 0.5, 1.0), want)
    # with an earlier merge: weights 0.4 for the shard, 0.6 for the merge, no trimming
    d, m = torch.tensor([[1.0, -1.0]]), torch.tensor([[-2.0, -3.0]])
    assert torch.allclose(merge_shards([d], m, "ties", 1.0, 1.0), torch.tensor([[-2.0, -2.2]]))
    # without sign election or normalisation it is the weighted sum of the trimmed deltas
    assert torch.equal(merge_deltas([d1, d2], [0.5, 0.5], "magnitude", 0.5),
                       torch.tensor([[1.5, -1.0, 0.0], [1.0, 1.5, -1.0]]))


def test_sequential_edits_accumulate_in_one_side_memory_with_shards_and_merges():
    lm = tiny()
    editor = make(lm, steps=5, save_freq=2, merge_freq=4, weight_decay=1e-3)
    proj = find_layout(lm.model).layers[3].mlp_out
    infos, stored_masks = [], []
    for case in [CASE, *OTHERS]:
        handle = editor.apply_batch(lm.model, lm.tokenizer, [case])
        state = side_state(editor)
        infos.append(handle.info["cases"][0])
        if state.count % 2 == 1:
            stored_masks.append(state.mask.clone())
        if state.count == 2:
            stored = list(state.stored)
        assert len(proj._forward_hooks) == 1  # installed once
    assert [i["shard"] for i in infos] == [0, 0, 1, 1, 2]
    assert [i["edits"] for i in infos] == [1, 2, 3, 4, 5]
    assert [i["saved"] for i in infos] == [False, True, False, True, False]
    assert [i["merged"] for i in infos] == [False, False, False, True, False]
    state = side_state(editor)
    assert state.merges == 1 and state.stored == [] and state.shards == 3
    # each shard's task vector lies in its mask (gradient and decay masked)
    assert not (stored[0] * ~stored_masks[0]).any() and stored[0].any()
    assert not (state.shard * ~state.mask).any()
    # between merges, evaluation reads the stored shards and the open one merged (final merge)
    merged, open_shard = state.deployed(editor.hparams)
    assert open_shard is None
    assert torch.allclose(merged, merge_shards([state.shard], state.merged, "ties", 0.53, 1.0))


# --------------------------------------------------------------------------------------------
# Sequential state and resume
# --------------------------------------------------------------------------------------------


def through_a_file(state: dict, tmp_path) -> dict:
    """The state as a checkpoint stores it: tensors in safetensors, the rest as JSON."""
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    plain = {k: v for k, v in state.items() if k not in tensors}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "state.safetensors"))
    return {**load_file(str(tmp_path / "state.safetensors")), **json.loads(json.dumps(plain))}


def test_sequential_state_round_trip_gives_identical_outputs_and_continues_identically(tmp_path):
    lm_a, lm_b = tiny(), tiny()
    fresh = model_fingerprint(lm_b.model)
    hp = {"steps": 5, "save_freq": 2, "merge_freq": 4}
    a = make(lm_a, **hp)
    for case in [CASE, *OTHERS[:2]]:
        a.apply_batch(lm_a.model, lm_a.tokenizer, [case])
    state = through_a_file(a.sequential_state(), tmp_path)
    assert {"shard", "mask", "stored.0", "used", "wise"} <= set(state)
    b = make(lm_b, **hp)
    b.load_sequential_state(state)
    handle = b.reattach(lm_b.model, lm_b.tokenizer)
    assert handle.info["reattached"] and handle.kinds == ("modules",)
    texts = [CASE.prompt, OTHERS[0].prompt, UNRELATED, CASE.rephrase_prompts[0]]
    assert all(torch.equal(logits(lm_a, t), logits(lm_b, t)) for t in texts)
    info_a = a.apply_batch(lm_a.model, lm_a.tokenizer, [OTHERS[2]]).info
    info_b = b.apply_batch(lm_b.model, lm_b.tokenizer, [OTHERS[2]]).info
    assert info_a == info_b
    assert all(torch.equal(logits(lm_a, t), logits(lm_b, t)) for t in texts)
    sa, sb = a.sequential_state(), b.sequential_state()
    assert sa["wise"] == sb["wise"] and all(torch.equal(sa[k], sb[k]) for k in sa if k != "wise")
    handle.restore()
    assert model_fingerprint(lm_b.model) == fresh  # the handle that put the memory on takes it all off
    with pytest.raises(ValueError):
        Wise().load_sequential_state({"count": torch.zeros(1)})
    lm_c = tiny()
    c = make(lm_c, **hp)
    c.load_sequential_state({**state, "shard": torch.zeros(2, 2)})
    with pytest.raises(BenchError, match="does not fit this model"):
        c.reattach(lm_c.model, lm_c.tokenizer)
    assert model_fingerprint(lm_c.model) == fresh  # nothing left behind


class CrashingWise(Wise):
    name = "crashing-wise"
    crash_at: int | None = None

    def apply(self, model, tokenizer, case):
        memory = self._attached(model)
        if CrashingWise.crash_at is not None and memory is not None and memory.state.count >= CrashingWise.crash_at:
            raise KeyboardInterrupt("simulated crash")
        return super().apply(model, tokenizer, case)


# A sequential run on the tiny model (also the SIGKILL resume test of tests/test_view.py): shards
# saved every 2 edits and merged every 4, so a crash at the 6th edit falls after a merge and inside
# an open shard
SEQ_HPARAMS = {k: str(v) for k, v in {**TINY, "steps": 8, "save_freq": 2, "merge_freq": 4,
                                      "irrelevant": "train_split"}.items()}


def seq_options(tmp_path, **changes) -> RunOptions:
    hparams = dict(SEQ_HPARAMS)
    base = dict(editor="crashing-wise", tasks=["counterfact"], model="tiny", device="cpu", limit=None,
                data_dir=str(FIXTURE_DATA), output_dir=str(tmp_path / "runs"), hparams=hparams,
                batch_size=4, mode="sequential", eval_every=2, locality_probes=3, edit_batch=1,
                protocols=("teacher_forced", "wild"))
    base.update(changes)
    return RunOptions(**base)


def test_a_crashed_sequential_run_resumes_to_the_checkpoints_of_an_uninterrupted_one(tmp_path, monkeypatch):
    import bench.session

    monkeypatch.setitem(editors.BUILTIN, "crashing-wise", "tests.test_wise:CrashingWise")
    models = []

    def load(spec="smollm2-135m", device="auto", dtype="auto"):
        models.append(tiny())
        return models[-1]

    monkeypatch.setattr(bench.session, "load_model", load)
    monkeypatch.setattr(bench.session, "load_config", lambda spec="smollm2-135m": tiny_config("llama"))
    straight = execute(seq_options(tmp_path / "a"), log=lambda s: None)
    assert model_fingerprint(models[0].model) == model_fingerprint(tiny().model)  # restored at the end
    records = lines(straight / "cases.jsonl")
    assert [r["edit"]["shard"] for r in records] == [0, 0, 1, 1, 2, 2]
    assert {r["edit"]["irrelevant"] for r in records} == {"train_split"}
    assert [r["edit"]["merged"] for r in records] == [False, False, False, True, False, False]
    CrashingWise.crash_at = 5  # dies making the 6th edit, after the checkpoint at 4
    try:
        with pytest.raises(KeyboardInterrupt):
            execute(seq_options(tmp_path / "b"), log=lambda s: None)
    finally:
        CrashingWise.crash_at = None
    crashed = next((tmp_path / "b" / "runs").iterdir())
    assert [c["n_edits"] for c in lines(crashed / "checkpoints.jsonl")] == [2, 4]
    resume(crashed, log=lambda s: None)
    got, want = lines(crashed / "checkpoints.jsonl"), lines(straight / "checkpoints.jsonl")
    assert [c["n_edits"] for c in got] == [2, 4, 6]
    assert [without_time(c) for c in got] == [without_time(c) for c in want]
    assert [without_time(r) for r in lines(crashed / "cases.jsonl")] == [without_time(r) for r in records]
    a, b = (load_file(str(p / "sequential" / "state.safetensors")) for p in (straight, crashed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
