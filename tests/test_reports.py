"""Tests of the leaderboard reporter (the reports package) on the fixture runs in tests/fixtures/runs/."""

from __future__ import annotations

import csv
import itertools
import json
import re
import shutil
import zlib
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from markupsafe import escape

from bench.core.errors import BenchError
from bench.core.metrics import N_BOOTSTRAP, bootstrap_ci, bootstrap_means
from reports import build_report
from reports.exports import neutralise_csv_cell
from reports.runs import EDITOR_COLORS, PALETTE, REFERENCE_COLOR, load_run, scrub_paths
from reports.stats import ALPHA, holm, interval_pvalue

RUNS = Path(__file__).parent / "fixtures" / "runs"
NONE, FT, ROME = RUNS / "none-fixture", RUNS / "ft-fixture", RUNS / "rome-fixture"
MEND, INSTRUCTEDIT = RUNS / "mend-fixture", RUNS / "instructedit-fixture"
ALL = [NONE, FT, ROME, MEND, INSTRUCTEDIT]
EDITORS = ("none", "ft", "rome", "mend", "instructedit")
METRICS = ("reliability", "generality", "locality", "portability")
CF_METRICS = ("efficacy", "paraphrase", "neighborhood")
MARKS = {"▲": 1, "△": 1, "▼": -1, "▽": -1, "·": 0}


class Tables(HTMLParser):
    """Collects, per top-level <table class=...>, its <th> texts and its <td> cells (attrs + text),
    its caption, and the group heading (<h2>) it stands under."""

    def __init__(self):
        super().__init__()
        self.tables: list[dict] = []
        self.depth = 0
        self.cell: dict | None = None
        self.headings: list[str] = []
        self._h3: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self.depth += 1
            if self.depth == 1:
                self.tables.append({"class": (a.get("class") or "").split(), "th": [], "td": [],
                                    "heading": self.headings[-1] if self.headings else None})
        elif tag in ("td", "th", "caption") and self.depth == 1:
            self.cell = {"tag": tag, "attrs": a, "text": ""}
        elif tag == "h2":
            self._h3 = []

    def handle_endtag(self, tag):
        if tag == "table":
            self.depth -= 1
        elif tag in ("td", "th", "caption") and self.depth == 1 and self.cell is not None:
            self.cell["text"] = " ".join(self.cell["text"].split())
            self.tables[-1].setdefault(self.cell["tag"], []).append(self.cell)
            self.cell = None
        elif tag == "h2" and self._h3 is not None:
            self.headings.append("".join(self._h3).strip())
            self._h3 = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell["text"] += data
        if self._h3 is not None:
            self._h3.append(data)


def parse(path: Path) -> Tables:
    p = Tables()
    p.feed(path.read_text(encoding="utf-8"))
    return p


def tables(path: Path, cls: str) -> list[dict]:
    return [t for t in parse(path).tables if cls in t["class"]]


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def cases(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "cases.jsonl").read_text().splitlines() if line.strip()]


def doc_of(out: Path) -> dict:
    return json.loads((out / "leaderboard.json").read_text())


def row_headers(table: dict) -> set[str]:
    """The run labels of a table's rows (the row header cells)."""
    return {c["text"].split()[0] for c in table["th"] if c["attrs"].get("scope") == "row"}


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report")
    main = build_report(ALL, out, baseline="ft", fmt="all", title="Fixture leaderboard")
    assert main == out / "index.html"
    return out


def test_report_renders_all_files(report):
    for name in ("index.html", "leaderboard.json", "leaderboard.csv", "leaderboard.md"):
        assert (report / name).is_file(), name
    html = (report / "index.html").read_text()
    assert html.startswith("<!DOCTYPE html>") and "Fixture leaderboard" in html
    # self-contained: no external resources
    for bad in ("http://cdn", "https://", "<link ", "src=\"http"):
        assert bad not in html
    assert "<svg" in html and "<style>" in html
    for run in EDITORS:
        for task in ("counterfact", "zsre"):
            page = report / f"cases-{run}-{task}.html"
            assert page.is_file()
            assert f'href="cases-{run}-{task}.html"' in html


def test_formats(tmp_path):
    md = build_report(ALL, tmp_path / "md", fmt="md")
    assert md.name == "leaderboard.md"
    assert sorted(p.name for p in md.parent.iterdir()) == ["leaderboard.csv", "leaderboard.json", "leaderboard.md"]
    text = md.read_text()
    assert re.search(r"^\| 1=? [a-z]+ \| rome \|", text, re.M) and "Versus baseline ft" in text
    assert "| ref | none (no edit: reference) |" in text
    html = build_report(ALL, tmp_path / "html", fmt="html")
    names = {p.name for p in html.parent.iterdir()}
    assert {"index.html", "leaderboard.csv", "leaderboard.json"} <= names and "leaderboard.md" not in names
    with pytest.raises(BenchError):
        build_report(ALL, tmp_path / "x", fmt="pdf")


def test_overview_json_matches_summary(report):
    doc = json.loads((report / "leaderboard.json").read_text())
    assert len(doc["groups"]) == 1
    rows = {r["editor"]: r for r in doc["groups"][0]["rows"]}
    assert set(rows) == set(EDITORS)
    for run in ALL:
        s = summary(run)["tasks"]
        row = rows[run.name.split("-")[0]]
        assert set(row["tasks"]) == set(s)
        for task, metrics in s.items():
            for m, v in metrics.items():
                got = row["tasks"][task][m]
                assert got["post"] == v["post"] and got["pre"] == v["pre"]
                assert got["ci"] == v["ci"] and got["n"] == v["n"]
        # mean across tasks per metric
        for m in METRICS:
            vals = [s[t][m]["post"] for t in s if m in s[t]]
            assert row["mean"][m] == pytest.approx(np.mean(vals), abs=1e-4)
    # ranked by the composite Score: ranks never decrease down the table, the reference comes last
    ranked = doc["groups"][0]["rows"]
    assert ranked[0]["editor"] == "rome" and ranked[-1]["editor"] == "none" and ranked[-1]["rank"] is None
    assert [r["rank"] for r in ranked[:-1]] == sorted(r["rank"] for r in ranked[:-1])


def test_overview_html_cells_match_summary(report):
    (table,) = tables(report / "index.html", "overview")
    cells = {(c["attrs"]["data-run"], c["attrs"]["data-task"], c["attrs"]["data-metric"]): c
             for c in table["td"] if "data-metric" in c["attrs"]}
    n_checked = 0
    for run in ALL:
        for task, metrics in summary(run)["tasks"].items():
            for m, v in metrics.items():
                if m not in METRICS:
                    continue
                c = cells[(run.name.split("-")[0], task, m)]
                assert float(c["attrs"]["data-v"]) == v["post"]
                assert c["text"].split()[0] == f"{v['post']:.1f}"
                assert f"[{v['ci'][0]:.1f}, {v['ci'][1]:.1f}]" in c["text"]
                assert f"n={v['n']}" in c["text"]
                n_checked += 1
    assert n_checked == 5 * 7
    # every metric column header sorts, with a visible cue before it is used
    heads = [th for th in table["th"] if th["text"].split(" ")[0].rstrip("↕") in ("Rel", "Gen", "Loc", "Port", "Score")]
    assert heads and all("data-col" in th["attrs"] and "↕" in th["text"] for th in heads)


def test_csv_matches_json(report):
    df = pd.read_csv(report / "leaderboard.csv")
    doc = json.loads((report / "leaderboard.json").read_text())
    for row in doc["groups"][0]["rows"]:
        line = df[df["run"] == row["run"]].iloc[0]
        for task, metrics in row["tasks"].items():
            for m, v in metrics.items():
                assert line[f"{task}/{m}"] == v["post"] and line[f"{task}/{m}/n"] == v["n"]


def test_every_editor_appears_in_the_holdout_view(report):
    """Editors that do not train saw no task: the held-out task is held out for them too, so
    every run is in the held-out view; a learned editor's trained-on task is not."""
    doc = doc_of(report)
    ho = doc["groups"][0]["holdout"]
    assert ho["tasks"] == ["zsre"]
    assert "saw no task" in ho["rule"]
    rows = {r["run"]: r for r in ho["rows"]}
    assert set(rows) == set(EDITORS)
    for run in ALL:
        s = summary(run)["tasks"]
        r = rows[run.name.split("-")[0]]
        assert r["tasks"]["zsre"]["reliability"]["post"] == pytest.approx(s["zsre"]["reliability"]["post"])
        assert r["heldout_mean"]["reliability"] == pytest.approx(s["zsre"]["reliability"]["post"])
        assert r["other_tasks_mean"]["reliability"] == pytest.approx(s["counterfact"]["reliability"]["post"])
    assert rows["mend"]["trained_on"] == ["counterfact"] and rows["rome"]["trained_on"] is None
    assert rows["rome"]["holdout_tasks"] == ["counterfact", "zsre"] and rows["mend"]["holdout_tasks"] == ["zsre"]
    # the page: every run, the rule said, zsre cells only (counterfact was trained on by mend)
    (table,) = tables(report / "index.html", "holdout")
    assert row_headers(table) == set(EDITORS)
    assert {c["attrs"]["data-task"] for c in table["td"] if "data-task" in c["attrs"]} == {"zsre"}
    cells = {(c["attrs"]["data-run"], c["attrs"]["data-metric"]): c for c in table["td"] if "data-run" in c["attrs"]}
    for editor in EDITORS:
        assert cells[(editor, "reliability")]["text"] != "–"
        assert cells[(editor, "score")]["text"] != "–"
    html = (report / "index.html").read_text()
    assert "saw no task, so every task is held out for it" in html
    # the Markdown likewise: every run, held-out marks
    md = (report / "leaderboard.md").read_text()
    section = md[md.index("**Held-out tasks**"):md.index("**Versus baseline")]
    for editor in EDITORS:
        assert re.search(rf"^\| {editor}( \(no edit: reference\))? \| ", section, re.M), editor
    assert "zsre† Rel" in md and "† held out of training by" in md


def _hand_diff(run: Path, base: Path, task: str, metric: str) -> tuple[float, int]:
    def posts(p):
        return {c["case_id"]: c["post"][metric] for c in cases(p)
                if c["task"] == task and not c.get("error") and metric in (c.get("post") or {})}
    a, b = posts(run), posts(base)
    shared = sorted(a.keys() & b.keys())
    return 100 * (sum(a[k] for k in shared) - sum(b[k] for k in shared)) / len(shared), len(shared)


def test_baseline_difference_matches_hand_computation(report):
    doc = json.loads((report / "leaderboard.json").read_text())
    cmp = doc["groups"][0]["baseline_comparison"]
    assert cmp["baseline_run"] == "ft"
    got = {(c["run"], c["task"], c["metric"]): c for c in cmp["comparisons"]}
    assert not any(k[0] == "ft" for k in got)
    for run in (NONE, ROME):
        for task, metrics in summary(run)["tasks"].items():
            for m in metrics:
                if m not in METRICS:
                    continue
                diff, n = _hand_diff(run, FT, task, m)
                c = got[(run.name.split("-")[0], task, m)]
                assert c["diff"] == pytest.approx(diff, abs=1e-4) and c["n"] == n
    # literal hand values: ft's zsre case zs-4 errored, so 5 shared cases there
    assert got[("rome", "counterfact", "reliability")]["diff"] == pytest.approx(12.5)
    assert got[("rome", "zsre", "reliability")]["diff"] == pytest.approx(5.0)
    assert got[("rome", "zsre", "reliability")]["n"] == 5
    # the interval and p come from the core's bootstrap of the paired differences (seed 0)
    d = np.array([0, 0, 0.5, 0, 0, 0.5, 0, 0])
    c = got[("rome", "counterfact", "reliability")]
    lo, hi = bootstrap_ci(d * 100)
    assert c["ci"] == [pytest.approx(lo, abs=1e-3), pytest.approx(hi, abs=1e-3)]
    assert c["p"] == pytest.approx(interval_pvalue(bootstrap_means(d, N_BOOTSTRAP, 0)), abs=1e-6)
    assert c["mark"] == "·" and lo <= 0  # two cases of eight: the interval reaches 0
    # the no-edit reference row is compared but never marked
    assert got[("none", "counterfact", "reliability")]["diff"] == pytest.approx(-75.0)
    assert got[("none", "counterfact", "reliability")]["mark"] == ""
    # and the HTML shows the same difference
    (table,) = tables(report / "index.html", "comparison")
    cell = next(c for c in table["td"] if c["attrs"].get("data-run") == "rome"
                and c["attrs"].get("data-task") == "zsre" and c["attrs"].get("data-metric") == "reliability")
    assert cell["text"].startswith("+5.0") and "n=5" in cell["text"]


def test_missing_baseline_is_noted_not_an_error(tmp_path):
    """The default baseline (ft) missing is a note; a baseline the user names that matches no
    run is a one-line error listing the labels."""
    build_report([NONE, ROME], tmp_path)
    html = (tmp_path / "index.html").read_text()
    assert "Baseline &#39;ft&#39; is not among the runs" in html
    assert not tables(tmp_path / "index.html", "comparison")
    for name in ("ft", "bogus"):
        with pytest.raises(BenchError) as e:
            build_report([NONE, ROME], tmp_path / name, baseline=name)
        assert str(e.value) == (f"--baseline {name!r} matches no run: name a run label ('none', 'rome'), "
                                "a run directory name or an editor name, or pass --baseline none")


def _stopped_copy(src: Path, dst: Path, keep: int, summary_kept: bool) -> Path:
    """`src` as a run stopped after its first `keep` cases: cases.jsonl cut, config.json still
    planning every case; summary.json removed (SIGKILL) or left as it was."""
    shutil.copytree(src, dst)
    lines = (dst / "cases.jsonl").read_text().splitlines(keepends=True)
    (dst / "cases.jsonl").write_text("".join(lines[:keep]))
    if not summary_kept:
        (dst / "summary.json").unlink()
    return dst


@pytest.mark.parametrize("summary_kept", [False, True], ids=["summary-rebuilt", "summary-kept"])
def test_an_unfinished_run_is_marked_incomplete_and_not_ranked(tmp_path, summary_kept):
    """ROME, the best run, stopped after 5 of its 14 cases (no zsre case at all): listed in every
    format with "incomplete (5 of 14 cases)", without a rank, a best-value mark or a verdict;
    the complete runs are ranked among themselves. Without summary.json the summary is rebuilt
    from cases.jsonl (the report CLI's rebuild), with a note."""
    from bench.cli.report import rebuild_summary

    rome = _stopped_copy(ROME, tmp_path / "rome-stopped", 5, summary_kept)
    if not summary_kept:  # without the CLI's rebuild: an error that says how to go on
        with pytest.raises(BenchError, match=r"no summary\.json \(the run was stopped before it wrote one\): "
                                             r"`bench report` rebuilds it from cases\.jsonl, or finish the run "
                                             r"with `bench run --resume .*rome-stopped`$"):
            build_report([FT, rome], tmp_path / "no-rebuild")
    out = build_report([NONE, FT, rome, MEND, INSTRUCTEDIT], tmp_path / "out", fmt="all",
                       rebuild_summary=rebuild_summary).parent
    mark = "incomplete (5 of 14 cases)"
    g = doc_of(out)["groups"][0]
    rows = {r["editor"]: r for r in g["rows"]}
    r = rows["rome"]
    assert (r["complete"], r["rank"], r["status"], r["cases"], r["summary_rebuilt"]) == \
        (False, None, mark, {"finished": 5, "planned": 14}, not summary_kept)
    assert all(x["complete"] and x["status"] == "complete" and x["rank"] is not None
               for e, x in rows.items() if e not in ("rome", "none"))
    assert min(x["rank"] for x in rows.values() if x["rank"] is not None) == 1
    assert [x["editor"] for x in g["rows"]][-2:] == ["rome", "none"]  # listed after the ranked runs
    assert not any("rome" in v for v in g["verdicts"])
    # the page: the mark beside the label, no rank, no best-of-column highlight
    html = (out / "index.html").read_text()
    row = re.search(r'<tr data-run="rome">\s*<td class="num rank" data-v="">(.*?)</td>\s*<th[^>]*>(.*?)</th>', html, re.S)
    assert row and "not ranked" in row.group(1) and mark in row.group(2)
    (table,) = tables(out / "index.html", "overview")
    assert not any("best" in c["attrs"].get("class", "") for c in table["td"] if c["attrs"].get("data-run") == "rome")
    assert "\u201cincomplete (n of N cases)\u201d" in doc_of(out)["ranking"]
    assert "neither is ranked, marked best or named in a verdict" in doc_of(out)["ranking"]
    md = (out / "leaderboard.md").read_text()
    assert f"| – | rome — {mark}, not ranked |" in md
    line = pd.read_csv(out / "leaderboard.csv").set_index("editor").loc["rome"]
    assert (line["complete"], line["status"], line["finished_cases"], line["planned_cases"]) == (False, mark, 5, 14)
    assert pd.isna(line["rank"])


def test_default_baseline_picks_one_ft_run_and_says_which(tmp_path):
    """Two FT runs and no --baseline: the complete one with default hyperparameters, else the
    first given; one line (and the comparison's note) says which and how to choose another."""
    tuned = tmp_path / "ft-tuned"
    shutil.copytree(FT, tuned)
    cfg = json.loads((tuned / "config.json").read_text())
    cfg["options"]["hparams"] = {"lr": 0.001}
    (tuned / "config.json").write_text(json.dumps(cfg))

    def chosen(runs: list[Path], name: str) -> tuple[str, list[str]]:
        lines: list[str] = []
        cmp = doc_of(build_report(runs, tmp_path / name, log=lines.append).parent)["groups"][0]["baseline_comparison"]
        assert cmp["note"] == lines[0] and len(lines) == 1
        return cmp["baseline_run_dir"], lines

    run_dir, lines = chosen([tuned, FT, ROME], "default-hparams")
    assert run_dir == "ft-fixture"
    assert lines[0] == ("Baseline: ft (fixture) (run directory ft-fixture), chosen among the 2 ft runs (default "
                        "hyperparameters); choose another with --baseline LABEL ('ft (tuned)', 'ft (fixture)') "
                        "or --baseline none.")
    second = tmp_path / "ft-second"
    shutil.copytree(FT, second)
    assert chosen([second, FT, ROME], "first")[0] == "ft-second"  # both default: the first given
    assert "(default hyperparameters, first given)" in chosen([second, FT, ROME], "first-again")[1][0]
    stopped = _stopped_copy(FT, tmp_path / "ft-stopped", 3, summary_kept=True)
    assert chosen([stopped, tuned], "complete")[0] == "ft-tuned"  # a complete run first
    # a baseline the user names must be unambiguous
    with pytest.raises(BenchError, match="matches 2 runs in one group"):
        build_report([second, FT], tmp_path / "named", baseline="ft")


def test_interval_pvalue_agrees_with_the_interval():
    """p < ALPHA exactly when the core's 95% percentile interval excludes zero, on random data."""
    rng = np.random.default_rng(7)
    seen = {True: 0, False: 0}
    for k in range(300):
        n = int(rng.integers(5, 40))
        d = rng.normal(rng.normal(0, 0.3), 1, n).round(1)
        lo, hi = bootstrap_ci(d)
        p = interval_pvalue(bootstrap_means(d, N_BOOTSTRAP, 0))
        excludes = lo > 0 or hi < 0
        assert (p < ALPHA) == excludes, (k, p, lo, hi)
        seen[excludes] += 1
    assert min(seen.values()) > 20  # both outcomes were exercised
    assert interval_pvalue(np.zeros(N_BOOTSTRAP)) == 1.0
    assert interval_pvalue(np.ones(N_BOOTSTRAP)) == 0.0
    # Holm: the smallest p times m, then non-decreasing
    assert holm([0.01, 0.04, 0.03, None]) == [pytest.approx(0.03), pytest.approx(0.06), pytest.approx(0.06), None]


def test_script_in_data_is_escaped(report, tmp_path):
    payload = "<script>alert(1)</script>"
    for page in report.glob("*.html"):
        assert payload not in page.read_text(), page.name
    cf = (report / "cases-ft-counterfact.html").read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt; The capital of Spain is" in cf
    assert "&lt;b&gt;Lisbon&lt;/b&gt;" in cf
    # hostile editor, task and model names reach the tables, the SVG charts and the headings escaped
    run = tmp_path / "evil"
    shutil.copytree(ROME, run)
    cfg = json.loads((run / "config.json").read_text())
    evil = '<img src=x onerror="alert(2)">'
    cfg["editor"]["name"] = evil
    cfg["model"]["spec"] = evil
    (run / "config.json").write_text(json.dumps(cfg))
    s = json.loads((run / "summary.json").read_text())
    s["tasks"][evil] = s["tasks"].pop("zsre")
    (run / "summary.json").write_text(json.dumps(s))
    out = build_report([run, FT], tmp_path / "out")
    for page in out.parent.glob("*.html"):
        text = page.read_text()
        assert "<img" not in text and payload not in text, page.name
    assert "&lt;img src=x onerror=" in out.read_text()


def test_different_models_go_to_separate_tables(tmp_path):
    other = tmp_path / "rome-gpt2"
    shutil.copytree(ROME, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["model"] = {**cfg["model"], "spec": "gpt2", "source_hash": "beef" * 16}
    (other / "config.json").write_text(json.dumps(cfg))
    defs = tmp_path / "ft-metrics-v2"
    shutil.copytree(FT, defs)
    cfg = json.loads((defs / "config.json").read_text())
    cfg["metric_definitions"] = "exact-match/v2"
    (defs / "config.json").write_text(json.dumps(cfg))

    out = build_report([NONE, FT, ROME, other, defs], tmp_path / "out")
    doc = json.loads((tmp_path / "out" / "leaderboard.json").read_text())
    groups = [(g["model"]["spec"], g["metric_definitions"], sorted(r["run_dir"] for r in g["rows"]))
              for g in doc["groups"]]
    assert len(groups) == 3
    assert groups[0][:2] == ("smollm2-135m", "easyedit-token-accuracy/v1") and len(groups[0][2]) == 3
    assert groups[1] == ("gpt2", "easyedit-token-accuracy/v1", [other.name])  # run paths: names only
    assert groups[2] == ("smollm2-135m", "exact-match/v2", [defs.name])
    ov = tables(out, "overview")
    assert len(ov) == 3
    assert "gpt2" in ov[1]["heading"] and "exact-match/v2" in ov[2]["heading"]
    # each table names its runs plainly (a run is told apart from the runs ranked with it);
    # the file names of the drill-down pages stay distinct across tables
    assert {c["attrs"]["data-run"] for c in ov[1]["td"] if "data-run" in c["attrs"]} == {"rome"}
    for g in doc["groups"]:
        labels = [r["run"] for r in g["rows"]]
        assert len(set(labels)) == len(labels)
    pages = sorted(p.name for p in out.parent.glob("cases-rome*.html"))
    assert pages == ["cases-rome-2-counterfact.html", "cases-rome-2-zsre.html",
                     "cases-rome-counterfact.html", "cases-rome-zsre.html"]
    # the gpt2 group has no ft run: noted, not an error
    assert doc["groups"][1]["baseline_comparison"]["baseline_run"] is None
    assert "not among the runs" in doc["groups"][1]["baseline_comparison"]["note"]


def test_missing_summary_is_a_bench_error(tmp_path):
    run = tmp_path / "broken"
    shutil.copytree(FT, run)
    (run / "summary.json").unlink()
    with pytest.raises(BenchError, match="summary.json"):
        build_report([NONE, run], tmp_path / "out")


@pytest.mark.parametrize("case", ["no-config", "bad-json", "bad-cases", "no-dir", "no-runs", "no-tasks"])
def test_bad_input_is_a_bench_error(tmp_path, case):
    run = tmp_path / "run"
    shutil.copytree(FT, run)
    dirs = [run]
    if case == "no-config":
        (run / "config.json").unlink()
    elif case == "bad-json":
        (run / "summary.json").write_text('{"tasks": {')
    elif case == "bad-cases":  # a malformed line before the last one (a torn last line is dropped)
        with open(run / "cases.jsonl", "a") as f:
            f.write('{"task": "zsre", "case_id"\n{"task": "zsre", "case_id": "zs-extra"}\n')
    elif case == "no-dir":
        dirs = [tmp_path / "nope"]
    elif case == "no-runs":
        dirs = []
    elif case == "no-tasks":
        (run / "summary.json").write_text("[]")
    with pytest.raises(BenchError) as e:
        build_report(dirs, tmp_path / "out")
    assert "\n" not in str(e.value)


def test_run_without_cases_file_still_reports(tmp_path):
    run = tmp_path / "rome-nocases"
    shutil.copytree(ROME, run)
    (run / "cases.jsonl").unlink()
    out = build_report([FT, run], tmp_path / "out")
    assert "no cases.jsonl" in (out.parent / "cases-rome-zsre.html").read_text()
    doc = json.loads((out.parent / "leaderboard.json").read_text())
    assert doc["groups"][0]["baseline_comparison"]["comparisons"] == []


def test_no_case_text_leaves_the_data_records_out_of_the_drill_down(tmp_path, report):
    """Published leaderboards can drop every text that comes from the data records; the case
    ids, the model's predictions, the scores and the failure filter stay."""
    build_report(ALL, tmp_path, baseline="ft", fmt="html", case_text=False)
    records = [r for r in cases(FT) if r["task"] == "counterfact" and r.get("case")]
    page = (tmp_path / "cases-ft-counterfact.html").read_text()
    full = (report / "cases-ft-counterfact.html").read_text()
    assert "Case texts (prompts, targets, ground truths) are left out" in page
    assert 'id="failfilter"' in page
    for rec in records:
        case = rec["case"]
        texts = [case["prompt"], *case.get("rephrase_prompts", []),
                 *(q["prompt"] for q in case.get("locality", []))]
        predicted = json.dumps(rec["predictions"])
        # A short target can legitimately show up as the edited model's own prediction.
        texts += [t.strip() for t in (case["target_new"], case.get("ground_truth")) if t and t.strip() not in predicted]
        for text in map(str, map(escape, texts)):  # as the templates write it (a leading space shows as ·)
            assert text in full  # the ordinary report shows it ...
            assert text not in page  # ... the published one does not
        assert f'data-case="{rec["case_id"]}"' in page
        post = rec["predictions"]["post"]["prompt"]
        if post and post.strip():
            assert post.strip() in page


def test_killed_run_with_a_torn_last_line_reports(tmp_path):
    """A run killed mid-write leaves a torn last line in cases.jsonl: the report drops it and
    leaves the file as it is."""
    run = tmp_path / "ft-killed"
    shutil.copytree(FT, run)
    with open(run / "cases.jsonl", "a") as f:
        f.write('{"task": "counterfact", "case_i')
    before = (run / "cases.jsonl").read_bytes()
    assert len(load_run(run).cases) == len(cases(FT))
    out = build_report([NONE, run], tmp_path / "out", baseline="ft")
    assert (run / "cases.jsonl").read_bytes() == before
    doc = json.loads((out.parent / "leaderboard.json").read_text())
    comps = doc["groups"][0]["baseline_comparison"]["comparisons"]
    assert {(c["task"], c["metric"]): c["n"] for c in comps}[("counterfact", "reliability")] == 8


def test_csv_cells_cannot_start_a_formula(tmp_path, monkeypatch):
    """Run labels and directory names reach leaderboard.csv; a spreadsheet must not run them."""
    formula = '=HYPERLINK("example.com","click")'  # a directory name: no '/'
    run = tmp_path / formula
    shutil.copytree(ROME, run)
    cfg = json.loads((run / "config.json").read_text())
    cfg["editor"]["name"] = "@SUM(1+1)"
    (run / "config.json").write_text(json.dumps(cfg))
    monkeypatch.chdir(tmp_path)  # a relative run directory: the run_dir cell starts with '='
    build_report([Path(formula), FT], tmp_path / "out")
    with open(tmp_path / "out" / "leaderboard.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    row = next(r for r in rows if r["editor"].endswith("SUM(1+1)"))
    assert row["run"] == row["editor"] == "'@SUM(1+1)"
    assert row["run_dir"] == "'" + formula
    for r in rows:
        for cell in r.values():
            assert not cell.startswith(("=", "+", "-", "@", "\t", "\r")), cell
    # numbers stay numbers, a negative one included; text is neutralised whatever its first sign
    assert neutralise_csv_cell(-1.5) == -1.5 and neutralise_csv_cell(None) is None
    for text in ("=1+1", "+1", "-1", "@x", "\tx", "\rx"):
        assert neutralise_csv_cell(text) == "'" + text
    assert neutralise_csv_cell("rome") == "rome"


def test_teacher_forced_against_wild_gap_in_every_format(tmp_path):
    """A run measured both ways: the report shows teacher-forced and wild means side by side with
    the gap (teacher-forced minus wild), equal to summary.json's numbers."""
    run = tmp_path / "ft-both"
    shutil.copytree(FT, run)
    s = summary(run)
    task = next(iter(s["tasks"]))
    tf = s["tasks"][task]["reliability"]
    s["tasks"][task]["wild_reliability"] = {"pre": 0.0, "post": tf["post"] - 30.0, "ci": [0.0, 50.0], "n": tf["n"]}
    (run / "summary.json").write_text(json.dumps(s))
    out = tmp_path / "report"
    build_report([run], out, baseline=None, fmt="all")
    doc = json.loads((out / "leaderboard.json").read_text())
    (gap,) = [g for g in doc["groups"][0]["protocol_gap"] if g["task"] == task]
    assert (gap["metric"], gap["wild_metric"]) == ("reliability", "wild_reliability")
    assert gap["teacher_forced"] == pytest.approx(tf["post"]) and gap["gap"] == pytest.approx(30.0)
    assert "Teacher forced vs. in the wild" in (out / "leaderboard.md").read_text()
    assert f"{tf['post']:.1f} / {tf['post'] - 30:.1f} (+30.0)" in (out / "leaderboard.md").read_text()
    (table,) = tables(out / "index.html", "protocols")
    assert any(f"{tf['post']:.1f} / {tf['post'] - 30:.1f} (+30.0)" in c["text"] for c in table["td"])
    # runs measured teacher forced only have no such section
    build_report([FT], tmp_path / "plain", baseline=None, fmt="all")
    assert not tables(tmp_path / "plain" / "index.html", "protocols")
    assert "in the wild" not in (tmp_path / "plain" / "leaderboard.md").read_text()


def test_a_run_on_the_built_in_sample_is_marked_in_every_format(tmp_path):
    run = tmp_path / "ft-sample"
    shutil.copytree(FT, run)
    config = json.loads((run / "config.json").read_text())
    config["data"] = "built-in sample"
    (run / "config.json").write_text(json.dumps(config))
    out = tmp_path / "report"
    build_report([run, NONE], out, baseline=None, fmt="all")
    rows = {r["editor"]: r for r in json.loads((out / "leaderboard.json").read_text())["groups"][0]["rows"]}
    assert rows["ft"]["data"] == "built-in sample" and rows["none"]["data"] == "real"
    with open(out / "leaderboard.csv", newline="") as f:
        assert {r["editor"]: r["data"] for r in csv.DictReader(f)} == {"ft": "built-in sample", "none": "real"}
    assert "(built-in sample: not comparable)" in (out / "leaderboard.md").read_text()
    overview = tables(out / "index.html", "overview")[0]
    assert any("built-in sample" in c["text"] for c in overview["th"] if c["attrs"].get("scope") == "row")


# --------------------------------------------------------------------------------------------
# Issue 15: what the leaderboard tells a reader
# --------------------------------------------------------------------------------------------

def _harmonic(values) -> np.ndarray:
    v = np.asarray(values, dtype=float)
    return np.where((v > 0).all(axis=0), len(v) / np.where(v > 0, 1 / np.where(v > 0, v, 1), 0).sum(axis=0), 0.0)


def _score_by_hand(run: Path, task: str, seed: int = 0) -> tuple[float, np.ndarray]:
    """ROME's Score (harmonic mean of the reliability, generality and locality means) of the run's
    finished cases of `task`, and its 2,000 bootstrap resamples: the cases drawn with
    numpy's generator seeded `seed`, the same draw for the three columns."""
    terms = ("reliability", "generality", "locality")
    rows = [c["post"] for c in cases(run) if c["task"] == task and not c.get("error") and c.get("post")
            and all(m in c["post"] for m in terms)]
    cols = np.array([[r[m] for r in rows] for m in terms])
    value = float(_harmonic(cols.mean(axis=1))) * 100
    idx = np.random.default_rng(seed).integers(0, len(rows), size=(N_BOOTSTRAP, len(rows)))
    return value, _harmonic(cols[:, idx].mean(axis=2)) * 100


def test_composite_and_its_interval_equal_an_independent_computation(report):
    doc = doc_of(report)
    rows = {r["editor"]: r for r in doc["groups"][0]["rows"]}
    (table,) = tables(report / "index.html", "overview")
    cells = {(c["attrs"]["data-run"], c["attrs"]["data-task"], c["attrs"]["data-metric"]): c
             for c in table["td"] if "data-metric" in c["attrs"]}
    for run in ALL:
        editor = run.name.split("-")[0]
        task_values, task_resamples = [], []
        for task in ("counterfact", "zsre"):
            value, res = _score_by_hand(run, task)
            got = rows[editor]["tasks"][task]["score"]
            assert got["post"] == pytest.approx(value, abs=1e-3)
            assert got["ci"][0] == pytest.approx(np.quantile(res, 0.025), abs=1e-3)
            assert got["ci"][1] == pytest.approx(np.quantile(res, 0.975), abs=1e-3)
            cell = cells[(editor, task, "score")]
            assert float(cell["attrs"]["data-v"]) == pytest.approx(value, abs=1e-9)
            assert f"[{np.quantile(res, 0.025):.1f}, {np.quantile(res, 0.975):.1f}]" in cell["text"]
            task_values.append(value)
            task_resamples.append(_score_by_hand(run, task, seed=zlib.crc32(task.encode()))[1])  # overall
        overall = rows[editor]["score"]
        assert overall["value"] == pytest.approx(np.mean(task_values), abs=1e-3)
        mean_res = np.mean(task_resamples, axis=0)
        assert overall["ci"] == [pytest.approx(np.quantile(mean_res, 0.025), abs=1e-3),
                                 pytest.approx(np.quantile(mean_res, 0.975), abs=1e-3)]
    # the CSV has the same numbers
    df = pd.read_csv(report / "leaderboard.csv")
    for editor, row in rows.items():
        line = df[df["editor"] == editor].iloc[0]
        assert line["zsre/score"] == pytest.approx(row["tasks"]["zsre"]["score"]["post"])
        assert line["score"] == pytest.approx(row["score"]["value"])
    # a no-op cannot win: the no-edit run's Score is far below every editor's
    assert all(rows["none"]["score"]["value"] < rows[e]["score"]["value"] - 30 for e in EDITORS[1:])


def test_the_no_edit_row_is_a_reference_not_a_competitor(report):
    doc = doc_of(report)
    g = doc["groups"][0]
    none = next(r for r in g["rows"] if r["editor"] == "none")
    assert none["rank"] is None and none["reference"] is True and g["rows"][-1] is none
    assert all(r["rank"] is not None for r in g["rows"] if r["editor"] != "none")
    # the page: no rank number, a reference badge, the last row; no best-of-column highlight
    (table,) = tables(report / "index.html", "overview")
    html = (report / "index.html").read_text()
    row = re.search(r'<tr data-run="none" class="reference">\s*<td class="num rank" data-v="">(.*?)</td>', html, re.S)
    assert row and "ref" in row.group(1) and not re.search(r"\d", re.sub(r"<[^>]+>", "", row.group(1)))
    assert html.index('<tr data-run="none" class="reference">') > html.index('<tr data-run="ft">')
    assert not any("best" in c["attrs"].get("class", "") for c in table["td"] if c["attrs"].get("data-run") == "none")
    # its locality of 100 is no "best" for anyone; no significance marks on its comparison row
    for c in g["baseline_comparison"]["comparisons"]:
        if c["run"] == "none":
            assert c["mark"] == "" and c["p_holm"] is None
    (cmp_table,) = tables(report / "index.html", "comparison")
    assert not any(c["attrs"].get("data-mark") for c in cmp_table["td"] if c["attrs"].get("data-run") == "none")
    # not a competitor in the pairwise tests, drawn as a dashed reference line in the bar charts
    assert all("none" not in (p["a"], p["b"]) for p in g["pairwise"]["comparisons"])
    assert "none (no edit, reference) · " in html and 'class="ref"' in html
    assert not re.search(r'<rect [^>]*fill="[^"]+"><title>none · ', html)
    # the Markdown says the same
    assert "| ref | none (no edit: reference) |" in (report / "leaderboard.md").read_text()


def test_mark_and_interval_never_disagree(report):
    doc = doc_of(report)
    g = doc["groups"][0]
    comps = [c for c in g["baseline_comparison"]["comparisons"] if c["run"] != "none"] + g["pairwise"]["comparisons"]
    assert len(comps) > 40
    marked = 0
    for c in comps:
        lo, hi = c["ci"]
        if lo is None:
            assert c["mark"] == "·" and c["p"] is None
            continue
        sign = 1 if lo > 0 else -1 if hi < 0 else 0
        assert MARKS[c["mark"]] == sign, c
        assert (c["p"] < ALPHA) == (sign != 0), c
        assert c["p_holm"] >= c["p"] - 1e-12
        if c["mark"] in "▲▼":
            assert c["p_holm"] < ALPHA
        if c["mark"] in "△▽":
            assert c["p_holm"] >= ALPHA
        marked += sign != 0
    assert marked >= 5
    # Holm over one table: n_tests comparisons, the adjusted p of the smallest raw p is m * p
    base = [c for c in g["baseline_comparison"]["comparisons"] if c["run"] != "none" and c["p"] is not None]
    assert g["baseline_comparison"]["n_tests"] == len(base)
    smallest = min(base, key=lambda c: c["p"])
    assert smallest["p_holm"] == pytest.approx(min(1.0, len(base) * smallest["p"]), abs=1e-5)
    # the HTML cells carry the same mark as their interval
    html_cells = [c for t in ("comparison", "pairwise") for tb in tables(report / "index.html", t) for c in tb["td"]
                  if c["attrs"].get("data-mark")]
    assert len(html_cells) >= len(comps)
    for c in html_cells:
        lo, hi = float(c["attrs"]["data-lo"]), float(c["attrs"]["data-hi"])
        assert MARKS[c["attrs"]["data-mark"]] == (1 if lo > 0 else -1 if hi < 0 else 0), c
        assert c["attrs"]["data-mark"] in c["text"]


def test_pairwise_tests_between_any_two_editors(report):
    doc = doc_of(report)
    pairs = {(p["a"], p["b"], p["task"]): p for p in doc["groups"][0]["pairwise"]["comparisons"]}
    assert {("mend", "instructedit", t) for t in ("all", "counterfact", "zsre")} <= set(pairs)
    tabs = tables(report / "index.html", "pairwise")
    assert len(tabs) == 3
    for t in tabs:
        assert row_headers(t) == {"ft", "rome", "mend", "instructedit"}
    md = (report / "leaderboard.md").read_text()
    assert "**Pairwise comparisons**" in md and "| instructedit |" in md[md.index("**Pairwise comparisons**"):]


def test_counterfact_probability_scores_reach_every_format(report):
    s = summary(FT)["tasks"]["counterfact"]
    # HTML overview
    (table,) = tables(report / "index.html", "overview")
    cells = {(c["attrs"]["data-run"], c["attrs"]["data-task"], c["attrs"]["data-metric"]): c
             for c in table["td"] if "data-metric" in c["attrs"]}
    for m in CF_METRICS:
        assert float(cells[("ft", "counterfact", m)]["attrs"]["data-v"]) == s[m]["post"]
    assert ("ft", "counterfact", "cf_score") in cells
    heads = " ".join(th["text"] for th in table["th"])
    assert all(a in heads for a in ("Eff", "Para", "Nbr", "CF-Score"))
    # JSON, CSV, Markdown
    row = next(r for r in doc_of(report)["groups"][0]["rows"] if r["editor"] == "ft")
    df = pd.read_csv(report / "leaderboard.csv")
    line = df[df["editor"] == "ft"].iloc[0]
    md = (report / "leaderboard.md").read_text()
    cf_table = md[md.index("**CounterFact (probability comparison)**"):]
    for m, abbr in zip(CF_METRICS, ("Eff", "Para", "Nbr")):
        assert row["tasks"]["counterfact"][m]["post"] == s[m]["post"]
        assert line[f"counterfact/{m}"] == s[m]["post"] and line[f"counterfact/{m}/n"] == s[m]["n"]
        assert f"counterfact {abbr}" in cf_table and f"{s[m]['post']:.1f} [" in cf_table
    # the wild metrics too, in their own family
    mend = summary(MEND)["tasks"]["zsre"]["wild_reliability"]
    assert next(r for r in doc_of(report)["groups"][0]["rows"] if r["editor"] == "mend")[
        "tasks"]["zsre"]["wild_reliability"]["post"] == mend["post"]
    assert df[df["editor"] == "mend"].iloc[0]["zsre/wild_reliability"] == mend["post"]
    assert "**In the wild (generated answers)**" in md
    assert ("mend", "zsre", "wild_reliability") in cells
    assert 'class="tog-wild"' in (report / "index.html").read_text()


def test_a_locality_failure_is_listed_by_the_failures_filter(report):
    """ft's counterfact case cf-0: reliability 1 but locality 1 -> 0.5: a failure (it broke
    something), with its reason, in the rows the failures filter keeps."""
    rec = next(c for c in cases(FT) if c["case_id"] == "cf-0")
    assert rec["post"]["reliability"] == 1 and rec["post"]["locality"] < rec["pre"]["locality"]
    page = (report / "cases-ft-counterfact.html").read_text()
    row = re.search(r'<tr class="([^"]*)" data-case="cf-0">(.*?)<tr class=', page, re.S)
    classes = row.group(1).split()
    assert "fail" in classes and "k-broke" in classes and "k-edit" not in classes
    assert "Loc dropped 1 → 0.5" in row.group(2)
    # the filter hides .ok rows (CSS) and counts .fail rows; cf-1 (nothing broke) is ok
    assert re.search(r'<tr class="ok" data-case="cf-1">', page)
    assert "table.show-fail tbody tr.ok" in page and '<option value="broke">' in page
    assert "locality-type score (locality, wild locality, neighborhood) is lower after the edit" in page
    n_fail = len(re.findall(r'<tr class="fail', page))
    assert f"{n_fail} failures" in page


def test_drill_down_shows_whitespace_special_tokens_and_empty_predictions(report):
    page = (report / "cases-instructedit-counterfact.html").read_text()
    rows = {re.match(r'[^"]*" data-case="([^"]+)"', chunk).group(1): chunk
            for chunk in page.split('<tr class="')[1:] if ' data-case="' in chunk[:80]}
    cell = rows.__getitem__
    assert '<span class="ws" title="newline">⏎</span>' in cell("cf-0")
    assert '<span class="repl"' in cell("cf-1") and "\ufffd" in cell("cf-1")
    assert '<span class="special" title="special token">&lt;|im_end|&gt;</span>' in cell("cf-3")
    assert '<span class="empty">(empty)</span>' in cell("cf-4")
    assert "<strong>Predictions</strong> are teacher forced: the model's argmax token" in page
    assert "Generated answers</strong> are the wild protocol's" in page
    # the legend explains every sign
    for sign in ("⏎", "·", "⇥", "(empty)", "special token"):
        assert sign in page[page.index('<dl class="legend"'):page.index("</dl>")]


def test_baseline_is_an_editor_a_run_or_off(tmp_path):
    by_dir = doc_of(build_report(ALL, tmp_path / "dir", baseline="rome-fixture").parent)
    assert by_dir["groups"][0]["baseline_comparison"]["baseline_run"] == "rome"
    off = build_report(ALL, tmp_path / "off", baseline="none", fmt="all").parent
    doc = doc_of(off)
    assert doc["groups"][0]["baseline_comparison"]["comparisons"] == []
    assert not tables(off / "index.html", "comparison")
    assert "No baseline chosen" in (off / "leaderboard.md").read_text()
    # two runs of the baseline editor in one group: an error naming both, until one is chosen
    second = tmp_path / "ft-second"
    shutil.copytree(FT, second)
    with pytest.raises(BenchError) as e:
        build_report([FT, second, ROME], tmp_path / "two", baseline="ft")
    msg = str(e.value)
    assert "ft-fixture" in msg and "ft-second" in msg and "\n" not in msg
    doc = doc_of(build_report([FT, second, ROME], tmp_path / "chosen", baseline="ft-second").parent)
    cmp = doc["groups"][0]["baseline_comparison"]
    assert cmp["baseline_run_dir"] == "ft-second" and {c["run"] for c in cmp["comparisons"]} == {"ft (fixture)", "rome"}
    label = doc_of(build_report([FT, second, ROME], tmp_path / "label", baseline="ft (second)").parent)
    assert label["groups"][0]["baseline_comparison"]["baseline_run_dir"] == "ft-second"


def test_provenance_command_extensions_overrides_and_no_absolute_paths(tmp_path):
    run = tmp_path / "rome-abs"
    shutil.copytree(ROME, run)
    cfg = json.loads((run / "config.json").read_text())
    cfg["command"] += " --output-dir /home/someone/runs --data-dir /srv/data/x"
    cfg["data_dir"] = "/srv/data/x"
    cfg["notes"] = {"stats_cache": "/root/.cache/instructedit-bench/stats/layer5.safetensors",
                    "hub": "hf://datasets/owner/name/file.json"}
    (run / "config.json").write_text(json.dumps(cfg))
    out = build_report([run, FT], tmp_path / "out", fmt="all").parent
    for name in ("index.html", "leaderboard.json", "leaderboard.csv", "leaderboard.md", "cases-rome-zsre.html"):
        text = (out / name).read_text()
        for bad in ("/home/someone", "/srv/data", "/root/", str(tmp_path)):
            assert bad not in text, (name, bad)
    html = (out / "index.html").read_text()
    assert "--output-dir …/runs --data-dir …/x" in html and "…/layer5.safetensors" in html
    assert "hf://datasets/owner/name/file.json" in html  # not a path on this machine
    # the command as recorded, and the --resume extension that took it from 6 to 8 cases per task
    assert "bench run --editor rome --task counterfact,zsre --holdout zsre --limit 6 --hparam v_lr=0.5" in html
    assert "extended: <code>bench run --resume rome-abs --limit 8</code>" in html
    assert "hyperparameters set for this run" in html and "{&#34;v_lr&#34;: 0.5}" in html
    assert scrub_paths(["C:\\Users\\x\\runs", "a=/tmp/q/r", "./rel/path"]) == ["…/runs", "a=…/r", "./rel/path"]


def test_cost_columns(report):
    doc = doc_of(report)
    rows = {r["editor"]: r for r in doc["groups"][0]["rows"]}
    # ft computed its counterfact edits four at a time: each case gets its call's mean
    recs = [c for c in cases(FT) if not c.get("error")]
    per_case = []
    for task in ("counterfact", "zsre"):
        ts = [c["time"]["edit_s"] for c in recs if c["task"] == task]
        if task == "counterfact":
            per_case += [sum(ts[k:k + 4]) / 4 for k in range(0, len(ts), 4) for _ in range(4)]
        else:
            per_case += ts
    assert rows["ft"]["cost"]["median_edit_s"] == pytest.approx(float(np.median(per_case)), abs=1e-4)
    assert all(r["cost"]["peak_memory_mb"] is None for r in rows.values())
    html = (report / "index.html").read_text()
    assert "peak memory" in html and "the run recorded none" in html
    df = pd.read_csv(report / "leaderboard.csv")
    assert df[df["editor"] == "ft"].iloc[0]["median_edit_s"] == pytest.approx(rows["ft"]["cost"]["median_edit_s"])


def test_markdown_parity(report):
    md = (report / "leaderboard.md").read_text()
    assert "n=8" in md and "(pre " in md  # n and pre-edit values
    cmp = md[md.index("**Versus baseline"):]
    assert re.search(r"\+\d+\.\d [▲△▼▽·] \[[+-]\d+\.\d, [+-]\d+\.\d\] p(<0\.001|=\d\.\d{3})", cmp)  # CI of the difference
    assert "p=0.000" not in md and "p=<" not in md and "p<0.001" in md  # the HTML's p format
    html = (report / "index.html").read_text()
    assert "p&lt;0.001" in html and "p=&lt;" not in html
    assert md.count("**Best on the held-out task zsre:") == 1
    # links from the page to the machine-readable files
    for f in ("leaderboard.json", "leaderboard.csv", "leaderboard.md"):
        assert f'<a href="{f}">' in html


def test_accessibility_of_tables_and_charts(report):
    html = (report / "index.html").read_text()
    for t in parse(report / "index.html").tables:
        assert t.get("caption"), t["class"]
        for th in t["th"]:
            assert th["attrs"].get("scope") in ("col", "colgroup", "row"), th
    (table,) = tables(report / "index.html", "overview")
    assert row_headers(table) == set(EDITORS)
    assert html.count('<button type="button" class="sort">') > 20 and 'aria-sort="none"' in html
    for svg in re.findall(r"<svg .*?</svg>", html, re.S):
        if re.match(r'<svg [^>]*aria-hidden="true"', svg):  # a legend's look sample, beside its label
            continue
        assert re.search(r'^<svg [^>]*role="img" aria-labelledby="svgt\d+ svgd\d+"><title id=', svg)
        assert "<desc id=" in svg
    # pre-edit values are on the page, not only in tooltips
    cell = next(c for c in table["td"] if c["attrs"].get("data-run") == "ft" and c["attrs"].get("data-metric") == "reliability"
                and c["attrs"].get("data-task") == "counterfact")
    assert "pre 12.5" in cell["text"]


def test_sequential_runs_are_never_ranked_with_single_ones(tmp_path):
    seq = tmp_path / "ft-sequential"
    shutil.copytree(FT, seq)
    cfg = json.loads((seq / "config.json").read_text())
    cfg["mode"] = "sequential"
    (seq / "config.json").write_text(json.dumps(cfg))
    s = json.loads((seq / "summary.json").read_text())
    s["sequential"] = {"n_edits": 14, "checkpoints": [
        {"n_edits": n, "n_applied": n, "tasks": {"counterfact": {"reliability": {"pre": 10.0, "post": v, "ci": [v - 5, v], "n": 8},
                                                                "locality": {"pre": 100.0, "post": 100 - n, "ci": [90, 100], "n": 8}}}}
        for n, v in ((4, 90.0), (8, 80.0), (14, 70.0))]}
    for cp, bpb in zip(s["sequential"]["checkpoints"], (0.91, 0.95, 1.02)):
        cp["regression"] = {"bench_perplexity": {"bits_per_byte": {"before": 0.9, "after": bpb, "diff": bpb - 0.9,
                                                                   "diff_stderr": 0.01}}}
    (seq / "summary.json").write_text(json.dumps(s))
    out = build_report([NONE, FT, seq], tmp_path / "out", baseline="ft", fmt="all")
    doc = doc_of(out.parent)
    modes = [(g["mode"], sorted(r["editor"] for r in g["rows"])) for g in doc["groups"]]
    assert modes == [("single", ["ft", "none"]), ("sequential", ["ft"])]
    assert "sequential edits (every edit kept)" in doc["groups"][1]["heading"]
    html = out.read_text()
    assert "Sequential editing: scores as edits accumulate" in html and "70.0 [65.0, 70.0] after 14 edits" in html
    # each chart is titled; the unedited model is a marker of its own; the regression suite has its own
    assert "counterfact: reliability (%)" in html and "10.0 before editing (the unedited model)" in html
    assert "bench_perplexity: bits per byte (lm-eval)" in html and "1.02 after 14 edits" in html
    assert "0.9 before editing" in html
    assert len(tables(out, "overview")) == 2


def _lin(c):
    c = np.asarray(c, dtype=float)
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def _lab(rgb):
    m = np.array([[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750],
                  [0.0193339, 0.1191920, 0.9503041]])
    x = (m @ _lin(rgb)) / (m @ np.ones(3))
    f = np.where(x > (6 / 29) ** 3, np.cbrt(x), x / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.array([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])


def _ciede2000(l1, l2) -> float:
    (L1, a1, b1), (L2, a2, b2) = l1, l2
    cb = (np.hypot(a1, b1) + np.hypot(a2, b2)) / 2
    g = 0.5 * (1 - np.sqrt(cb ** 7 / (cb ** 7 + 25 ** 7)))
    a1p, a2p = (1 + g) * a1, (1 + g) * a2
    c1, c2 = np.hypot(a1p, b1), np.hypot(a2p, b2)
    h1, h2 = np.degrees(np.arctan2(b1, a1p)) % 360, np.degrees(np.arctan2(b2, a2p)) % 360
    dh = 0.0 if c1 * c2 == 0 else (h2 - h1 + 180) % 360 - 180
    dH = 2 * np.sqrt(c1 * c2) * np.sin(np.radians(dh / 2))
    lb, cbp = (L1 + L2) / 2, (c1 + c2) / 2
    hb = h1 + h2 if c1 * c2 == 0 else (h1 + h2) / 2 if abs(h1 - h2) <= 180 else \
        (h1 + h2 + 360) / 2 if h1 + h2 < 360 else (h1 + h2 - 360) / 2
    t = (1 - 0.17 * np.cos(np.radians(hb - 30)) + 0.24 * np.cos(np.radians(2 * hb))
         + 0.32 * np.cos(np.radians(3 * hb + 6)) - 0.20 * np.cos(np.radians(4 * hb - 63)))
    rt = -np.sin(np.radians(60 * np.exp(-((hb - 275) / 25) ** 2))) * 2 * np.sqrt(cbp ** 7 / (cbp ** 7 + 25 ** 7))
    sl = 1 + 0.015 * (lb - 50) ** 2 / np.sqrt(20 + (lb - 50) ** 2)
    sc, sh = 1 + 0.045 * cbp, 1 + 0.015 * cbp * t
    return float(np.sqrt(((L2 - L1) / sl) ** 2 + ((c2 - c1) / sc) ** 2 + (dH / sh) ** 2 + rt * ((c2 - c1) / sc) * (dH / sh)))


# Machado, Oliveira & Fernandes (2009), severity 1.0, applied to linear RGB
MACHADO = {"deuteranopia": [[0.367322, 0.860646, -0.227968], [0.280085, 0.672501, 0.047413], [-0.011820, 0.042940, 0.968881]],
           "protanopia": [[0.152286, 1.052583, -0.204868], [0.114503, 0.786281, 0.099216], [-0.003882, -0.048116, 1.051998]],
           "tritanopia": [[1.255528, -0.076749, -0.178779], [-0.078411, 0.930809, 0.147602], [0.004733, 0.691367, 0.303900]]}


def test_palette_is_colour_blind_safe_and_fixed_per_editor(tmp_path):
    """Every pair of chart colours (the reference grey included) differs by CIEDE2000 >= 15 under
    normal vision and simulated deuteranopia, protanopia and tritanopia; every colour has >= 3:1
    contrast on white; colours follow the editor, not the order of the runs."""
    # the CIEDE2000 implementation against Sharma, Wu & Dalal (2005)'s test data
    assert _ciede2000((50, 2.6772, -79.7751), (50, 0, -82.7485)) == pytest.approx(2.0425, abs=1e-4)
    assert _ciede2000((50, 2.49, -0.001), (50, -2.49, 0.0011)) == pytest.approx(7.2195, abs=1e-4)
    assert _ciede2000((60.2574, -34.0099, 36.2677), (60.4626, -34.1751, 39.4387)) == pytest.approx(1.2644, abs=1e-4)
    colors = list(PALETTE) + [REFERENCE_COLOR]
    rgb = {c: np.array([int(c[i:i + 2], 16) / 255 for i in (1, 3, 5)]) for c in colors}
    for c, v in rgb.items():
        assert 1.05 / (float(np.array([0.2126, 0.7152, 0.0722]) @ _lin(v)) + 0.05) >= 3.0, c
    worst = {}
    for vision, m in [("normal", None), *MACHADO.items()]:
        def seen(v):
            if m is None:
                return v
            lin = np.clip(np.array(m) @ _lin(v), 0, 1)
            return np.where(lin <= 0.0031308, 12.92 * lin, 1.055 * lin ** (1 / 2.4) - 0.055)
        worst[vision] = min(_ciede2000(_lab(seen(rgb[a])), _lab(seen(rgb[b]))) for a, b in itertools.combinations(colors, 2))
    assert min(worst.values()) >= 15, worst
    # fixed per editor name: the same colours whatever the order of the runs
    a = tables(build_report([ROME, FT, NONE], tmp_path / "a"), "overview")[0]
    b = tables(build_report([NONE, FT, ROME], tmp_path / "b"), "overview")[0]
    assert {e: EDITOR_COLORS[e] for e in ("ft", "rome")} == {"ft": PALETTE[0], "rome": PALETTE[1]}
    html_a, html_b = (tmp_path / "a" / "index.html").read_text(), (tmp_path / "b" / "index.html").read_text()
    for editor in ("ft", "rome", "none"):
        pat = rf'<span class="swatch" style="background:(#[0-9a-f]+)" data-family="{editor}" aria-hidden="true"></span><a href="#run-{editor}">'
        assert re.search(pat, html_a).group(1) == re.search(pat, html_b).group(1) == EDITOR_COLORS[editor]
    assert a and b


def test_runs_of_one_editor_are_labelled_by_the_hyperparameters_they_differ_in(tmp_path):
    """FT-L and FT-M side by side: each row names its objective as users know it (FT-M), not
    "ft (objective=...)" nor its directory."""
    ftm = tmp_path / "ft-m-run"
    shutil.copytree(FT, ftm)
    config = json.loads((ftm / "config.json").read_text())
    config["editor"].setdefault("hparams", {})["objective"] = "target_masked"
    (ftm / "config.json").write_text(json.dumps(config))
    doc = doc_of(build_report([FT, ftm, ROME], tmp_path / "out", baseline="ft-fixture").parent)
    labels = {r["run"] for g in doc["groups"] for r in g["rows"]}
    assert {"ft", "FT-M", "rome"} <= labels  # the fixture's FT records no objective: plain "ft"
    assert not any("objective=" in label for label in labels)
    # runs equal in every hyperparameter fall back to their directory names
    same = tmp_path / "ft-same"
    shutil.copytree(FT, same)
    doc = doc_of(build_report([FT, same], tmp_path / "out2", baseline="ft-same").parent)
    assert {r["run"] for g in doc["groups"] for r in g["rows"]} >= {"ft (fixture)", "ft (same)"}


def test_runs_on_two_models_get_a_cross_model_view(tmp_path):
    """Each model's runs are ranked on their own; the cross-model table gives each editor's rank
    on both and Kendall's tau-b of the two orders, computed here independently."""
    other = []
    for src in (NONE, FT, ROME):
        dst = tmp_path / "other" / src.name
        shutil.copytree(src, dst)
        config = json.loads((dst / "config.json").read_text())
        config["model"] = {**config["model"], "spec": "gemma3-270m", "source_hash": "ab" * 32}
        (dst / "config.json").write_text(json.dumps(config))
        other.append(dst)
    out = build_report(ALL + other, tmp_path / "out", baseline="none", fmt="all").parent
    doc = doc_of(out)
    assert [g["model"]["spec"] for g in doc["groups"]] == ["smollm2-135m", "gemma3-270m"]
    # ft and rome on both models are labelled plainly in each model's table
    assert {r["run"] for r in doc["groups"][1]["rows"]} == {"none", "ft", "rome"}
    (x,) = doc["cross_model"]
    assert x["models"] == ["smollm2-135m", "gemma3-270m"]
    cells = {r["label"]: r["cells"] for r in x["rows"]}
    assert cells["mend"][1] is None and cells["ft"][1] is not None
    first = {r["run"]: r for r in doc["groups"][0]["rows"]}
    assert cells["rome"][0]["rank"] == first["rome"]["rank"]
    assert cells["rome"][0]["value"] == pytest.approx(first["rome"]["score"]["value"], abs=1e-3)
    # identical copies: the same order on both models, tau = 1 over ft and rome
    (a,) = x["agreement"]
    assert a["n"] == 2 and a["tau"] == pytest.approx(1.0) and a["same_leaders"]
    md = (out / "leaderboard.md").read_text()
    assert "## Across models" in md and "Kendall's tau-b +1.00 over the 2 editors" in md
    page = (out / "index.html").read_text()
    assert "Across models" in page
    # the columns are headed by the model, linking to its section (the full heading as a title)
    assert re.search(r'<th scope="col"><a href="#[^"]+" title="Model gemma3-270m[^"]*">gemma3-270m</a></th>', page)


def test_kendall_tau_b_by_hand():
    from reports.views import kendall_tau

    assert kendall_tau([1, 2, 3], [1, 2, 3]) == pytest.approx(1.0)
    assert kendall_tau([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # pairs: (1,2) concordant, (1,3) concordant, (2,3) discordant -> (2 - 1) / 3
    assert kendall_tau([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3)
    assert kendall_tau([1.0], [2.0]) is None


def test_every_editor_in_one_report_has_its_own_colour_and_marker(tmp_path):
    """The six built-in editors, the reference and a third-party editor side by side: no two
    runs share a colour and marker (a new editor takes a free slot, not a known editor's)."""
    from reports.runs import MARKERS, Run, assign_style

    runs = []
    for editor in ("ft", "rome", "mend", "instructedit", "memit", "alphaedit", "none", "my_editor"):
        config = {"editor": {"name": editor}}
        runs.append(Run(path=tmp_path / f"{editor}-x", config=config, summary={}, cases=[],
                        has_cases_file=True))
    assign_style(runs)
    looks = [(r.color, r.marker) for r in runs]
    assert len(set(looks)) == len(looks)
    known = {(r.color, r.marker) for r in runs[:7]}
    assert (runs[-1].color, runs[-1].marker) not in known and runs[-1].marker in MARKERS
    assert runs[5].color == PALETTE[5] and runs[5].marker == "hexagon"
