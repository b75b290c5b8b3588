"""Temporary files of killed processes: every writer in the cache writes `<name>.<pid>.tmp` and
renames it into place, so a process killed mid-way (SIGKILL during a model's download or
conversion, a full disk) leaves its temporary behind - up to the size of a model. The next writer
in the same folder removes those whose process is gone (`remove_stale_temporaries`).

A process is taken as alive when `kill(pid, 0)` does not say it is gone (another user's process
included), so a live writer's temporary is never removed. Processes in another PID namespace (a
container sharing the cache volume) cannot be checked: a cache shared across such boundaries
should not be written by two of them at once anyway.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

_TMP_NAME = re.compile(r"^.+\.(\d+)\.tmp$")  # <name>.<pid>.tmp: a per-process temporary


def pid_alive(pid: int) -> bool:
    """Whether process `pid` may be running (True unless the system says it is gone)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # another user's process (or a pid this system cannot check): keep its file
    return True


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Remove the `<name>.<pid>.tmp` files and folders in `folder` whose process is gone (a
    download or conversion killed mid-way, e.g. by SIGKILL, leaves them behind: up to the size of
    a model each). A temporary of a live process is kept. Returns what was removed."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for path in entries:
        m = _TMP_NAME.match(path.name)
        if m is None or int(m.group(1)) == os.getpid() or pid_alive(int(m.group(1))):
            continue
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
        except OSError:
            pass  # another process removed it first, or it is not ours to remove
    if removed:
        print(f"removed {len(removed)} temporary file(s) left by killed processes in {folder}",
              file=sys.stderr)
    return removed
