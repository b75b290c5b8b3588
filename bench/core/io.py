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
from pathlib import Path
from typing import Any, Iterable

from bench.core.errors import BenchError


# --------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------


def read_text(path: Path, what: str = "file") -> str:
    """A UTF-8 text file's content (a byte order mark is dropped); BenchError saying `what` the
    file is and why it cannot be read (missing, a directory, not UTF-8, unreadable)."""
    path = Path(path).expanduser()
    try:
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
    """Strict JSON text: non-finite floats as null, anything else unknown as its str()."""
    return json.dumps(finite(data), indent=indent, default=str, allow_nan=False, ensure_ascii=False)


def write_json_atomic(path: Path, data: Any) -> None:
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(dumps(data, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: Path, what: str = "JSON file") -> Any:
    """A JSON file's content; BenchError naming the file when it cannot be read or is not
    valid JSON."""
    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise BenchError(f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno}): "
                         f"{exc.msg}") from None


# --------------------------------------------------------------------------------------------
# JSONL
# --------------------------------------------------------------------------------------------


def read_jsonl(path: Path, repair: bool = False) -> list[Any]:
    """The records of a JSONL file ([] when it does not exist). A torn last line (no newline,
    or not valid JSON) is dropped; with `repair` it is also truncated away."""
    path = Path(path)
    if not path.exists():
        return []
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
            rec = json.loads(line.decode("utf-8-sig" if number == 1 else "utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            if number == len(lines):  # only the last line may be torn
                break
            why = exc.msg if isinstance(exc, json.JSONDecodeError) else "not UTF-8"
            raise BenchError(f"{path}: line {number} is not valid JSON ({why})") from None
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
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file, remembered per (path, size, mtime) so large weights are hashed once."""
    path = Path(path).resolve()
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    memo_path = cache_dir() / "file-hashes.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        memo = {}
    if key in memo:
        return memo[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    memo[key] = h.hexdigest()
    tmp = memo_path.with_name(f"{memo_path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(memo))
    os.replace(tmp, memo_path)
    return memo[key]


def short_hash(data: Any, n: int = 16) -> str:
    """A short, stable digest of a JSON-serialisable value (cache keys)."""
    blob = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:n]
