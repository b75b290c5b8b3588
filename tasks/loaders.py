"""Source-schema loaders: read a data file and check each record's shape.

A loader is `fn(path, options) -> list[RawRecord]`, registered by schema name with @register.
It returns one RawRecord per record in the file, in file order: either the (possibly normalised)
record or the reason it was refused. Refused records are later reported as SkippedRecord, never
scored. Whole-file problems (missing, not JSON, not a list of objects) raise BenchError naming
the file. Files may be a JSON list (.json) or one object per line (.jsonl).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from bench.core.errors import BenchError


@dataclass(frozen=True)
class RawRecord:
    index: int                # position in the file (0-based; the line number - 1 for .jsonl)
    data: dict | None         # None when refused
    reason: str | None = None


Loader = Callable[[Path, dict], list[RawRecord]]
LOADERS: dict[str, Loader] = {}


def register(name: str) -> Callable[[Loader], Loader]:
    def deco(fn: Loader) -> Loader:
        LOADERS[name] = fn
        return fn
    return deco


def get_loader(name: str) -> Loader:
    if name not in LOADERS:
        raise BenchError(f"unknown source schema {name!r}; available: {', '.join(sorted(LOADERS))}")
    return LOADERS[name]


# --------------------------------------------------------------------------------------------
# Reading files (parsed once per process per file version)
# --------------------------------------------------------------------------------------------

_FILE_CACHE: dict[tuple[str, int, int], list[dict]] = {}


def read_records(path: Path) -> list[dict]:
    """The objects in a .json list or .jsonl file; BenchError names the file on any problem."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise BenchError(f"data file not found: {path}") from None
    if not path.is_file():
        raise BenchError(f"data file is not a file: {path}")
    key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
    if key not in _FILE_CACHE:
        _FILE_CACHE[key] = _parse(path)
    return _FILE_CACHE[key]


def _parse(path: Path) -> list[dict]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise BenchError(f"data file {path} is not UTF-8 text (byte {exc.start})") from None
    if path.suffix == ".jsonl":
        records = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise BenchError(f"data file {path}: line {lineno} (record {len(records)}) is not "
                                 f"valid JSON: {exc.msg}") from None
    else:
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BenchError(f"data file {path} is not valid JSON: {exc.msg} at line {exc.lineno} "
                             f"column {exc.colno}") from None
        if not isinstance(records, list):
            raise BenchError(f"data file {path} must hold a JSON list of objects, "
                             f"not a {type(records).__name__}")
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise BenchError(f"data file {path}: record {i} is a {type(rec).__name__}, not an object")
    return records


def _check(records: list[dict], required: tuple[str, ...],
           extra: Callable[[dict], str | dict | None] | None = None) -> list[RawRecord]:
    """Refuse records that miss a required field; `extra` may refuse (str) or normalise (dict)."""
    out = []
    for i, rec in enumerate(records):
        missing = [k for k in required if rec.get(k) is None]
        if missing:
            out.append(RawRecord(i, None, f"missing field '{missing[0]}'"))
            continue
        result = extra(rec) if extra else None
        if isinstance(result, str):
            out.append(RawRecord(i, None, result))
        else:
            out.append(RawRecord(i, result if isinstance(result, dict) else rec))
    return out


# --------------------------------------------------------------------------------------------
# Schemas
# --------------------------------------------------------------------------------------------


@register("easyedit_counterfact")
def load_counterfact(path: Path, options: dict) -> list[RawRecord]:
    """CounterFact in the EasyEdit/MEND layout (case_id, prompt, subject, target_new, ...)."""
    return _check(read_records(path), ("case_id", "prompt", "subject", "target_new", "ground_truth",
                                       "rephrase_prompt", "locality_prompt", "locality_ground_truth"))


@register("mend_zsre")
def load_zsre(path: Path, options: dict) -> list[RawRecord]:
    """ZsRE in the MEND layout (subject, src, rephrase, alt, answers[], loc, loc_ans)."""
    def answers_ok(rec: dict) -> str | None:
        if not isinstance(rec["answers"], list) or not rec["answers"]:
            return "answers is not a non-empty list"
        return None
    return _check(read_records(path), ("subject", "src", "rephrase", "alt", "answers", "loc", "loc_ans"),
                  answers_ok)


@register("knowedit_recent")
def load_recent(path: Path, options: dict) -> list[RawRecord]:
    """KnowEdit WikiData_recent (recent_train.json / recent_test.json).

    Required: subject, prompt, target_new. Optional: ground_truth (string or alias list),
    rephrase (string), portability and locality ({group: [{prompt, ground_truth}]}); absent
    optional fields are filled with None / {} so card templates can test them.
    """
    def normalise(rec: dict) -> str | dict:
        for k in ("portability", "locality"):
            if rec.get(k) is not None and not isinstance(rec[k], dict):
                return f"{k} is not an object"
        return {"ground_truth": None, "rephrase": None, **rec,
                "portability": rec.get("portability") or {}, "locality": rec.get("locality") or {}}
    return _check(read_records(path), ("subject", "prompt", "target_new"), normalise)


@register("convsent")
def load_convsent(path: Path, options: dict) -> list[RawRecord]:
    """ConvSent, in either layout (detected per file from its first record):

    * `ent_pos_neg`: SERAC's ConvSent and KnowEdit's convsent/blender_{train,val,test}.json:
      {ent, pos: [responses], neg: [responses]}. The edit makes the model answer with the
      `options.target_sentiment` side (default positive); ground_truth is the other side.
    * `reconstructed`: EasyEdit/InstructEdit's convsent_test_reconstruct.json:
      {subject, prompt, target_new, metric_kwargs?: {inner_q, inner_all_qa, outer_all_qa,
      inner_target, all_target}} where *_all_qa items are "question </s> answer".

    Both become {topic, question (None for ent_pos_neg), target_new, ground_truth, rephrase: [],
    locality: [{prompt, answer}], layout}.
    """
    records = read_records(path)
    if not records:
        return []
    first = records[0]
    if "ent" in first:
        target = options.get("target_sentiment", "positive")
        if target not in ("positive", "negative"):
            raise BenchError(f"convsent option target_sentiment must be positive or negative, not {target!r}")
        return _check(records, ("ent", "pos", "neg"), lambda r: _from_ent_pos_neg(r, target))
    if "prompt" in first and "target_new" in first:
        return _check(records, ("subject", "prompt", "target_new"), _from_reconstructed)
    raise BenchError(f"data file {path}: cannot tell the convsent layout from record 0 "
                     f"(keys {', '.join(sorted(first))}); expected ent/pos/neg or subject/prompt/target_new")


def _from_ent_pos_neg(rec: dict, target: str) -> str | dict:
    want, other = ("pos", "neg") if target == "positive" else ("neg", "pos")
    for k in (want, other):
        if not isinstance(rec[k], list) or not rec[k] or not isinstance(rec[k][0], str):
            return f"{k} has no responses"
    return {"layout": "ent_pos_neg", "topic": rec["ent"], "question": None,
            "target_new": rec[want][0], "ground_truth": rec[other][0],
            "target_sentiment": target, "rephrase": [], "locality": []}


def _split_qa(item: Any) -> tuple[str, str] | None:
    if isinstance(item, str) and " </s> " in item:
        q, a = item.split(" </s> ", 1)
        return q.strip(), a.strip()
    return None


def _from_reconstructed(rec: dict) -> str | dict:
    kw = rec.get("metric_kwargs") or {}
    if not isinstance(kw, dict):
        return "metric_kwargs is not an object"
    rephrase = [kw["inner_q"]] if isinstance(kw.get("inner_q"), str) else []
    # ground truth: the first response whose sentiment label differs from the target's.
    ground_truth = None
    inner, labels, targets = kw.get("inner_all_qa") or [], kw.get("all_target") or [], kw.get("inner_target") or []
    for qa, label, tgt in zip(inner, labels, targets):
        if label != tgt and (pair := _split_qa(qa)):
            ground_truth = pair[1]
            break
    # locality: the first question about another topic with one of its responses.
    outer = [p for p in map(_split_qa, kw.get("outer_all_qa") or []) if p]
    locality = [{"prompt": outer[0][0], "answer": outer[0][1]}] if outer else []
    prompt = str(rec["prompt"])
    sentiment = "positive" if "positively" in prompt else "negative" if "negatively" in prompt else None
    return {"layout": "reconstructed", "topic": rec["subject"], "question": prompt,
            "target_new": rec["target_new"], "ground_truth": ground_truth,
            "target_sentiment": sentiment, "rephrase": rephrase, "locality": locality}
