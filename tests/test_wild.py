"""Evaluation in the wild: natural stopping, scorers, the wild metrics, the judge client, the
default cap, the reuse of pre-edit generations after an edit, and runs with either protocol."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from bench.core.cases import EditCase, PromptAnswer
from bench.core.errors import BenchError
from bench.core.generation import Generation, StopRules, _cut, as_generation, generate, regenerate
from bench.core.judge import HTTPJudge, JudgeItem, parse_verdict
from bench.core.probes import encode_probe, evaluate_case
from bench.core.scorers import answer_first, exact_match, normalize_answer, token_f1
from bench.core.tiny import tiny_model, tiny_tokenizer
from bench.core.wild import WildSettings, default_max_new_tokens, generate_cases, wild_result
from bench.runner import execute
from bench.session import RunOptions
from tasks.registry import list_cards, load_split
from tests.helpers import FIXTURE_DATA

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "The mother tongue of Danielle Darrieux is"


def greedy_ids(lm, prompt: str, n: int) -> list[int]:
    enc = lm.tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = lm.model.generate(**enc, do_sample=False, max_new_tokens=n, min_new_tokens=n,
                                pad_token_id=lm.tokenizer.pad_token_id)
    return out[0, enc["input_ids"].shape[1]:].tolist()


# --------------------------------------------------------------------------------------------
# Stopping
# --------------------------------------------------------------------------------------------


def test_cut_at_newline_and_stop_strings_after_the_answer_has_begun():
    rules = StopRules(max_new_tokens=10, stop_strings=(". ",))
    assert _cut(" Paris\nand more", rules) == (" Paris", "newline")
    assert _cut("\n\n Paris\nmore", rules) == ("\n\n Paris", "newline")  # leading blank lines kept
    assert _cut(" Paris. It is", rules) == (" Paris", "stop_string")
    assert _cut(". Paris", rules) == (". Paris", None)  # a marker before any answer does not stop
    assert _cut(" Paris", rules) == (" Paris", None)
    assert _cut(" a\nb", StopRules(max_new_tokens=5, at_newline=False)) == (" a\nb", None)


def test_generation_stops_at_the_cap_at_eos_and_at_a_stop_string():
    lm = tiny_model("llama")
    tok = lm.tokenizer
    free = greedy_ids(lm, PROMPT, 6)
    # the cap: exactly max_new_tokens, never cut to anything shorter
    (gen,) = generate(lm.model, tok, [PROMPT], StopRules(max_new_tokens=6, at_newline=False))
    assert gen.stop == "max_new_tokens" and list(gen.token_ids) == free
    assert gen.text == tok.decode(free)
    # EOS: a tokenizer whose end-of-sequence token is the model's third greedy token
    eos_tok = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer,
                                      eos_token=tok.convert_ids_to_tokens(free[2]), pad_token=tok.pad_token)
    (gen,) = generate(lm.model, eos_tok, [PROMPT], StopRules(max_new_tokens=6, at_newline=False))
    first = free.index(free[2])  # the first time that token comes
    assert gen.stop == "eos" and list(gen.token_ids) == free[:first]
    # a stop string: the text of the fourth token, which follows some answer text
    marker = tok.decode(free[3:4])
    if marker.strip() and marker not in tok.decode(free[:3]):
        (gen,) = generate(lm.model, tok, [PROMPT], StopRules(max_new_tokens=6, stop_strings=(marker,),
                                                             at_newline=False))
        assert gen.stop == "stop_string" and gen.text == tok.decode(free[:3]).split(marker)[0]


def test_a_newline_token_stops_the_answer():
    tok = tiny_tokenizer()
    newline = tok("\n", add_special_tokens=False)["input_ids"]
    word = tok(" Paris", add_special_tokens=False)["input_ids"]
    rules = StopRules(max_new_tokens=20)
    gen = as_generation(tok, word + newline + word, tok.eos_token_id, rules)
    assert (gen.text, gen.stop) == (" Paris", "newline")
    gen = as_generation(tok, newline + word + [tok.eos_token_id] + word, tok.eos_token_id, rules)
    assert (gen.text, gen.stop, gen.n_tokens) == ("\n Paris", "eos", len(newline + word))


def test_batched_generation_equals_one_prompt_at_a_time():
    lm = tiny_model("gpt2")
    prompts = [PROMPT, "Toko Yasuda plays the", "What is the capital of France?"]
    rules = StopRules(max_new_tokens=5)
    together = generate(lm.model, lm.tokenizer, prompts, rules)
    alone = [generate(lm.model, lm.tokenizer, [p], rules)[0] for p in prompts]
    assert [g.token_ids for g in together] == [g.token_ids for g in alone]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
def test_regenerate_after_an_edit_equals_generating_again(arch):
    """Reusing the pre-edit generations that the edited model reproduces gives what generating
    from scratch gives (here on a model whose one MLP projection was changed)."""
    lm = tiny_model(arch)
    prompts = [PROMPT, "Toko Yasuda plays the", "Barack Obama was born in", "London is the capital of"]
    rules = StopRules(max_new_tokens=6)
    before = generate(lm.model, lm.tokenizer, prompts, rules)
    assert regenerate(lm.model, lm.tokenizer, prompts, before, rules) == before  # nothing changed
    weight = lm.layout.layers[-1].mlp_out.weight
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        weight.add_(torch.randn(weight.shape, generator=generator) * weight.abs().max() * 20)
    after = generate(lm.model, lm.tokenizer, prompts, rules)
    assert after != before  # the edit changed some answers ...
    assert regenerate(lm.model, lm.tokenizer, prompts, before, rules) == after  # ... and exactly those


# --------------------------------------------------------------------------------------------
# Scorers and wild metrics
# --------------------------------------------------------------------------------------------


def test_scorers_on_hand_made_generations():
    assert normalize_answer("  The Eiffel-Tower, in PARIS! ") == "eiffeltower in paris"
    assert exact_match(" Paris.", "paris") == 1.0 and exact_match(" Paris, France", "Paris") == 0.0
    assert answer_first(" Paris, France.", "Paris") == 1.0
    assert answer_first(" Parisian food", "Paris") == 0.0  # whole words only
    assert answer_first(" the Louvre", "Louvre") == 1.0  # articles do not count
    assert answer_first(" It is Paris", "Paris") == 0.0
    assert token_f1(" Paris France", "Paris") == pytest.approx(2 / 3)
    assert token_f1("London", "Paris") == 0.0 and token_f1("", "") == 1.0


def G(text: str, stop: str = "newline") -> Generation:  # noqa: N802 - a short constructor for tables
    return Generation(text=text, stop=stop, n_tokens=len(text.split()))


CASE = EditCase(case_id="1", task="t", prompt="The capital of France is", subject="France",
                target_new="Rome", ground_truth="Paris",
                rephrase_prompts=("France's capital is", "The French capital is"),
                locality=(PromptAnswer("Germany's capital is", "Berlin"),
                          PromptAnswer("Spain's capital is", "Madrid")),
                portability=(PromptAnswer("The capital of France lies in the country of", "Italy"),))


def test_wild_metrics_by_hand():
    settings = WildSettings(rules=StopRules(max_new_tokens=8), scorer="answer_first")
    # probes: prompt, 2 rephrases, 2 locality, 1 portability
    pre = [G(" Paris"), G(" Paris"), G(" Paris, of course"), G(" Berlin"), G(" Madrid."), G(" France")]
    post = [G(" Rome, Italy"), G(" Rome"), G(" Paris"), G(" Berlin"), G(" Barcelona"), G(" Italy")]
    res = wild_result(CASE, pre, post, settings)
    assert res["pre"] == {"wild_reliability": 0.0, "wild_generality": 0.0, "wild_portability": 0.0,
                          "wild_locality_correct": 1.0, "wild_locality": 1.0}
    assert res["post"] == {"wild_reliability": 1.0, "wild_generality": 0.5, "wild_portability": 1.0,
                           "wild_locality_correct": 0.5, "wild_locality": 0.5}
    # exact_match is stricter: " Rome, Italy" does not count
    strict = wild_result(CASE, pre, post, WildSettings(rules=StopRules(max_new_tokens=8), scorer="exact_match"))
    assert strict["post"]["wild_reliability"] == 0.0 and strict["post"]["wild_generality"] == 0.5
    record = res["record"]
    assert record["generations"]["post"]["prompt"] == {"text": " Rome, Italy", "stop": "newline", "tokens": 2}
    assert record["verdicts"]["post"]["prompt"] == {"answer_first": 1.0, "exact_match": 0.0,
                                                   "token_f1": pytest.approx(2 / 3)}
    assert len(record["generations"]["post"]["locality"]) == 2


def test_teacher_forced_one_but_generated_zero():
    """The answer fed gives token accuracy 1.0; the model left to itself says more than the
    target, so exact match in the wild is 0."""
    lm = tiny_model("llama")
    free = greedy_ids(lm, PROMPT, 4)
    target = lm.tokenizer.decode(free[:1])
    assert encode_probe(lm.tokenizer, PROMPT, target)[1] == free[:1]  # one token, as generated
    case = EditCase(case_id="c", task="t", prompt=PROMPT, subject="Danielle Darrieux", target_new=target)
    forced = evaluate_case(lm.model, lm.tokenizer, case)
    assert forced.reliability.accuracy == 1.0
    settings = WildSettings(rules=StopRules(max_new_tokens=4, at_newline=False), scorer="exact_match")
    (gens,) = generate_cases(lm.model, lm.tokenizer, [case], settings)
    assert normalize_answer(gens[0].text) != normalize_answer(target)
    assert wild_result(case, gens, gens, settings)["post"]["wild_reliability"] == 0.0


def test_the_default_cap_cuts_no_gold_answer_of_the_fixture_tasks():
    tok = tiny_tokenizer()
    for name in list_cards():
        for holdout in (False, True):
            try:
                cases = load_split(name, "eval", FIXTURE_DATA, holdout=holdout).cases
            except BenchError:
                continue  # e.g. convsent's test file is not in the fixtures under that name
            if not cases:
                continue
            cap = default_max_new_tokens(tok, cases)
            longest = max(len(encode_probe(tok, p, a)[1]) for c in cases
                          for p, a in [(c.prompt, c.target_new)] + [(q.prompt, q.answer) for q in c.locality + c.portability])
            assert cap >= longest, name


def test_unknown_scorer_and_judge_scorer_without_a_judge():
    with pytest.raises(BenchError, match="unknown scorer 'fuzzy'"):
        WildSettings(rules=StopRules(max_new_tokens=3), scorer="fuzzy")
    with pytest.raises(BenchError, match="needs --judge"):
        WildSettings(rules=StopRules(max_new_tokens=3), scorer="judge")


# --------------------------------------------------------------------------------------------
# The judge
# --------------------------------------------------------------------------------------------


class _Judge(BaseHTTPRequestHandler):
    """A chat-completions endpoint on loopback: `plan` (a list) says what each request gets:
    a reply text, or an HTTP status code to fail with."""

    plan: list = []
    seen: list = []

    def do_POST(self):  # noqa: N802 - the http.server API
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append((self.path, body, self.headers.get("Authorization")))
        step = type(self).plan.pop(0) if type(self).plan else "yes"
        if isinstance(step, int):
            self.send_response(step)
            self.end_headers()
            return
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": step}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):  # quiet
        pass


@pytest.fixture
def judge_server():
    server = HTTPServer(("127.0.0.1", 0), _Judge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Judge.plan, _Judge.seen = [], []
    yield f"http://127.0.0.1:{server.server_port}/v1"
    server.shutdown()


def test_judge_verdicts_retries_and_recorded_failure(judge_server, monkeypatch):
    monkeypatch.setenv("BENCH_JUDGE_API_KEY", "secret-key")
    item = JudgeItem("The capital of France is", " Rome", "Rome")
    judge = HTTPJudge(judge_server, "judge-model", attempts=3, backoff_s=0.01)
    _Judge.plan = ["Yes.", "no", "maybe so", 500, 503, "YES"]
    verdicts = judge.judge([item, item, item, item])
    assert [v.correct for v in verdicts] == [True, False, None, True]  # the 4th after two 5xx retries
    assert verdicts[2].raw == "maybe so" and verdicts[2].error is None
    path, body, auth = _Judge.seen[0]
    assert path == "/v1/chat/completions" and body["model"] == "judge-model" and body["temperature"] == 0
    assert auth == "Bearer secret-key"
    assert "Expected answer: Rome" in body["messages"][-1]["content"]
    _Judge.plan = [500, 500, 500]
    (failed,) = judge.judge([item])
    assert failed.correct is None and "judge failed after 3 attempts" in failed.error
    assert parse_verdict("  No, it does not") is False and parse_verdict("") is None


def test_a_run_judged_over_http_stores_verdicts_and_survives_a_failing_judge(tmp_path, tiny_load, judge_server):
    _Judge.plan = ["yes"] * 200
    opts = RunOptions(editor="none", tasks=["zsre"], model="tiny", device="cpu", limit=None,
                      data_dir=str(FIXTURE_DATA), output_dir=str(tmp_path / "runs"), batch_size=4,
                      protocols=["wild"], judge_url=judge_server, judge_model="j", max_new_tokens=3)
    path = execute(opts, log=lambda s: None)
    config = json.loads((path / "config.json").read_text())
    assert config["wild"]["zsre"]["scorer"] == "judge"  # the judge is the primary scorer by default
    assert config["wild"]["zsre"]["judge"] == {"name": "http:j", "prompt": "judge-prompt/v1"}
    assert "secret" not in (path / "config.json").read_text()
    (record,) = [json.loads(line) for line in (path / "cases.jsonl").read_text().splitlines()]
    verdict = record["wild"]["verdicts"]["post"]["prompt"]
    assert verdict["judge"] == 1.0 and verdict["judge_raw"] == "yes"
    assert record["post"]["wild_reliability"] == 1.0 and "reliability" not in record["post"]
    # a judge that is down: the run finishes, the verdicts say so, the metric is absent
    _Judge.plan = [500] * 1000
    opts.run_name = "down"
    path = execute(opts, log=lambda s: None)
    (record,) = [json.loads(line) for line in (path / "cases.jsonl").read_text().splitlines()]
    verdict = record["wild"]["verdicts"]["post"]["prompt"]
    assert verdict["judge"] is None and "judge failed" in verdict["judge_error"]
    assert "wild_reliability" not in record["post"] and record["error"] is None


# --------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------


def _run(tmp_path, **changes) -> Path:
    base = dict(editor="ft", tasks=["counterfact", "zsre"], model="tiny", device="cpu", limit=3,
                data_dir=str(FIXTURE_DATA), output_dir=str(tmp_path / "runs"), batch_size=4,
                hparams={"steps": "2", "layers": "1"})
    base.update(changes)
    return execute(RunOptions(**base), log=lambda s: None)


def test_both_protocols_side_by_side_and_each_alone(tmp_path, tiny_load):
    both = _run(tmp_path, run_name="both")
    records = [json.loads(line) for line in (both / "cases.jsonl").read_text().splitlines()]
    for r in records:
        assert {"reliability", "wild_reliability", "wild_locality"} <= set(r["post"])
        assert set(r["wild"]["generations"]) == {"pre", "post"}
        assert r["pre"]["wild_locality"] == 1.0
    summary = json.loads((both / "summary.json").read_text())
    assert {"reliability", "wild_reliability"} <= set(summary["tasks"]["counterfact"])
    stops = summary["task_info"]["counterfact"]["wild"]
    assert stops["generations"] == sum(stops["stops"].values()) > 0
    config = json.loads((both / "config.json").read_text())
    assert config["protocols"] == ["teacher_forced", "wild"]
    assert config["wild"]["counterfact"]["stop_strings"] == [". ", ", ", "; "]
    forced = _run(tmp_path, run_name="forced", protocols=["teacher_forced"])
    r = json.loads((forced / "cases.jsonl").read_text().splitlines()[0])
    assert "wild" not in r and not any(k.startswith("wild_") for k in r["post"])
    # the teacher-forced numbers do not depend on whether the wild protocol ran too
    a = [json.loads(line) for line in (forced / "cases.jsonl").read_text().splitlines()]
    assert [x["post"]["reliability"] for x in a] == [x["post"]["reliability"] for x in records]
    wild = _run(tmp_path, run_name="wild", protocols=["wild"])
    r = json.loads((wild / "cases.jsonl").read_text().splitlines()[0])
    assert "predictions" not in r and "reliability" not in r["post"] and "wild_reliability" in r["post"]


def test_protocol_option_errors(tmp_path, tiny_load):
    for changes, message in [({"protocols": ["fuzzy"]}, "--protocol must name teacher_forced and/or wild"),
                             ({"max_new_tokens": 0}, "--max-new-tokens must be at least 1"),
                             ({"wild_scorer": "judge"}, "needs --judge"),
                             ({"judge_url": "http://x"}, "--judge-url needs --judge-model"),
                             ({"prompt_format": "xml"}, "--prompt-format must be plain or chat")]:
        with pytest.raises(BenchError, match=message):
            _run(tmp_path, **changes)
    assert tiny_load == []  # refused before the model loads


def test_bench_ablate_scores_every_switch(tmp_path, tiny_model_dir, capsys):
    from bench.cli import main

    argv = ["ablate", "--editor", "ft", "--task", "counterfact", "--limit", "2", "--model", str(tiny_model_dir),
            "--device", "cpu", "--data-dir", str(FIXTURE_DATA), "--output-dir", str(tmp_path),
            "--hparam", "steps=2", "--hparam", "layers=1", "--formats", "plain"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| fed | target length | token accuracy |" in out and "| generated | natural | answer first |" in out
    (run,) = tmp_path.iterdir()
    assert run.name.startswith("ablate-ft-counterfact-")
    records = [json.loads(line) for line in (run / "cases.jsonl").read_text().splitlines()]
    for r in records:
        variants = r["ablation"]["plain"]
        # the teacher-forced token variant is the run's own teacher-forced reliability
        assert variants["forced_token"]["reliability"] == pytest.approx(r["post"]["reliability"])
        assert variants["generated_natural_first"]["reliability"] == r["post"]["wild_reliability"]
        assert all(0.0 <= v <= 1.0 for entry in variants.values() for v in entry.values())
        assert variants["forced_whole"]["reliability"] <= variants["forced_token"]["reliability"]
    block = json.loads((run / "summary.json").read_text())["ablation"]
    assert block["plain"]["forced_token"]["reliability"]["n"] == 2
    # a chat format on a tokenizer without a chat template is refused before the cases
    assert main(argv[:-1] + ["chat"]) == 2
    assert "no chat template" in capsys.readouterr().err
