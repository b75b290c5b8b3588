"""Frozen-prefix caching gives the same numbers as the plain forward pass."""

from __future__ import annotations

import pytest
import torch

from bench.core.cases import EditCase, PromptAnswer
from editors.frozen_prefix import frozen_prefix
from editors.ft import FineTune, FTHparams
from bench.core.tiny import ARCHS, tiny_model


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("layer", [0, 2])
def test_stubbed_forward_matches_full_forward_after_a_weight_change(arch, layer):
    lm = tiny_model(arch)
    model, layout = lm.model, lm.layout
    ids = lm.tokenizer("The mother tongue of Danielle Darrieux is", return_tensors="pt")["input_ids"]
    weight = layout.layers[layer].mlp_out.weight
    with torch.no_grad():
        delta = 0.05 * torch.randn_like(weight)
        weight.add_(delta)
        full = model.base_model(input_ids=ids).last_hidden_state
        weight.sub_(delta)
    with frozen_prefix(model, layout, layer, input_ids=ids):
        with torch.no_grad():
            weight.add_(delta)
            stubbed = model.base_model(input_ids=ids).last_hidden_state
            weight.sub_(delta)
    torch.testing.assert_close(stubbed, full, rtol=1e-5, atol=1e-5)
    # The stubs are gone afterwards.
    assert "forward" not in vars(layout.blocks[0]) and "forward" not in vars(layout.layers[layer].mlp)


@pytest.mark.parametrize("arch", ARCHS)
def test_ft_with_and_without_frozen_prefix_agree(arch):
    case = EditCase(case_id="1", task="counterfact", prompt="The mother tongue of Danielle Darrieux is",
                    subject="Danielle Darrieux", target_new="English", ground_truth="French",
                    locality=(PromptAnswer("The Eiffel Tower is located in", "Paris"),))
    results = []
    for frozen in (True, False):
        lm = tiny_model(arch)
        hp = FTHparams(layers=[2], steps=5, lr=1e-2, norm_constraint=None,
                       objective="target_masked", frozen_prefix=frozen, min_loss=0.0)
        FineTune(hp).apply(lm.model, lm.tokenizer, case)
        results.append(lm.layout.layers[2].mlp_out.weight.detach().clone())
    torch.testing.assert_close(results[0], results[1], rtol=1e-4, atol=1e-6)


EVAL_CASE = EditCase(case_id="1", task="counterfact", prompt="The mother tongue of Danielle Darrieux is",
                     subject="Danielle Darrieux", target_new="English", ground_truth="French",
                     rephrase_prompts=("Danielle Darrieux spoke the language",),
                     locality=(PromptAnswer("The Eiffel Tower is located in", "Paris"),
                               PromptAnswer("Michael Jordan plays the sport of", "basketball")))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("layer", [1, 3])
def test_post_edit_evaluation_reusing_unchanged_blocks_is_identical(arch, layer, monkeypatch):
    """Recorded pre-edit block outputs replace the blocks below the edit: the same numbers,
    bit for bit, and those blocks' own forward never runs (batch size 1: several passes)."""
    from bench.core.probes import evaluate_case
    from bench.core.replay import BlockOutputs, first_changed_block

    lm = tiny_model(arch)
    model, layout = lm.model, lm.layout
    outputs = BlockOutputs(layout)
    with outputs.record():
        evaluate_case(model, lm.tokenizer, EVAL_CASE, counterfact=True, batch_size=1)
    assert len(outputs.passes) == 4  # 8 probes, read from 4 sequences (new and true answers share)
    handle = FineTune(FTHparams(layers=[layer], steps=3, lr=5e-2, norm_constraint=None)).apply(
        model, lm.tokenizer, EVAL_CASE)
    first = first_changed_block(layout, handle.changed)
    assert first == layer
    full = evaluate_case(model, lm.tokenizer, EVAL_CASE, counterfact=True, batch_size=1)

    block_class = type(layout.blocks[0])
    calls = []
    original = block_class.forward

    def counting(self, *args, **kwargs):
        calls.append(next(i for i, b in enumerate(layout.blocks) if b is self))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(block_class, "forward", counting)
    with outputs.replay(first):
        reused = evaluate_case(model, lm.tokenizer, EVAL_CASE, counterfact=True, batch_size=1)
    monkeypatch.undo()
    handle.restore()
    assert sorted(set(calls)) == list(range(layer, layout.num_layers))
    assert reused == full  # dataclasses of floats and ids: exact equality
    assert full.reliability != evaluate_case(model, lm.tokenizer, EVAL_CASE, counterfact=True).reliability
    assert "forward" not in vars(layout.blocks[0])
    with outputs.replay(first), pytest.raises(RuntimeError, match="differs from the recorded"):
        evaluate_case(model, lm.tokenizer, EVAL_CASE, counterfact=True, batch_size=3)


def test_first_changed_block_from_parameter_names():
    from bench.core.replay import first_changed_block

    lm = tiny_model("llama")
    layout = lm.layout
    names = [n for n, _ in lm.model.named_parameters()]
    in_block = lambda i: [n for n in names if n.startswith(f"{layout.blocks_name}.{i}.")]  # noqa: E731
    assert first_changed_block(layout, in_block(3)[:1] + in_block(2)[-1:]) == 2
    assert first_changed_block(layout, []) == layout.num_layers
    embedding = [n for n, p in lm.model.named_parameters() if p is layout.embeddings.weight]
    assert first_changed_block(layout, in_block(3) + embedding) is None
