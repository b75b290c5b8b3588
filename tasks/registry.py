"""The task registry: the runner and the CLI call only the functions defined here.

    list_cards() -> {name: TaskCard}
    get_card(name) -> TaskCard
    resolve_data_dir(arg) -> (data_dir | None, use_builtin_sample)
    load_split(name, split, data_dir, holdout=False, options=None) -> TaskSplit
    task_status(name, data_dir) -> dict
    data_file_hashes(name, data_dir, split=None) -> {relative path: sha256}

`data_dir=None` everywhere means the built-in sample in tasks/samples.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from bench.core.cases import SkippedRecord, TaskSplit
from bench.core.errors import BenchError
from bench.core.io import file_sha256
from tasks.card import SplitRule, TaskCard, merge_options, parse_card
from tasks.fields import FieldMapper, RecordError
from tasks.loaders import get_loader, read_records

CARDS_DIR = Path(__file__).parent / "cards"
SAMPLES_DIR = Path(__file__).parent / "samples"
SPLITS = ("train", "eval")
SAMPLE_PREFIX = "sample/"  # how sample files are named in hashes and status

_CARDS: dict[str, TaskCard] | None = None
_SPLIT_CACHE: dict[tuple, TaskSplit] = {}


# --------------------------------------------------------------------------------------------
# Cards
# --------------------------------------------------------------------------------------------


def list_cards() -> dict[str, TaskCard]:
    """All cards in tasks/cards, sorted by name (parsed once per process)."""
    global _CARDS
    if _CARDS is None:
        cards = {}
        for path in sorted(CARDS_DIR.glob("*.yaml")):
            card = parse_card(path)
            get_loader(card.schema)  # fail early on a card naming an unknown schema
            cards[card.name] = card
        _CARDS = cards
    return dict(_CARDS)


def get_card(name: str) -> TaskCard:
    cards = list_cards()
    if name not in cards:
        raise BenchError(f"unknown task {name!r}; available: {', '.join(cards)}")
    return cards[name]


# --------------------------------------------------------------------------------------------
# Data directory and files
# --------------------------------------------------------------------------------------------


def resolve_data_dir(arg: str | None) -> tuple[Path | None, bool]:
    """--data-dir, else $BENCH_DATA, else ../shared/data (a development checkout), else the sample.

    Returns (directory, False), or (None, True) meaning "use the built-in sample". A directory
    that is named explicitly (argument or $BENCH_DATA) but does not exist, or is not a
    directory, is an error.
    """
    for given, origin in ((arg, "--data-dir"), (os.environ.get("BENCH_DATA") or None, "$BENCH_DATA")):
        if given:
            try:
                path = Path(given).expanduser()
            except RuntimeError:  # "~someone" with no such user
                raise BenchError(f"data directory from {origin}: cannot expand {given!r}") from None
            if not path.exists():
                raise BenchError(f"data directory from {origin} does not exist: {path}")
            if not path.is_dir():
                raise BenchError(f"data directory from {origin} is not a directory: {path}")
            return path.resolve(), False
    dev = Path.cwd() / ".." / "shared" / "data"
    if dev.is_dir():
        return dev.resolve(), False
    return None, True


def _no_sample(card: TaskCard) -> BenchError:
    wanted = ", ".join(paths[0] for paths in card.files.values())
    return BenchError(f"task {card.name!r} has no built-in sample; pass --data-dir (or set "
                      f"$BENCH_DATA) to a directory holding {wanted}")


def _file_path(card: TaskCard, key: str, data_dir: Path | None) -> tuple[Path, str]:
    """(absolute path, name used in reports) of one of the card's files; BenchError if absent."""
    if data_dir is None:
        if not card.has_sample:
            raise _no_sample(card)
        path = SAMPLES_DIR / card.sample_files[key]
        if not path.is_file():  # a card naming a sample that is not shipped
            raise BenchError(f"task {card.name!r}: built-in sample file not found: {path}")
        return path, SAMPLE_PREFIX + card.sample_files[key]
    candidates = card.files[key]
    for rel in candidates:
        if (Path(data_dir) / rel).is_file():
            return Path(data_dir) / rel, rel
    for rel in candidates:  # none is a file: say why if one of them exists
        path = Path(data_dir) / rel
        if path.is_dir():
            raise BenchError(f"task {card.name!r}: data path {path} is a directory, not a file")
        if path.exists():
            raise BenchError(f"task {card.name!r}: data path {path} is not a regular file")
    also = f" (also looked for {', '.join(candidates[1:])})" if len(candidates) > 1 else ""
    raise BenchError(f"task {card.name!r}: data file not found: {Path(data_dir) / candidates[0]}{also}")


def _file_key(path: Path) -> tuple:
    st = path.stat()
    return str(path.resolve()), st.st_mtime_ns, st.st_size


# --------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------


def hash_bucket(salt: str, case_id: str, buckets: int) -> int:
    """Stable bucket of a case id (sha256, not Python's per-process hash())."""
    digest = hashlib.sha256(f"{salt}:{case_id}".encode("utf-8")).hexdigest()
    return int(digest, 16) % buckets


def _rule_for(card: TaskCard, split: str, holdout: bool, sample: bool) -> SplitRule:
    if split not in SPLITS:
        raise BenchError(f"unknown split {split!r}; use one of: {', '.join(SPLITS)}")
    if split == "train" and holdout:
        raise BenchError(f"task {card.name!r} is held out: it has no train split")
    rule = card.rule(split, holdout, sample)
    if rule is None:
        why = " (it is always held out)" if card.holdout_only else ""
        raise BenchError(f"task {card.name!r} has no {split} split{why}")
    return rule


def _build(card: TaskCard, split: str, rule: SplitRule, path: Path, source: str,
           options: dict[str, Any]) -> TaskSplit:
    raws = get_loader(card.schema)(path, options)
    originals = read_records(path)
    mapper = FieldMapper(card.name, card.fields, options)
    out = TaskSplit(task=card.name, split=split)
    seen_ids: set[str] = set()

    def skip(index: int, reason: str) -> None:
        out.skipped.append(SkippedRecord(task=card.name, source=source, index=index, reason=reason))

    for raw in raws:
        i = raw.index
        if rule.slice is not None:
            start, stop = rule.slice
            if i < start or (stop is not None and i >= stop):
                continue
        context = {"_index": i, "_file": rule.file}
        if rule.salt is not None:
            try:
                case_id = mapper.case_id(raw.data if raw.data is not None else originals[i], context)
            except RecordError as exc:
                # no case id, no bucket: report it once, in eval
                if split == "eval":
                    skip(i, str(exc))
                continue
            lo, hi = rule.keep
            if not lo <= hash_bucket(rule.salt, case_id, rule.buckets) < hi:
                continue
        if raw.data is None:
            skip(i, raw.reason)
            continue
        try:
            case = mapper.to_case(raw.data, context)
        except RecordError as exc:
            skip(i, str(exc))
            continue
        if case.case_id in seen_ids:
            skip(i, f"duplicate case_id {case.case_id}")
            continue
        seen_ids.add(case.case_id)
        out.cases.append(case)
    return out


def load_split(name: str, split: str, data_dir: Path | None, holdout: bool = False,
               options: dict[str, Any] | None = None) -> TaskSplit:
    """The cases of one split; records that fail validation are in .skipped with a reason.

    `holdout=True` asks for the task as the held-out task: its `holdout_eval` rule (e.g. all of
    zsre) replaces `eval`, and there is no train split. `options` override the card's
    source.options for this call (e.g. {"strip_locality_prefix": "true"}; strings are coerced
    to the type of the card's default, an unknown name is a BenchError).
    """
    card = get_card(name)
    opts = merge_options(card, options)
    sample = data_dir is None
    if sample and not card.has_sample:
        raise _no_sample(card)
    rule = _rule_for(card, split, holdout, sample)
    path, source = _file_path(card, rule.file, data_dir)
    # options change the cases, so they are part of the key (as canonical JSON: values may be lists)
    key = (card.name, split, rule, _file_key(path), json.dumps(opts, sort_keys=True, default=repr))
    if key not in _SPLIT_CACHE:
        _SPLIT_CACHE[key] = _build(card, split, rule, path, source, opts)
    cached = _SPLIT_CACHE[key]
    # hand out fresh lists so a caller that trims them cannot corrupt the cache
    return TaskSplit(task=cached.task, split=split, cases=list(cached.cases),
                     skipped=list(cached.skipped))


# --------------------------------------------------------------------------------------------
# Status and provenance
# --------------------------------------------------------------------------------------------


def _rules_used(card: TaskCard, sample: bool, split: str | None = None) -> dict[str, SplitRule]:
    rules = card.sample_splits if sample and card.sample_splits else card.splits
    if split is not None:
        rules = {k: v for k, v in rules.items() if k == split or (split == "eval" and k == "holdout_eval")}
    return rules


def task_status(name: str, data_dir: Path | None) -> dict:
    """What `bench tasks` shows: files, whether they were found, case and skip counts."""
    card = get_card(name)
    sample = data_dir is None
    rules = _rules_used(card, sample)
    file_keys = list(dict.fromkeys(r.file for r in rules.values()))  # train's file first
    if sample:
        source = ([SAMPLE_PREFIX + card.sample_files[k] for k in file_keys] if card.has_sample
                  else [card.files[k][0] for k in file_keys])  # what --data-dir must hold
    else:
        source = [card.files[k][0] for k in file_keys]
    source = list(dict.fromkeys(source))
    status = {
        "name": card.name, "description": card.description, "source": source,
        "sample": sample, "found": False,
        "counts": {s: None for s in SPLITS}, "skipped": {s: None for s in SPLITS},
        "instructions": {"seen": len(card.instructions.pool(True)),
                         "unseen": len(card.instructions.pool(False))},
        "metrics": list(card.metrics), "holdout_only": card.holdout_only,
    }
    try:
        if sample and not card.has_sample:
            raise _no_sample(card)
        status["source"] = list(dict.fromkeys(_file_path(card, k, data_dir)[1] for k in file_keys))
    except BenchError as exc:
        status["missing"] = str(exc)
        return status
    status["found"] = True
    try:
        for split in SPLITS:
            if split in rules:
                ts = load_split(name, split, data_dir)
                status["counts"][split], status["skipped"][split] = len(ts.cases), len(ts.skipped)
        if "holdout_eval" in rules:
            status["holdout_eval"] = len(load_split(name, "eval", data_dir, holdout=True).cases)
    except BenchError as exc:  # e.g. a malformed file: report it, keep listing other tasks
        status["error"] = str(exc)
    return status


def trainable(name: str, data_dir: Path | None) -> bool:
    """Whether the task can be trained on: it has a train split and its data is found."""
    card = get_card(name)
    if card.holdout_only or card.rule("train", False, data_dir is None) is None:
        return False
    try:
        data_file_hashes(name, data_dir, split="train")
    except BenchError:
        return False  # data not found
    return True


def data_file_hashes(name: str, data_dir: Path | None, split: str | None = None) -> dict[str, str]:
    """sha256 of each file the task reads (only those of `split` if given), keyed by the
    path relative to the data dir ("sample/<file>" for the built-in sample)."""
    card = get_card(name)
    out = {}
    for key in sorted({r.file for r in _rules_used(card, data_dir is None, split).values()}):
        path, rel = _file_path(card, key, data_dir)
        out[rel] = file_sha256(path)
    return out


__all__ = ["list_cards", "get_card", "resolve_data_dir", "load_split", "task_status",
           "trainable", "data_file_hashes", "hash_bucket", "TaskCard"]
