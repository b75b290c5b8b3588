"""Seconds per evaluated case of earlier runs on this machine, kept in the cache
(`timings.json`), so that a command which trains an editor before it evaluates can give one
estimate for the whole command: the training's own remaining time plus the cases that follow at
the rate the last comparable run measured here.

Comparable: same model (and weights), editor, tasks, protocols, mode and device type. The file
is advisory: unreadable or missing, it gives no estimate and is rewritten; writing it never
fails a run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from bench.core.io import write_json_atomic

FILE = "timings.json"


def timing_key(model_identity: str, editor: str, tasks: list[str], protocols: list[str], mode: str,
               device_type: str) -> str:
    return json.dumps([model_identity, editor, sorted(tasks), sorted(protocols), mode, device_type])


def recorded(cache_dir: Path, key: str) -> float | None:
    """The seconds per case the last comparable run measured here, or None."""
    try:
        value = json.loads((Path(cache_dir) / FILE).read_text(encoding="utf-8")).get(key)
    except (OSError, ValueError, AttributeError):
        return None
    return float(value) if isinstance(value, (int, float)) and 0 < value < 1e6 else None


def record(cache_dir: Path, key: str, s_per_case: float) -> None:
    """Keep `s_per_case` for `key` (best effort: a read-only cache is no reason to fail a run)."""
    path = Path(cache_dir) / FILE
    try:
        table = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
        if not isinstance(table, dict):
            table = {}
    except (OSError, ValueError):
        table = {}
    table[key] = round(float(s_per_case), 4)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, table)
    except OSError:
        pass


@dataclass
class WorkAfter:
    """What a command does after the editor's training: `cases` to evaluate, at `s_per_case`
    (None: no comparable run measured here yet)."""

    cases: int
    s_per_case: float | None = None

    def note(self, training_left_s: float | None) -> str:
        """The part of a training progress line that speaks for the whole command."""
        if not self.cases:
            return ""
        if self.s_per_case is None or training_left_s is None:
            return f"then {self.cases} cases (no timing of such a run here yet)"
        whole = training_left_s + self.cases * self.s_per_case
        return (f"whole command ~{tqdm.format_interval(round(whole))} left (then {self.cases} cases at "
                f"{self.s_per_case:.2g} s/case, as last measured here)")

