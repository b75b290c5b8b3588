"""Run labels and slugs: a run is labelled by its editor as users know it (FT-L, FT-M) and, when
a group holds several runs of that editor, by what sets it apart (docs/report.md, "Run labels");
then it gets a slug (file names, anchors) and its look (reports.looks)."""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

from reports.looks import assign_style

if TYPE_CHECKING:
    from reports.runs import Run


def slugify(s: str) -> str:
    """`s` reduced to characters that are safe in a file name and an HTML anchor."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", s).strip("-.") or "x"


_TIMESTAMP = re.compile(r"-?\d{8}-\d{6}$")  # bench run's default directory suffix: -YYYYMMDD-HHMMSS


def _hparam_parts(runs: list[Run], skip: tuple[str, ...] = ()) -> list[list[str]]:
    """Per run, "key=value" of the hyperparameters in which the runs differ (keys in `skip`
    left out); a value most of the runs share is not repeated (a tie: none is)."""
    hps = [r.resolved_hparams for r in runs]
    keys = sorted({k for hp in hps for k in hp if k not in skip})
    differ = [k for k in keys if len({json.dumps(hp.get(k), sort_keys=True) for hp in hps}) > 1]
    common = {}
    for k in differ:
        values = [json.dumps(hp.get(k), sort_keys=True) for hp in hps]
        counts = sorted((values.count(v) for v in set(values)), reverse=True)
        common[k] = max(set(values), key=values.count) if counts[0] > counts[1] else None
    return [[f"{k}={_short(hp.get(k))}" for k in differ if json.dumps(hp.get(k), sort_keys=True) != common[k]]
            for hp in hps]


def _short(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)


def _dir_suffix(r: Run, timestamp: bool) -> str:
    """The run directory's name without a leading '<editor>-' (and its timestamp)."""
    suffix = r.name[len(r.editor) + 1:] if r.name.startswith(r.editor + "-") else r.name
    if not timestamp:
        suffix = _TIMESTAMP.sub("", suffix)
    return suffix or r.name


def variant_labels(rs: list[Run]) -> list[str]:
    """Labels of the runs of one editor in one group: the editor as users know it (FT-L, FT-M),
    and what tells the runs apart, in this order while it does not: the hyperparameters they
    differ in, the instruction mode (seen / unseen), the held-out tasks; then the run
    directory's name without its timestamp; then with it."""
    bases = [r.display_editor for r in rs]
    if len(rs) == 1:
        return bases
    parts: list[list[str]] = [[] for _ in rs]

    def labels() -> list[str]:
        return [f"{b} ({', '.join(p)})" if p else b for b, p in zip(bases, parts)]

    def unique() -> bool:
        return len(set(labels())) == len(rs)

    steps = [
        lambda: _hparam_parts(rs, skip=("objective",) if rs[0].editor == "ft" else ()),
        lambda: [[r.instruction_mode] if len({x.instruction_mode for x in rs}) > 1 and r.instruction_mode else []
                 for r in rs],
        lambda: [["held out " + ", ".join(r.held_out)] if len({tuple(x.held_out) for x in rs}) > 1 and r.held_out
                 else [] for r in rs],
    ]
    for step in steps:
        if unique():
            return labels()
        for p, extra in zip(parts, step()):
            p.extend(extra)
    if unique():
        return labels()
    for timestamp in (False, True):
        names = [_dir_suffix(r, timestamp) for r in rs]
        if len(set(zip(bases, names))) == len(rs) or timestamp:
            return [f"{b} ({n})" for b, n in zip(bases, names)]
    return labels()


def assign_labels(runs: list[Run]) -> None:
    """Label each run (variant_labels; runs are told apart within what the report ranks
    together, so FT on two models is "FT-L" in each model's table), then its slug (unique,
    case-insensitively) and its look (reports.looks)."""
    by_editor: dict[tuple, list[Run]] = {}
    for r in runs:
        by_editor.setdefault((r.comparison_key, r.editor), []).append(r)
    for rs in by_editor.values():
        for r, label in zip(rs, variant_labels(rs)):
            r.label = label
    seen: dict[tuple, int] = {}
    for r in runs:  # identical directory names under different parents
        key = (r.comparison_key, r.label)
        if key in seen:
            seen[key] += 1
            r.label = f"{r.label} #{seen[key]}"
        else:
            seen[key] = 1
    slugs: set[str] = set()
    for r in runs:
        base = slugify(r.label)
        slug, k = base, 2
        while slug.lower() in slugs:
            slug, k = f"{base}-{k}", k + 1
        slugs.add(slug.lower())
        r.slug = slug
    assign_style(runs)
