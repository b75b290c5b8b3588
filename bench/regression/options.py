"""What a regression measurement is asked to do, checked before any model loads."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from bench.core.defaults import DEFAULT_LM_LIMIT, RUN_MODES
from bench.core.errors import BenchError
from bench.regression.lm_tasks import OFFLINE_TASKS

DEFAULT_SUITE = list(OFFLINE_TASKS)
DEFAULT_SAMPLE = 3  # edits evaluated in single mode


@dataclass
class RegressionOptions:
    lm_tasks: list[str] = field(default_factory=lambda: list(DEFAULT_SUITE))
    mode: str = "single"  # the run's mode: the suite runs after sampled single edits, or once on all
    lm_limit: int | None = DEFAULT_LM_LIMIT
    sample: int = DEFAULT_SAMPLE
    corpus: str | None = None  # --regression-corpus; None = generate from the unedited model
    batch_size: int = 32
    seed: int = 0

    def check(self) -> None:
        if self.mode not in RUN_MODES:
            raise BenchError(f"--mode must be single or sequential, got {self.mode!r}")
        if not self.lm_tasks:
            raise BenchError("no lm-eval tasks given")
        if self.sample < 1:
            raise BenchError(f"--sample must be at least 1, got {self.sample}")
        if self.lm_limit is not None and self.lm_limit < 1:
            raise BenchError(f"--lm-limit must be positive (0 = all), got {self.lm_limit}")
        if self.batch_size < 1:
            raise BenchError("--batch-size must be at least 1")
        if self.corpus is not None and not Path(self.corpus).is_file():
            raise BenchError(f"regression corpus not found: {self.corpus}")
