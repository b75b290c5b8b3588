"""The TaskCard dataclass and the parser that turns a cards/<name>.yaml file into one.

Card schema (all keys are checked; an unknown key is an error so typos don't go unnoticed):

    name: str                      # must equal the file stem
    description: str
    holdout_only: bool             # optional (default false): the task is never trained on
    source:
      schema: str                  # a loader registered in tasks.loaders
      files: {key: path | [path, ...]}   # relative to the data dir; a list = candidates, first found wins
      options: {name: value}       # optional: passed to the loader and, as `options`, to the
                                   # field templates; load_split(options=...) overrides them per run
      remote:                      # optional: published copies, tried in order after the data dir
        - hub: owner/name          # a Hugging Face dataset repository ...
          revision: <commit sha>   # ... at a pinned commit (40 hex digits), or
          # url: https://host/base/  a fixed base URL (then every file needs a sha256 pin)
          files: {key: path}       # same keys as `files`; path in the repository / under the URL
          sha256: {key: hex}       # optional for hub files: a key without a pin is not verified
          licence: str             # shown by `bench data list`, stored in each run's config.json
          provenance: str
    sample:                        # optional: the built-in sample, used with no data dir and
                                   # no cached published copy
      files: {key: path}           # relative to tasks/samples
      splits: {split: rule}        # optional, replaces `splits` for the sample
    fields: {EditCase field: jinja template}   # see tasks.fields
    splits:
      train: rule                  # optional
      eval: rule
      holdout_eval: rule           # optional: replaces `eval` when the task is the held-out task
    metrics: [reliability | generality | locality | portability | counterfact, ...]
    generation:                    # optional: how a generated answer ends (the wild protocol)
      stop: [str, ...]             # stop strings after the answer has begun (besides EOS and newline)
    instructions:
      task: str                    # the label after "Task:"
      template: str                # optional, default INSTRUCTION_TEMPLATE
      descriptions: [{text: str, seen: bool}, ...]

A split rule names one file key and exactly one selector:
    {file: k, slice: [start, stop]}                       # record indices, stop null = end
    {file: k, all: true}
    {file: k, hash: {salt: s, buckets: n, keep: [lo, hi]}} # sha256(salt:case_id) % n in [lo, hi)
and optionally, when a split's records may repeat records evaluated elsewhere (CounterFact
repeats some edits under other record ids):
    disjoint: {file: k, slice: [start, stop] | all: true, by: [subject, target_new]}
        # skip a record whose case has the same values of the `by` fields as one of those
        # records (mapped by this card's fields); the skip names the record it repeats
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from jinja2 import Environment, TemplateSyntaxError

from bench.core.errors import BenchError
from bench.core.hparams import coerce
from bench.core.io import YAML_MAX_BYTES, load_yaml, read_text
from tasks.fields import FieldMapper

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
    # `disjoint`: records this split must not repeat (a file and a slice or all of it), and the
    # case fields that say two cases are the same edit
    avoid: SplitRule | None = None
    avoid_by: tuple[str, ...] = ()

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
class Remote:
    """One published copy of a task's files (card `source.remote`), fetched by tasks.sources."""

    kind: str                  # "hub" or "url"
    location: str              # hub: the dataset repository id; url: the base URL (ends with /)
    revision: str | None       # hub: the pinned commit
    files: dict[str, str]      # file key -> path in the repository / under the base URL
    sha256: dict[str, str]     # file key -> pinned digest; a key without one is not verified
    licence: str
    provenance: str

    def address(self, key: str) -> str:
        """Where file `key` is published (an hf:// path or a URL): its name in runs and logs."""
        if self.kind == "hub":
            return f"hf://datasets/{self.location}@{self.revision}/{self.files[key]}"
        return self.location + self.files[key]

    @property
    def label(self) -> str:
        """A short name: repository@commit, or the base URL without its scheme."""
        if self.kind == "hub":
            return f"{self.location}@{self.revision[:8]}"
        return self.location.split("://", 1)[-1]


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
    remotes: tuple[Remote, ...] = ()  # source.remote, in order of preference
    stop_strings: tuple[str, ...] = ()  # generation.stop

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
    if unknown:  # YAML keys may be numbers or dates: sort their text
        raise BenchError(f"{where}: unknown key(s) {', '.join(sorted(map(str, unknown)))}")
    return d


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_disjoint(where: str, d: Any, file_keys: set[str]) -> dict[str, Any]:
    """A rule's `disjoint: {file, slice | all, by: [case field, ...]}`."""
    d = _expect_keys(where, d, {"file", "by"}, {"slice", "all"})
    by = d["by"]
    if not (isinstance(by, list) and by and all(isinstance(f, str) and f in CASE_FIELDS for f in by)):
        raise BenchError(f"{where}: by must be a non-empty list of case fields ({', '.join(CASE_FIELDS)})")
    if not ("slice" in d or "all" in d):
        raise BenchError(f"{where}: give slice or all (the records to keep clear of)")
    avoid = _parse_rule(where, {k: v for k, v in d.items() if k != "by"}, file_keys)
    return {"avoid": avoid, "avoid_by": tuple(dict.fromkeys(by))}


def _parse_rule(where: str, d: Any, file_keys: set[str]) -> SplitRule:
    d = _expect_keys(where, d, {"file"}, {"slice", "all", "hash", "disjoint"})
    if not isinstance(d["file"], str) or d["file"] not in file_keys:
        raise BenchError(f"{where}: file {d['file']!r} is not one of {sorted(file_keys)}")
    selectors = [k for k in ("slice", "all", "hash") if k in d]
    if len(selectors) != 1:
        raise BenchError(f"{where}: give exactly one of slice, all, hash")
    extra = _parse_disjoint(f"{where}.disjoint", d["disjoint"], file_keys) if "disjoint" in d else {}
    if "slice" in d:
        s = d["slice"]
        if not (isinstance(s, list) and len(s) == 2 and _is_int(s[0]) and s[0] >= 0
                and (s[1] is None or (_is_int(s[1]) and s[1] >= s[0]))):
            raise BenchError(f"{where}: slice must be [start, stop] with 0 <= start <= stop "
                             f"(stop may be null)")
        return SplitRule(file=d["file"], slice=(s[0], s[1]), **extra)
    if "all" in d:
        if d["all"] is not True:
            raise BenchError(f"{where}: all must be true")
        return SplitRule(file=d["file"], all=True, **extra)
    h = _expect_keys(f"{where}.hash", d["hash"], {"salt", "buckets", "keep"})
    keep = h["keep"]
    if not (_is_int(h["buckets"]) and h["buckets"] > 0 and isinstance(keep, list) and len(keep) == 2
            and _is_int(keep[0]) and _is_int(keep[1]) and 0 <= keep[0] < keep[1] <= h["buckets"]):
        raise BenchError(f"{where}.hash: need buckets > 0 and keep [lo, hi] within it")
    return SplitRule(file=d["file"], salt=str(h["salt"]), buckets=h["buckets"],
                     keep=(keep[0], keep[1]), **extra)


def _parse_splits(where: str, d: Any, file_keys: set[str]) -> dict[str, SplitRule]:
    d = _expect_keys(where, d, {"eval"}, {"train", "holdout_eval"})
    return {k: _parse_rule(f"{where}.{k}", v, file_keys) for k, v in d.items()}


def _text_field(where: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise BenchError(f"{where} must be a non-empty string")
    return value


def _check_options(where: str, options: Any) -> dict[str, Any]:
    if options is None:
        return {}
    if not isinstance(options, dict) or not all(isinstance(k, str) for k in options):
        raise BenchError(f"{where}: source.options must map option names to values")
    return dict(options)


_HEX40 = re.compile(r"[0-9a-f]{40}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


def _remote_path(where: str, path: Any) -> str:
    """A relative path inside a repository or under a base URL (no escaping it)."""
    if not isinstance(path, str) or not path.strip() or path.startswith("/") or "\\" in path \
            or ".." in path.split("/"):
        raise BenchError(f"{where}: expected a relative path inside the source, got {path!r}")
    return path


def _parse_remote(where: str, d: Any, file_keys: set[str]) -> Remote:
    d = _expect_keys(where, d, {"files", "licence", "provenance"},
                     {"hub", "revision", "url", "sha256"})
    kinds = [k for k in ("hub", "url") if k in d]
    if len(kinds) != 1:
        raise BenchError(f"{where}: give exactly one of hub (a dataset repository) or url")
    if not isinstance(d["files"], dict) or set(d["files"]) != file_keys:
        raise BenchError(f"{where}: files must map the same keys as source.files "
                         f"({', '.join(sorted(file_keys))})")
    files = {k: _remote_path(f"{where}.files.{k}", v) for k, v in d["files"].items()}
    sha256 = d.get("sha256") or {}
    if not isinstance(sha256, dict) or not set(sha256) <= file_keys \
            or not all(isinstance(v, str) and _HEX64.fullmatch(v) for v in sha256.values()):
        raise BenchError(f"{where}: sha256 must map file keys to 64 lowercase hex digits")
    if kinds == ["hub"]:
        if not isinstance(d["hub"], str) or not _REPO_ID.fullmatch(d["hub"]):
            raise BenchError(f"{where}: hub must be a repository id owner/name, got {d['hub']!r}")
        # a branch would let the data change under the same card: only a commit pins it
        if not isinstance(d.get("revision"), str) or not _HEX40.fullmatch(d["revision"]):
            raise BenchError(f"{where}: revision must be the commit sha (40 lowercase hex digits)")
        location, revision = d["hub"], d["revision"]
    else:
        if "revision" in d:
            raise BenchError(f"{where}: revision belongs to hub sources; pin a URL in its path")
        url = d["url"]
        if not isinstance(url, str) or not re.fullmatch(r"https?://[^\s]+/", url):
            raise BenchError(f"{where}: url must be an http(s) base URL ending with /, got {url!r}")
        # what a URL serves can change: only the digest pins it
        if set(sha256) != file_keys:
            raise BenchError(f"{where}: a url source needs a sha256 pin for every file")
        location, revision = url, None
    return Remote(kind=kinds[0], location=location, revision=revision, files=files,
                  sha256=dict(sha256), licence=_text_field(f"{where}: licence", d["licence"]).strip(),
                  provenance=_text_field(f"{where}: provenance", d["provenance"]).strip())


def _parse_remotes(where: str, d: Any, file_keys: set[str]) -> tuple[Remote, ...]:
    if d is None:
        return ()
    if not isinstance(d, list) or not d:
        raise BenchError(f"{where}: source.remote must be a list of sources")
    return tuple(_parse_remote(f"{where}: source.remote[{i}]", r, file_keys) for i, r in enumerate(d))


def _read_yaml(path: Path) -> Any:
    text = read_text(path, "task card", max_bytes=YAML_MAX_BYTES)  # a byte order mark is accepted
    try:
        return load_yaml(text)  # safe_load with limits (an alias bomb, deep nesting)
    except yaml.YAMLError as exc:
        raise BenchError(f"task card {path}: invalid YAML ({exc.__class__.__name__})") from None
    except (ValueError, OverflowError, RecursionError) as exc:  # e.g. a date 2001-13-01
        raise BenchError(f"task card {path}: invalid YAML value ({exc.__class__.__name__}: "
                         f"{str(exc)[:80]})") from None


def parse_card(path: Path) -> TaskCard:
    """Read and validate one card file."""
    path = Path(path)
    where = path.name
    raw = _read_yaml(path)
    d = _expect_keys(where, raw, {"name", "description", "source", "fields", "splits", "metrics",
                                  "instructions"}, {"sample", "holdout_only", "generation"})
    if d["name"] != path.stem:
        raise BenchError(f"{where}: name {d['name']!r} must match the file name")

    src = _expect_keys(f"{where}: source", d["source"], {"schema", "files"}, {"options", "remote"})
    schema = _text_field(f"{where}: source.schema", src["schema"])
    if not isinstance(src["files"], dict) or not all(isinstance(k, str) for k in src["files"]):
        raise BenchError(f"{where}: source.files must map keys to a path or a list of paths")
    files = {k: tuple([v] if isinstance(v, str) else v if isinstance(v, list) else [None])
             for k, v in src["files"].items()}
    if not files or not all(files.values()) or not all(isinstance(p, str) for v in files.values() for p in v):
        raise BenchError(f"{where}: source.files must map keys to a path or a list of paths")
    options = _check_options(where, src.get("options"))
    remotes = _parse_remotes(where, src.get("remote"), set(files))

    fields = _expect_keys(f"{where}: fields", d["fields"], {"case_id", *REQUIRED_FIELDS},
                          set(CASE_FIELDS))
    if not all(isinstance(v, str) for v in fields.values()):
        raise BenchError(f"{where}: every fields entry must be a template string")
    FieldMapper(d["name"], fields, options)  # a template syntax error is a card error, said now

    splits = _parse_splits(f"{where}: splits", d["splits"], set(files))
    sample_files = sample_splits = None
    if "sample" in d:
        s = _expect_keys(f"{where}: sample", d["sample"], {"files"}, {"splits"})
        if not isinstance(s["files"], dict) or not all(isinstance(v, str) for v in s["files"].values()):
            raise BenchError(f"{where}: sample.files must map keys to a path")
        sample_files = dict(s["files"])
        if set(sample_files) != set(files):
            raise BenchError(f"{where}: sample.files must have the same keys as source.files")
        if "splits" in s:
            sample_splits = _parse_splits(f"{where}: sample.splits", s["splits"], set(files))

    metrics = d["metrics"]
    if not (isinstance(metrics, list) and metrics
            and all(isinstance(m, str) and m in KNOWN_METRICS for m in metrics)):
        raise BenchError(f"{where}: metrics must be a non-empty subset of {', '.join(KNOWN_METRICS)}")
    metrics = tuple(metrics)

    ins = _expect_keys(f"{where}: instructions", d["instructions"], {"task", "descriptions"},
                       {"template"})
    if not isinstance(ins["descriptions"], list):
        raise BenchError(f"{where}: instructions.descriptions must be a list of {{text, seen}}")
    descs = []
    for i, item in enumerate(ins["descriptions"]):
        item = _expect_keys(f"{where}: instructions.descriptions[{i}]", item, {"text", "seen"})
        if not isinstance(item["text"], str) or not item["text"].strip() or not isinstance(item["seen"], bool):
            raise BenchError(f"{where}: instructions.descriptions[{i}] needs text and seen: true|false")
        descs.append(Description(item["text"].strip(), item["seen"]))
    template = _text_field(f"{where}: instructions.template", ins.get("template", INSTRUCTION_TEMPLATE))
    try:
        Environment().parse(template)
    except TemplateSyntaxError as exc:
        raise BenchError(f"{where}: instructions.template is not a valid template: {exc.message}") from None
    task = _text_field(f"{where}: instructions.task", ins["task"])
    instructions = Instructions(task, template, tuple(descs))
    if not instructions.pool(True) or not instructions.pool(False):
        raise BenchError(f"{where}: instructions need at least one seen and one unseen description")

    generation = _expect_keys(f"{where}: generation", d.get("generation") or {}, set(), {"stop"})
    stop = generation.get("stop") or []
    if not isinstance(stop, list) or not all(isinstance(x, str) and x for x in stop):
        raise BenchError(f"{where}: generation.stop must be a list of non-empty strings")
    holdout_only = d.get("holdout_only", False)
    if not isinstance(holdout_only, bool):
        raise BenchError(f"{where}: holdout_only must be true or false")
    if holdout_only and "train" in splits:
        raise BenchError(f"{where}: a holdout_only task cannot have a train split")
    return TaskCard(name=d["name"], description=str(d["description"]).strip(), schema=schema,
                    files=files, options=options, fields=dict(fields),
                    splits=splits, metrics=metrics, instructions=instructions,
                    sample_files=sample_files, sample_splits=sample_splits,
                    holdout_only=holdout_only, path=path, stop_strings=tuple(stop),
                    remotes=remotes)


# --------------------------------------------------------------------------------------------
# Per-run options
# --------------------------------------------------------------------------------------------

def _coerce_option(task: str, key: str, value: Any, default: Any) -> Any:
    """`value` in the type of the card's default (command-line values arrive as strings); a
    default of another type (list, null) takes the value as given."""
    if isinstance(default, (bool, int, float, str)):
        return coerce(value, type(default), key, label=f"task {task!r}: option {key}")
    return value


def merge_options(card: TaskCard, overrides: dict[str, Any] | None) -> dict[str, Any]:
    """The card's source.options with `overrides` applied, each coerced to its default's type;
    an unknown name is a BenchError listing the known ones."""
    merged = dict(card.options)
    if not overrides:
        return merged
    if not isinstance(overrides, dict):
        raise BenchError(f"task {card.name!r}: options must be a mapping of name to value")
    for key, value in overrides.items():
        if key not in card.options:
            known = ", ".join(sorted(card.options)) or "none"
            raise BenchError(f"task {card.name!r}: unknown option {key!r}; known: {known}")
        merged[key] = _coerce_option(card.name, key, value, card.options[key])
    return merged
