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

    def read_cases(self) -> list[dict]:
        """Finished cases; a torn trailing line (the process was killed mid-write) is dropped and
        truncated away so later appends start on a clean line."""
        if not self.cases_path.exists():
            return []
        raw = self.cases_path.read_bytes()
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
                raise BenchError(f"{self.cases_path}: corrupt line at byte {offset - len(line)}") from None
            if not line.endswith(b"\n"):
                break  # complete JSON but unterminated: treat as torn, rerun the case
            records.append(rec)
            good_end = offset
        if good_end != len(raw):
            with open(self.cases_path, "r+b") as f:
                f.truncate(good_end)
        return records

    def append_case(self, record: dict) -> None:
        line = json.dumps(record, default=str) + "\n"
        with open(self.cases_path, "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def write_summary(self, summary: dict) -> None:
        write_json_atomic(self.summary_path, summary)

    def read_summary(self) -> dict:
        return read_json(self.summary_path)
