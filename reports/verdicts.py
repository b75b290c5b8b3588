"""The verdicts that open each group: per held-out task (or, without one, overall) the best run
on equal footing, its lead over the runner-up and over the baseline. Every number is one the
page's tables show: the Scores from the overview, the differences (with their marks) from the
pairwise table and the baseline table, so a verdict never disagrees with a table."""

from __future__ import annotations

from reports.compare import Pairing
from reports.groups import COMPOSITES, Column, Group
from reports.ranking import competes
from reports.runs import Run
from reports.stats import signed

SIGNIFICANCE = {"▲": "significant, also after Holm's adjustment (▲)",
                "▼": "significant, also after Holm's adjustment (▼)",
                "△": "the interval excludes 0, but not after Holm's adjustment (△)",
                "▽": "the interval excludes 0, but not after Holm's adjustment (▽)",
                "·": "not significant (the interval contains 0)"}


def _interval(c: dict, value_key: str = "post") -> str:
    v = c[value_key]
    return f"{v:.1f}" + ("" if c.get("lo") is None else f" [{c['lo']:.1f}, {c['hi']:.1f}]")


def _pair_cell(pw: dict | None, a: Run, b: Run, task: str | None) -> dict | None:
    """The pairwise table's cell a − b (task None: the mean over tasks)."""
    if not pw or not pw.get("matrices"):
        return None
    ids = [id(r) for r in pw["runs"]]
    if id(a) not in ids or id(b) not in ids:
        return None
    mat = next((m for m in pw["matrices"] if m["task"] == task), None)
    return None if mat is None else mat["cells"][ids.index(id(a))][ids.index(id(b))]


def lead_text(cell: dict | None, other: str, what: str, values: tuple[float, float] | None = None) -> str:
    """'ahead of OTHER (values) by d points on WHAT, 95% interval [lo, hi], n=k: significance'."""
    if cell is None or cell.get("diff") is None:
        return f"no paired comparison with {other} (fewer than 5 shared cases)"
    word = "ahead of" if cell["diff"] >= 0 else "behind"
    shown = "" if values is None else f" ({values[0]:.1f} vs {values[1]:.1f})"
    if cell.get("lo") is None:
        return f"{word} {other} by {abs(cell['diff']):.1f} points on {what}{shown}, n={cell['n']}: not tested"
    mark = cell.get("mark") or ("·" if cell["sig"] == 0 else "△" if cell["sig"] > 0 else "▽")
    return (f"{word} {other} by {abs(cell['diff']):.1f} points on {what}{shown}, 95% interval "
            f"[{signed(cell['lo'])}, {signed(cell['hi'])}], n={cell['n']}: {SIGNIFICANCE[mark]}")


def verdicts(g: Group, ov: list[dict], ho: dict, cmp: dict, pw: dict | None = None,
             pairing: Pairing | None = None) -> list[str]:
    """One line per held-out task (or, without one, for the overall ranking): the best run on
    equal footing (competes) by Score with its interval, its lead over the runner-up (the
    pairwise table's cell) and over the baseline (the baseline table's cell); the runs left out
    for fewer cases are named."""
    if g.rank_key is None:
        return []
    label = COMPOSITES[g.rank_key][0]
    pairing = pairing or Pairing(g)
    base = cmp.get("base")
    base_rows = {id(row["run"]): row for row in cmp.get("rows", [])}

    def versus_base(best: Run, col: Column | None, what: str) -> str:
        if base is None:
            return "no baseline chosen" if not cmp.get("baseline") or cmp.get("baseline") == "none" \
                else "the baseline is not in this group"
        if best is base:
            return f"it is the baseline ({base.label})"
        row = base_rows.get(id(best))
        if row is None:
            return f"no comparison with the baseline {base.label}"
        if not pairing.comparable(best, base):
            return f"no paired comparison with the baseline {base.label} (a sequential run of another length)"
        cell = row["overall"] if col is None else next(
            (x for c, x in zip(g.columns, row["cells"]) if c == col), None)
        return lead_text(cell, f"the baseline {base.label}", what)

    def versus_runner(best: Run, runner: Run, task: str | None, values: tuple[float, float], what: str) -> str:
        cell = _pair_cell(pw, best, runner, task)
        if cell is None:
            col = Column(task, g.rank_key, COMPOSITES[g.rank_key][1]) if task else None
            cell = pairing.compare(best, runner, col) if col else pairing.compare_overall(best, runner)
        return lead_text(cell, f"the runner-up {runner.label}", what, values)

    def left_out(runs: list[Run]) -> str:
        out = [f"{r.label}, on {g.fewer_mark(r)}" for r in runs if g.fewer_cases(r)]
        return f" Not compared (not on equal footing): {', '.join(out)}." if out else ""

    lines = []
    for t in ho["tasks"]:
        key = g.rank_key
        have = [r for r in g.runs if t in r.summary["tasks"] and r.unseen(t)
                and g.composite.get((r.slug, t, key)) is not None]
        cands = sorted(((r, g.composite[(r.slug, t, key)]) for r in have if competes(g, r)),
                       key=lambda rc: -rc[1]["post"])
        if not cands:
            continue
        (best, bc), what = cands[0], f"{t} {label}"
        parts = [f"Best on the held-out task {t}: {best.label} ({label} {_interval(bc)}, n={bc['n']})"]
        if len(cands) > 1:
            runner, rc = cands[1]
            parts.append(versus_runner(best, runner, t, (bc["post"], rc["post"]), what))
        if base is not None and len(cands) > 1 and cands[1][0] is base:
            pass  # the runner-up is the baseline: said once
        else:
            parts.append(versus_base(best, Column(t, key, COMPOSITES[key][1]), what))
        lines.append("; ".join(parts) + "." + left_out(have))
    if not lines:
        ranked = sorted((row for row in ov if row["rank"] is not None), key=lambda row: -row["overall"]["value"])
        if ranked:
            top = ranked[0]
            tied = [row["run"].label for row in ranked[1:] if row["rank"] == top["rank"]]
            what = f"the mean {label}"
            n_tasks = len(g.rank_tasks)
            parts = [f"Best overall: {top['run'].label} ({label} {_interval(top['overall'], 'value')}, mean over "
                     f"{n_tasks} task{'s' if n_tasks != 1 else ''})"
                     + (f", sharing rank {top['rank']} with {', '.join(tied)} (no significant difference after "
                        f"Holm's adjustment)" if tied else "")]
            if len(ranked) > 1:
                runner = ranked[1]
                parts.append(versus_runner(top["run"], runner["run"], None,
                                           (top["overall"]["value"], runner["overall"]["value"]), what))
            if not (base is not None and len(ranked) > 1 and ranked[1]["run"] is base):
                parts.append(versus_base(top["run"], None, what))
            lines.append("; ".join(parts) + "." + left_out(g.runs))
    return lines
