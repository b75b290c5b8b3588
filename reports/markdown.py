"""The leaderboard as Markdown (leaderboard.md): the same tables as the HTML page, one per metric
family, without the charts; and the one-line texts the index shares with it."""

from __future__ import annotations

import re
from typing import Any

from reports.exports import MARK_RULE, PEAK_MEMORY_NOTE
from reports.groups import COMPOSITES, FAMILIES, METRIC_ABBR, Group
from reports.matrix import metric_tables, training_table
from reports.ranking import RANK_RULE
from reports.sequential import metric_title
from reports.stats import ALPHA, MIN_PAIRS, comparison_text, signed


def _md_escape(s: Any) -> str:
    """`s` as literal Markdown table text (no markup, no line breaks)."""
    return re.sub(r"([\\|<>*_`\[\]])", r"\\\1", str(s)).replace("\n", " ")


def _md_num(x: float | None) -> str:
    return "–" if x is None else f"{x:.1f}"


def _md_stat(s: dict | None, best: bool = False) -> str:
    """'post [lo, hi] n=k (pre p)' of a cell; bold when the best of its column."""
    if s is None or s.get("post") is None:
        return "–"
    v = f"**{s['post']:.1f}**" if best else f"{s['post']:.1f}"
    if s.get("lo") is not None and s.get("hi") is not None:
        v += f" [{s['lo']:.1f}, {s['hi']:.1f}]"
    if s.get("n") is not None:
        v += f" n={s['n']}"
    if s.get("pre") is not None:
        v += f" (pre {s['pre']:.1f})"
    return v


def cross_model_cell(c: dict | None) -> str:
    """'rank (Score [lo, hi])' of one editor on one model; '–' where it did not run."""
    if c is None:
        return "–"
    rank = "–" if c["rank"] is None else f"{c['rank']}{'=' if c['tied'] else ''}"
    if c["value"] is None:
        return rank
    ci = "" if c["lo"] is None else f" [{c['lo']:.1f}, {c['hi']:.1f}]"
    return f"{rank} ({c['value']:.1f}{ci})"


def agreement_text(a: dict) -> str:
    """One line on whether two models rank the editors alike."""
    tau = "–" if a["tau"] is None else f"{a['tau']:+.2f}"
    lead = (f"of those, {', '.join(a['leaders'][0])} rank first on both" if a["same_leaders"] else
            f"of those, rank 1 on {a['a']}: {', '.join(a['leaders'][0]) or '–'}; on {a['b']}: "
            f"{', '.join(a['leaders'][1]) or '–'}")
    return f"{a['a']} vs {a['b']}: Kendall's tau-b {tau} over the {a['n']} editors ranked on both; {lead}."


def _cross_model_markdown(x: dict) -> list[str]:
    rank_label = COMPOSITES[x["rank_key"]][0] if x.get("rank_key") in COMPOSITES else "Score"
    L = ["## Across models", "",
         f"Each editor's rank on each model ({rank_label}, mean over that model's tasks, with its 95% interval); "
         "ranks are each model's own. " + _md_escape(" ".join(agreement_text(a) for a in x["agreement"])), ""]
    head = ["Run"] + [_md_escape(m) for m in x["models"]]
    body = [[_md_escape(r["label"])] + [cross_model_cell(c) for c in r["cells"]] for r in x["rows"]]
    return L + _md_table(head, body) + [""]


def _md_table(head: list[str], rows: list[list[str]], align: list[str] | None = None) -> list[str]:
    align = align or [":---"] + ["---:"] * (len(head) - 1)
    return (["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"]
            + ["| " + " | ".join(r) + " |" for r in rows] + [""])


def _held_mark(g: Group, task: str) -> str:
    return "†" if g.heldout_for(task) else ""


def _run_md(r, g: Group | None = None, reference_note: bool = True, trained: bool = False) -> str:
    label = r.label
    if r.reference and reference_note:
        label += " (no edit: reference)"
    if r.sample_data:
        label += f" ({r.data}: not comparable)"
    if not r.complete:
        label += f" — {r.incomplete_mark}, not ranked"
    elif g is not None and g.fewer_mark(r):
        label += f" — {g.fewer_mark(r)}, not ranked"
    if trained and r.train_tasks is not None:
        label += f" (trained on {', '.join(r.train_tasks) or 'nothing'})"
    return _md_escape(label)


def _md_rank(row: dict) -> str:
    r = row["run"]
    if r.reference:
        return "ref"
    if row["rank"] is None:
        return "–"
    return f"{row['rank']}{'=' if row['tied'] else ''} {row['letters']}".strip()


def _md_training(t: dict | None) -> str:
    if t is None or t.get("seconds") is None:
        return "–"
    return f"{t['seconds']:.0f} s" + ("" if t.get("steps") is None else f" ({t['steps']} steps)")


def leaderboard_markdown(title: str, baseline: str | None, groups: list[Group], ov: dict, ho: dict,
                         cmp: dict, pg: dict | None = None, pw: dict | None = None, vd: dict | None = None,
                         mx: dict | None = None, xm: list | None = None, sq: dict | None = None) -> str:
    """The content of leaderboard.md: the same tables as the HTML page (one per metric family),
    without the charts."""
    L = [f"# {_md_escape(title)}", "",
         "Post-edit means in percent with 95% bootstrap interval, n = cases, pre-edit value in parentheses; "
         "the best value of each column (the no-edit reference left out) in bold. " + _md_escape(RANK_RULE), "",
         "Score = ROME's composite: " + "; ".join(f"{v[0]} = {v[3]}" for v in COMPOSITES.values()) + ".", ""]
    if mx is not None:
        L += _matrix_markdown(mx)
    for x in xm or []:
        L += _cross_model_markdown(x)
    for g in groups:
        L += [f"## {_md_escape(g.heading)}", ""]
        for line in (vd or {}).get(g.gid, []):
            L += [f"**{_md_escape(line)}**", ""]
        held = [t for t in g.tasks if g.heldout_for(t)]
        if held:
            L += [f"† held out of training by {_md_escape(', '.join(sorted({x for t in held for x in g.heldout_for(t)})))} "
                  "(editors that do not train saw no task at all).", ""]
        L += _overview_markdown(g, ov[g.gid])
        L += _holdout_markdown(g, ho[g.gid])
        L += _baseline_markdown(g, cmp[g.gid])
        L += _pairwise_markdown((pw or {}).get(g.gid), _rank_label(g))
        L += _gap_markdown((pg or {}).get(g.gid))
        if (sq or {}).get(g.gid):
            L += _checkpoints_markdown(sq[g.gid])
    return "\n".join(L).rstrip() + "\n"


def _rank_label(g: Group) -> str:
    return COMPOSITES[g.rank_key][0] if g.rank_key else "Score"


def _column_head(g: Group, i: int) -> str:
    c = g.columns[i]
    return f"{_md_escape(c.task)}{_held_mark(g, c.task)} {c.abbr}"


def _overview_markdown(g: Group, rows: list[dict]) -> list[str]:
    """The overview: one table per metric family, ranked, with cost columns beside the token one."""
    L: list[str] = []
    for fam in g.families:
        cols = [i for i, c in enumerate(g.columns) if c.family == fam]
        token = fam == "token"
        head = (["#", "Run"] + ([f"{_rank_label(g)} (mean over tasks)"] if token and g.rank_key else [])
                + [_column_head(g, i) for i in cols] + (["s/edit (median)", "peak memory", "training"] if token else []))
        body = []
        for row in rows:
            cells = [_md_rank(row), _run_md(row["run"], g, trained=True)]
            if token and g.rank_key:
                o = row["overall"]
                cells.append("–" if o is None else _md_stat({"post": o["value"], "lo": o["lo"], "hi": o["hi"]},
                                                           row["best_overall"]))
            cells += [_md_stat(row["cells"][i], row["best"][i]) for i in cols]
            if token:
                cost = row["cost"]
                cells += ["–" if cost["edit_s"] is None else f"{cost['edit_s']:.3g} s",
                          "–" if cost["peak_mb"] is None else f"{cost['peak_mb']:.0f} MB", _md_training(cost["training"])]
            body.append(cells)
        L += [f"**{FAMILIES[fam][0][0].upper() + FAMILIES[fam][0][1:]}**", ""]
        L += _md_table(head, body, ["---:", ":---"] + ["---:"] * (len(head) - 2))
        if token:
            L += [f"_s/edit: median seconds per edit (edits computed together share their time); "
                  f"{PEAK_MEMORY_NOTE}._", ""]
    return L


def _holdout_markdown(g: Group, h: dict) -> list[str]:
    """Every run on the tasks it never trained on, against its mean on the group's other tasks."""
    if not h["tasks"]:
        return [f"_{_md_escape(h['note'])}_", ""] if h.get("note") else []
    L = [f"**Held-out tasks** ({_md_escape(', '.join(h['tasks']))}): every run, on the tasks it never trained "
         "on, against its mean on the group's other tasks. " + _md_escape(h["rule"]), ""]
    idx = [i for i, c in enumerate(h["columns"]) if c.family == "token"]
    head = ["Run", "status"] + [f"{_md_escape(h['columns'][i].task)}† {h['columns'][i].abbr}" for i in idx] + \
           [f"{METRIC_ABBR[m]} held-out / other tasks (gap)" for m in h["metrics"]]
    body = []
    for row in h["rows"]:
        cells = [_run_md(row["run"], g), _md_escape(row["status"])]
        for i in idx:
            cells.append("trained on" if row["trained"][i] else _md_stat(row["cells"][i], row["best"][i]))
        for m in h["metrics"]:
            gp = row["gap"][m]
            cells.append(f"{_md_num(row['heldout'][m])} / {_md_num(row['other'][m])}"
                         + ("" if gp is None else f" ({signed(gp)})"))
        body.append(cells)
    return L + _md_table(head, body)


def _baseline_markdown(g: Group, c: dict) -> list[str]:
    """Every run against the baseline, one table per metric family."""
    if c["base"] is None or not c["rows"]:
        return [f"_{_md_escape(c['note'])}_", ""] if c["note"] else []
    L = [f"**Versus baseline {_md_escape(c['base'].label)}** (run directory {_md_escape(c['base'].name)}; "
         "difference run − baseline in points). "
         + _md_escape(MARK_RULE.format(alpha=ALPHA, n=c["n_tests"], min_pairs=MIN_PAIRS))
         + " The no-edit reference row carries no marks.", ""]
    if c["note"]:
        L += [f"_{_md_escape(c['note'])}_", ""]
    for fam in g.families:
        cols = [i for i, col in enumerate(g.columns) if col.family == fam]
        overall = fam == "token" and g.rank_key
        head = ["Run"] + ([f"{_rank_label(g)} (mean over tasks)"] if overall else []) + [_column_head(g, i) for i in cols]
        body = [[_run_md(row["run"], g)] + ([comparison_text(row["overall"])] if overall else [])
                + [comparison_text(row["cells"][i]) for i in cols] for row in c["rows"]]
        L += _md_table(head, body)
    return L


def _pairwise_markdown(p: dict | None, rank_label: str) -> list[str]:
    """Every pair of runs, row − column, one matrix per task and overall."""
    if not p or not p["matrices"]:
        return []
    runs = p["runs"]
    L = [f"**Pairwise comparisons** ({rank_label}, row − column, in points). "
         + _md_escape(MARK_RULE.format(alpha=ALPHA, n=p["n_tests"], min_pairs=MIN_PAIRS)), ""]
    for mat in p["matrices"]:
        L += [f"_{_md_escape(mat['title'])}_", ""]
        body = [[_md_escape(a.label)] + ["" if i == j else comparison_text(mat["cells"][i][j]) for j in range(len(runs))]
                for i, a in enumerate(runs)]
        L += _md_table(["row − column"] + [_md_escape(b.label) for b in runs], body)
    return L


def _gap_markdown(gap: dict | None) -> list[str]:
    """Teacher forced against in the wild, per run and task."""
    if not gap or not gap["rows"]:
        return []
    L = ["**Teacher forced vs. in the wild** (post-edit %, teacher-forced / wild, and the gap "
         "teacher-forced − wild in points):", ""]
    head = ["Run"] + [f"{_md_escape(t)} {gap['abbr'][tf]}" for t, tf, _ in gap["columns"]]
    body = [[_md_escape(row["run"].label)] + ["–" if x is None else f"{x['tf']:.1f} / {x['wild']:.1f} ({signed(x['gap'])})"
                                              for x in row["cells"]] for row in gap["rows"]]
    return L + _md_table(head, body)


def _checkpoints_markdown(table: dict) -> list[str]:
    """A sequential group's checkpoint table: per task a row per run and number of edits."""
    L = ["**Sequential editing: checkpoints.** " + _md_escape(table["rule"]), ""]
    if table["trained"]:
        L += ["_Trained on the task shown: " + _md_escape("; ".join(f"{x['run']} ({', '.join(x['tasks'])})"
                                                              for x in table["trained"])) + "._", ""]
    for t in table["tasks"]:
        head = ["Run", "edits"] + [_md_escape(metric_title(m)) for m in t["metrics"]]
        body = []
        for e in t["runs"]:
            label = _md_escape(e["run"].label)
            body.append([label, "before"] + [_md_num(e["pre"].get(m)) for m in t["metrics"]])
            for c in e["checkpoints"]:
                body.append([label, str(c["n_edits"])] + [_md_stat(c["cells"].get(m)) for m in t["metrics"]])
        L += [f"_{_md_escape(t['task'])}_", ""] + _md_table(head, body, [":---"] + ["---:"] * (len(head) - 1))
    for e in table["regression"]:
        ns = [c["n_edits"] for c in e["runs"][0]["checkpoints"]]
        head = ["Run", "before"] + [f"{n} edits" for n in ns]
        body = [[_md_escape(x["run"].label), "–" if x["before"] is None else f"{x['before']:.4g}"]
                + [f"{c['value']:.4g}" for c in x["checkpoints"]] for x in e["runs"]]
        L += [f"_lm-eval {_md_escape(e['task'])}: {_md_escape(e['metric'])}_", ""] + _md_table(head, body)
    return L


def _matrix_markdown(mx: dict) -> list[str]:
    """The leave-one-task-out matrix (reports.matrix): one table per metric, then the training."""
    L = ["## Leave-one-task-out matrix", "", _md_escape(mx["rule"]), ""]
    if mx["missing"]:
        L += [f"_Missing run directories: {_md_escape(', '.join(mx['missing']))}._", ""]
    for title, head, body in metric_tables(mx):
        L += [f"**{_md_escape(title)}**", ""]
        L += _md_table([_md_escape(h) for h in head], [[_md_escape(c) for c in row] for row in body])
    head, body = training_table(mx)
    L += ["**Training** (each run's editor; kept step: the validation with the lowest loss, whose network is "
          "used; Score on its training tasks: mean over them of the per-task Score)", ""]
    L += _md_table(head, [[_md_escape(c) for c in row] for row in body],
                   [":---"] * (len(head) - 3) + ["---:"] * 3)  # with seeds, a seed column
    for line in mx.get("summary") or []:  # the multi-task column's mean difference (reports.seeded)
        L += [f"**{_md_escape(line)}**", ""]
    if mx.get("seed_table"):  # several training seeds: the per-seed values (reports.seeded)
        head, body = mx["seed_table"]
        L += ["**Per seed** (each run's value per training seed; each difference's per-seed values, their "
              "standard deviation, the mean with its hierarchical-bootstrap interval and the verdict)", ""]
        L += _md_table([_md_escape(h) for h in head], [[_md_escape(c) for c in row] for row in body],
                       [":---"] * 4 + ["---:", ":---"])
    return L
