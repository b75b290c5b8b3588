"""Generations started from the teacher-forced pass (bench.core.prefill) are the generations of
`generate`, and the teacher-forced readings are unchanged by handing the pass to them."""

from __future__ import annotations

import pytest
import torch
from transformers import Gemma3ForCausalLM

from bench.core.decoding import reference_paths
from bench.core.generation import StopRules, generate
from bench.core.prefill import SharedPrefill
from bench.core.probes import score_probes
from bench.core.tiny import tiny_config, tiny_model, tiny_tokenizer
from tests.test_decoding import CONTEXT, PROMPTS

pytestmark = pytest.mark.usefixtures("one_thread")

RULES = [StopRules(12), StopRules(9, stop_strings=(".", " the")), StopRules(5, at_newline=False)]


@pytest.fixture(scope="module", params=["llama", "gpt2", "gpt_neox", "gemma3"])
def lm(request):
    torch.manual_seed(0)
    return tiny_model(request.param)


def _case(lm, batch: int, tf_batch: int):
    """Prompts with varied rules; probes on most of them (some with multi-token answers, so the
    prompt is a strict prefix of the sequence run) and none on the last two."""
    prompts = PROMPTS + [CONTEXT + p for p in PROMPTS]
    rules = [RULES[i % len(RULES)] for i in range(len(prompts))]
    probes = [(p, a) for p in prompts[:-2] for a in ("Paris", "the French language")]
    prefill = SharedPrefill(lm.model, lm.tokenizer, prompts, rules, batch)
    with_prefill = score_probes(lm.model, lm.tokenizer, probes, tf_batch, prefill=prefill)
    gens = prefill.finish()
    return prompts, rules, probes, with_prefill, gens, prefill


@pytest.mark.parametrize("batch,tf_batch", [(1, 3), (4, 5), (128, 32)])
def test_generations_from_the_teacher_forced_pass_equal_generate(lm, batch, tf_batch):
    prompts, rules, probes, with_prefill, gens, prefill = _case(lm, batch, tf_batch)
    assert prefill.taken == set(range(len(prompts) - 2))  # every prompt a probe begins with
    alone = score_probes(lm.model, lm.tokenizer, probes, tf_batch)
    assert [(r.pred_ids, r.mean_logprob) for r in with_prefill] == [(r.pred_ids, r.mean_logprob) for r in alone]
    for r in RULES:
        idx = [i for i, x in enumerate(rules) if x == r]
        with reference_paths():
            expected = generate(lm.model, lm.tokenizer, [prompts[i] for i in idx], r, batch)
        assert [gens[i] for i in idx] == expected


def test_a_full_sliding_window_leaves_the_rows_to_their_own_prefill():
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    config = tiny_config("gemma3")
    config.sliding_window = 6  # shorter than most prompts: the pass keeps only the last columns
    model = Gemma3ForCausalLM(config).eval()
    prompts = ["Paris", "The Eiffel Tower is located in the city of"]
    prefill = SharedPrefill(model, tok, prompts, [StopRules(6)] * 2, 8)
    score_probes(model, tok, [(p, "Paris") for p in prompts], 1, prefill=prefill)
    gens = prefill.finish()
    assert prefill.taken == {0}
    with reference_paths():
        assert gens == generate(model, tok, prompts, StopRules(6), 8)


def test_on_the_reference_paths_nothing_is_taken_from_the_pass(lm):
    prompts = ["The Eiffel Tower is located in"]
    prefill = SharedPrefill(lm.model, lm.tokenizer, prompts, [StopRules(6)], 8)
    with reference_paths():
        score_probes(lm.model, lm.tokenizer, [(prompts[0], "Paris")], 4, prefill=prefill)
        gens = prefill.finish()
        assert gens == generate(lm.model, lm.tokenizer, prompts, StopRules(6), 8)
    assert not prefill.taken


@pytest.mark.parametrize("tasks", [["counterfact"], ["counterfact", "zsre"]])
def test_sequential_checkpoints_start_generations_from_the_pass_and_record_what_the_reference_paths_do(
        tmp_path, tiny_load, monkeypatch, tasks):
    """At every checkpoint (and the fixed probes' first reading) the wild prompts are started from
    the teacher-forced pass, and the run's records equal those of the paths it replaces."""
    from tests.test_decoding import _runs_agree
    taken: list[int] = []
    take = SharedPrefill.take

    def spy(self, chunk, hidden, cache):
        before = len(self.taken)
        take(self, chunk, hidden, cache)
        taken.append(len(self.taken) - before)
    monkeypatch.setattr(SharedPrefill, "take", spy)
    _runs_agree(tmp_path, editor="ft", tasks=tasks, limit=6, hparams={"steps": 2})
    assert sum(taken) > 0


def test_only_a_model_read_plainly_lets_the_pass_stand_for_a_prefill():
    """Weights alone (or no edit): yes. Modules or hooks may read the whole sequence, and a
    context changes the prompt: no."""
    from bench.evaluation import plain_reading
    from editors.base import EditHandle
    model = tiny_model("llama").model
    name = next(n for n, _ in model.named_parameters())
    assert plain_reading(None)
    assert plain_reading(EditHandle(model))  # the `none` editor's: nothing changed
    assert plain_reading(EditHandle(model, [name]))
    assert not plain_reading(EditHandle(model, [name], modules=True))
    assert not plain_reading(EditHandle(model, context="Paris is in Italy. "))
