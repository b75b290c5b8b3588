"""The task registry: the runner and the CLI call only the functions named here (where a
task's files are found is tasks.datafiles).

    list_cards() -> {name: TaskCard}
    get_card(name) -> TaskCard
    resolve_data_dir(arg) -> (data_dir | None, no_data_dir)
    load_split(name, split, data_dir, holdout=False, options=None) -> TaskSplit
    task_status(name, data_dir) -> dict
    task_source(name, data_dir) -> dict            where the data comes from (no network)
    provide(name, data_dir, ...) -> dict           the same, fetching a published copy if needed
    data_file_hashes(name, data_dir, split=None) -> {name of the file: sha256}

Each file of a task comes from the data directory (`data_dir`, the card's `source.files`), else
from the cached copy of a published source (the card's `source.remote`, tasks.sources; checked
against its sha256 pin). `data_dir=None` means there is no data directory: a task then uses its
cached published copy, else the built-in sample in tasks/samples.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from bench.core.cases import SkippedRecord, TaskSplit
from bench.core.errors import BenchError
from bench.core.io import file_sha256
from tasks import sources
from tasks.card import SplitRule, TaskCard, merge_options, parse_card
from tasks.datafiles import (SAMPLE_PREFIX, SAMPLES_DIR, expected_paths, file_key, file_path, local_file,
                             resolve_data_dir, uses_sample)
from tasks.fields import FieldMapper, RecordError
from tasks.loaders import get_loader, read_records

CARDS_DIR = Path(__file__).parent / "cards"
SPLITS = ("train", "eval")

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


def _same_edit(case, fields: tuple[str, ...]) -> tuple:
    """The values that make two cases the same edit (a rule's `disjoint.by`)."""
    return tuple(getattr(case, f) for f in fields)


def _in_slice(rule: SplitRule, index: int) -> bool:
    if rule.slice is None:
        return True
    start, stop = rule.slice
    return start <= index and (stop is None or index < stop)


def _edits_of(card: TaskCard, rule: SplitRule, path: Path, options: dict[str, Any]) -> dict[tuple, int]:
    """{the `avoid_by` values of a case: its record index} over the records `rule.avoid` selects
    (a slice or all of a file), mapped by the card's fields; records that do not map are left out
    (they are no case anywhere)."""
    mapper = FieldMapper(card.name, card.fields, options)
    out: dict[tuple, int] = {}
    for raw in get_loader(card.schema)(path, options):
        if raw.data is None or not _in_slice(rule.avoid, raw.index):
            continue
        try:
            case = mapper.to_case(raw.data, {"_index": raw.index, "_file": rule.avoid.file})
        except RecordError:
            continue
        out.setdefault(_same_edit(case, rule.avoid_by), raw.index)
    return out


def _build(card: TaskCard, split: str, rule: SplitRule, path: Path, source: str,
           options: dict[str, Any], avoid: tuple[dict[tuple, int], str] | None = None) -> TaskSplit:
    """The split's cases; with `avoid` ({edit: record index}, the file's name) from the rule's
    `disjoint`, a record whose case is one of those edits is skipped, naming the record."""
    raws = get_loader(card.schema)(path, options)
    taken, taken_source = avoid if avoid is not None else ({}, "")
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
        if taken and (other := taken.get(_same_edit(case, rule.avoid_by))) is not None:
            skip(i, f"same {'/'.join(rule.avoid_by)} as record {other} of {taken_source}")
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
    sample = uses_sample(card, data_dir)
    rule = _rule_for(card, split, holdout, sample)
    path, source = file_path(card, rule.file, data_dir)
    # a split kept clear of other records depends on their file too
    avoid_path, avoid_source = file_path(card, rule.avoid.file, data_dir) if rule.avoid else (None, "")
    # options change the cases, so they are part of the key (as canonical JSON: values may be lists)
    key = (card.name, split, rule, file_key(path), avoid_path and file_key(avoid_path),
           json.dumps(opts, sort_keys=True, default=repr))
    if key not in _SPLIT_CACHE:
        avoid = (_edits_of(card, rule, avoid_path, opts), avoid_source) if rule.avoid else None
        _SPLIT_CACHE[key] = _build(card, split, rule, path, source, opts, avoid)
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


def _files_read(card: TaskCard, sample: bool, split: str | None = None) -> list[str]:
    """The file keys a split reads (all splits when None): its rules' files, and those of the
    records a rule keeps clear of (they decide which records are left out)."""
    rules = _rules_used(card, sample, split).values()
    return sorted({r.file for r in rules} | {r.avoid.file for r in rules if r.avoid is not None})


def task_status(name: str, data_dir: Path | None) -> dict:
    """What `bench tasks` shows: files, whether they were found, case and skip counts."""
    card = get_card(name)
    sample = uses_sample(card, data_dir)
    rules = _rules_used(card, sample)
    file_keys = list(dict.fromkeys(r.file for r in rules.values()))  # train's file first
    if sample:
        source = [SAMPLE_PREFIX + card.sample_files[k] for k in file_keys]
    else:
        source = [card.files[k][0] for k in file_keys]  # what --data-dir must hold
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
        status["source"] = list(dict.fromkeys(file_path(card, k, data_dir)[1] for k in file_keys))
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
    if card.holdout_only or card.rule("train", False, uses_sample(card, data_dir)) is None:
        return False
    try:
        data_file_hashes(name, data_dir, split="train")
    except sources.DigestMismatch:
        raise  # a corrupted cached copy is an error, not a task without data
    except BenchError:
        return False  # data not found
    return True


def data_file_hashes(name: str, data_dir: Path | None, split: str | None = None) -> dict[str, str]:
    """sha256 of each file the task reads (only those of `split` if given), keyed by the
    path relative to the data dir ("sample/<file>" for the built-in sample, the hf:// path or URL
    of a cached published copy)."""
    card = get_card(name)
    out = {}
    for key in _files_read(card, uses_sample(card, data_dir), split):
        path, rel = file_path(card, key, data_dir)
        out[rel] = file_sha256(path)
    return out


# --------------------------------------------------------------------------------------------
# Where the data comes from; fetching published copies
# --------------------------------------------------------------------------------------------

SAMPLE_LICENCE = "Apache-2.0 (this project's own records)"
SAMPLE_PROVENANCE = "hand-written records in the published layouts (tasks/samples); not benchmark data"


def task_source(name: str, data_dir: Path | None) -> dict:
    """Where the task's data comes from, found without any network access (what `bench data
    list` shows; each run's config.json keeps it):

        data        "real", "built-in sample", or None when the data is not found
        origin      "data directory", "hub cache", "url cache" (or two of them joined by " + "),
                    "built-in sample"; not found: "hub not cached", "url not cached", "missing"
        location    the data directory, the published source (repository@commit, base URL) or
                    tasks/samples
        licence, provenance   those the card gives for its published copy (for the sample: ours)
        verified    True when every file has the sha256 the card pins, False when a local file
                    differs from it (`differs` names them), None when some file has no pin
        files       {name of the file: sha256}

    A cached copy whose digest differs from its pin is a BenchError (tasks.sources.verify)."""
    card = get_card(name)
    published = card.remotes[0] if card.remotes else None
    out: dict[str, Any] = {"task": name, "data": None, "origin": "missing", "location": None,
                           "licence": published.licence if published else None,
                           "provenance": published.provenance if published else None,
                           "verified": None, "differs": [], "files": {}}
    if uses_sample(card, data_dir):
        out.update(data="built-in sample", origin="built-in sample", location="tasks/samples",
                   licence=SAMPLE_LICENCE, provenance=SAMPLE_PROVENANCE,
                   files={SAMPLE_PREFIX + f: file_sha256(SAMPLES_DIR / f)
                          for f in dict.fromkeys(card.sample_files.values())})
        return out
    cached = sources.cached_files(card)
    origins, checks, locations = [], [], []
    for key in card.files:
        local = local_file(card, key, data_dir) if data_dir is not None else None
        if local is not None:
            path, rel = local
            digest = out["files"][rel] = file_sha256(path)
            pins = [r.sha256[key] for r in card.remotes if key in r.sha256]
            checks.append(digest in pins if pins else None)
            if pins and digest not in pins:
                out["differs"].append(rel)
            origins.append("data directory")
            locations.append(str(data_dir))
        elif cached is not None:
            remote, paths = cached
            out["files"][remote.address(key)] = sources.verify(name, remote, key, paths[key])
            checks.append(True if key in remote.sha256 else None)
            origins.append(f"{remote.kind} cache")
            locations.append(remote.label)
            out["licence"], out["provenance"] = remote.licence, remote.provenance
        else:
            out["origin"] = f"{published.kind} not cached" if published else "missing"
            out["location"] = published.label if published else None
            out["files"] = {}
            return out
    out["data"] = "real"
    out["origin"] = " + ".join(dict.fromkeys(origins))
    out["location"] = " + ".join(dict.fromkeys(locations))
    out["verified"] = False if False in checks else True if all(checks) else None
    return out


# Why a task the user did not name is not fetched (provide(fetch=False)): a run's tasks, and the
# training mixture of a learned editor, never depend on whether the network answers.
NOT_NAMED = "tasks not named with --task or --holdout are not fetched"


def has_train_split(name: str) -> bool:
    """Whether the task's card defines a train split of its published files (whether that data is
    found here is `trainable`)."""
    card = get_card(name)
    return not card.holdout_only and card.rule("train", False, False) is not None


def _cannot_have(card: TaskCard, data_dir: Path | None, why: str) -> BenchError:
    where = f"not in the data directory {data_dir}" if data_dir is not None else "no data directory"
    return BenchError(f"task {card.name!r}: {where}, no cached copy, and {why}; supply a local "
                      f"directory with --data-dir or $BENCH_DATA holding {expected_paths(card)}")


def _fetch(card: TaskCard, force: bool) -> None:
    """Download the files of the first of the card's published sources that can be had, each
    checked against its pin; BenchError with every source's reason otherwise (a digest mismatch
    is raised at once: it is never worked around by another source)."""
    reasons = []
    for remote in card.remotes:
        try:
            for key in card.files:
                path = None if force else sources.cached(remote, key)
                sources.verify(card.name, remote, key, path or sources.download(remote, key, force))
            return
        except sources.DigestMismatch:
            raise
        except BenchError as exc:
            reasons.append(str(exc))
    raise BenchError("; ".join(reasons))


def provide(name: str, data_dir: Path | None, sample: bool = True, force: bool = False,
            check_local: bool = False, fetch: bool = True) -> dict:
    """task_source(), after fetching the task's published copy into its cache when its files are
    neither in the data directory nor cached (`force`: download again unless the data directory
    holds them). Offline (tasks.sources.offline) nothing is downloaded; with `fetch=False` (a
    task the user did not name) neither: what a run uses then never depends on the network.

    With `sample`, a task with a built-in sample falls back to it when there is no data
    directory and nothing can be fetched (`note` then says why); without, that is an error.
    `check_local` makes a local file whose digest differs from the card's pin an error. Errors
    are one line naming the task and the files a data directory must hold instead."""
    card = get_card(name)
    src = task_source(name, data_dir)
    if check_local and src["differs"]:
        raise sources.DigestMismatch(
            f"task {name!r}: {', '.join(src['differs'])} in {data_dir} differ from the published "
            f"files the card pins (sha256); replace them, or remove them to use the fetched copy")
    if src["origin"] == "data directory" or (src["data"] == "real" and not force):
        return src
    if not card.remotes:
        if src["data"] is not None:  # the built-in sample: nothing to fetch instead
            return src
        for key in card.files:  # the loader's own one-line reason (missing file, no sample)
            file_path(card, key, data_dir)
        raise _cannot_have(card, data_dir, "its card names no published copy")
    variable = sources.offline()
    if variable is not None:
        why = f"the hub is offline ({variable} is set)"
    elif not fetch:
        why = NOT_NAMED
    else:
        try:
            _fetch(card, force)
            return task_source(name, data_dir)
        except sources.DigestMismatch:
            raise
        except BenchError as exc:
            why = str(exc)
    if sample and src["data"] == "built-in sample":
        return {**src, "note": why}
    raise _cannot_have(card, data_dir, why)


__all__ = ["list_cards", "get_card", "resolve_data_dir", "load_split", "task_status",
           "trainable", "has_train_split", "NOT_NAMED", "data_file_hashes", "hash_bucket", "task_source",
           "provide", "expected_paths", "TaskCard"]
