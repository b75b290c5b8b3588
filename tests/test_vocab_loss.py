"""The one-pass vocabulary loss used by FT on CPU equals the ordinary log-softmax NLL."""

import pytest
import torch

from bench.core.layout import output_logits
from editors import vocab_loss
from editors.vocab_loss import ChunkedTokenNLL, token_nll
from bench.core.tiny import tiny_model


def reference_nll(model, hidden, targets):
    logp = torch.log_softmax(output_logits(model, hidden).float(), -1)
    return -logp.gather(1, targets[:, None]).squeeze(1)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
@pytest.mark.parametrize("chunk", [7, 64, 4096])  # several blocks, a ragged last one, one block
def test_chunked_nll_and_gradient_match_log_softmax(arch, chunk, monkeypatch):
    monkeypatch.setattr(vocab_loss, "CHUNK_ROWS", chunk)
    model = tiny_model(arch).model
    torch.manual_seed(0)
    hidden = torch.randn(3, model.config.hidden_size) * 3
    targets = torch.tensor([5, 17, 5])
    weight = model.get_output_embeddings().weight
    grads = []
    for fn in (lambda h: ChunkedTokenNLL.apply(h, weight, targets), lambda h: reference_nll(model, h, targets)):
        h = hidden.clone().requires_grad_(True)
        nll = fn(h)
        (nll * torch.tensor([1.0, 2.0, 0.5])).sum().backward()
        grads.append((nll.detach(), h.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-5, atol=1e-6)


def test_token_nll_falls_back_when_the_output_layer_is_trainable():
    model = tiny_model("llama").model
    head = model.get_output_embeddings()
    hidden = torch.randn(2, model.config.hidden_size)
    targets = torch.tensor([1, 2])
    head.weight.requires_grad_(True)
    try:
        nll = token_nll(model, hidden, targets)
        assert nll.grad_fn is not None and "Chunked" not in type(nll.grad_fn).__name__
        nll.sum().backward()
        assert head.weight.grad is not None  # the fallback gives the output layer its gradient
    finally:
        head.weight.requires_grad_(False)
        head.weight.grad = None
    fused = token_nll(model, hidden.requires_grad_(True), targets)
    assert "Chunked" in type(fused.grad_fn).__name__
    torch.testing.assert_close(fused, reference_nll(model, hidden, targets))
