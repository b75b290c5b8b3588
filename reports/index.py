"""The index of a folder of leaderboards (`bench report --index leaderboards/`): one page,
`index.html` in that folder, that links every leaderboard found below it (a folder with a
`leaderboard.json`), lists every run of every leaderboard in one table with filters by editor,
task, model and leaderboard and column toggles (their state kept in the URL fragment, so a
filtered view can be linked), shows the across-models view of each leaderboard that has one, and
links each editor's paper.

It reads only the leaderboards' `leaderboard.json` (no run directories), so it can be made over
committed leaderboards; a leaderboard written before a field existed shows "–" for it.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench.core.errors import BenchError
from reports.looks import REFERENCE_EDITOR

INDEX_FILE = "index.html"
LEADERBOARD_JSON = "leaderboard.json"
# editor -> (paper, link): what a reader opens to learn what the editor does
EDITOR_PAPERS = {
    "ft": ("Zhu et al. 2020, Modifying Memories in Transformer Models", "https://arxiv.org/abs/2012.00363"),
    "rome": ("Meng et al. 2022, Locating and Editing Factual Associations in GPT (ROME)",
             "https://arxiv.org/abs/2202.05262"),
    "memit": ("Meng et al. 2023, Mass-Editing Memory in a Transformer (MEMIT)", "https://arxiv.org/abs/2210.07229"),
    "alphaedit": ("Fang et al. 2025, AlphaEdit: Null-Space Constrained Knowledge Editing",
                  "https://arxiv.org/abs/2410.02355"),
    "mend": ("Mitchell et al. 2022, Fast Model Editing at Scale (MEND)", "https://arxiv.org/abs/2110.11309"),
    "instructedit": ("Zhang et al. 2024, InstructEdit: Instruction-based Knowledge Editing",
                     "https://arxiv.org/abs/2402.16123"),
    "ike": ("Zheng et al. 2023, Can We Edit Factual Knowledge by In-Context Learning? (IKE)",
            "https://arxiv.org/abs/2305.12740"),
    "lora": ("Hu et al. 2022, LoRA: Low-Rank Adaptation of Large Language Models", "https://arxiv.org/abs/2106.09685"),
    "grace": ("Hartvigsen et al. 2023, Aging with GRACE: Lifelong Model Editing with Discrete Key-Value Adaptors",
              "https://arxiv.org/abs/2211.11031"),
    "wise": ("Wang et al. 2024, WISE: Rethinking the Knowledge Memory for Lifelong Model Editing",
             "https://arxiv.org/abs/2405.14768"),
}


def find_leaderboards(root: Path) -> list[Path]:
    """The folders below `root` (at any depth, `root` itself excepted) that hold a
    leaderboard.json, in path order."""
    root = Path(root)
    return sorted(p.parent for p in root.rglob(LEADERBOARD_JSON) if p.parent != root)


def _get(d: Any, *keys: str) -> Any:
    for k in keys:
        d = d.get(k) if isinstance(d, dict) else None
    return d


def _leaderboard(root: Path, folder: Path) -> dict:
    """One leaderboard of the index: its title, files, groups and rows (plain data)."""
    path = folder / LEADERBOARD_JSON
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BenchError(f"{path}: not a readable leaderboard.json ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("groups"), list):
        raise BenchError(f"{path}: expected a leaderboard.json with a 'groups' list")
    rel = folder.relative_to(root).as_posix()
    files = [f for f in (INDEX_FILE, "leaderboard.md", LEADERBOARD_JSON, "leaderboard.csv", "checkpoints.csv")
             if (folder / f).is_file()]
    lb = {"name": rel, "title": str(doc.get("title") or rel), "files": files,
          "page": f"{rel}/{INDEX_FILE}" if INDEX_FILE in files else None,
          "cross_model": [x for x in doc.get("cross_model") or [] if isinstance(x, dict)],
          "matrix": isinstance(doc.get("holdout_matrix"), dict), "groups": [], "runs": []}
    for g in doc["groups"]:
        if not isinstance(g, dict):
            continue
        model, mode = str(_get(g, "model", "spec") or "?"), str(g.get("mode") or "single")
        tasks = [str(t.get("name")) for t in g.get("tasks") or [] if isinstance(t, dict)]
        key = g.get("ranking_composite") or "score"
        lb["groups"].append({"model": model, "mode": mode, "tasks": tasks, "heading": g.get("heading"),
                             "verdicts": [str(v) for v in g.get("verdicts") or []], "n_runs": len(g.get("rows") or [])})
        for row in g.get("rows") or []:
            if not isinstance(row, dict):
                continue
            score = row.get("score") if isinstance(row.get("score"), dict) else {}
            per_task = {t: _get(row, "tasks", t, key) for t in tasks}
            lb["runs"].append({
                "leaderboard": rel, "model": model, "mode": mode, "run": str(row.get("run")),
                "editor": str(row.get("editor")), "reference": bool(row.get("reference")) or row.get("editor") == REFERENCE_EDITOR,
                "rank": row.get("rank"), "tied": bool(row.get("tied")), "letters": row.get("letters") or "",
                "status": row.get("status") or "complete", "score": score.get("value"),
                "ci": score.get("ci") if isinstance(score.get("ci"), list) else [None, None],
                "tasks": {t: (c.get("post") if isinstance(c, dict) else None) for t, c in per_task.items()},
                "cases": _get(row, "cases", "finished"), "run_dir": row.get("run_dir"),
                "has_tasks": " ".join(t for t, v in per_task.items() if isinstance(v, dict)),
                "page": lb["page"] or f"{rel}/leaderboard.md"})
    return lb


def index_view(root: Path) -> dict:
    """What the index shows: every leaderboard below `root` and all their runs."""
    root = Path(root)
    if not root.is_dir():
        raise BenchError(f"{root}: not a folder of leaderboards")
    boards = [_leaderboard(root, f) for f in find_leaderboards(root)]
    if not boards:
        raise BenchError(f"{root}: no leaderboard found (a folder with a {LEADERBOARD_JSON})")
    k = 0
    for b in boards:  # an anchor per across-models view: the first is #across-models
        b["cross_ids"] = []
        for _ in b["cross_model"]:
            k += 1
            b["cross_ids"].append("across-models" if k == 1 else f"across-models-{k}")
    runs = [r for b in boards for r in b["runs"]]
    tasks = list(dict.fromkeys(t for b in boards for g in b["groups"] for t in g["tasks"]))
    editors = sorted({r["editor"] for r in runs})
    return {"boards": boards, "runs": runs, "tasks": tasks, "editors": editors,
            "models": sorted({r["model"] for r in runs}), "papers": {e: EDITOR_PAPERS[e] for e in editors
                                                                    if e in EDITOR_PAPERS}}


def build_index(root: Path, title: str | None = None) -> Path:
    """Write `root`/index.html over the leaderboards below `root` and return its path."""
    from reports.markdown import agreement_text, cross_model_cell  # late: not needed to read the leaderboards
    from reports.render import environment

    root = Path(root)
    view = index_view(root)
    page = environment().get_template("leaderboards.html.j2").render(
        title=title or "instructedit-bench leaderboards", view=view, agreement_text=agreement_text,
        cross_model_cell=cross_model_cell,
        generated=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    out = root / INDEX_FILE
    out.write_text(page, encoding="utf-8")
    return out
