"""Tests of the leaderboard reporter (the reports package) on the fixture runs in tests/fixtures/runs/."""

from __future__ import annotations

import csv
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from markupsafe import escape

from bench.core.errors import BenchError
from reports import build_report
from reports.exports import neutralise_csv_cell
from reports.runs import load_run
from reports.stats import signflip_pvalue

RUNS = Path(__file__).parent / "fixtures" / "runs"
NONE, FT, ROME = RUNS / "none-fixture", RUNS / "ft-fixture", RUNS / "rome-fixture"
ALL = [NONE, FT, ROME]
METRICS = ("reliability", "generality", "locality", "portability")


class Tables(HTMLParser):
    """Collects, per top-level <table class=...>, its <th> texts and its <td> cells (attrs + text)."""

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
        elif tag in ("td", "th") and self.depth == 1:
            self.cell = {"tag": tag, "attrs": a, "text": ""}
        elif tag == "h3":
            self._h3 = []

    def handle_endtag(self, tag):
        if tag == "table":
            self.depth -= 1
        elif tag in ("td", "th") and self.depth == 1 and self.cell is not None:
            self.cell["text"] = " ".join(self.cell["text"].split())
            self.tables[-1][self.cell["tag"]].append(self.cell)
            self.cell = None
        elif tag == "h3" and self._h3 is not None:
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
    for run in ("none", "ft", "rome"):
        for task in ("counterfact", "zsre"):
            page = report / f"cases-{run}-{task}.html"
            assert page.is_file()
            assert f'href="cases-{run}-{task}.html"' in html


def test_formats(tmp_path):
    md = build_report(ALL, tmp_path / "md", fmt="md")
    assert md.name == "leaderboard.md"
    assert sorted(p.name for p in md.parent.iterdir()) == ["leaderboard.csv", "leaderboard.json", "leaderboard.md"]
    text = md.read_text()
    assert "| 1 | rome |" in text and "Versus baseline ft" in text
    html = build_report(ALL, tmp_path / "html", fmt="html")
    names = {p.name for p in html.parent.iterdir()}
    assert {"index.html", "leaderboard.csv", "leaderboard.json"} <= names and "leaderboard.md" not in names
    with pytest.raises(BenchError):
        build_report(ALL, tmp_path / "x", fmt="pdf")


def test_overview_json_matches_summary(report):
    doc = json.loads((report / "leaderboard.json").read_text())
    assert len(doc["groups"]) == 1
    rows = {r["editor"]: r for r in doc["groups"][0]["rows"]}
    assert set(rows) == {"none", "ft", "rome"}
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
    assert [r["editor"] for r in doc["groups"][0]["rows"]] == ["rome", "ft", "none"]  # ranked


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
    assert n_checked == 3 * 7
    # every column header sorts
    assert all("data-col" in th["attrs"] for th in table["th"] if th["text"] in ("Rel", "Gen", "Loc", "Port", "All"))


def test_csv_matches_json(report):
    df = pd.read_csv(report / "leaderboard.csv")
    doc = json.loads((report / "leaderboard.json").read_text())
    for row in doc["groups"][0]["rows"]:
        line = df[df["run"] == row["run"]].iloc[0]
        for task, metrics in row["tasks"].items():
            for m, v in metrics.items():
                assert line[f"{task}/{m}"] == v["post"] and line[f"{task}/{m}/n"] == v["n"]


def test_holdout_view_lists_only_holdout_tasks(report):
    doc = json.loads((report / "leaderboard.json").read_text())
    ho = doc["groups"][0]["holdout"]
    assert ho["tasks"] == ["zsre"]
    (table,) = tables(report / "index.html", "holdout")
    assert {c["attrs"]["data-task"] for c in table["td"] if "data-task" in c["attrs"]} == {"zsre"}
    header = " ".join(th["text"] for th in table["th"])
    assert "zsre" in header and "counterfact" not in header
    assert "In-distribution mean" in header
    # in-distribution mean = mean over the non-holdout task (counterfact) only
    rows = {r["run"]: r for r in ho["rows"]}
    for run in ALL:
        s = summary(run)["tasks"]
        r = rows[run.name.split("-")[0]]
        assert r["indistribution_mean"]["reliability"] == pytest.approx(s["counterfact"]["reliability"]["post"])
        assert r["heldout_mean"]["reliability"] == pytest.approx(s["zsre"]["reliability"]["post"])


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
    # exact sign-flip p-value: two non-zero differences of 0.5 -> p = 2/4
    assert got[("rome", "counterfact", "reliability")]["p"] == pytest.approx(0.5)
    assert got[("rome", "counterfact", "reliability")]["mark"] == "·"
    # none is significantly worse than ft on counterfact reliability: 8 negative differences, p = 2/256
    assert got[("none", "counterfact", "reliability")]["mark"] == "▼"
    assert got[("none", "counterfact", "reliability")]["p"] == pytest.approx(2 / 256, abs=1e-6)
    # and the HTML shows the same difference
    (table,) = tables(report / "index.html", "comparison")
    cell = next(c for c in table["td"] if c["attrs"].get("data-run") == "rome"
                and c["attrs"].get("data-task") == "zsre" and c["attrs"].get("data-metric") == "reliability")
    assert cell["text"].startswith("+5.0") and "n=5" in cell["text"]


def test_missing_baseline_is_noted_not_an_error(tmp_path):
    build_report([NONE, ROME], tmp_path, baseline="ft")
    html = (tmp_path / "index.html").read_text()
    assert "Baseline editor &#39;ft&#39; is not among the runs" in html
    assert not tables(tmp_path / "index.html", "comparison")


def test_signflip_pvalue():
    assert signflip_pvalue(np.zeros(5)) == 1.0
    assert signflip_pvalue(np.ones(6)) == pytest.approx(2 / 64)
    assert signflip_pvalue(np.array([1.0, -1.0])) == 1.0
    p = signflip_pvalue(np.full(30, 0.5))  # Monte Carlo path
    assert p == pytest.approx(1 / 10_001)
    assert 0.2 < signflip_pvalue(np.r_[np.ones(20), -np.ones(18)]) <= 1.0


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
    assert groups[1] == ("gpt2", "easyedit-token-accuracy/v1", [str(other)])
    assert groups[2] == ("smollm2-135m", "exact-match/v2", [str(defs)])
    ov = tables(out, "overview")
    assert len(ov) == 3
    assert "gpt2" in ov[1]["heading"] and "exact-match/v2" in ov[2]["heading"]
    assert {c["attrs"]["data-run"] for c in ov[1]["td"] if "data-run" in c["attrs"]} == {"rome (gpt2)"}
    # two ft runs and two rome runs -> distinguishable labels
    labels = [r["run"] for g in doc["groups"] for r in g["rows"]]
    assert len(set(labels)) == len(labels) == 5
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
    assert 'id="failonly"' in page
    for rec in records:
        case = rec["case"]
        texts = [case["prompt"], *case.get("rephrase_prompts", []),
                 *(q["prompt"] for q in case.get("locality", []))]
        predicted = json.dumps(rec["predictions"])
        # A short target can legitimately show up as the edited model's own prediction.
        texts += [t for t in (case["target_new"], case.get("ground_truth")) if t and t not in predicted]
        for text in map(str, map(escape, texts)):  # as the templates write it
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
    assert any("built-in sample" in c["text"] for c in overview["td"])
