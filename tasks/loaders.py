"""Source-schema loaders: read a data file and check each record's shape.

A loader is `fn(path, options) -> list[RawRecord]`, registered by schema name with @register.
It returns one RawRecord per record in the file, in file order: either the (possibly normalised)
record or the reason it was refused. Refused records are later reported as SkippedRecord, never
scored. Whole-file problems (missing, a directory, not JSON, not a list of objects, no records)
raise BenchError naming the file. Files may be a JSON list (.json) or one object per line
(.jsonl), UTF-8 with or without a byte order mark.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from bench.core.errors import BenchError
from bench.core.io import read_text
from tasks.fields import first_alias, is_blank, strip_prefix


@dataclass(frozen=True)
class RawRecord:
    index: int                # position in the file (0-based; for .jsonl, among non-blank lines)
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
    except OSError as exc:
        raise BenchError(f"cannot read data file {path}: {exc.strerror or exc}") from None
    if path.is_dir():
        raise BenchError(f"data file {path} is a directory, not a file")
    if not path.is_file():  # a FIFO or device would block or never end
        raise BenchError(f"data file {path} is not a regular file")
    key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
    if key not in _FILE_CACHE:
        _FILE_CACHE[key] = _parse(path)
    return _FILE_CACHE[key]


def _json(text: str) -> Any:
    """json.loads; its errors other than JSONDecodeError (nesting, huge ints) as ValueError."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _parse(path: Path) -> list[dict]:
    text = read_text(path, "data file")  # files saved by some Windows editors start with a BOM
    if path.suffix == ".jsonl":
        records = []
        # only "\n" ends a record: str.splitlines() would also split at U+2028 or U+0085,
        # which JSON allows unescaped inside strings
        for lineno, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                records.append(_json(line))
            except json.JSONDecodeError as exc:
                raise BenchError(f"data file {path}: line {lineno} (record {len(records)}) is not "
                                 f"valid JSON: {exc.msg}") from None
            except ValueError as exc:
                raise BenchError(f"data file {path}: line {lineno} (record {len(records)}) is not "
                                 f"valid JSON: {exc}") from None
    else:
        try:
            records = _json(text)
        except json.JSONDecodeError as exc:
            raise BenchError(f"data file {path} is not valid JSON: {exc.msg} at line {exc.lineno} "
                             f"column {exc.colno}") from None
        except ValueError as exc:
            raise BenchError(f"data file {path} is not valid JSON: {exc}") from None
        if not isinstance(records, list):
            raise BenchError(f"data file {path} must hold a JSON list of objects, "
                             f"not a {type(records).__name__}")
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise BenchError(f"data file {path}: record {i} is a {type(rec).__name__}, not an object")
    if not records:  # said here, naming the file, rather than "no usable cases" later
        raise BenchError(f"data file {path} holds no records")
    return records


def _nonfinite_field(rec: dict) -> str | None:
    """The top-level field of `rec` that holds a non-finite float anywhere inside (the JSON
    literals NaN, Infinity, -Infinity that Python's reader accepts), else None."""
    for key, value in rec.items():
        stack = [value]
        while stack:
            v = stack.pop()
            if isinstance(v, float) and not math.isfinite(v):
                return str(key)
            if isinstance(v, dict):
                stack.extend(v.values())
            elif isinstance(v, list):
                stack.extend(v)
    return None


def _check(records: list[dict], required: tuple[str, ...],
           extra: Callable[[dict], str | dict | None] | None = None) -> list[RawRecord]:
    """Refuse records that miss a required field; `extra` may refuse (str) or normalise (dict)."""
    out = []
    for i, rec in enumerate(records):
        missing = [k for k in required if rec.get(k) is None]
        if missing:
            out.append(RawRecord(i, None, f"missing field '{missing[0]}'"))
            continue
        nonfinite = _nonfinite_field(rec)
        if nonfinite is not None:  # JSON NaN / Infinity: never a text, an id or a score
            out.append(RawRecord(i, None, f"non-finite number (NaN or Infinity) in field {nonfinite!r}"))
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


ZSRE_LOC_PREFIX = "nq question: "


@register("mend_zsre")
def load_zsre(path: Path, options: dict) -> list[RawRecord]:
    """ZsRE in the MEND layout (subject, src, rephrase, alt, answers[], loc, loc_ans).

    `loc` is a Natural Questions item prefixed "nq question: "; a loc with nothing after the
    prefix is refused here, so the record is skipped whether or not a card strips the prefix.
    """
    def answers_ok(rec: dict) -> str | None:
        if not isinstance(rec["answers"], list) or not rec["answers"]:
            return "answers is not a non-empty list"
        if rec["answers"][0] is None:  # would map to "no ground truth" instead of a skip
            return "answers[0] is null"
        if isinstance(rec["loc"], str) and is_blank(strip_prefix(rec["loc"], ZSRE_LOC_PREFIX)):
            return "empty locality prompt"
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


@register("knowedit")
def load_knowedit(path: Path, options: dict) -> list[RawRecord]:
    """KnowEdit's fact layouts: ZsRE (benchmark/ZsRE/ZsRE-test-all.json), WikiData_counterfact
    (benchmark/wiki_counterfact/{train,test}_cf.json) and WikiData_recent
    (benchmark/wiki_recent/recent_{train,test}.json):

        {subject, prompt, target_new, ground_truth?, rephrase? | rephrase_prompt?,
         portability?: {group: [probe, ...]}, locality?: {group: [probe, ...]}}
        probe = {prompt: text | [text], ground_truth: text | [text] | [[text, ...], ...]}

    Portability groups are e.g. Subject_Aliasing, Reasoning, Logical_Generalization; locality
    groups Relation_Specificity, Forgetfulness; every group a record has is kept, in file order.
    Answers may be alias lists: the first alias is scored (as EasyEdit does).

    Each record becomes {subject, prompt, target_new, ground_truth (None when absent), rephrase:
    [text], portability: [{prompt, answer}], locality: [{prompt, answer}]}. Required: subject,
    prompt, target_new. Optional, and simply left out when absent or null: ground_truth,
    rephrase, portability, locality and each of their groups (a case without portability
    probes has no portability score). Present but malformed (a group that is not a list, a
    probe that is not an object or lacks prompt or ground_truth, an empty alias list, an object
    where text belongs) refuses the whole record, naming the sub-field: dropping one probe
    would silently change what the metric averages over.
    """
    return _check(read_records(path), ("subject", "prompt", "target_new"), _from_knowedit)


def _knowedit_text(value: Any, where: str) -> str:
    try:
        return first_alias(value)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def _knowedit_probes(rec: dict, field: str) -> list[dict]:
    groups = rec.get(field)
    if groups is None:
        return []
    if not isinstance(groups, dict):
        raise ValueError(f"{field} is not an object")
    out = []
    for group, items in groups.items():
        if items is None:  # a null group is an absent one (as `datasets` writes a missing key)
            continue
        group = group if group.isidentifier() else repr(group)  # a reason stays one plain line
        if not isinstance(items, list):
            raise ValueError(f"{field}.{group} is not a list")
        for i, item in enumerate(items):
            where = f"{field}.{group}[{i}]"
            if not isinstance(item, dict):
                raise ValueError(f"{where} is not an object")
            for key in ("prompt", "ground_truth"):
                if item.get(key) is None:
                    raise ValueError(f"{where} lacks {key}")
            out.append({"prompt": _knowedit_text(item["prompt"], f"{where}.prompt"),
                        "answer": _knowedit_text(item["ground_truth"], f"{where}.ground_truth")})
    return out


def _from_knowedit(rec: dict) -> str | dict:
    try:
        target_new = _knowedit_text(rec["target_new"], "target_new")
        truth = rec.get("ground_truth")
        ground_truth = None if truth is None else _knowedit_text(truth, "ground_truth")
        # ZsRE names it rephrase_prompt, the Wiki files rephrase (text or a list of texts)
        rephrase = next((rec[k] for k in ("rephrase", "rephrase_prompt") if rec.get(k) is not None), [])
        rephrase = [rephrase] if not isinstance(rephrase, list) else rephrase
        for i, text in enumerate(rephrase):
            if isinstance(text, bool) or not isinstance(text, (str, int, float)):
                raise ValueError(f"rephrase[{i}] is {type(text).__name__}, not text")
        portability = _knowedit_probes(rec, "portability")
        locality = _knowedit_probes(rec, "locality")
    except ValueError as exc:
        return str(exc)
    return {"subject": rec["subject"], "prompt": rec["prompt"], "target_new": target_new,
            "ground_truth": ground_truth, "rephrase": [str(t) for t in rephrase],
            "portability": portability, "locality": locality}


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
    records = read_records(path)  # never empty: read_records refuses a file without records
    first = records[0]
    if "ent" in first:
        target = options.get("target_sentiment", "positive")
        if target not in ("positive", "negative"):
            raise BenchError(f"convsent option target_sentiment must be positive or negative, not {target!r}")
        return _check(records, ("ent", "pos", "neg"), lambda r: _from_ent_pos_neg(r, target))
    if "prompt" in first and "target_new" in first:
        return _check(records, ("subject", "prompt", "target_new"), _from_reconstructed)
    raise BenchError(f"data file {path}: cannot tell the convsent layout from record 0 "
                     f"(keys {', '.join(map(repr, sorted(first)[:8])) or 'none'}); expected ent/pos/neg "
                     f"or subject/prompt/target_new")


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
    lists = {k: kw.get(k) or [] for k in ("inner_all_qa", "all_target", "inner_target", "outer_all_qa")}
    for k, v in lists.items():
        if not isinstance(v, list):
            return f"metric_kwargs.{k} is not a list"
    rephrase = [kw["inner_q"]] if isinstance(kw.get("inner_q"), str) else []
    # ground truth: the first response whose sentiment label differs from the target's.
    ground_truth = None
    for qa, label, tgt in zip(lists["inner_all_qa"], lists["all_target"], lists["inner_target"]):
        if label != tgt and (pair := _split_qa(qa)):
            ground_truth = pair[1]
            break
    # locality: the first question about another topic with one of its responses.
    outer = [p for p in map(_split_qa, lists["outer_all_qa"]) if p]
    locality = [{"prompt": outer[0][0], "answer": outer[0][1]}] if outer else []
    prompt = str(rec["prompt"])
    sentiment = "positive" if "positively" in prompt else "negative" if "negatively" in prompt else None
    return {"layout": "reconstructed", "topic": rec["subject"], "question": prompt,
            "target_new": rec["target_new"], "ground_truth": ground_truth,
            "target_sentiment": sentiment, "rephrase": rephrase, "locality": locality}
