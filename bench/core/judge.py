"""An optional judge of generated answers, as "The Mirage of Model Editing" (Yang et al., 2025)
uses: a local causal LM, or any OpenAI-compatible chat-completions endpoint (vLLM, llama.cpp's
server, hosted APIs). One fixed, versioned prompt asks whether the generated answer states the
expected one; the verdict and the judge's raw output are kept. An endpoint is asked once before
a run's first edit (`HTTPJudge.check`): one that cannot be reached stops the run there, one line.
A judge that fails later is retried, then its verdict is recorded as an error (never a crash of
the run). An API key comes from the environment ($BENCH_JUDGE_API_KEY) and is never written
anywhere.
"""

from __future__ import annotations

import http.client
import json
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import torch

from bench.core.errors import BenchError

JUDGE_PROMPT_VERSION = "judge-prompt/v1"
JUDGE_SYSTEM = ("You grade answers to factual prompts. Reply with exactly one word: yes or no.")
JUDGE_TEMPLATE = ("Prompt: {prompt}\n"
                  "Expected answer: {target}\n"
                  "Model's answer: {generated}\n"
                  "Does the model's answer state the expected answer? Reply yes or no.")
API_KEY_ENV = "BENCH_JUDGE_API_KEY"


@dataclass(frozen=True)
class JudgeItem:
    prompt: str
    generated: str
    target: str


@dataclass(frozen=True)
class Verdict:
    correct: bool | None  # None: the judge's reply could not be read, or the judge failed
    raw: str  # the judge's reply as it came
    error: str | None = None


def judge_messages(item: JudgeItem) -> list[dict]:
    return [{"role": "system", "content": JUDGE_SYSTEM},
            {"role": "user", "content": JUDGE_TEMPLATE.format(prompt=item.prompt.strip(),
                                                              target=item.target.strip(),
                                                              generated=item.generated.strip())}]


def parse_verdict(reply: str) -> bool | None:
    """yes -> True, no -> False (the first word, any case and punctuation), else None."""
    words = reply.strip().lower().replace(".", " ").replace(",", " ").replace("!", " ").split()
    if not words:
        return None
    return {"yes": True, "no": False}.get(words[0])


class HTTPJudge:
    """A judge behind an OpenAI-compatible chat-completions endpoint (`url` is the API base, e.g.
    http://localhost:8000/v1)."""

    def __init__(self, url: str, model: str, attempts: int = 3, timeout_s: float = 30.0,
                 backoff_s: float = 0.5):
        if not url.startswith(("http://", "https://")):
            raise BenchError(f"--judge-url must be an http(s) URL, got {url!r}")
        if not model:
            raise BenchError("--judge-url needs --judge-model (the model name the endpoint serves)")
        self.url = url.rstrip("/") + "/chat/completions"
        self.model, self.attempts, self.timeout_s, self.backoff_s = model, attempts, timeout_s, backoff_s
        self.name = f"http:{model}"

    def check(self, timeout_s: float = 10.0) -> None:
        """Ask the endpoint once (a trivial question, `timeout_s` at most, no retry) before a run
        starts editing: BenchError (one line) when it cannot be reached, refuses the request (a
        4xx status: a wrong path, model name or key) or does not answer as a chat-completions
        endpoint. A server error (5xx) passes: the verdicts record it per probe, as they record
        any later failure."""
        item = JudgeItem("The capital of France is", "Paris", "Paris")
        head = f"the judge endpoint {self.url}"
        try:
            self._ask(item, timeout_s)
        except urllib.error.HTTPError as exc:
            if 400 <= exc.code < 500:
                raise BenchError(f"{head} refused the request (HTTP {exc.code} {exc.reason}); check "
                                 f"--judge-url, --judge-model and ${API_KEY_ENV}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise BenchError(f"{head} cannot be reached ({' '.join(str(reason).split())[:120]}; "
                             f"waited at most {timeout_s:g} s); start it or drop --judge-url") from None
        except (ValueError, KeyError, IndexError, TypeError, http.client.HTTPException) as exc:
            raise BenchError(f"{head} does not answer as an OpenAI-compatible chat-completions "
                             f"endpoint ({type(exc).__name__}: {' '.join(str(exc).split())[:120]})") from None

    def _ask(self, item: JudgeItem, timeout_s: float | None = None) -> str:
        body = json.dumps({"model": self.model, "messages": judge_messages(item), "temperature": 0,
                           "max_tokens": 4}).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(API_KEY_ENV)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        with urllib.request.urlopen(request, timeout=timeout_s or self.timeout_s) as response:
            reply = json.loads(response.read().decode("utf-8"))
        return str(reply["choices"][0]["message"]["content"])

    def judge(self, items: list[JudgeItem]) -> list[Verdict]:
        out = []
        for item in items:
            error = None
            for attempt in range(self.attempts):
                try:
                    raw = self._ask(item)
                    out.append(Verdict(parse_verdict(raw), raw))
                    break
                except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError, TypeError,
                        http.client.HTTPException) as exc:
                    error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                    if attempt + 1 < self.attempts:
                        time.sleep(self.backoff_s * 2 ** attempt)
            else:
                out.append(Verdict(None, "", f"judge failed after {self.attempts} attempts: {error}"))
        return out


class LocalJudge:
    """A causal LM in this process as the judge (greedy, a few tokens); the chat template is used
    where the tokenizer has one."""

    def __init__(self, lm, spec: str, max_new_tokens: int = 3):
        self.lm, self.max_new_tokens = lm, max_new_tokens
        self.name = f"local:{spec}"

    def _text(self, item: JudgeItem) -> str:
        tok = self.lm.tokenizer
        if getattr(tok, "chat_template", None):
            return tok.apply_chat_template(judge_messages(item), tokenize=False, add_generation_prompt=True)
        return JUDGE_SYSTEM + "\n" + judge_messages(item)[1]["content"] + "\nAnswer:"

    @torch.no_grad()
    def judge(self, items: list[JudgeItem]) -> list[Verdict]:
        tok, model = self.lm.tokenizer, self.lm.model
        out = []
        for item in items:
            enc = tok(self._text(item), return_tensors="pt").to(self.lm.device)
            ids = model.generate(**enc, do_sample=False, max_new_tokens=self.max_new_tokens,
                                 pad_token_id=tok.pad_token_id)
            raw = tok.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            out.append(Verdict(parse_verdict(raw), raw))
        return out
