"""What a run records about the code and the machine that made it: the git commit of the code
(config.json `versions.git_commit`) and the peak memory the run used (summary.json `memory`).

Both are best effort and never stop a run: outside a git checkout (an installed wheel) or
without `git` the commit is None; peak memory is read from the operating system and, on CUDA,
from torch's allocator.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CODE_DIR = Path(__file__).resolve().parents[2]  # the checkout that holds bench/


def git_commit(path: Path = CODE_DIR) -> dict:
    """`{"git_commit": sha, "git_dirty": bool}` for the git work tree holding `path`, or
    `{"git_commit": None}` when it is not one (or git is missing or slow). `git_dirty` says the
    run's code had uncommitted changes, so the commit alone does not reproduce it."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True,
                                 timeout=10, check=False)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    sha = git("rev-parse", "--verify", "HEAD")
    if not sha:
        return {"git_commit": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": sha, "git_dirty": None if status is None else bool(status)}


def peak_rss_mb() -> float | None:
    """The process's peak resident memory in MB (None where the platform does not report it)."""
    try:
        import resource  # late: a POSIX module, absent on Windows
    except ImportError:
        return None
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kilobytes, macOS bytes.
    return round(kb / (1 << 20) if sys.platform == "darwin" else kb / 1024, 1)


def peak_memory(device: object) -> dict:
    """summary.json's `memory` block: `peak_mb` is the peak on the device that held the model
    (torch's peak allocation on CUDA, the process's peak resident memory on CPU), with both
    readings beside it. Peaks are of this process: a resumed run reports its last sitting."""
    out: dict = {"peak_rss_mb": peak_rss_mb()}
    kind = getattr(device, "type", str(device))
    if kind == "cuda":
        import torch  # late: CUDA readings only; the rest of this module needs no torch
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(device) / (1 << 20), 1)
        out["peak_mb"], out["measured"] = out["peak_gpu_mb"], "cuda max_memory_allocated"
    else:
        out["peak_mb"], out["measured"] = out["peak_rss_mb"], "process peak resident memory (ru_maxrss)"
    return out
