"""Turning one raw record into an EditCase with the card's Jinja `fields` templates.

Templates are rendered with a NativeEnvironment, so a template that is a single expression
(`{{ [rephrase_prompt] }}`) yields the Python value itself (list, dict, str, int). Unlike Jinja's
stock native mode we never run ast.literal_eval over strings: an answer such as "1789" or
"None" stays the string it was. A template that mixes text and expressions (`zsre-{{ _index }}`)
yields a string. Every record also sees `_index` (its position in the file), `_file` (the
card's file key) and `options` (the card's `source.options` with any per-run overrides merged in,
e.g. `options.strip_locality_prefix`; it hides a record field of the same name).

A text field counts as empty ("blank") when it holds only invisible characters: whitespace,
format characters (Unicode category Cf: zero-width space, BOM, joiners, bidi marks), control
characters, or the few other default-ignorable code points (Hangul fillers, variation
selectors). Such records are skipped with reason "empty <field>". A text field longer than
MAX_TEXT_CHARS, or a JSON NaN / Infinity where text belongs, skips its record too.

Custom filters available in cards:
  fill_blank        'The capital of France is' -> 'Fill in the blank: "The capital of France is ___"\\nAnswer:'
  strip_prefix(p)   drop p from the start of a string if present ('nq question: ...')
  first_alias       a KnowEdit answer (str, [str], or [[str, ...], ...]) -> its first string
  probes            a KnowEdit {kind: [{prompt, ground_truth}, ...]} mapping -> [{prompt, answer}]
                    in key order, answer = first alias
"""

from __future__ import annotations

import math
import unicodedata
from typing import Any

from jinja2 import StrictUndefined, TemplateError, TemplateSyntaxError, Undefined
from jinja2.nativetypes import NativeEnvironment, NativeTemplate

from bench.core.cases import EditCase, PromptAnswer
from bench.core.errors import BenchError

# Categories whose characters render as nothing (Cf: format, Cc: control) or as space.
_INVISIBLE_CATEGORIES = frozenset({"Cf", "Cc", "Zs", "Zl", "Zp"})
# Default-ignorable code points outside Cf: combining grapheme joiner, Hangul fillers, Khmer
# inherent vowels, Mongolian variation selectors, variation selectors (incl. the supplement).
_INVISIBLE_EXTRA = frozenset(map(chr, (0x034F, 0x115F, 0x1160, 0x17B4, 0x17B5, 0x180B, 0x180C,
                                       0x180D, 0x180F, 0x3164, 0xFFA0, *range(0xFE00, 0xFE10),
                                       *range(0xE0100, 0xE01F0))))


def is_blank(text: str) -> bool:
    """True when `text` shows nothing: empty, or only whitespace and invisible characters."""
    # all() stops at the first visible character, so ordinary text costs one check
    return all(ch.isspace() or ch in _INVISIBLE_EXTRA
               or unicodedata.category(ch) in _INVISIBLE_CATEGORIES for ch in text)


def _check_defined(value: Any) -> Any:
    """Native rendering lets an Undefined slip through inside a value; make it raise."""
    if isinstance(value, Undefined):
        value._fail_with_undefined_error()
    if isinstance(value, (list, tuple)):
        for v in value:
            _check_defined(v)
    elif isinstance(value, dict):
        for v in value.values():
            _check_defined(v)
    return value


def _plain_concat(values):
    """One node -> its value untouched; several nodes -> their text joined (no literal_eval)."""
    values = list(values)
    if not values:
        return None
    if len(values) == 1:
        return _check_defined(values[0])
    return "".join(str(v) for v in values)


class _FieldTemplate(NativeTemplate):
    pass


class FieldEnvironment(NativeEnvironment):
    concat = staticmethod(_plain_concat)
    template_class = _FieldTemplate


_FieldTemplate.environment_class = FieldEnvironment


def _as_text(value: Any) -> str:
    """A filter's input as text; a list or object is refused rather than printed as "['a']", a
    non-finite number (JSON NaN, Infinity) rather than printed as "nan"."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"expected text, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"expected text, got the non-finite number {value}")
    return str(value)


def fill_blank(prompt: Any) -> str:
    """Recast a cloze continuation prompt as a fill-in-the-blank question."""
    prompt = _as_text(prompt)
    if is_blank(prompt):  # stays blank, so the mapper reports "empty ..." instead of a bare "___"
        return prompt
    return f'Fill in the blank: "{prompt.rstrip()} ___"\nAnswer:'


def strip_prefix(text: Any, prefix: str) -> str:
    text = _as_text(text)
    return text[len(prefix):] if text.startswith(prefix) else text


def first_alias(answer: Any) -> str:
    """KnowEdit answers come as a string, a list of strings, or a list of alias lists."""
    while isinstance(answer, (list, tuple)):
        if not answer:
            raise ValueError("empty answer list")
        answer = answer[0]
    if not isinstance(answer, (str, int, float)) or isinstance(answer, bool):
        raise ValueError(f"answer is a {type(answer).__name__}, not text")
    if isinstance(answer, float) and not math.isfinite(answer):
        raise ValueError(f"answer is the non-finite number {answer}, not text")
    return str(answer)


def probes(groups: Any) -> list[dict]:
    """Flatten KnowEdit portability/locality groups into [{prompt, answer}]."""
    if not groups:
        return []
    if not isinstance(groups, dict):
        raise ValueError(f"expected an object of probe groups, got {type(groups).__name__}")
    out = []
    for kind, items in groups.items():
        if not isinstance(items, list):
            raise ValueError(f"probe group {kind!r} is not a list")
        for item in items:
            if not isinstance(item, dict) or "prompt" not in item or "ground_truth" not in item:
                raise ValueError(f"probe in {kind!r} lacks prompt or ground_truth")
            prompt = item["prompt"]
            if isinstance(prompt, list):  # some KnowEdit files keep prompts in a one-element list
                prompt = prompt[0] if prompt else ""
            out.append({"prompt": prompt, "answer": first_alias(item["ground_truth"])})
    return out


def make_environment() -> FieldEnvironment:
    env = FieldEnvironment(undefined=StrictUndefined, autoescape=False)
    env.filters.update(fill_blank=fill_blank, strip_prefix=strip_prefix,
                       first_alias=first_alias, probes=probes)
    return env


# The longest text an edit case may hold in any field (prompt, target, rephrase, probe): 2,000
# characters stay inside an 8k-token context even at one token per byte; the real data's longest
# is a few hundred. A longer one skips its record (a 1 MB prompt would exhaust memory).
MAX_TEXT_CHARS = 2000


class RecordError(ValueError):
    """A record that cannot become a valid EditCase; the message is the skip reason."""


def _text(value: Any, what: str, allow_none: bool = False) -> str | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise RecordError(f"{what} is {type(value).__name__}, not text")
    if isinstance(value, float) and not math.isfinite(value):  # JSON NaN / Infinity: not an answer
        raise RecordError(f"{what} is a non-finite number ({value}), not text")
    text = str(value)
    if len(text) > MAX_TEXT_CHARS:  # would not fit the model's context (a 1 MB prompt: out of memory)
        raise RecordError(f"{what} is longer than {MAX_TEXT_CHARS} characters ({len(text):,})")
    try:
        text.encode("utf-8")  # a JSON "\ud800" escape decodes to a lone surrogate
    except UnicodeEncodeError:
        raise RecordError(f"{what} is not valid Unicode (lone surrogate)") from None
    return text


def _pairs(value: Any, what: str) -> tuple[PromptAnswer, ...]:
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)):
        raise RecordError(f"{what} is not a list")
    out = []
    for item in value:
        if not isinstance(item, dict) or "prompt" not in item or "answer" not in item:
            raise RecordError(f"{what} item lacks prompt or answer")
        pa = PromptAnswer(_text(item["prompt"], f"{what} prompt"), _text(item["answer"], f"{what} answer"))
        if is_blank(pa.prompt):
            raise RecordError(f"empty {what} prompt")
        if is_blank(pa.answer):
            raise RecordError(f"empty {what} answer")
        out.append(pa)
    return tuple(out)


class FieldMapper:
    """Compiled `fields` templates of one card."""

    def __init__(self, task: str, fields: dict[str, str], options: dict[str, Any] | None = None):
        self.task = task
        self.options = dict(options or {})
        env = make_environment()
        self.templates = {}
        for name, src in fields.items():
            try:
                self.templates[name] = env.from_string(src)
            except TemplateSyntaxError as exc:
                raise BenchError(f"task {task!r}: fields.{name} is not a valid template: "
                                 f"{exc.message} (line {exc.lineno})") from None

    def case_id(self, record: dict, context: dict) -> str:
        return self._render(("case_id",), record, context)["case_id"]

    def _render(self, names: tuple[str, ...], record: dict, context: dict) -> dict[str, Any]:
        # One Jinja context per record shared by all its field templates: building contexts is
        # most of the cost, and the card's templates share one environment and have no blocks.
        ctx = self.templates[names[0]].new_context({**record, **context, "options": self.options})
        out = {}
        for name in names:
            try:
                value = _plain_concat(self.templates[name].root_render_func(ctx))
            except TemplateError as exc:  # StrictUndefined: a field the record lacks
                raise RecordError(f"cannot map {name}: {exc.message}") from None
            except (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError) as exc:
                raise RecordError(f"cannot map {name}: {exc}") from None
            except RecursionError:  # a record nested deeper than Python's stack allows
                raise RecordError(f"cannot map {name}: value nested too deeply") from None
            if name == "case_id":
                value = _text(value, "case_id")
                if is_blank(value):
                    raise RecordError("empty case_id")
            out[name] = value
        return out

    def to_case(self, record: dict, context: dict) -> EditCase:
        """Render every field and validate the result; RecordError carries the skip reason."""
        v = self._render(tuple(self.templates), record, context)
        case_id = v["case_id"]
        text = {k: _text(v[k], k) for k in ("prompt", "subject", "target_new")}
        for k in ("prompt", "subject", "target_new"):
            if is_blank(text[k]):
                raise RecordError(f"empty {k}")
        # None means the card's template found no ground truth (KnowEdit recent may lack one);
        # a value that is present but blank would leave the counterfact metric silently unscored
        ground_truth = _text(v.get("ground_truth"), "ground_truth", allow_none=True)
        if ground_truth is not None and is_blank(ground_truth):
            raise RecordError("empty ground_truth")
        rephrases = v.get("rephrase_prompts") or ()
        if isinstance(rephrases, str) or not isinstance(rephrases, (list, tuple)):
            raise RecordError("rephrase_prompts is not a list")
        rephrases = tuple(_text(r, "rephrase prompt") for r in rephrases)
        if any(is_blank(r) for r in rephrases):
            raise RecordError("empty rephrase prompt")
        if text["subject"] not in text["prompt"]:
            raise RecordError("subject not in prompt")
        return EditCase(case_id=case_id, task=self.task, prompt=text["prompt"],
                        subject=text["subject"], target_new=text["target_new"],
                        ground_truth=ground_truth, rephrase_prompts=rephrases,
                        locality=_pairs(v.get("locality"), "locality"),
                        portability=_pairs(v.get("portability"), "portability"))
