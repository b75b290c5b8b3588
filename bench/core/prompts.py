"""How probe prompts are shown to the model at evaluation: as the data gives them (`plain`), or
as the user turn of the model's chat template (`chat`, for chat models such as SmolLM2-Instruct).
Edits are always computed on the prompts as the data gives them; only evaluation changes."""

from __future__ import annotations

from dataclasses import replace

from bench.core.cases import EditCase, PromptAnswer
from bench.core.errors import BenchError

PROMPT_FORMATS = ("plain", "chat")


def check_prompt_format(tokenizer, fmt: str) -> None:
    if fmt not in PROMPT_FORMATS:
        raise BenchError(f"--prompt-format must be plain or chat, got {fmt!r}")
    if fmt == "chat" and not getattr(tokenizer, "chat_template", None):
        raise BenchError("--prompt-format chat: this model's tokenizer has no chat template")


def format_prompt(tokenizer, prompt: str, fmt: str) -> str:
    """The prompt as given (plain) or as the user turn of the chat template (chat)."""
    if fmt == "plain":
        return prompt
    check_prompt_format(tokenizer, fmt)
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


def format_case(tokenizer, case: EditCase, fmt: str) -> EditCase:
    """The case with every probe prompt (edit, rephrase, locality, portability) formatted."""
    if fmt == "plain":
        return case
    f = lambda text: format_prompt(tokenizer, text, fmt)  # noqa: E731
    return replace(case, prompt=f(case.prompt), rephrase_prompts=tuple(f(p) for p in case.rephrase_prompts),
                   locality=tuple(PromptAnswer(f(pa.prompt), pa.answer) for pa in case.locality),
                   portability=tuple(PromptAnswer(f(pa.prompt), pa.answer) for pa in case.portability))
