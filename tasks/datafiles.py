"""Where a task's files are: the data directory (--data-dir, $BENCH_DATA, ../shared/data), the
cached published copy (tasks.sources, its digest checked) or the built-in sample (tasks/samples).
tasks.registry calls these; nothing else should."""

from __future__ import annotations

import os
from pathlib import Path

from bench.core.errors import BenchError
from tasks import sources
from tasks.card import TaskCard

SAMPLES_DIR = Path(__file__).parent / "samples"
SAMPLE_PREFIX = "sample/"  # how sample files are named in hashes and status


def resolve_data_dir(arg: str | None) -> tuple[Path | None, bool]:
    """--data-dir, else $BENCH_DATA, else ../shared/data (a development checkout), else none.

    Returns (directory, False), or (None, True) meaning "no data directory" (each task then uses
    its cached published copy, else the built-in sample). A directory
    that is named explicitly (argument or $BENCH_DATA) but does not exist, or is not a
    directory, is an error.
    """
    for given, origin in ((arg, "--data-dir"), (os.environ.get("BENCH_DATA") or None, "$BENCH_DATA")):
        if given:
            try:
                path = Path(given).expanduser()
            except RuntimeError:  # "~someone" with no such user
                raise BenchError(f"data directory from {origin}: cannot expand {given!r}") from None
            if not path.exists():
                raise BenchError(f"data directory from {origin} does not exist: {path}")
            if not path.is_dir():
                raise BenchError(f"data directory from {origin} is not a directory: {path}")
            return path.resolve(), False
    dev = Path.cwd() / ".." / "shared" / "data"
    if dev.is_dir():
        return dev.resolve(), False
    return None, True


def expected_paths(card: TaskCard) -> str:
    """The files a data directory must hold for the task (each key's first candidate)."""
    return ", ".join(paths[0] for paths in card.files.values())


def fetch_hint(card: TaskCard) -> str:
    return f"; or fetch its published copy: bench data fetch {card.name}" if card.remotes else ""


def no_sample(card: TaskCard) -> BenchError:
    return BenchError(f"task {card.name!r} has no built-in sample; pass --data-dir (or set "
                      f"$BENCH_DATA) to a directory holding {expected_paths(card)}{fetch_hint(card)}")


def uses_sample(card: TaskCard, data_dir: Path | None) -> bool:
    """The built-in sample stands in for a task only when there is no data directory and no
    published copy of the task's files is cached."""
    return data_dir is None and card.has_sample and sources.cached_files(card) is None


def local_file(card: TaskCard, key: str, data_dir: Path) -> tuple[Path, str] | None:
    """The first candidate of file `key` that is a file in the data directory; None when none
    exists, BenchError when one exists but is not a regular file."""
    candidates = card.files[key]
    for rel in candidates:
        if (Path(data_dir) / rel).is_file():
            return Path(data_dir) / rel, rel
    for rel in candidates:  # none is a file: say why if one of them exists
        path = Path(data_dir) / rel
        if path.is_dir():
            raise BenchError(f"task {card.name!r}: data path {path} is a directory, not a file")
        if path.exists():
            raise BenchError(f"task {card.name!r}: data path {path} is not a regular file")
    return None


def file_path(card: TaskCard, key: str, data_dir: Path | None) -> tuple[Path, str]:
    """(absolute path, name used in reports) of one of the card's files: from the data
    directory, else the cached published copy (its digest checked), else the built-in sample
    when there is no data directory; BenchError if absent."""
    if uses_sample(card, data_dir):
        path = SAMPLES_DIR / card.sample_files[key]
        if not path.is_file():  # a card naming a sample that is not shipped
            raise BenchError(f"task {card.name!r}: built-in sample file not found: {path}")
        return path, SAMPLE_PREFIX + card.sample_files[key]
    if data_dir is not None and (found := local_file(card, key, data_dir)) is not None:
        return found
    if (cached := sources.cached_files(card)) is not None:
        remote, paths = cached
        sources.verify(card.name, remote, key, paths[key])
        return paths[key], remote.address(key)
    if data_dir is None:
        raise no_sample(card)
    candidates = card.files[key]
    also = f" (also looked for {', '.join(candidates[1:])})" if len(candidates) > 1 else ""
    raise BenchError(f"task {card.name!r}: data file not found: {Path(data_dir) / candidates[0]}{also}"
                     f"{fetch_hint(card)}")


def file_key(path: Path) -> tuple:
    st = path.stat()
    return str(path.resolve()), st.st_mtime_ns, st.st_size
