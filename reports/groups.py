"""The groups of runs a report ranks together, their columns and the composites (ROME's Score).

Runs are ranked together only when they share the model (``config.model.spec`` +
``source_hash``), the metric definitions (``config.metric_definitions``), the run mode (single
edits or sequential edits, ``config.mode``) and the prompt format: each combination gets its own
group. Teacher-forced, CounterFact and in-the-wild metrics are separate columns (families).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np

from bench.core.metrics import ALL_METRICS, METRIC_BY_NAME, TOKEN_METRICS
from reports.runs import Run, finite_or_none
from reports.stats import harmonic_mean, score_with_interval

# The composites: ROME's Score (harmonic mean of the edit, generalisation and locality terms)
# for each family that has the three terms. key -> (label, family, terms, description)
COMPOSITES = {
    "score": ("Score", "token", ("reliability", "generality", "locality"),
              "harmonic mean of reliability, generality and locality (teacher forced)"),
    "cf_score": ("CF-Score", "counterfact", ("efficacy", "paraphrase", "neighborhood"),
                 "harmonic mean of efficacy, paraphrase and neighborhood (CounterFact, ROME's Score)"),
    "wild_score": ("W-Score", "wild", ("wild_reliability", "wild_generality", "wild_locality"),
                   "harmonic mean of the wild reliability, generality and locality"),
}
FAMILIES = {  # family -> (toggle label, short header label, shown before the reader asks)
    "token": ("teacher forced (token accuracy)", "teacher forced", True),
    "counterfact": ("CounterFact (probability comparison)", "CounterFact prob.", True),
    "wild": ("in the wild (generated answers)", "in the wild", False),
    "generation": ("generation (fluency, bits)", "generation", False),
}
METRIC_ABBR = {**{m: METRIC_BY_NAME[m].abbr for m in ALL_METRICS}, **{k: v[0] for k, v in COMPOSITES.items()}}
METRICS = TOKEN_METRICS  # the per-metric means of the overview ("Mean across tasks")
LOCALITY_TYPE = ("locality", "wild_locality", "neighborhood")  # a drop = the edit broke something


def task_seed(task: str) -> int:
    """The bootstrap seed of `task` in the overall Score: fixed by the task's name (not its place
    in a report), different between tasks so that their resamples are independent."""
    return zlib.crc32(task.encode("utf-8"))


def mean_of(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


@dataclass(frozen=True)
class Column:
    task: str
    key: str  # a metric name, or a composite key (COMPOSITES)
    family: str

    @property
    def composite(self) -> bool:
        return self.key in COMPOSITES

    @property
    def abbr(self) -> str:
        return METRIC_ABBR.get(self.key, self.key)

    @property
    def title(self) -> str:
        if self.composite:
            return f"{self.task} · {COMPOSITES[self.key][3]}"
        m = METRIC_BY_NAME.get(self.key)
        return f"{self.task} · {self.key}" + (f": {m.text}" if m else "")

    @property
    def scale(self) -> float:
        """Case values (fractions) to the shown unit: points, or the metric's own unit."""
        m = METRIC_BY_NAME.get(self.key)
        return 1.0 if m is not None and not m.percent else 100.0


def family_of(metric: str) -> str:
    if metric in COMPOSITES:
        return COMPOSITES[metric][1]
    m = METRIC_BY_NAME.get(metric)
    return m.family if m else "token"


@dataclass
class Group:
    model_spec: str
    model_hash: str
    metric_definitions: str
    mode: str
    prompt_format: str
    runs: list[Run]
    gid: str = ""
    tasks: list[str] = field(default_factory=list)
    task_metrics: dict[str, list[str]] = field(default_factory=dict)
    columns: list[Column] = field(default_factory=list)
    families: list[str] = field(default_factory=list)
    mean_metrics: list[str] = field(default_factory=list)
    rank_key: str | None = None  # the composite the ranking averages over tasks
    rank_tasks: list[str] = field(default_factory=list)
    # (run slug, task, composite key) -> {'post','pre','lo','hi','n'} (None: not computable)
    composite: dict[tuple[str, str, str], dict | None] = field(default_factory=dict)
    # task -> the most cases a complete competing run finished on it (equal footing)
    full_cases: dict[str, int] = field(default_factory=dict)

    # id(run) -> fewer_cases(run), filled by make_groups
    fewer: dict[int, list[tuple[str, int, int]]] = field(default_factory=dict)

    def fewer_cases(self, r: Run) -> list[tuple[str, int, int]]:
        """(task, finished, full) of each task on which the complete run `r` finished fewer cases
        than the group's other runs (full_cases): a run not on equal footing. [] for a run on
        equal footing, the reference and an incomplete run (marked as such)."""
        if id(r) in self.fewer:
            return self.fewer[id(r)]
        if r.reference or not r.complete:
            return []
        counts = r.case_counts()
        return [(t, counts[t][0], self.full_cases[t]) for t in self.tasks
                if t in counts and t in r.summary["tasks"] and counts[t][0] < self.full_cases.get(t, 0)]

    def fewer_mark(self, r: Run) -> str:
        """'fewer cases (30 of 100 per task)' (or per task: 'fewer cases (zsre 30 of 100, ...)'),
        or '' for a run on equal footing."""
        short = self.fewer_cases(r)
        if not short:
            return ""
        counts = r.case_counts()
        all_tasks = [(t, counts[t][0], self.full_cases.get(t, 0)) for t in self.tasks if t in counts]
        if len(short) == len(all_tasks) and len({(n, full) for _, n, full in short}) == 1:
            return f"fewer cases ({short[0][1]} of {short[0][2]} per task)"
        return "fewer cases (" + ", ".join(f"{t} {n} of {full}" for t, n, full in short) + ")"

    def fewer_detail(self, r: Run) -> str:
        """The fewer-cases mark's tooltip."""
        return ("this run finished fewer cases than the group's other runs, so its Scores are not on "
                "equal footing with theirs (a subset's values differ, pre-edit ones included): it is "
                "listed with its cells and its paired comparisons (over the cases both runs finished), "
                "but not ranked, not marked best and not named in a verdict")

    @property
    def heading(self) -> str:
        h = f" (source sha256 {self.model_hash[:12]})" if self.model_hash else " (no source hash)"
        mode = "sequential edits (every edit kept)" if self.mode == "sequential" else "single edits"
        fmt = f" · prompt format {self.prompt_format}" if self.prompt_format != "plain" else ""
        return f"Model {self.model_spec}{h} · metric definitions {self.metric_definitions} · {mode}{fmt}"

    def holdout_status(self, task: str) -> str:
        """'all', 'some' or 'none' of the group's runs that have the task never trained on it."""
        flags = [r.unseen(task) for r in self.runs if task in r.summary["tasks"]]
        if flags and all(flags):
            return "all"
        return "some" if any(flags) else "none"

    def heldout_for(self, task: str) -> list[str]:
        """Labels of the learned runs that held `task` out (the runs it is news to)."""
        return [r.label for r in self.runs if task in r.summary["tasks"] and r.train_tasks is not None
                and r.unseen(task)]

    def cell(self, r: Run, c: Column) -> dict | None:
        """The shown value of run `r` in column `c`: {'post','pre','lo','hi','n'} or None."""
        if c.composite:
            return self.composite.get((r.slug, c.task, c.key))
        return r.stat(c.task, c.key)


# --------------------------------------------------------------------------------------------
# Groups and composites
# --------------------------------------------------------------------------------------------

def composite_cases(r: Run, task: str, terms: tuple[str, ...]) -> list[tuple[str, dict, dict]]:
    """(case id, pre, post) of the run's finished cases of `task` that have every term."""
    out = []
    for rec in r.cases:
        if str(rec.get("task")) != task or rec.get("error") or not isinstance(rec.get("post"), dict):
            continue
        post = rec["post"]
        pre = rec.get("pre") if isinstance(rec.get("pre"), dict) else {}
        if all(finite_or_none(post.get(m)) is not None for m in terms):
            out.append((str(rec["case_id"]), pre, post))
    return out


def composite_cell(r: Run, task: str, key: str, seed: int = 0) -> dict | None:
    """The run's composite `key` on `task` from its cases.jsonl, with a 95% bootstrap interval
    over cases; from summary.json's means (no interval) when the run has no case records."""
    terms = COMPOSITES[key][2]
    rows = composite_cases(r, task, terms)
    if rows:
        s = score_with_interval([np.array([p[m] for _, _, p in rows], dtype=float) for m in terms], seed)
        pres = [[finite_or_none(pre.get(m)) for _, pre, _ in rows] for m in terms]
        pre = None if any(v is None for col in pres for v in col) else \
            float(harmonic_mean([np.mean(col) for col in pres])) * 100
        return {"post": s["value"], "pre": pre, "lo": s["lo"], "hi": s["hi"], "n": s["n"]}
    if r.cases:
        return None
    stats = [r.stat(task, m) for m in terms]
    if any(s is None or s["post"] is None for s in stats):
        return None
    pre = None if any(s["pre"] is None for s in stats) else float(harmonic_mean([s["pre"] / 100 for s in stats])) * 100
    return {"post": float(harmonic_mean([s["post"] / 100 for s in stats])) * 100, "pre": pre,
            "lo": None, "hi": None, "n": min(s["n"] or 0 for s in stats) or None}


def make_groups(runs: list[Run]) -> list[Group]:
    """One group per (model, source hash, metric definitions, mode, prompt format), in order of
    first appearance, with its columns and every run's composites."""
    groups: dict[tuple, Group] = {}
    for r in runs:
        key = r.comparison_key
        if key not in groups:
            groups[key] = Group(*key, runs=[])
        groups[key].runs.append(r)
    out = list(groups.values())
    for i, g in enumerate(out, 1):
        g.gid = f"g{i}"
        for r in g.runs:
            for t in r.tasks:
                if t not in g.tasks:
                    g.tasks.append(t)
        for t in g.tasks:
            g.task_metrics[t] = [m for m in ALL_METRICS if any(r.stat(t, m) is not None for r in g.runs)]
            for key, (_, fam, terms, _) in COMPOSITES.items():
                if all(m in g.task_metrics[t] for m in terms):
                    for r in g.runs:
                        g.composite[(r.slug, t, key)] = composite_cell(r, t, key)
        fams = [f for f in FAMILIES if any(family_of(m) == f for t in g.tasks for m in g.task_metrics[t])]
        for f in fams:
            for t in g.tasks:
                g.columns += [Column(t, k, f) for k, v in COMPOSITES.items()
                              if v[1] == f and (g.runs[0].slug, t, k) in g.composite]
                g.columns += [Column(t, m, f) for m in g.task_metrics[t] if family_of(m) == f]
        # columns ordered task by task, each task's families in FAMILIES order
        g.columns.sort(key=lambda c: (g.tasks.index(c.task), list(FAMILIES).index(c.family)))
        g.families = [f for f in FAMILIES if any(c.family == f for c in g.columns)]
        g.mean_metrics = [m for m in METRICS if any(m in g.task_metrics[t] for t in g.tasks)]
        g.rank_key = next((k for k in ("score", "wild_score")
                           if any(c.key == k for c in g.columns)), None)
        g.rank_tasks = [t for t in g.tasks if any(c.key == g.rank_key and c.task == t for c in g.columns)]
        for r in g.runs:
            if r.reference or not r.complete:
                continue
            for t, (finished, _) in r.case_counts().items():
                if t in r.summary["tasks"]:
                    g.full_cases[t] = max(g.full_cases.get(t, 0), finished)
        g.fewer = {id(r): g.fewer_cases(r) for r in g.runs}
    return out


def task_columns(g: Group, task: str) -> list[Column]:
    return [c for c in g.columns if c.task == task]


def segments(columns: list[Column]) -> list[tuple[str, str, int]]:
    """Runs of consecutive columns of one (task, family): the top header row's cells."""
    out: list[tuple[str, str, int]] = []
    for c in columns:
        if out and out[-1][0] == c.task and out[-1][1] == c.family:
            out[-1] = (c.task, c.family, out[-1][2] + 1)
        else:
            out.append((c.task, c.family, 1))
    return out
