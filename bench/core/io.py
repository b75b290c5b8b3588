"""File I/O shared by every layer: strict JSON written atomically, JSONL that survives a kill,
file hashes, the cache directory, and the one reader of text corpora.

* JSON is written strictly (no NaN or Infinity: a non-finite float becomes null, which every
  JSON parser reads) and atomically (a temporary file, fsync, rename).
* JSONL readers tolerate a torn last line (a process killed mid-write); `repair=True` also cuts
  it off the file so later appends start on a clean line. A bad line anywhere else is an error
  naming the file and line.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import Any, Iterable

from bench.core.errors import BenchError


# --------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------


def check_regular_file(path: Path, what: str = "file") -> None:
    """BenchError unless `path` is a regular file (or a link to one): a FIFO or a device would
    block the reader or never end, so it is refused before it is opened. A missing path or a
    directory passes (the opener says so in its own words)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
        raise BenchError(f"{what} {path} is not a regular file (a FIFO, socket or device)")


def read_text(path: Path, what: str = "file", max_bytes: int | None = None) -> str:
    """A UTF-8 text file's content (a byte order mark is dropped); BenchError saying `what` the
    file is and why it cannot be read (missing, a directory, a FIFO or device, larger than
    `max_bytes`, not UTF-8, unreadable)."""
    path = Path(path).expanduser()
    check_regular_file(path, what)
    try:
        if max_bytes is not None and path.is_file() and path.stat().st_size > max_bytes:
            raise BenchError(f"{what} {path} is larger than {max_bytes:,} bytes "
                             f"({path.stat().st_size:,})")
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise BenchError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise BenchError(f"{what} {path} is a directory, not a file") from None
    except UnicodeDecodeError as exc:
        raise BenchError(f"{what} {path} is not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise BenchError(f"cannot read {what} {path}: {exc.strerror}") from None


# --------------------------------------------------------------------------------------------
# JSON
# --------------------------------------------------------------------------------------------


def finite(value: Any) -> Any:
    """`value` with every non-finite float (NaN, inf) replaced by None, recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def dumps(data: Any, indent: int | None = None) -> str:
    """Strict JSON text: non-finite floats as null, anything else unknown as its str(). A lone
    surrogate (an undecodable byte of a path or argument, a \\udcff escape in a file read back)
    cannot be written as UTF-8: the text then escapes every non-ASCII character (still the same
    JSON)."""
    data = finite(data)
    text = json.dumps(data, indent=indent, default=str, allow_nan=False, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(data, indent=indent, default=str, allow_nan=False, ensure_ascii=True)
    return text


def write_json_atomic(path: Path, data: Any) -> None:
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(dumps(data, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: Path, what: str = "JSON file") -> Any:
    """A JSON file's content; BenchError naming the file when it cannot be read, is not valid
    JSON, or holds text that is not valid Unicode (a lone surrogate escape such as \\udcff,
    which no UTF-8 file, page or table can hold)."""
    text = read_text(path, what)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BenchError(f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno}): "
                         f"{exc.msg}") from None
    except RecursionError:
        raise BenchError(f"{path} is not valid JSON: nested too deeply") from None
    if _has_lone_surrogate(text, data):
        raise BenchError(f"{path} holds text that is not valid Unicode (a lone surrogate escape)")
    return data


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _has_lone_surrogate(raw: str, data: Any) -> bool:
    """Whether a string of `data` (parsed from the JSON text `raw`) holds a lone surrogate: only
    looked for when `raw` escapes a surrogate at all (a pair for an emoji is fine)."""
    if not _SURROGATE_ESCAPE.search(raw):
        return False
    stack = [data]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return False


# --------------------------------------------------------------------------------------------
# YAML
# --------------------------------------------------------------------------------------------

YAML_MAX_BYTES = 1 << 20  # a hyperparameter file, preset or card is a few hundred bytes
YAML_MAX_NODES = 100_000  # values after aliases are expanded: a "billion laughs" document is refused
YAML_MAX_DEPTH = 64


def load_yaml(text: str) -> Any:
    """yaml.safe_load with limits: a document whose aliases expand to more than YAML_MAX_NODES
    values (an alias bomb), that refers to itself, or that nests deeper than YAML_MAX_DEPTH is
    refused before it is built, and a value the constructor cannot make (a date 2001-13-01, an
    integer of 5000 digits) is a YAML error too. Every refusal is a yaml.YAMLError, so a caller
    reports it as it reports invalid YAML."""
    import yaml  # late: the CLI's start-up does not need it

    class Refused(yaml.YAMLError):
        pass

    loader = yaml.SafeLoader(text)
    try:
        try:
            node = loader.get_single_node()
        except RecursionError:
            raise Refused("nested too deeply") from None
        if node is None:
            return None
        _yaml_size(node, 0, {}, set(), Refused)
        try:
            return loader.construct_document(node)
        except (ValueError, OverflowError, TypeError, RecursionError) as exc:
            raise Refused(f"invalid value: {type(exc).__name__}: {str(exc)[:80]}") from None
    finally:
        loader.dispose()


def _yaml_size(node, depth: int, sizes: dict[int, int], open_: set[int], refused) -> int:
    """How many values `node` holds once its aliases are expanded (the same node reached twice
    counts twice, computed once)."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_:
        raise refused("an alias refers to the value that holds it")
    if depth > YAML_MAX_DEPTH:
        raise refused(f"nested deeper than {YAML_MAX_DEPTH} levels")
    size = 1
    if isinstance(node.value, list):  # a sequence (nodes) or a mapping ((key, value) pairs)
        open_.add(key)
        for item in node.value:
            for child in (item if isinstance(item, tuple) else (item,)):
                size += _yaml_size(child, depth + 1, sizes, open_, refused)
                if size > YAML_MAX_NODES:
                    raise refused(f"more than {YAML_MAX_NODES:,} values once its aliases are "
                                  "expanded (an alias bomb?)")
        open_.discard(key)
    sizes[key] = size
    return size


# --------------------------------------------------------------------------------------------
# JSONL
# --------------------------------------------------------------------------------------------


def read_jsonl(path: Path, repair: bool = False) -> list[Any]:
    """The records of a JSONL file ([] when it does not exist). A torn last line (no newline,
    or not valid JSON) is dropped; with `repair` it is also truncated away."""
    path = Path(path)
    if not path.exists():
        return []
    check_regular_file(path, "JSONL file")
    try:
        raw = path.read_bytes()
    except IsADirectoryError:
        raise BenchError(f"{path} is a directory, not a JSONL file") from None
    except OSError as exc:
        raise BenchError(f"cannot read {path}: {exc.strerror}") from None
    records, good_end, offset = [], 0, 0
    lines = raw.splitlines(keepends=True)
    for number, line in enumerate(lines, 1):
        offset += len(line)
        if not line.strip():
            good_end = offset
            continue
        try:
            text = line.decode("utf-8-sig" if number == 1 else "utf-8")
            rec = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            if number == len(lines):  # only the last line may be torn
                break
            why = exc.msg if isinstance(exc, json.JSONDecodeError) else \
                "not UTF-8" if isinstance(exc, UnicodeDecodeError) else "nested too deeply"
            raise BenchError(f"{path}: line {number} is not valid JSON ({why})") from None
        if _has_lone_surrogate(text, rec):
            raise BenchError(f"{path}: line {number} holds text that is not valid Unicode "
                             "(a lone surrogate escape)")
        if not line.endswith(b"\n"):
            break  # complete JSON but unterminated: treated as torn
        records.append(rec)
        good_end = offset
    if repair and good_end != len(raw):
        with open(path, "r+b") as f:
            f.truncate(good_end)
    return records


def append_jsonl(path: Path, record: Any) -> None:
    """Append one record as a line and fsync it (it survives a kill right after)."""
    line = dumps(record) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def write_jsonl(path: Path, records: Iterable[Any]) -> None:
    """Replace `path` atomically with one line per record."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(dumps(rec) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# Text corpora
# --------------------------------------------------------------------------------------------


def read_corpus(path: str | Path, what: str = "corpus file") -> list[str]:
    """The documents of a text corpus file, the one definition every caller shares:

    * JSON lines (a `.jsonl` file, or one whose first non-blank character is "{"): one document
      per object, its "text" field (blank texts are left out);
    * plain text: paragraphs separated by blank lines; a file without any blank line holds one
      document per line.
    """
    path = Path(path).expanduser()
    raw = read_text(path, what).replace("\r\n", "\n")
    if path.suffix == ".jsonl" or raw.lstrip().startswith("{"):
        docs = []
        for number, line in enumerate(raw.split("\n"), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                raise BenchError(f"{what} {path} line {number} is not valid JSON") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise BenchError(f"{what} {path} line {number} has no string \"text\" field")
            if obj["text"].strip():
                docs.append(obj["text"])
    else:
        lines = raw.split("\n")
        if any(not line.strip() for line in lines[:-1]):  # a blank line inside: paragraphs
            docs = [block.strip() for block in raw.split("\n\n") if block.strip()]
        else:
            docs = [line.strip() for line in lines if line.strip()]
    if not docs:
        raise BenchError(f"{what} {path} holds no documents")
    return docs


# --------------------------------------------------------------------------------------------
# Cache directory and file hashes
# --------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Where downloaded wheels, converted models, statistics and checkpoints are kept:
    $BENCH_CACHE, else $XDG_CACHE_HOME/instructedit-bench, else ~/.cache/instructedit-bench."""
    root = os.environ.get("BENCH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "instructedit-bench")
    path = Path(root).expanduser()
    what = "$BENCH_CACHE" if os.environ.get("BENCH_CACHE") else "the cache directory"
    if path.exists() and not path.is_dir():
        raise BenchError(f"{what} {path} is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BenchError(f"cannot create {what} {path}: {exc.strerror or exc}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise BenchError(f"{what} {path} is not writable")
    return path


def check_writable_dir(path: str | Path, what: str = "output directory") -> Path:
    """`path` as a Path when it is a directory this process can create files in, or one that can
    be created (its deepest existing ancestor is a directory that takes a new directory); else
    BenchError naming `what` and why: empty, below a regular file, a broken link, on a file system
    that takes no new directories (/proc, /sys, read-only), no permission. Nothing is left behind."""
    if isinstance(path, str) and not path.strip():
        raise BenchError(f"{what} is empty")
    path = Path(path).expanduser()
    probe = path
    while not os.path.lexists(probe) and probe.parent != probe:
        probe = probe.parent
    if os.path.lexists(probe) and not probe.exists():
        raise BenchError(f"{what} {path}: {probe} is a broken link")
    if not probe.is_dir():
        where = "is not a directory" if probe == path else f"lies below {probe}, which is not a directory"
        raise BenchError(f"{what} {path} {where}")
    try:
        longest = os.pathconf(probe, "PC_NAME_MAX")
    except (OSError, ValueError):
        longest = 255
    for part in path.relative_to(probe).parts if probe != path else ():
        if len(os.fsencode(part)) > longest:
            raise BenchError(f"{what} {path}: the name {part[:20]}... is longer than {longest} bytes")
    try:  # the one sure test: /proc or a read-only mount pass os.access but take nothing
        os.rmdir(tempfile.mkdtemp(prefix=".bench-probe-", dir=probe))
    except OSError as exc:
        raise BenchError(f"{what} {path} cannot be written ({probe} takes no new directory: "
                         f"{exc.strerror or exc})") from None
    return path


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file, remembered per (path, size, mtime) so large weights are hashed once."""
    path = Path(path).resolve()
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    memo_path = cache_dir() / "file-hashes.json"
    try:  # only a memo: one that is unreadable, not UTF-8, not JSON or not an object is started afresh
        check_regular_file(memo_path, "hash memo")
        memo = json.loads(memo_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError, BenchError):
        memo = {}
    if not isinstance(memo, dict):
        memo = {}
    if isinstance(memo.get(key), str):
        return memo[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    memo[key] = h.hexdigest()
    tmp = memo_path.with_name(f"{memo_path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(memo), encoding="utf-8")
        os.replace(tmp, memo_path)
    except OSError:  # e.g. a directory in the memo's place: the digest is right, only not remembered
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
    return memo[key]


def short_hash(data: Any, n: int = 16) -> str:
    """A short, stable digest of a JSON-serialisable value (cache keys)."""
    blob = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:n]
