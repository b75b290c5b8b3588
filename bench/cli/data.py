"""`bench data list|fetch`: where each task's data comes from, and fetching the published copies
its card pins (tasks.sources) into the usual Hugging Face caches."""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.cli.common import DATA_DIR_HELP, Parser
from bench.core.errors import BenchError
from tasks import sources
from tasks.registry import expected_paths, get_card, list_cards, provide, resolve_data_dir, task_source

INDENT = " " * 17


def register(sub) -> None:
    p = sub.add_parser("data", help="where each task's data comes from; fetch the published data")
    dsub = p.add_subparsers(dest="data_command", required=True, parser_class=Parser)
    lp = dsub.add_parser("list", help="per task: data directory, cache, not cached or built-in "
                                      "sample, with licence and provenance (no network)")
    lp.add_argument("--data-dir", default=None, help=DATA_DIR_HELP)
    lp.set_defaults(func=list_main)
    fp = dsub.add_parser("fetch", help="download the published data of these tasks (default: all) "
                                       "into the cache and check each file's sha256")
    fp.add_argument("tasks", nargs="*", metavar="TASK")
    fp.add_argument("--data-dir", default=None,
                    help="data directory (default: $BENCH_DATA, else ../shared/data of the current "
                         "directory if it exists): tasks whose files it holds are checked, not "
                         "downloaded")
    fp.add_argument("--force", action="store_true", help="download again even when cached")
    fp.set_defaults(func=fetch_main)


def _hub_line() -> str:
    variable = sources.offline()
    if variable:
        return f"hub: offline ({variable} is set): nothing is downloaded"
    return ("hub: not marked offline: bench data fetch (and bench run, for the tasks it names) "
            "download what is not cached")


def _check(src: dict) -> str:
    if src["verified"] is True:
        return "sha256 as the card pins"
    if src["verified"] is False:
        return f"sha256 differs from the card's pin: {', '.join(src['differs'])}"
    return "no sha256 pin to check against"


def describe(name: str, data_dir: Path | None) -> tuple[str, str]:
    """(data from, details) of one task for `bench data list`; its licence and provenance lines
    are those of the card's published copy."""
    card = get_card(name)
    published = card.remotes[0] if card.remotes else None
    try:
        src = task_source(name, data_dir)
    except BenchError as exc:  # a cached copy that fails its pin, a directory where a file belongs
        return "error", str(exc)
    files = ", ".join(src["files"]) if src["files"] else ""
    if src["data"] == "built-in sample":
        extra = f"; published copy not cached: bench data fetch {name}" if published else ""
        return src["origin"], f"tasks/samples: {files}{extra}"
    if src["data"] == "real":
        return src["origin"], f"{src['location']}: {files} ({_check(src)})"
    remote = (f"{published.label}: {', '.join(published.files.values())}; bench data fetch {name}, or "
              if published else "")
    return src["origin"], f"{remote}a data directory holding {expected_paths(card)}"


def list_main(args: argparse.Namespace) -> int:
    data_dir, _ = resolve_data_dir(args.data_dir)
    print(f"data directory: {data_dir if data_dir else 'none found'}")
    print(_hub_line())
    print(f"{'task':16s} {'data from':16s} files")
    for name in list_cards():
        origin, details = describe(name, data_dir)
        print(f"{name:16s} {origin:16s} {details}")
        card = get_card(name)
        published = card.remotes[0] if card.remotes else None
        if published is not None:
            print(f"{INDENT}licence: {published.licence}")
            print(f"{INDENT}provenance: {published.provenance}")
    return 0


def _fetched(name: str, src: dict) -> str:
    pins = {r.address(k): r.sha256.get(k) for r in get_card(name).remotes for k in r.files}
    unpinned = [f"{f} {digest}" for f, digest in src["files"].items() if f in pins and not pins[f]]
    note = f"; not pinned in the card (pin after checking): {'; '.join(unpinned)}" if unpinned else ""
    return f"{name}: {src['origin']} {src['location']} ({_check(src)}){note}"


def fetch_main(args: argparse.Namespace) -> int:
    data_dir, _ = resolve_data_dir(args.data_dir)
    names = list(dict.fromkeys(args.tasks)) or list(list_cards())
    for name in names:
        get_card(name)  # an unknown task: one line before anything happens
    need = []
    for name in names:
        src = task_source(name, data_dir)  # no network; a cached copy failing its pin raises
        if src["differs"]:
            provide(name, data_dir, sample=False, check_local=True)  # raises the mismatch
        if src["data"] == "real" and (not args.force or src["origin"] == "data directory"):
            print(_fetched(name, src))
        else:
            need.append(name)
    variable = sources.offline()
    if need and variable:
        where = (f"holding {expected_paths(get_card(need[0]))}" if len(need) == 1
                 else "holding their files (bench data list shows the paths)")
        raise BenchError(f"cannot fetch {', '.join(need)}: the hub is offline ({variable} is set); "
                         f"fetch where the hub is reachable, or supply a local directory with "
                         f"--data-dir or $BENCH_DATA {where}")
    failed = []
    for name in need:
        try:
            print(_fetched(name, provide(name, data_dir, sample=False, force=args.force)))
        except sources.DigestMismatch:
            raise
        except BenchError as exc:
            print(f"{name}: FAILED: {exc}")
            failed.append(name)
    if failed:
        raise BenchError(f"could not fetch {', '.join(failed)} (reasons above)")
    return 0
