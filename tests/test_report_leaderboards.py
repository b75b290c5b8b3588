"""Leaderboards that stay true as they grow (issue 28): a look per run that never runs out, equal
footing, ranks that agree with the pairwise tests, verdicts against the runner-up, the
sequential checkpoint table in every format, and the small things. The run directories are
fabricated here (config.json, summary.json and cases.jsonl as `bench run` writes them)."""

from __future__ import annotations

import itertools
import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bench.core.errors import BenchError
from reports import build_report
from reports.index import build_index
from reports.looks import EDITOR_FAMILIES, MARKERS, contrast_on_white
from reports.ranking import letter_display, rank_groups
from reports.stats import signed
from tests.test_reports import doc_of, tables

TERMS = ("reliability", "generality", "locality")


def fabricate(path: Path, editor: str, n_cases: int | dict = 20, quality: float = 0.8, seed: int = 0,
              hparams: dict | None = None, set_hparams: dict | None = None, argv: list[str] | None = None,
              train_tasks: list[str] | None = None, holdout: tuple[str, ...] = (), instruction_mode: str = "seen",
              uses_instructions: bool = False, tasks: tuple[str, ...] = ("counterfact", "zsre"),
              case_extra: dict | None = None, config_extra: dict | None = None) -> Path:
    """A run directory of `editor`: per task `n_cases` cases whose reliability and generality are
    right with probability `quality` (locality 0.9), a summary.json of their means."""
    rng = random.Random(f"{editor}-{seed}-{quality}")
    counts = n_cases if isinstance(n_cases, dict) else {t: n_cases for t in tasks}
    path.mkdir(parents=True)
    records, summary_tasks = [], {}
    for t in tasks:
        rows = []
        for i in range(counts[t]):
            post = {"reliability": float(rng.random() < quality), "generality": float(rng.random() < quality * 0.8),
                    "locality": float(rng.random() < 0.9)}
            pre = {"reliability": 0.0, "generality": 0.0, "locality": 1.0}
            rec = {"task": t, "case_id": f"{t}-{i}", "pre": pre, "post": post, "error": None,
                   "time": {"edit_s": 0.5}, **(case_extra or {})}
            rows.append(rec)
        records += rows
        summary_tasks[t] = {m: {"pre": 100.0 * float(np.mean([r["pre"][m] for r in rows])),
                                "post": 100.0 * float(np.mean([r["post"][m] for r in rows])),
                                "ci": [0.0, 100.0], "n": len(rows)} for m in TERMS}
    argv = argv if argv is not None else ["run", "--editor", editor, "--task", ",".join(tasks)]
    config = {"command": "bench " + " ".join(argv), "argv": argv, "created": "2026-12-01T00:00:00+00:00",
              "options": {"editor": editor, "hparams": set_hparams or {}},
              "model": {"spec": "smollm2-135m", "source_hash": "ab" * 32, "dtype": "float32", "device": "cpu"},
              "editor": {"name": editor, "hparams": hparams or {}, "uses_instructions": uses_instructions},
              "tasks": [{"name": t, "split": "eval", "holdout": t in holdout, "metrics": list(TERMS),
                         "n_cases": counts[t]} for t in tasks],
              "data": "real", "seed": 0, "limit": max(counts.values()), "mode": "single",
              "instruction_mode": instruction_mode, "protocols": ["teacher_forced"], "prompt_format": "plain",
              "metric_definitions": "easyedit-token-accuracy/v1",
              "notes": {"train_tasks": train_tasks, "train_time_s": 120.0, "train_steps": 250} if train_tasks else {},
              **(config_extra or {})}
    (path / "config.json").write_text(json.dumps(config))
    (path / "summary.json").write_text(json.dumps({"tasks": summary_tasks}))
    (path / "cases.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def fourteen_runs(root: Path) -> list[Path]:
    """Two runs each of seven editors, told apart by hyperparameters, instruction mode or held-out
    task; directory names with bench run's timestamps."""
    out = []
    for i, (editor, kw) in enumerate([
        ("ft", {"hparams": {"objective": "prompt_last"}}),
        ("ft", {"hparams": {"objective": "target_masked"}, "set_hparams": {"objective": "target_masked"}}),
        ("rome", {"hparams": {"v_lr": 0.5}}),
        ("rome", {"hparams": {"v_lr": 0.1}, "set_hparams": {"v_lr": 0.1}}),
        ("memit", {"hparams": {"layers": [3, 4]}}),
        ("memit", {"hparams": {"layers": [4, 5]}, "set_hparams": {"layers": [4, 5]}}),
        ("mend", {"train_tasks": ["counterfact"], "holdout": ("zsre",)}),
        ("mend", {"train_tasks": ["zsre"], "holdout": ("counterfact",)}),
        ("instructedit", {"train_tasks": ["counterfact"], "holdout": ("zsre",), "uses_instructions": True,
                          "instruction_mode": "seen"}),
        ("instructedit", {"train_tasks": ["counterfact"], "holdout": ("zsre",), "uses_instructions": True,
                          "instruction_mode": "unseen"}),
        ("ike", {"hparams": {"k": 8}}),
        ("ike", {"hparams": {"k": 16}, "set_hparams": {"k": 16}}),
        ("lora", {"hparams": {"rank": 4}}),
        ("lora", {"hparams": {"rank": 8}, "set_hparams": {"rank": 8}}),
    ]):
        out.append(fabricate(root / f"{editor}-{i}-20261129-1{i:02d}040", editor, quality=0.3 + 0.04 * i, seed=i, **kw))
    return out


# --------------------------------------------------------------------------------------------
# 1. A look per run that never runs out
# --------------------------------------------------------------------------------------------

class Looks:
    """The legend entries (<ul class="looks"><li data-...>) of every group of a page."""

    def __init__(self, html: str):
        self.items = [dict(re.findall(r'data-([a-z]+)="([^"]*)"', li))
                      for li in re.findall(r'<li (data-run="[^>]*)>', html)]


def test_fourteen_runs_of_seven_editors_never_share_a_look(tmp_path):
    runs = fourteen_runs(tmp_path / "runs")
    out = build_report(runs, tmp_path / "out", baseline="none", fmt="all").parent
    html = (out / "index.html").read_text()
    looks = Looks(html).items
    assert len(looks) == 14
    # no two runs share a look (colour, marker, line style) ...
    assert len({(x["color"], x["marker"], x["dash"]) for x in looks}) == 14
    by_editor: dict[str, list[dict]] = {}
    for x in looks:
        by_editor.setdefault(x["editor"], []).append(x)
    assert len(by_editor) == 7
    for editor, xs in by_editor.items():
        # ... every run of an editor wears its colour family, the first variant its base colour ...
        assert {x["family"] for x in xs} == {editor}
        assert all(x["color"] in EDITOR_FAMILIES[editor] for x in xs)
        assert sorted(int(x["variant"]) for x in xs) == [0, 1]
        assert next(x for x in xs if x["variant"] == "0")["color"] == EDITOR_FAMILIES[editor][0]
        # ... and its variants differ in marker and line style
        assert len({x["marker"] for x in xs}) == 2 and len({x["dash"] for x in xs}) == 2
    # families differ between editors: no colour of one editor is another's
    for a, b in itertools.combinations(by_editor, 2):
        assert not set(EDITOR_FAMILIES[a]) & set(EDITOR_FAMILIES[b])
    # the charts draw each run in its legend colour; the legend says what colour and marker mean
    for x in looks:
        fills = set(re.findall(r'<rect [^>]*fill="(#[0-9a-f]{6})"[^>]*><title>' + re.escape(x["run"]) + " · ", html))
        assert fills == {x["color"]}, x["run"]
    assert "Colour = the editor" in html and "Marker shape and line style = the variant" in html
    # labels: FT-L / FT-M, the variant's difference, never a timestamp
    labels = {x["run"] for x in looks}
    assert {"FT-L", "FT-M", "rome (v_lr=0.5)", "rome (v_lr=0.1)", "instructedit (seen)", "instructedit (unseen)",
            "mend (held out zsre)", "mend (held out counterfact)"} <= labels
    assert not any(re.search(r"\d{8}-\d{6}", label) for label in labels)
    # the JSON carries the same looks
    rows = {r["run"]: r["look"] for r in doc_of(out)["groups"][0]["rows"]}
    for x in looks:
        assert (rows[x["run"]]["color"], rows[x["run"]]["marker"], rows[x["run"]]["dash"]) == \
            (x["color"], x["marker"], x["dash"])


def test_looks_never_run_out_and_keep_contrast(tmp_path):
    """Twelve variants of one editor and four editors no table knows: still one look each, every
    colour with at least 3:1 contrast on white."""
    from reports.runs import Run
    from reports.looks import assign_style

    runs = []
    for k in range(12):
        runs.append(Run(path=tmp_path / f"rome-{k}", config={"editor": {"name": "rome"}}, summary={}, cases=[],
                        has_cases_file=True, label=f"rome ({k})"))
    for name in ("zeta", "eta", "theta", "iota", "kappa"):
        runs.append(Run(path=tmp_path / name, config={"editor": {"name": name}}, summary={}, cases=[],
                        has_cases_file=True, label=name))
    assign_style(runs)
    assert len({(r.color, r.marker, r.dash) for r in runs}) == len(runs)
    assert all(r.marker in MARKERS for r in runs)
    assert {r.color for r in runs[:12]} <= set(EDITOR_FAMILIES["rome"])
    assert len({r.color for r in runs[12:]}) == 5  # a family per unknown editor, past the spare ones too
    for family in list(EDITOR_FAMILIES.values()) + [(r.color,) for r in runs]:
        for color in family:
            assert contrast_on_white(color) >= 3.0, color


# --------------------------------------------------------------------------------------------
# 2-4. Equal footing, rank groups from the pairwise tests, the runner-up in the verdict
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def footing(tmp_path_factory) -> Path:
    """FT and ROME on 100 cases per task, MEMIT (the best editor here) on 30: MEMIT is listed,
    marked, and kept out of the ranking, the best marks and the verdict."""
    root = tmp_path_factory.mktemp("footing")
    runs = [fabricate(root / "ft", "ft", 100, quality=0.35), fabricate(root / "rome", "rome", 100, quality=0.8),
            fabricate(root / "mend", "mend", 100, quality=0.7, seed=3),
            fabricate(root / "memit", "memit", 30, quality=0.97), fabricate(root / "none", "none", 100, quality=0.0)]
    return build_report(runs, root / "out", baseline="ft", fmt="all").parent


def test_a_30_case_run_beside_100_case_runs_is_marked_and_not_ranked(footing):
    g = doc_of(footing)["groups"][0]
    rows = {r["editor"]: r for r in g["rows"]}
    memit = rows["memit"]
    assert memit["rank"] is None and memit["equal_footing"] is False
    assert memit["status"] == "fewer cases (30 of 100 per task)"
    assert memit["fewer_cases"] == [{"task": t, "finished": 30, "full": 100} for t in ("counterfact", "zsre")]
    assert memit["score"]["value"] > max(r["score"]["value"] for e, r in rows.items() if e != "memit")
    assert all(rows[e]["rank"] is not None and rows[e]["equal_footing"] for e in ("ft", "rome", "mend"))
    # the page: the mark in its row, no rank, never bold
    html = (footing / "index.html").read_text()
    row = re.search(r'<tr data-run="memit">\s*<td class="num rank" data-v="">(.*?)</td>\s*<th[^>]*>(.*?)</th>', html, re.S)
    assert row and "not ranked" in row.group(1) and "fewer cases (30 of 100 per task)" in row.group(2)
    (table,) = tables(footing / "index.html", "overview")
    assert not any("best" in c["attrs"].get("class", "").split() for c in table["td"]
                   if c["attrs"].get("data-run") == "memit")
    bold = {c["attrs"].get("data-run") for c in table["td"] if "best" in c["attrs"].get("class", "").split()} - {None}
    assert bold and bold <= {"ft", "rome", "mend"}
    # the Markdown and the CSV say so too
    assert "| – | memit — fewer cases (30 of 100 per task), not ranked |" in (footing / "leaderboard.md").read_text()
    line = pd.read_csv(footing / "leaderboard.csv").set_index("editor").loc["memit"]
    assert line["status"] == "fewer cases (30 of 100 per task)" and not line["equal_footing"] and pd.isna(line["rank"])


def test_the_verdict_compares_the_winner_with_the_runner_up_on_the_tables_numbers(footing):
    g = doc_of(footing)["groups"][0]
    rows = {r["run"]: r for r in g["rows"]}
    (line,) = g["verdicts"]
    # no learned run: no held-out task, so the verdict is on the overall ranking
    assert line.startswith("Best overall: rome (Score ")
    best, runner = rows["rome"], rows["mend"]
    m = re.search(r"ahead of the runner-up mend by (\d+\.\d) points on the mean Score \((\d+\.\d) vs (\d+\.\d)\), "
                  r"95% interval \[([+-]?\d+\.\d+), ([+-]?\d+\.\d+)\], n=(\d+)", line)
    assert m, line
    diff, a, b = float(m.group(1)), float(m.group(2)), float(m.group(3))
    assert (a, b) == (round(best["score"]["value"], 1), round(runner["score"]["value"], 1))
    assert diff == pytest.approx(best["score"]["value"] - runner["score"]["value"], abs=0.051)  # verdict = table
    pair = next(p for p in g["pairwise"]["comparisons"] if {p["a"], p["b"]} == {"rome", "mend"} and p["task"] == "all")
    assert abs(pair["diff"]) == pytest.approx(diff, abs=0.051) and pair["n"] == int(m.group(6))
    assert "the baseline ft by" in line
    assert "Not compared (not on equal footing): memit, on fewer cases (30 of 100 per task)." in line
    assert "memit" not in line.split("Not compared")[0]


def test_ranks_never_contradict_a_significant_pairwise_test(tmp_path):
    """Runs close together: whatever the pairwise marks, two runs that share a rank are never
    marked significantly different, and two runs share a letter exactly when they are not."""
    runs = [fabricate(tmp_path / f"e{k}", f"e{k}", 60, quality=q, seed=k)
            for k, q in enumerate((0.9, 0.84, 0.78, 0.72, 0.62, 0.6))]
    g = doc_of(build_report(runs, tmp_path / "out", baseline="none").parent)["groups"][0]
    rows = {r["run"]: r for r in g["rows"]}
    sig = {frozenset((p["a"], p["b"])) for p in g["pairwise"]["comparisons"]
           if p["task"] == "all" and p["mark"] in ("▲", "▼")}
    assert sig and len(sig) < 15  # some pairs differ significantly, some do not
    for a, b in itertools.combinations(rows, 2):
        same_rank = rows[a]["rank"] == rows[b]["rank"]
        share_letter = bool(set(rows[a]["letters"]) & set(rows[b]["letters"]))
        assert not (same_rank and frozenset((a, b)) in sig), (a, b)
        assert share_letter == (frozenset((a, b)) not in sig), (a, b)
    assert "pairwise tests of that mean" in doc_of(tmp_path / "out")["ranking"]


def test_rank_groups_and_letters_by_hand():
    class R:  # a run: only its identity matters
        pass

    a, b, c, d = R(), R(), R(), R()
    sig = {(id(x), id(y)) for x, y in ((a, c), (a, d), (b, d))} | {(id(y), id(x)) for x, y in ((a, c), (a, d), (b, d))}
    assert rank_groups([a, b, c, d], sig) == [1, 1, 2, 2]
    assert letter_display([a, b, c, d], sig) == ["a", "ab", "bc", "c"]
    # random relations: one rank never holds a significant pair; a shared letter iff not significant
    rng = random.Random(0)
    for _ in range(200):
        order = [R() for _ in range(rng.randint(1, 7))]
        sig = set()
        for x, y in itertools.combinations(order, 2):
            if rng.random() < 0.4:
                sig |= {(id(x), id(y)), (id(y), id(x))}
        ranks, letters = rank_groups(order, sig), letter_display(order, sig)
        for i, j in itertools.combinations(range(len(order)), 2):
            s = (id(order[i]), id(order[j])) in sig
            assert not (s and ranks[i] == ranks[j])
            assert bool(set(letters[i]) & set(letters[j])) == (not s)


# --------------------------------------------------------------------------------------------
# 5. Small things
# --------------------------------------------------------------------------------------------

def test_signed_values_never_print_negative_zero(footing):
    assert signed(0.0) == "0.0" and signed(-0.0) == "0.0"
    assert signed(-0.04) == "-0.04" and signed(0.04) == "+0.04" and signed(-2.66) == "-2.7"
    for name in ("index.html", "leaderboard.md"):
        assert not re.search(r"[-−+]0\.0(?![0-9])", (footing / name).read_text()), name


def test_run_names_wrap_between_words_only(footing):
    css = (footing / "index.html").read_text()
    rule = re.search(r"\.runcell \{([^}]*)\}", css).group(1)
    assert "overflow-wrap: normal" in rule and "anywhere" not in rule and "break-all" not in rule


def test_hyperparameters_set_for_the_run_come_from_the_command(tmp_path):
    """An old ROME run recorded every resolved value in options.hparams although its command set
    none: the page says the defaults were used; a --hparam names only its key."""
    every = {"layer": 5, "v_lr": 0.5, "kl_factor": 0.0625}
    plain = fabricate(tmp_path / "rome-plain", "rome", hparams=every, set_hparams=every)
    named = fabricate(tmp_path / "rome-named", "rome", hparams=every, set_hparams=every,
                      argv=["--threads", "1", "run", "--editor", "rome", "--hparam", "v_lr=0.5"])
    out = build_report([plain, named], tmp_path / "out", baseline="none").parent
    html = (out / "index.html").read_text()
    sections = dict(re.findall(r'<details class="run" id="run-([^"]+)".*?hyperparameters set for this run</dt><dd>(.*?)</dd>',
                               html, re.S))
    assert sections["rome-plain"] == "none: the editor's defaults"
    assert sections["rome-named"] == "<pre>{&#34;v_lr&#34;: 0.5}</pre>"


def test_peak_memory_training_cost_commit_and_command_are_reported(tmp_path):
    measured = fabricate(tmp_path / "rome", "rome", case_extra={"memory": {"peak_mb": 812.5}},
                         config_extra={"git_commit": "745c79b0"})
    learned = fabricate(tmp_path / "mend", "mend", train_tasks=["counterfact"], holdout=("zsre",))
    out = build_report([measured, learned], tmp_path / "out", baseline="none", fmt="all").parent
    rows = {r["editor"]: r for r in doc_of(out)["groups"][0]["rows"]}
    assert rows["rome"]["cost"]["peak_memory_mb"] == 812.5 and rows["mend"]["cost"]["peak_memory_mb"] is None
    assert rows["mend"]["cost"]["training"] == {"seconds": 120.0, "steps": 250} and rows["rome"]["cost"]["training"] is None
    assert rows["rome"]["git_commit"] == "745c79b0" and rows["mend"]["git_commit"] is None
    assert rows["rome"]["command"] == "bench run --editor rome --task counterfact,zsre"
    df = pd.read_csv(out / "leaderboard.csv").set_index("editor")
    assert df.loc["rome", "git_commit"] == "745c79b0" and df.loc["rome", "command"].startswith("bench run --editor rome")
    assert df.loc["rome", "peak_memory_mb"] == 812.5 and df.loc["mend", "train_time_s"] == 120.0
    html = (out / "index.html").read_text()
    assert ">812 MB</td>" in html and 'title="not recorded by this run">–</td>' in html
    assert "120 s" in html and "250 steps" in html and 'title="does not train">–</td>' in html
    assert "the run recorded none" in html


# --------------------------------------------------------------------------------------------
# 6. The sequential page
# --------------------------------------------------------------------------------------------

def _sequential(path: Path, editor: str, values: list[tuple[int, float, float]], train_tasks=None) -> Path:
    """A sequential run with checkpoints (n_edits, reliability, locality); generality = half the
    reliability; a regression metric too."""
    fabricate(path, editor, 14, train_tasks=train_tasks, tasks=("counterfact",))
    cfg = json.loads((path / "config.json").read_text())
    cfg["mode"] = "sequential"
    (path / "config.json").write_text(json.dumps(cfg))
    s = json.loads((path / "summary.json").read_text())
    cps = []
    for n, rel, loc in values:
        tasks = {"counterfact": {
            "reliability": {"pre": 10.0, "post": rel, "ci": [rel - 5, min(100.0, rel + 5)], "n": n},
            "generality": {"pre": 5.0, "post": rel / 2, "ci": [rel / 2 - 4, rel / 2 + 4], "n": n},
            "locality": {"pre": 100.0, "post": loc, "ci": [loc - 3, min(100.0, loc + 3)], "n": 100},
            "wild_reliability": {"pre": 0.0, "post": rel - 10, "ci": [rel - 20, rel], "n": n}}}
        cps.append({"n_edits": n, "n_applied": n, "tasks": tasks,
                    "regression": {"bench_perplexity": {"bits_per_byte": {"before": 0.9, "after": 0.9 + n / 100}}}})
    s["sequential"] = {"n_edits": values[-1][0], "checkpoints": cps}
    (path / "summary.json").write_text(json.dumps(s))
    return path


def test_sequential_runs_of_different_lengths_are_never_paired(tmp_path):
    """A sequential case's score is read after all of its run's edits: a 6-edit run and a
    14-edit run scored on their 6 shared cases measure different things, so the report pairs
    only runs of the same length (pairwise table and baseline comparison); the same runs in
    single mode are paired on their shared cases."""
    def sequential(path: Path, editor: str, n: int) -> Path:
        fabricate(path, editor, n, tasks=("counterfact",), seed=len(editor))
        cfg = json.loads((path / "config.json").read_text())
        cfg["mode"] = "sequential"
        (path / "config.json").write_text(json.dumps(cfg))
        return path

    runs = [sequential(tmp_path / "a", "rome", 14), sequential(tmp_path / "b", "memit", 14),
            sequential(tmp_path / "c", "wise", 6)]
    build_report(runs, tmp_path / "out", baseline="rome", fmt="md")
    (g,) = doc_of(tmp_path / "out")["groups"]
    pairs = {frozenset((p["a"], p["b"])) for p in g["pairwise"]["comparisons"] if p["task"] == "all"}
    assert pairs == {frozenset(("rome", "memit"))}
    assert "Sequential runs of different lengths are not paired" in (tmp_path / "out" / "leaderboard.md").read_text()
    build_report(runs, tmp_path / "short-base", baseline="wise", fmt="md")  # the baseline is the short run
    (g,) = doc_of(tmp_path / "short-base")["groups"]
    (line,) = g["verdicts"]
    assert "no paired comparison with the baseline wise (a sequential run of another length)" in line, line

    for r in runs:  # the same directories as single-mode runs: the short one is paired
        cfg = json.loads((r / "config.json").read_text())
        cfg["mode"] = "single"
        (r / "config.json").write_text(json.dumps(cfg))
    build_report(runs, tmp_path / "single", baseline="rome", fmt="md")
    (g,) = doc_of(tmp_path / "single")["groups"]
    pairs = {frozenset((p["a"], p["b"])) for p in g["pairwise"]["comparisons"] if p["task"] == "all"}
    assert frozenset(("rome", "wise")) in pairs and frozenset(("memit", "wise")) in pairs


def test_the_checkpoint_table_equals_the_run_records_in_every_format(tmp_path):
    rome = _sequential(tmp_path / "rome", "rome", [(4, 90.0, 95.0), (8, 80.0, 90.0), (14, 70.0, 80.0)])
    mend = _sequential(tmp_path / "mend", "mend", [(4, 60.0, 50.0), (8, 10.0, 20.0), (14, 0.0, 5.0)],
                       train_tasks=["counterfact"])
    out = build_report([rome, mend], tmp_path / "out", baseline="none", fmt="all").parent
    records = {r: json.loads((p / "summary.json").read_text())["sequential"]["checkpoints"]
               for r, p in (("rome", rome), ("mend", mend))}
    expected = {}  # (run, edits, metric) -> (post, lo, hi, n)
    for run, cps in records.items():
        for cp in cps:
            for m, x in cp["tasks"]["counterfact"].items():
                expected[(run, cp["n_edits"], m)] = (x["post"], x["ci"][0], x["ci"][1], x["n"])
            t = cp["tasks"]["counterfact"]
            score = 3 / sum(100 / t[m]["post"] for m in TERMS) * 100 if all(t[m]["post"] > 0 for m in TERMS) else 0.0
            expected[(run, cp["n_edits"], "score")] = (score, None, None, None)
    # HTML
    cells = {}
    for table in tables(out / "index.html", "checkpoints"):
        if "regression" in table["class"]:
            continue
        for c in table["td"]:
            a = c["attrs"]
            if "data-metric" in a and a["data-edits"] != "0" and a["data-v"]:
                cells[(a["data-run"], int(a["data-edits"]), a["data-metric"])] = (
                    float(a["data-v"]), float(a["data-lo"]) if a.get("data-lo") else None,
                    float(a["data-hi"]) if a.get("data-hi") else None, int(a["data-n"]) if a.get("data-n") else None)
    assert set(cells) == set(expected)
    for k, (post, lo, hi, n) in expected.items():
        got = cells[k]
        assert got[0] == pytest.approx(post, abs=1e-6) and got[3] == n, k
        assert (got[1], got[2]) == ((pytest.approx(lo), pytest.approx(hi)) if lo is not None else (None, None)), k
    # JSON
    seq = doc_of(out)["groups"][0]["sequential"]
    (task,) = seq["tasks"]
    got = {(e["run"], c["n_edits"], m): (x["post"], x["ci"][0], x["ci"][1], x["n"])
           for e in task["runs"] for c in e["checkpoints"] for m, x in c["metrics"].items()}
    assert set(got) == set(expected)
    for k, v in expected.items():
        assert got[k][0] == pytest.approx(v[0], abs=1e-4) and got[k][3] == v[3]
        assert got[k][1:3] == ((pytest.approx(v[1]), pytest.approx(v[2])) if v[1] is not None else (None, None))
    assert {e["run"]: e["pre"]["reliability"] for e in task["runs"]} == {"rome": 10.0, "mend": 10.0}
    # CSV
    df = pd.read_csv(out / "checkpoints.csv")
    df = df[(df["task"] == "counterfact") & (df["n_edits"] > 0)]
    got = {(r["run"], int(r["n_edits"]), r["metric"]): (r["post"], r["ci_lo"], r["ci_hi"], r["n"]) for _, r in df.iterrows()}
    assert set(got) == set(expected)
    for k, v in expected.items():
        assert got[k][0] == pytest.approx(v[0], abs=1e-4)
        if v[1] is not None:
            assert (got[k][1], got[k][2], got[k][3]) == (pytest.approx(v[1]), pytest.approx(v[2]), v[3])
    # Markdown: the row of each run and number of edits
    md = (out / "leaderboard.md").read_text()
    for (run, n, m), (post, lo, hi, count) in expected.items():
        if m == "reliability":
            assert f"| {run} | {n} | " in md and f"{post:.1f} [{lo:.1f}, {hi:.1f}] n={count}" in md
    assert "lm-eval bench\\_perplexity: bits\\_per\\_byte" in md
    # the regression suite: before and after each checkpoint
    reg = doc_of(out)["groups"][0]["sequential"]["regression"][0]
    assert reg["runs"][0]["before"] == 0.9 and [c["value"] for c in reg["runs"][0]["checkpoints"]] == [0.94, 0.98, 1.04]


def test_sequential_curves_and_notes(tmp_path):
    rome = _sequential(tmp_path / "rome", "rome", [(4, 90.0, 95.0), (8, 80.0, 90.0), (14, 70.0, 80.0)])
    mend = _sequential(tmp_path / "mend", "mend", [(4, 60.0, 50.0), (8, 10.0, 20.0), (14, 0.0, 5.0)],
                       train_tasks=["counterfact"])
    html = build_report([rome, mend], tmp_path / "out", baseline="none").read_text()
    charts = {re.search(r'<title id="svgt\d+">([^<]*)</title>', svg).group(1): svg
              for svg in re.findall(r'<svg xmlns[^>]*class="chart".*?</svg>', html, re.S)}
    # readable titles, a Score curve
    assert "counterfact Score as edits accumulate" in charts and "counterfact wild reliability as edits accumulate" in charts
    assert "counterfact: wild reliability (%)" in html and "wild_reliability (%)" not in html
    svg = charts["counterfact reliability as edits accumulate"]
    # the curve starts at the first checkpoint (x of 4 edits), not at 0; the pre-edit value is its own hollow marker
    paths = re.findall(r'<path d="M([\d.]+) [\d.]+L[^"]*" fill="none" stroke="#[0-9a-f]{6}"', svg)
    assert len(paths) == 2 and all(float(x) > 52 + 1 for x in paths)
    assert "rome: 10.0 before editing (the unedited model)" in svg
    assert re.search(r'fill="none" stroke="#[0-9a-f]{6}" stroke-width="1.5"><title>rome: 10.0 before editing', svg)
    assert "rome: 70.0 [65.0, 75.0] after 14 edits" in svg
    # interval bands
    assert len(re.findall(r'<path class="band"', svg)) == 2
    # the held-out note agrees with the runs' training tasks, and the page says mend trained on counterfact
    assert "No task of this group is held out for its learned editors (mend trained on counterfact)" in html
    assert "no run records training tasks" not in html
    assert "Trained on the task shown: mend (counterfact)" in html
    assert re.search(r'<span class="badge trained"[^>]*>trained on counterfact</span>', html)


# --------------------------------------------------------------------------------------------
# 7. The index of a folder of leaderboards
# --------------------------------------------------------------------------------------------

def test_bench_report_index_links_every_leaderboard_with_filters_in_the_url(tmp_path, capsys):
    from bench.cli import main
    from tests.test_reports import ALL, FT, NONE, ROME

    lb = tmp_path / "leaderboards"
    build_report(ALL, lb / "fixture", baseline="ft", fmt="all", title="Fixture board")
    other = []
    for src in (NONE, FT, ROME):  # the same runs on a second model: an across-models view, Markdown only
        dst = tmp_path / "gemma" / src.name
        dst.parent.mkdir(exist_ok=True)
        shutil.copytree(src, dst)
        cfg = json.loads((dst / "config.json").read_text())
        cfg["model"] = {**cfg["model"], "spec": "gemma3-270m", "source_hash": "cd" * 32}
        (dst / "config.json").write_text(json.dumps(cfg))
        other.append(dst)
    build_report([NONE, FT, ROME] + other, lb / "across", baseline="ft", fmt="md", title="Across board")
    assert main(["report", "--index", str(lb)]) == 0
    assert capsys.readouterr().out.strip() == f"report: {lb / 'index.html'}"
    page = lb / "index.html"
    html = page.read_text()
    # every leaderboard linked (its page, or its Markdown when it has none)
    (boards,) = tables(page, "boards")
    links = re.findall(r'<a href="([^"#]+)">', html)
    assert "fixture/index.html" in links and "across/leaderboard.md" in links
    assert {c["attrs"]["data-board"] for c in boards["td"] + boards["th"] if "data-board" in c["attrs"]} <= {"fixture", "across"}
    assert [t["text"].split(" (")[0] for t in boards["th"] if t["attrs"].get("scope") == "row"] == \
        ["Across board", "Fixture board"]
    # every run of every leaderboard in one table, with the leaderboard's rank and Score
    (runs,) = tables(page, "runs-index")
    rows = re.findall(r'<tr data-editor="([^"]+)" data-model="([^"]+)" data-board="([^"]+)" data-tasks="([^"]*)"', html)
    n = sum(len(g["rows"]) for b in ("fixture", "across") for g in doc_of(lb / b)["groups"])
    assert len(rows) == n == 5 + 6
    assert {(e, m) for e, m, b, _ in rows if b == "across"} >= {("rome", "gemma3-270m"), ("rome", "smollm2-135m")}
    rome = next(r for r in doc_of(lb / "fixture")["groups"][0]["rows"] if r["editor"] == "rome")
    assert f'{rome["score"]["value"]:.1f}' in html
    # filters for editor, task, model and leaderboard; column toggles; their state in the URL fragment
    for name in ("editor", "task", "model", "board"):
        assert f'<select name="{name}">' in html
    assert '<option value="instructedit">' in html and '<option value="zsre">' in html
    assert '<option value="gemma3-270m">' in html
    assert re.search(r'<fieldset class="toggles" id="columns">.*value="ci".*value="task-zsre"', html, re.S)
    assert "history.replaceState" in html and "location.hash" in html and '"hide="' in html
    # the across-models view is a section of the page, and each editor's paper is linked
    assert 'id="across-models"' in html and "Kendall&#39;s tau-b" in html
    assert 'href="https://arxiv.org/abs/2202.05262"' in html and 'id="paper-rome"' in html
    # a folder without any leaderboard is an error, as is asking for nothing
    with pytest.raises(BenchError, match="no leaderboard found"):
        build_index(tmp_path / "gemma")
    assert main(["report"]) == 2
