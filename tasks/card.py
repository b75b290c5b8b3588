"""The TaskCard dataclass and the parser that turns a cards/<name>.yaml file into one.

Card schema (all keys are checked; an unknown key is an error so typos don't go unnoticed):

    name: str                      # must equal the file stem
    description: str
    holdout_only: bool             # optional (default false): the task is never trained on
    source:
      schema: str                  # a loader registered in tasks.loaders
      files: {key: path | [path, ...]}   # relative to the data dir; a list = candidates, first found wins
      options: {...}               # optional, passed to the loader
    sample:                        # optional: the built-in sample used when there is no data dir
      files: {key: path}           # relative to tasks/samples
      splits: {split: rule}        # optional, replaces `splits` for the sample
    fields: {EditCase field: jinja template}   # see tasks.fields
    splits:
      train: rule                  # optional
      eval: rule
      holdout_eval: rule           # optional: replaces `eval` when the task is the held-out task
    metrics: [reliability | generality | locality | portability | counterfact, ...]
    instructions:
      task: str                    # the label after "Task:"
      template: str                # optional, default INSTRUCTION_TEMPLATE
      descriptions: [{text: str, seen: bool}, ...]

A split rule names one file key and exactly one selector:
    {file: k, slice: [start, stop]}                       # record indices, stop null = end
    {file: k, all: true}
    {file: k, hash: {salt: s, buckets: n, keep: [lo, hi]}} # sha256(salt:case_id) % n in [lo, hi)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bench.core.errors import BenchError

KNOWN_METRICS = ("reliability", "generality", "locality", "portability", "counterfact")
SPLIT_KEYS = ("train", "eval", "holdout_eval")
CASE_FIELDS = ("case_id", "prompt", "subject", "target_new", "ground_truth",
               "rephrase_prompts", "locality", "portability")
REQUIRED_FIELDS = ("prompt", "subject", "target_new")
# InstructEdit's instruction format.
INSTRUCTION_TEMPLATE = "Task: {{ task }}\nDescription: {{ description }}\nInput: {{ input }}"


@dataclass(frozen=True)
class SplitRule:
    file: str
    slice: tuple[int, int | None] | None = None
    all: bool = False
    salt: str | None = None
    buckets: int | None = None
    keep: tuple[int, int] | None = None

    @property
    def kind(self) -> str:
        return "slice" if self.slice is not None else "hash" if self.salt is not None else "all"


@dataclass(frozen=True)
class Description:
    text: str
    seen: bool


@dataclass(frozen=True)
class Instructions:
    task: str
    template: str
    descriptions: tuple[Description, ...]

    def pool(self, seen: bool) -> tuple[str, ...]:
        return tuple(d.text for d in self.descriptions if d.seen == seen)


@dataclass(frozen=True)
class TaskCard:
    name: str
    description: str
    schema: str
    files: dict[str, tuple[str, ...]]
    fields: dict[str, str]
    splits: dict[str, SplitRule]
    metrics: tuple[str, ...]
    instructions: Instructions
    options: dict[str, Any] = field(default_factory=dict)
    sample_files: dict[str, str] | None = None
    sample_splits: dict[str, SplitRule] | None = None
    holdout_only: bool = False
    path: Path | None = None

    @property
    def has_sample(self) -> bool:
        return self.sample_files is not None

    def rule(self, split: str, holdout: bool, sample: bool) -> SplitRule | None:
        """The split rule in force; holdout_eval replaces eval for a held-out task."""
        rules = self.sample_splits if sample and self.sample_splits else self.splits
        if split == "eval" and holdout and "holdout_eval" in rules:
            return rules["holdout_eval"]
        return rules.get(split)


def _expect_keys(where: str, d: Any, required: set[str], optional: set[str] = frozenset()) -> dict:
    if not isinstance(d, dict):
        raise BenchError(f"{where}: expected a mapping, got {type(d).__name__}")
    missing = required - d.keys()
    unknown = d.keys() - required - optional
    if missing:
        raise BenchError(f"{where}: missing key(s) {', '.join(sorted(missing))}")
    if unknown:
        raise BenchError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    return d


def _parse_rule(where: str, d: Any, file_keys: set[str]) -> SplitRule:
    d = _expect_keys(where, d, {"file"}, {"slice", "all", "hash"})
    if d["file"] not in file_keys:
        raise BenchError(f"{where}: file {d['file']!r} is not one of {sorted(file_keys)}")
    selectors = [k for k in ("slice", "all", "hash") if k in d]
    if len(selectors) != 1:
        raise BenchError(f"{where}: give exactly one of slice, all, hash")
    if "slice" in d:
        s = d["slice"]
        if not (isinstance(s, list) and len(s) == 2 and isinstance(s[0], int)
                and (s[1] is None or isinstance(s[1], int))):
            raise BenchError(f"{where}: slice must be [start, stop] (stop may be null)")
        return SplitRule(file=d["file"], slice=(s[0], s[1]))
    if "all" in d:
        if d["all"] is not True:
            raise BenchError(f"{where}: all must be true")
        return SplitRule(file=d["file"], all=True)
    h = _expect_keys(f"{where}.hash", d["hash"], {"salt", "buckets", "keep"})
    keep = h["keep"]
    if not (isinstance(h["buckets"], int) and h["buckets"] > 0 and isinstance(keep, list)
            and len(keep) == 2 and 0 <= keep[0] < keep[1] <= h["buckets"]):
        raise BenchError(f"{where}.hash: need buckets > 0 and keep [lo, hi] within it")
    return SplitRule(file=d["file"], salt=str(h["salt"]), buckets=h["buckets"],
                     keep=(keep[0], keep[1]))


def _parse_splits(where: str, d: Any, file_keys: set[str]) -> dict[str, SplitRule]:
    d = _expect_keys(where, d, {"eval"}, {"train", "holdout_eval"})
    return {k: _parse_rule(f"{where}.{k}", v, file_keys) for k, v in d.items()}


def parse_card(path: Path) -> TaskCard:
    """Read and validate one card file."""
    where = path.name
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise BenchError(f"task card {path}: invalid YAML ({exc.__class__.__name__})") from exc
    d = _expect_keys(where, raw, {"name", "description", "source", "fields", "splits", "metrics",
                                  "instructions"}, {"sample", "holdout_only"})
    if d["name"] != path.stem:
        raise BenchError(f"{where}: name {d['name']!r} must match the file name")

    src = _expect_keys(f"{where}: source", d["source"], {"schema", "files"}, {"options"})
    files = {k: tuple([v] if isinstance(v, str) else v) for k, v in src["files"].items()}
    if not files or not all(files.values()) or not all(isinstance(p, str) for v in files.values() for p in v):
        raise BenchError(f"{where}: source.files must map keys to a path or a list of paths")

    fields = _expect_keys(f"{where}: fields", d["fields"], {"case_id", *REQUIRED_FIELDS},
                          set(CASE_FIELDS))
    if not all(isinstance(v, str) for v in fields.values()):
        raise BenchError(f"{where}: every fields entry must be a template string")

    splits = _parse_splits(f"{where}: splits", d["splits"], set(files))
    sample_files = sample_splits = None
    if "sample" in d:
        s = _expect_keys(f"{where}: sample", d["sample"], {"files"}, {"splits"})
        sample_files = dict(s["files"])
        if set(sample_files) != set(files):
            raise BenchError(f"{where}: sample.files must have the same keys as source.files")
        if "splits" in s:
            sample_splits = _parse_splits(f"{where}: sample.splits", s["splits"], set(files))

    metrics = tuple(d["metrics"] or ())
    bad = [m for m in metrics if m not in KNOWN_METRICS]
    if not metrics or bad:
        raise BenchError(f"{where}: metrics must be a non-empty subset of {', '.join(KNOWN_METRICS)}")

    ins = _expect_keys(f"{where}: instructions", d["instructions"], {"task", "descriptions"},
                       {"template"})
    descs = []
    for i, item in enumerate(ins["descriptions"] or ()):
        item = _expect_keys(f"{where}: instructions.descriptions[{i}]", item, {"text", "seen"})
        if not isinstance(item["text"], str) or not item["text"].strip() or not isinstance(item["seen"], bool):
            raise BenchError(f"{where}: instructions.descriptions[{i}] needs text and seen: true|false")
        descs.append(Description(item["text"].strip(), item["seen"]))
    instructions = Instructions(str(ins["task"]), ins.get("template", INSTRUCTION_TEMPLATE), tuple(descs))
    if not instructions.pool(True) or not instructions.pool(False):
        raise BenchError(f"{where}: instructions need at least one seen and one unseen description")

    holdout_only = bool(d.get("holdout_only", False))
    if holdout_only and "train" in splits:
        raise BenchError(f"{where}: a holdout_only task cannot have a train split")
    return TaskCard(name=d["name"], description=str(d["description"]).strip(), schema=src["schema"],
                    files=files, options=dict(src.get("options") or {}), fields=dict(fields),
                    splits=splits, metrics=metrics, instructions=instructions,
                    sample_files=sample_files, sample_splits=sample_splits,
                    holdout_only=holdout_only, path=path)
