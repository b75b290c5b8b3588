"""Edit directions (`bench analyze directions`, docs/directions.md): where the edits of each task
point, as a set of vectors (one per edit: a raw fine-tuning gradient or an editor network's
update, flattened over the edited weights), and how well the tasks separate.

Every vector is scaled to unit length (a direction), then

* projected on the set's first two principal components (scikit-learn's PCA, fitted on every
  edit of the set, held-out task included; each component's sign fixed so that its largest
  loading is positive), which the figure draws;
* per-task separation: the silhouette of the training tasks' edits labelled by task, on the two
  projected coordinates (Euclidean: what the figure shows) and on the whole directions (cosine
  distance); per task its mean silhouette and its concentration (the length of the mean of its
  unit directions: 1 when all point the same way, about 0 when they scatter);
* the cosine between task-mean directions (the mean of a task's unit directions);
* per held-out task: for each of its edits the training task whose mean direction is closest
  (cosine), as fractions; its mean direction's cosine to each training task's; its silhouette
  when it is a cluster of its own beside the training tasks.

The files: directions.json (every number), directions.csv (every edit's coordinates),
summary.csv (one line per set), directions.svg (the scatter, one panel per set).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Sequence

import numpy as np
from markupsafe import escape
from sklearn.decomposition import PCA
from sklearn.metrics import silhouette_samples, silhouette_score

from bench.core.io import write_json_atomic
from reports.svg import marker

DIRECTIONS_FORMAT = "instructedit-bench/directions/v1"
# Okabe & Ito's colour-blind-safe palette (black last), one colour per task, with a marker shape
# of its own (two cues); the held-out task's markers are hollow
TASK_COLORS = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#D55E00", "#56B4E9", "#000000")
TASK_MARKERS = ("circle", "square", "triangle", "diamond", "triangle-down", "hexagon", "pentagon")


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Each row scaled to unit length (a zero row stays zero)."""
    x = np.asarray(x, dtype=float)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def pca_coordinates(x: np.ndarray, n_components: int = 2) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """(coordinates (n, k), components (k, dim), explained variance ratios) of the rows of `x`
    on their first k principal components, each component's sign chosen so that its largest
    loading (in absolute value; the first of equals) is positive. Components beyond the rank
    of the centred rows are zero."""
    n, dim = x.shape
    k = max(1, min(n_components, n, dim))
    pca = PCA(n_components=k, svd_solver="full").fit(x)
    comps = pca.components_.copy()
    for i, c in enumerate(comps):
        if c[int(np.argmax(np.abs(c)))] < 0:
            comps[i] = -c
    coords = (x - pca.mean_) @ comps.T
    explained = [float(v) for v in np.nan_to_num(pca.explained_variance_ratio_)]
    if k < n_components:  # fewer points or dimensions than components: pad with zeros
        coords = np.hstack([coords, np.zeros((n, n_components - k))])
        comps = np.vstack([comps, np.zeros((n_components - k, dim))])
        explained += [0.0] * (n_components - k)
    return coords, comps, explained


def _silhouette(x: np.ndarray, labels: np.ndarray, metric: str = "euclidean") -> float | None:
    """The mean silhouette, or None where it is undefined (fewer than two labels, or as many
    labels as points)."""
    n_labels = len(set(labels.tolist()))
    if n_labels < 2 or n_labels >= len(labels):
        return None
    return float(silhouette_score(x, labels, metric=metric))


def _per_label_silhouette(x: np.ndarray, labels: np.ndarray, metric: str = "euclidean") -> dict[str, float]:
    n_labels = len(set(labels.tolist()))
    if n_labels < 2 or n_labels >= len(labels):
        return {}
    s = silhouette_samples(x, labels, metric=metric)
    return {str(t): float(s[labels == t].mean()) for t in dict.fromkeys(labels.tolist())}


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return float(a @ b / (na * nb)) if na > 0 and nb > 0 else 0.0


def analyze_set(vectors: np.ndarray, tasks: Sequence[str], held_out: Sequence[str] = ()) -> dict:
    """The numbers of one set of edit vectors (rows; `tasks[i]` the task of row i; the tasks of
    `held_out` are the checkpoint's held-out ones) and its 2-D coordinates (under 'coords')."""
    x = unit_rows(vectors)
    labels = np.array([str(t) for t in tasks])
    order = list(dict.fromkeys(labels.tolist()))
    held = [t for t in order if t in set(held_out)]
    trained = [t for t in order if t not in set(held_out)]
    coords, _, explained = pca_coordinates(x, 2)
    train_mask = np.isin(labels, trained)
    means = {t: x[labels == t].mean(axis=0) for t in order}
    per_2d = _per_label_silhouette(coords, labels)
    per_cos = _per_label_silhouette(x, labels, "cosine")
    per_task = {t: {"n": int((labels == t).sum()), "held_out": t in held,
                    "concentration": float(np.linalg.norm(means[t])),
                    "centroid_2d": [float(v) for v in coords[labels == t].mean(axis=0)],
                    "silhouette_2d_all": per_2d.get(t), "silhouette_cosine_all": per_cos.get(t)}
                for t in order}
    train_2d = _per_label_silhouette(coords[train_mask], labels[train_mask])
    train_cos = _per_label_silhouette(x[train_mask], labels[train_mask], "cosine")
    for t in trained:
        per_task[t].update(silhouette_2d=train_2d.get(t), silhouette_cosine=train_cos.get(t))
    placement = {}
    for h in held:
        rows = x[labels == h]
        sims = np.array([[_cos(r, means[t]) for t in trained] for r in rows]) if trained else np.zeros((len(rows), 0))
        nearest = [trained[i] for i in sims.argmax(axis=1)] if trained else []
        placement[h] = {
            "nearest": {t: nearest.count(t) / len(nearest) for t in trained} if nearest else {},
            "nearest_mean": max(trained, key=lambda t: _cos(means[h], means[t])) if trained else None,
            "mean_cosine": {t: _cos(means[h], means[t]) for t in trained},
            "silhouette_2d": per_2d.get(h), "silhouette_cosine": per_cos.get(h)}
    return {"n": len(labels), "tasks": order, "held_out": held, "train_tasks": trained,
            "explained_variance": explained,
            "silhouette_2d": _silhouette(coords[train_mask], labels[train_mask]),
            "silhouette_cosine": _silhouette(x[train_mask], labels[train_mask], "cosine"),
            "silhouette_2d_all": _silhouette(coords, labels),
            "per_task": per_task,
            "mean_cosine": {a: {b: _cos(means[a], means[b]) for b in order} for a in order},
            "placement": placement, "coords": coords}


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def set_title(s: dict) -> str:
    """'gradient · instruction (seen)', 'instructedit update · no instruction'."""
    cond = {"raw": "no instruction", "seen": "instruction (seen)", "unseen": "instruction (unseen)"}
    who = "fine-tuning gradient" if s["kind"] == "gradient" else f"{s['editor']} update"
    return f"{who} · {cond.get(s['condition'], s['condition'])}"


def _r(x, nd: int = 4):
    if isinstance(x, float):
        return None if math.isnan(x) else round(x, nd)
    if isinstance(x, dict):
        return {k: _r(v, nd) for k, v in x.items()}
    if isinstance(x, list):
        return [_r(v, nd) for v in x]
    return x


def write_directions(out_dir: Path, meta: dict, sets: list[dict]) -> list[Path]:
    """directions.json, directions.csv, summary.csv and directions.svg in `out_dir`. `sets`:
    dicts with 'editor' (None for the gradient), 'kind', 'condition', 'result' (analyze_set's)
    and 'points' ([{'task', 'case_id'}] in row order)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {"format": DIRECTIONS_FORMAT, **meta, "sets": []}
    for s in sets:
        res = {k: v for k, v in s["result"].items() if k != "coords"}
        doc["sets"].append({"editor": s["editor"], "kind": s["kind"], "condition": s["condition"],
                            "title": set_title(s), **_r(res)})
    write_json_atomic(out_dir / "directions.json", doc)
    with open(out_dir / "directions.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["editor", "kind", "condition", "task", "held_out", "case_id", "pc1", "pc2"])
        for s in sets:
            held = set(s["result"]["held_out"])
            for p, (c1, c2) in zip(s["points"], s["result"]["coords"]):
                w.writerow([s["editor"] or "", s["kind"], s["condition"], p["task"], int(p["task"] in held),
                            p["case_id"], f"{c1:.6f}", f"{c2:.6f}"])
    with open(out_dir / "summary.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["editor", "kind", "condition", "n", "silhouette_2d", "silhouette_cosine", "pc1_var", "pc2_var",
                    "held_out", "held_out_nearest_mean", "held_out_nearest_fractions", "held_out_silhouette_2d",
                    "task_mean_cosines"])
        for s in sets:
            r = s["result"]

            def num(v):
                return "" if v is None else f"{v:.4f}"

            pl = [(h, r["placement"][h]) for h in r["held_out"]]
            cos = "; ".join(f"{a}~{b} {r['mean_cosine'][a][b]:.3f}" for i, a in enumerate(r["tasks"])
                            for b in r["tasks"][i + 1:])
            w.writerow([s["editor"] or "", s["kind"], s["condition"], r["n"], num(r["silhouette_2d"]),
                        num(r["silhouette_cosine"]), num(r["explained_variance"][0]), num(r["explained_variance"][1]),
                        ",".join(r["held_out"]), ",".join(str(p["nearest_mean"]) for _, p in pl),
                        "; ".join(f"{h}: " + ", ".join(f"{t} {v:.2f}" for t, v in p["nearest"].items()) for h, p in pl),
                        "; ".join(num(p["silhouette_2d"]) for _, p in pl), cos])
    (out_dir / "directions.svg").write_text(svg_directions(sets, meta), encoding="utf-8")
    return [out_dir / n for n in ("directions.json", "directions.csv", "summary.csv", "directions.svg")]


def svg_directions(sets: list[dict], meta: dict) -> str:
    """One scatter panel per set (rows: the gradient, then each editor's update; columns: the
    conditions), every edit a marker coloured and shaped by its task, the held-out task's
    hollow; each panel titled with its silhouette."""
    tasks = list(dict.fromkeys(t for s in sets for t in s["result"]["tasks"]))
    style = {t: (TASK_COLORS[i % len(TASK_COLORS)], TASK_MARKERS[i % len(TASK_MARKERS)]) for i, t in enumerate(tasks)}
    held = set(t for s in sets for t in s["result"]["held_out"])
    rows = list(dict.fromkeys((s["kind"], s["editor"]) for s in sets))
    conds = list(dict.fromkeys(s["condition"] for s in sets))
    pw, ph, gap, top, left = 250, 210, 34, 56, 16
    width = left + len(conds) * (pw + gap)
    height = top + len(rows) * (ph + gap + 22) + 10
    title = "Edit directions: PCA of the unit directions, per task"
    desc = ("One panel per set of edit vectors (rows: the fine-tuning gradient and each editor's update; columns: "
            "without instruction and with a seen or unseen instruction). Each marker is one edit on the set's "
            "first two principal components, coloured and shaped by its task; hollow markers: the held-out task. "
            "s2 = silhouette of the training tasks on the two components.")
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
           f'role="img" aria-labelledby="dt dd" font-family="sans-serif" font-size="11">'
           f'<title id="dt">{escape(title)}</title><desc id="dd">{escape(desc)}</desc>'
           f'<rect width="{width}" height="{height}" fill="#fff"/>']
    x = left
    for t in tasks:  # legend
        color, shape = style[t]
        hollow = t in held
        out.append(marker(shape, x + 6, 18, 5, "none" if hollow else color, stroke=color if hollow else "#222",
                          sw=1.6 if hollow else 0.8))
        label = f"{t} (held out)" if hollow else t
        out.append(f'<text x="{x + 16}" y="22">{escape(label)}</text>')
        x += 30 + 7 * len(label)
    model = meta.get("model") or ""
    out.append(f'<text x="{left}" y="40" fill="#555">{escape(str(model))} · {meta.get("n_per_task", "")} edits per '
               f'task · seed {meta.get("seed", "")}</text>')
    for ri, (kind, editor) in enumerate(rows):
        for ci, cond in enumerate(conds):
            s = next((s for s in sets if s["kind"] == kind and s["editor"] == editor and s["condition"] == cond), None)
            if s is None:
                continue
            r = s["result"]
            x0, y0 = left + ci * (pw + gap), top + ri * (ph + gap + 22) + 22
            sil = r["silhouette_2d"]
            head = set_title(s) + ("" if sil is None else f" · s2 {sil:.2f}")
            out.append(f'<text x="{x0}" y="{y0 - 6}" font-weight="600">{escape(head)}</text>')
            out.append(f'<rect x="{x0}" y="{y0}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>')
            c = np.asarray(r["coords"], dtype=float)
            span = [max(float(np.abs(c[:, j]).max()), 1e-9) * 1.1 for j in (0, 1)] if len(c) else [1.0, 1.0]

            def sx(v, x0=x0, span=span):
                return x0 + pw / 2 + (pw / 2) * v / span[0]

            def sy(v, y0=y0, span=span):
                return y0 + ph / 2 - (ph / 2) * v / span[1]

            out.append(f'<line x1="{x0}" x2="{x0 + pw}" y1="{sy(0):.1f}" y2="{sy(0):.1f}" stroke="#ddd"/>'
                       f'<line x1="{sx(0):.1f}" x2="{sx(0):.1f}" y1="{y0}" y2="{y0 + ph}" stroke="#ddd"/>')
            ev = r["explained_variance"]
            out.append(f'<text x="{x0 + pw}" y="{y0 + ph + 13}" text-anchor="end" fill="#555">PC1 {100 * ev[0]:.0f}% · '
                       f'PC2 {100 * ev[1]:.0f}% of variance</text>')
            for p, (v1, v2) in zip(s["points"], c):
                color, shape = style[p["task"]]
                hollow = p["task"] in held
                tip = f"{p['task']} {p['case_id']}: ({v1:.3f}, {v2:.3f})"
                out.append(marker(shape, sx(v1), sy(v2), 3.6, "none" if hollow else color,
                                  stroke=color if hollow else "#222", sw=1.4 if hollow else 0.5, tip=tip))
    out.append("</svg>")
    return "".join(out)
