"""Metric definitions on hand-checked examples, probe tokenisation, and batching invariance."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, processors
from torch import nn
from transformers import PreTrainedTokenizerFast

from bench.core.cases import EditCase, PromptAnswer
from bench.core.metrics import bootstrap_ci, case_scores, summarize_task
from bench.core.probes import (CaseEval, ProbeResult, build_probes, encode_probe, evaluate_case,
                               predictions, score_probes)
from bench.core.tiny import ARCHS, _tokenizer_json, tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------------
# A model whose next-token distribution is a table we choose: P(next | current token)
# --------------------------------------------------------------------------------------------

WORDS = ["<pad>", "a", "b", "c", "d", "g", "q", "r", "s", "t", "u", "w", "x", "y", "z"]


class WordTokenizer:
    """Whitespace tokenizer over WORDS; no special tokens."""

    pad_token_id = 0
    eos_token_id = None

    def __init__(self):
        self.vocab = {w: i for i, w in enumerate(WORDS)}

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [self.vocab[w] for w in text.split()]}

    def decode(self, ids):
        return " ".join(WORDS[i] for i in ids)


def ids(*words):
    return [WORDS.index(w) for w in words]


class _OneHot(nn.Module):
    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(last_hidden_state=nn.functional.one_hot(input_ids, self.vocab).float())


class BigramLM(nn.Module):
    """base_model(ids) is the one-hot of each token; the output embedding maps the one-hot of the
    current token to log P(next | current), so log_softmax gives back exactly the table."""

    def __init__(self, rules: dict[str, dict[str, float]]):
        super().__init__()
        v = len(WORDS)
        probs = torch.full((v, v), 0.0, dtype=torch.float64)
        for cur in range(v):
            row = rules.get(WORDS[cur], {})
            rest = 1.0 - sum(row.values())
            assert rest > 0
            others = [n for n in range(v) if WORDS[n] not in row]
            probs[cur, others] = rest / len(others)
            for nxt, p in row.items():
                probs[cur, WORDS.index(nxt)] = p
        self.logp = probs.log()
        self.body = _OneHot(v)
        self.head = nn.Linear(v, v, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(self.logp.T.float())  # weight[next, cur]
        self.config = SimpleNamespace()

    @property
    def base_model(self):
        return self.body

    def get_output_embeddings(self):
        return self.head

    def lp(self, cur: str, nxt: str) -> float:
        return float(self.logp[WORDS.index(cur), WORDS.index(nxt)])


# "a b" -> x y z: the model predicts x after b, y after x, but w (not z) after y.
PRE_RULES = {
    "b": {"x": 0.6, "g": 0.3},
    "x": {"y": 0.5},
    "y": {"w": 0.4, "z": 0.3},
    "c": {"x": 0.2, "g": 0.5},  # rephrase c: prefers the old answer g
    "d": {"x": 0.7},  # rephrase d: prefers x
    "q": {"u": 0.5, "r": 0.2},  # locality q -> r s t: the model is wrong at the first position
    "r": {"s": 0.9},
    "s": {"t": 0.6},
}


def test_reliability_is_token_accuracy_two_of_three():
    model, tok = BigramLM(PRE_RULES), WordTokenizer()
    (res,) = score_probes(model, tok, [("a b", "x y z")])
    assert res.answer_ids == ids("x", "y", "z")
    assert res.pred_ids == ids("x", "y", "w")
    assert res.accuracy == pytest.approx(2 / 3)
    expected = (model.lp("b", "x") + model.lp("x", "y") + model.lp("y", "z")) / 3
    assert res.mean_logprob == pytest.approx(expected, abs=1e-6)


def test_evaluate_case_and_scores_end_to_end():
    case = EditCase(case_id="1", task="t", prompt="a b", subject="a", target_new="x y z",
                    ground_truth="g", rephrase_prompts=("c", "d"),
                    locality=(PromptAnswer("q", "r s t"),))
    tok = WordTokenizer()
    pre_model = BigramLM(PRE_RULES)
    # After the "edit": y -> z is now the argmax, and the locality prediction after s changed.
    post_rules = dict(PRE_RULES, y={"z": 0.8}, s={"u": 0.7})
    post_model = BigramLM(post_rules)

    pre = evaluate_case(pre_model, tok, case, counterfact=True)
    post = evaluate_case(post_model, tok, case, counterfact=True)
    s_pre, s_post = case_scores(pre), case_scores(post, pre)

    assert s_pre["reliability"] == pytest.approx(2 / 3)
    # rephrase c: x? no (g), y after x yes, z after y no -> 1/3; rephrase d: x yes, y yes, w no -> 2/3
    assert s_pre["generality"] == pytest.approx((1 / 3 + 2 / 3) / 2)
    assert s_pre["locality"] == 1.0  # by definition before the edit
    # efficacy: mean log P(x y z | a b) vs log P(g | a b)
    lp_new = (math.log(0.6) + math.log(0.5) + math.log(0.3)) / 3
    assert pre.reliability.mean_logprob == pytest.approx(lp_new, abs=1e-6)
    assert pre.truth_prompt.mean_logprob == pytest.approx(math.log(0.3), abs=1e-6)
    assert s_pre["efficacy"] == float(lp_new > math.log(0.3))
    # neighbourhood: log P(r s t | q) vs log P(x y z | q)
    lp_true_loc = (math.log(0.2) + math.log(0.9) + math.log(0.6)) / 3
    lp_new_loc = (pre_model.lp("q", "x") + math.log(0.5) + math.log(0.3)) / 3
    assert s_pre["neighborhood"] == float(lp_true_loc > lp_new_loc) == 1.0

    assert s_post["reliability"] == 1.0
    assert s_post["generality"] == pytest.approx((2 / 3 + 1.0) / 2)
    # locality: pre argmax (u, s, t) vs post (u, s, u) -> 2 of 3 agree, though the first is wrong
    assert pre.locality[0].pred_ids == ids("u", "s", "t")
    assert post.locality[0].pred_ids == ids("u", "s", "u")
    assert s_post["locality"] == pytest.approx(2 / 3)
    assert s_post["efficacy"] == 1.0  # (log .6 + log .5 + log .8)/3 > log .3
    # paraphrase on c: (log .2 + log .5 + log .8)/3 = -0.85 vs log .5 = -0.69 -> no; on d: yes
    assert s_post["paraphrase"] == 0.5
    assert set(s_post) == {"reliability", "generality", "locality", "efficacy", "paraphrase",
                           "neighborhood"}
    assert predictions(tok, post)["prompt"] == "x y z"


def test_build_probes_order_and_counterfact_slots():
    case = EditCase(case_id="1", task="t", prompt="a b", subject="a", target_new="x",
                    ground_truth="g", rephrase_prompts=("c",), locality=(PromptAnswer("q", "r"),),
                    portability=(PromptAnswer("d", "y"),))
    slots = [s for s, _ in build_probes(case, counterfact=True)]
    assert slots == ["reliability", "generality", "locality", "portability", "truth_prompt",
                     "truth_rephrase", "new_on_locality"]
    assert [p for s, p in build_probes(case, counterfact=True) if s == "new_on_locality"] == [("q", "x")]
    assert [s for s, _ in build_probes(case, counterfact=False)] == slots[:4]


def pr(answer, pred, lp=0.0):
    return ProbeResult(answer_ids=answer, pred_ids=pred, mean_logprob=lp)


def test_case_scores_hand_checked():
    pre = CaseEval(
        reliability=pr([1, 2, 3], [1, 2, 9], -2.0),
        generality=[pr([1, 2, 3], [1, 0, 0], -3.0), pr([1, 2, 3], [1, 2, 3], -1.0)],
        locality=[pr([5, 6], [5, 7], -0.5), pr([5], [8], -0.2)],
        portability=[pr([4, 4], [4, 0]), pr([7], [7]), pr([1], [2])],
        truth_prompt=pr([4], [4], -1.0),
        truth_rephrase=[pr([4], [4], -2.5), pr([4], [4], -1.5)],
        new_on_locality=[pr([1], [1], -1.0), pr([1], [1], -0.1)],
    )
    s = case_scores(pre)
    assert s == pytest.approx({"reliability": 2 / 3, "generality": 2 / 3, "locality": 1.0,
                               "portability": (0.5 + 1 + 0) / 3, "efficacy": 0.0,
                               "paraphrase": 0.5, "neighborhood": 0.5})
    post = CaseEval(
        reliability=pr([1, 2, 3], [1, 2, 3], -0.5),
        locality=[pr([5, 6], [5, 6], -0.5), pr([5], [8], -0.2)],  # now correct, but changed
    )
    s = case_scores(post, pre)
    # agreement with pre: (1 + 0)/2 and 1 -> 0.75, although position 2 is now the "right" answer
    assert s == pytest.approx({"reliability": 1.0, "locality": 0.75})
    assert "efficacy" not in s  # no ground-truth probes: no CounterFact metrics


# --------------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------------


def test_summarize_task_percent_ci_n():
    records = [
        {"pre": {"reliability": 0.0, "locality": 1.0}, "post": {"reliability": 1.0, "locality": 0.5},
         "error": None},
        {"pre": {"reliability": 0.5, "locality": 1.0},
         "post": {"reliability": 0.5, "locality": 1.0, "portability": 1.0}, "error": None},
        {"pre": {"reliability": 1.0}, "error": "edit failed"},  # errors are left out
        {"pre": {"reliability": 0.0}, "post": {"reliability": 1.0}},
    ]
    out = summarize_task(records)
    assert set(out) == {"reliability", "locality", "portability"}
    rel = out["reliability"]
    assert rel["n"] == 3
    assert rel["post"] == pytest.approx(round(250 / 3, 4)) == 83.3333
    assert rel["pre"] == pytest.approx(16.6667)
    lo, hi = bootstrap_ci([100.0, 50.0, 100.0])
    assert rel["ci"] == [round(lo, 4), round(hi, 4)]
    assert 50.0 <= rel["ci"][0] <= rel["post"] <= rel["ci"][1] <= 100.0
    assert rel["ci"][0] < rel["ci"][1]
    assert out["locality"] == {"pre": 100.0, "post": 75.0, "ci": out["locality"]["ci"], "n": 2}
    assert out["portability"] == {"pre": None, "post": 100.0, "ci": [100.0, 100.0], "n": 1}


def test_bootstrap_ci_properties():
    assert bootstrap_ci([0.5, 0.5, 0.5]) == (0.5, 0.5)
    assert bootstrap_ci([7.0]) == (7.0, 7.0)
    assert all(math.isnan(v) for v in bootstrap_ci([]))
    values = np.r_[np.ones(30), np.zeros(70)]
    lo, hi = bootstrap_ci(values)
    assert lo < 0.3 < hi and 0.18 < lo and hi < 0.42  # ~ 0.3 +- 1.96 * 0.046
    assert bootstrap_ci(values) == (lo, hi)  # seeded: reproducible
    assert summarize_task([]) == {}


# --------------------------------------------------------------------------------------------
# encode_probe
# --------------------------------------------------------------------------------------------


def special_tokenizer(bos: bool, eos: bool) -> PreTrainedTokenizerFast:
    """tests.tiny's byte-level BPE with a post-processor adding BOS and/or EOS."""
    tok = Tokenizer.from_str(_tokenizer_json())
    sp = "<|endoftext|>"
    sp_id = tok.token_to_id(sp)
    single = " ".join(([f"{sp}:0"] if bos else []) + ["$A:0"] + ([f"{sp}:0"] if eos else []))
    tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=[(sp, sp_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=sp, pad_token=sp,
                                   bos_token=sp if bos else None)


def test_encode_probe_answer_is_a_continuation_with_leading_space():
    tok = tiny_tokenizer()
    prompt = "The Eiffel Tower is located in the city of"
    p, a = encode_probe(tok, prompt, "Paris")
    assert p == tok(prompt)["input_ids"]
    assert tok.convert_ids_to_tokens(a) == ["ĠParis"]  # GPT-2 style: the space is in the token
    assert a == tok(" Paris", add_special_tokens=False)["input_ids"]
    assert tok.decode(p + a) == prompt + " Paris"
    # an answer that already starts with a space gets no second one
    assert encode_probe(tok, prompt, " Paris") == (p, a)
    # multi-token answer: exactly the tokens running text would have
    p2, a2 = encode_probe(tok, "What is the capital of France?", "Paris. London")
    assert p2 + a2 == tok("What is the capital of France? Paris. London")["input_ids"]
    with pytest.raises(ValueError):
        encode_probe(tok, prompt, "")


def test_encode_probe_prompt_ending_in_space():
    tok = tiny_tokenizer()
    p, a = encode_probe(tok, "The city of ", "Paris")
    assert p == tok("The city of ")["input_ids"]
    assert tok.decode(a) == "Paris"  # no separator added: the prompt already has it
    assert tok.decode(p + a) == "The city of Paris"


@pytest.mark.parametrize("bos,eos", [(True, False), (True, True), (False, True)])
@pytest.mark.parametrize("prompt,answer", [("The Eiffel Tower is located in the city of", "Paris"),
                                           ("The city of ", "Paris"),  # prefix mismatch path
                                           ("The mother tongue of Danielle Darrieux is", "French")])
def test_encode_probe_no_special_token_in_the_middle(bos, eos, prompt, answer):
    tok = special_tokenizer(bos, eos)
    special = tok.convert_tokens_to_ids("<|endoftext|>")
    p, a = encode_probe(tok, prompt, answer)
    assert special not in a
    assert (p[0] == special) == bos
    assert special not in p[1:]  # a trailing EOS is dropped from the prompt
    plain = tiny_tokenizer()
    p0, a0 = encode_probe(plain, prompt, answer)
    assert a == a0 and p[int(bos):] == p0


# --------------------------------------------------------------------------------------------
# Batching: right padding must not change anything
# --------------------------------------------------------------------------------------------

PROBES = [
    ("The Eiffel Tower is located in the city of", "Paris"),
    ("Paris", "is the capital of France. London is the capital of England."),
    ("The mother tongue of Danielle Darrieux is", "French"),
    ("What is the capital of France?", "Paris."),
    ("Toko Yasuda plays the", "guitar"),
    ("Barack Obama was born in", "Hawaii"),
    ("Fill in the blank: the answer is ___ and", "the question was asked in English."),
    ("Michael Jordan plays", "basketball for Chicago"),
    ("Task: Description: Input:", "Answer: nq question: who wrote the book? The author."),
    ("London", "is"),
]


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_equals_unbatched(arch):
    lm = tiny_model(arch)
    model, tok = lm.model, lm.tokenizer
    lengths = {len(sum(encode_probe(tok, p, a), [])) for p, a in PROBES}
    assert len(lengths) > 3  # padding is in play

    rows = []
    hook = model.get_output_embeddings().register_forward_hook(
        lambda mod, inp, out: rows.append(inp[0].shape[0]))
    one = score_probes(model, tok, PROBES, batch_size=1)
    hook.remove()
    many = score_probes(model, tok, PROBES, batch_size=8)
    odd = score_probes(model, tok, PROBES, batch_size=3)
    # vocabulary logits only at answer positions (one run per probe here: no shared prefixes)
    assert sorted(rows) == sorted(len(encode_probe(tok, p, a)[1]) for p, a in PROBES)

    for r1, r8, r3, (prompt, answer) in zip(one, many, odd, PROBES):
        assert r1.answer_ids == r8.answer_ids == r3.answer_ids
        assert r1.pred_ids == r8.pred_ids == r3.pred_ids
        assert r8.mean_logprob == pytest.approx(r1.mean_logprob, abs=1e-5)
        assert r3.mean_logprob == pytest.approx(r1.mean_logprob, abs=1e-5)
        # and both agree with an ordinary full forward pass of the unpadded sequence
        p_ids, a_ids = encode_probe(tok, prompt, answer)
        with torch.no_grad():
            logits = model(torch.tensor([p_ids + a_ids])).logits[0].float()
        logp = torch.log_softmax(logits[len(p_ids) - 1: len(p_ids) - 1 + len(a_ids)], -1)
        assert r1.pred_ids == logp.argmax(-1).tolist()
        ref = logp.gather(1, torch.tensor(a_ids)[:, None]).mean().item()
        assert r1.mean_logprob == pytest.approx(ref, abs=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_probes_sharing_a_prefix_are_read_from_one_run(arch):
    """The same prompt with a one-token and a longer answer, and a probe whose whole sequence
    lies inside another's: one sequence is run for them, with the numbers of separate runs."""
    lm = tiny_model(arch)
    model, tok = lm.model, lm.tokenizer
    prompt = "The mother tongue of Danielle Darrieux is"
    probes = [(prompt, "French"), (prompt, "English"), (prompt, "the French language"),
              (prompt + " the", "French"), ("Toko Yasuda plays the", "guitar")]
    p_ids, a_ids = encode_probe(tok, prompt, "the French language")
    assert len(encode_probe(tok, prompt, "French")[1]) == 1 and len(a_ids) > 2
    assert encode_probe(tok, prompt + " the", "French")[0] == p_ids + a_ids[:1]  # inside the long one
    batches = []
    hook = model.base_model.register_forward_hook(lambda mod, inp, out: batches.append(out[0].shape[0]))
    together = score_probes(model, tok, probes, batch_size=8)
    hook.remove()
    assert batches == [2]  # 2 sequences run: the long answer's and Toko Yasuda's
    for probe, res in zip(probes, together):
        (alone,) = score_probes(model, tok, [probe], batch_size=1)
        assert res.answer_ids == alone.answer_ids and res.pred_ids == alone.pred_ids
        assert res.mean_logprob == pytest.approx(alone.mean_logprob, abs=1e-5)
