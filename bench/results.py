"""Run directories: config.json, cases.jsonl (append-only, flushed per case), summary.json.

See docs/run-format.md for the exact layout. Writes are crash-safe: a case line is flushed and
fsync'ed as soon as the case finishes, JSON files are replaced atomically, and a torn last line
left by a kill is dropped on reading (that case is simply run again on resume).
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

from bench.errors import BenchError

CONFIG = "config.json"
CASES = "cases.jsonl"
SUMMARY = "summary.json"


def write_json_atomic(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise BenchError(f"{path} not found") from None
    except json.JSONDecodeError as exc:
        raise BenchError(f"{path} is not valid JSON (line {exc.lineno}): {exc.msg}") from None


def new_run_dir(output_dir: Path, label: str) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    base = Path(output_dir) / f"{label}-{stamp}"
    path, k = base, 1
    while path.exists():
        k += 1
        path = base.with_name(f"{base.name}-{k}")
    path.mkdir(parents=True)
    return path


class RunDir:
    def __init__(self, path: Path):
        self.path = Path(path)

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG

    @property
    def cases_path(self) -> Path:
        return self.path / CASES

    @property
    def summary_path(self) -> Path:
        return self.path / SUMMARY

    def write_config(self, config: dict) -> None:
        write_json_atomic(self.config_path, config)

    def read_config(self) -> dict:
        if not self.path.is_dir():
            raise BenchError(f"run directory {self.path} does not exist")
        return read_json(self.config_path)

    def shard_path(self, rank: int) -> Path:
        return self.path / f"cases.rank{rank}.jsonl"

    def read_cases(self) -> list[dict]:
        """Finished cases from cases.jsonl and any per-process shards (a sharded run that has not
        been merged yet), without duplicates."""
        records, seen = [], set()
        for path in [self.cases_path] + sorted(self.path.glob("cases.rank*.jsonl")):
            for rec in _read_jsonl(path):
                key = (rec.get("task"), rec.get("case_id"))
                if key not in seen:
                    seen.add(key)
                    records.append(rec)
        return records

    def append_case(self, record: dict, rank: int | None = None) -> None:
        """Append one finished case (to this process's shard when the run is sharded)."""
        path = self.cases_path if rank is None else self.shard_path(rank)
        line = json.dumps(record, default=str) + "\n"
        with open(path, "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def merge_shards(self, order: list[tuple[str, str]]) -> list[dict]:
        """Fold shard files into cases.jsonl (in the run's planned case order) and remove them."""
        records = self.read_cases()
        rank = {key: i for i, key in enumerate(order)}
        records.sort(key=lambda r: rank.get((r["task"], r["case_id"]), len(rank)))
        tmp = self.cases_path.with_name(CASES + ".tmp")
        with open(tmp, "w") as f:
            for rec in records:
                f.write(json.dumps(rec, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.cases_path)
        for shard in self.path.glob("cases.rank*.jsonl"):
            shard.unlink()
        return records

    def write_summary(self, summary: dict) -> None:
        write_json_atomic(self.summary_path, summary)

    def read_summary(self) -> dict:
        return read_json(self.summary_path)


def _read_jsonl(path: Path) -> list[dict]:
    """Records of a JSONL file; a torn trailing line (the process was killed mid-write) is dropped
    and truncated away so later appends start on a clean line."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    records, good_end, offset = [], 0, 0
    for line in raw.splitlines(keepends=True):
        offset += len(line)
        if not line.strip():
            good_end = offset
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if offset == len(raw):  # only the last line may be torn
                break
            raise BenchError(f"{path}: corrupt line at byte {offset - len(line)}") from None
        if not line.endswith(b"\n"):
            break  # complete JSON but unterminated: treat as torn, rerun the case
        records.append(rec)
        good_end = offset
    if good_end != len(raw):
        with open(path, "r+b") as f:
            f.truncate(good_end)
    return records
