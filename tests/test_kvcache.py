"""The key-value cache keyword across transformers versions (bench.core.kvcache)."""

import warnings

import torch

from bench.core.kvcache import cache_arg, cache_of, with_cache
from bench.core.tiny import tiny_model


class New(torch.nn.Module):
    def forward(self, input_ids=None, cache=None):
        return input_ids


class Old(torch.nn.Module):
    def forward(self, input_ids=None, past_key_values=None):
        return input_ids


def test_the_keyword_is_the_one_the_forward_takes():
    assert cache_arg(New()) == "cache" and with_cache(New(), 1) == {"cache": 1}
    assert cache_arg(Old()) == "past_key_values" and with_cache(Old(), 2) == {"past_key_values": 2}


def test_a_real_model_runs_with_its_cache_and_no_deprecation_warning():
    lm = tiny_model("llama")
    ids = torch.tensor([[1, 2, 3, 4]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a deprecated keyword would warn (FutureWarning)
        first = lm.model.model(input_ids=ids[:, :3], use_cache=True)
        cache = cache_of(first)
        assert cache is not None and cache.get_seq_length() == 3
        step = lm.model.model(input_ids=ids[:, 3:], use_cache=True, **with_cache(lm.model.model, cache))
    whole = lm.model.model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(step.last_hidden_state[:, -1], whole[:, -1], rtol=1e-5, atol=1e-5)
