"""Where meta-training stands (FitState: what a saved training state holds besides the
network, optimizer and sampler), how a first Ctrl-C asks it to stop at a step boundary, and the
mean of a window of step statistics."""

from __future__ import annotations

import math
import os
import signal
import threading
from dataclasses import dataclass, field


@dataclass
class FitState:
    """Where `fit` stands: what save_state writes besides the network, optimizer and sampler."""

    step: int = 0
    elapsed_s: float = 0.0
    stop_reason: str | None = None  # set once training has ended
    best: dict = field(default_factory=lambda: {"loss": float("inf")})
    best_step: int = 0
    bad_rounds: int = 0
    history: list = field(default_factory=list)
    recent: list = field(default_factory=list)  # the last 20 steps' statistics (progress bar)
    best_state: dict | None = None


class StopAfterStep:
    """While training (main thread, default Ctrl-C handling): the first Ctrl-C only asks to stop
    at the next step boundary, where the state is saved; a second one interrupts at once."""

    def __init__(self, enabled: bool):
        self.enabled, self.requested, self.installed = enabled, False, False

    def __enter__(self) -> "StopAfterStep":
        self.installed = (self.enabled and threading.current_thread() is threading.main_thread()
                          and signal.getsignal(signal.SIGINT) is signal.default_int_handler)
        if self.installed:
            signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        try:  # a raw write: a signal handler must not re-enter a buffered stream
            os.write(2, b"\nstopping after this training step to save its state "
                        b"(Ctrl-C again stops at once)\n")
        except OSError:
            pass

    def __exit__(self, *exc) -> None:
        if self.installed:
            signal.signal(signal.SIGINT, signal.default_int_handler)


def mean_stats(rows: list[dict]) -> dict:
    """Each statistic's mean over `rows`, NaNs left out (NaN where all are)."""
    out = {}
    for key in rows[0]:
        vals = [r[key] for r in rows if not (isinstance(r[key], float) and math.isnan(r[key]))]
        out[key] = float(sum(vals) / len(vals)) if vals else float("nan")
    return out
