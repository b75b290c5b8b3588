"""Tiny models and a tiny tokenizer for unit tests and benchmarks: random weights, built from a
config (Llama, GPT-2 Conv1D, GPT-NeoX and Gemma-3 layouts), no download."""

from __future__ import annotations

from functools import lru_cache

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import Gemma3TextConfig, GPT2Config, GPTNeoXConfig, LlamaConfig, PreTrainedTokenizerFast

from bench.core.models import LoadedModel, model_from_config

CORPUS = [
    "The Eiffel Tower is located in the city of Paris.",
    "The mother tongue of Danielle Darrieux is French.",
    "Toko Yasuda plays the guitar. Autonomous University of Madrid is located in Spain.",
    "What is the capital of France? Paris. London is the capital of England.",
    "Fill in the blank: the answer is ___ and the question was asked in English.",
    "Task: Description: Input: Answer: nq question: who wrote the book? The author.",
    "Barack Obama was born in Hawaii. Michael Jordan plays basketball for Chicago.",
    "Danielle Darrieux, a French actress, spoke English and Italian and German too.",
]


@lru_cache(maxsize=None)
def _tokenizer_json() -> str:
    """A byte-level BPE tokenizer (GPT-2 style, leading-space convention) trained on CORPUS."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    return tok.to_str()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
                                  eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    return tok


def tiny_config(arch: str = "llama", vocab_size: int | None = None):
    vocab = vocab_size or len(tiny_tokenizer())
    if arch == "llama":
        return LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=256, tie_word_embeddings=True,
                           pad_token_id=0, bos_token_id=0, eos_token_id=0)
    if arch == "gpt2":
        return GPT2Config(vocab_size=vocab, n_embd=32, n_layer=4, n_head=4, n_positions=256,
                          pad_token_id=0, bos_token_id=0, eos_token_id=0)
    if arch == "gpt_neox":
        return GPTNeoXConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=4, num_attention_heads=4,
                             max_position_embeddings=256, pad_token_id=0, bos_token_id=0,
                             eos_token_id=0)
    if arch == "gemma3":  # sliding-window attention, norms after the MLP, tied embeddings
        return Gemma3TextConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                max_position_embeddings=256, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    raise ValueError(arch)


ARCHS = ("llama", "gpt2", "gpt_neox")  # the layouts most tests run on; tiny_config also makes "gemma3"


def tiny_model(arch: str = "llama", seed: int = 0) -> LoadedModel:
    return model_from_config(tiny_config(arch), tiny_tokenizer(), seed=seed)
