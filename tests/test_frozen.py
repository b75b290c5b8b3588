"""Frozen-prefix caching gives the same numbers as the plain forward pass."""

from __future__ import annotations

import pytest
import torch

from bench.cases import EditCase, PromptAnswer
from editors.frozen import frozen_prefix
from editors.ft import FineTune, FTHparams
from tests.tiny import ARCHS, tiny_model


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
