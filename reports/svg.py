"""Inline SVG charts of a group: the composite Score per task, grouped bars of the post-edit
scores, a reliability versus locality scatter, and (sequential groups) scores as edits
accumulate. Each run has its colour and its marker shape (two cues, reports.runs); the no-edit
run is drawn as a dashed reference line, never as a bar. Every chart carries a <title> and a
<desc>; every data string passes through markupsafe.escape."""

from __future__ import annotations

import math
from itertools import count

from markupsafe import Markup, escape

from reports.runs import REFERENCE_COLOR, Run
from reports.groups import COMPOSITES, Group

_ids = count(1)


def _f(x: float) -> str:
    """A coordinate with one decimal (keeps the markup short)."""
    return f"{x:.1f}"


def _text_w(s: str, px: float = 6.6) -> float:
    """Approximate width of a label at the charts' font size (no font metrics offline)."""
    return len(s) * px


def marker(shape: str, x: float, y: float, r: float, fill: str, stroke: str = "#222", sw: float = 1.0,
           tip: str | None = None) -> str:
    """An SVG marker of `shape` centred on (x, y) with radius about `r`."""
    t = f"<title>{escape(tip)}</title>" if tip else ""
    attrs = f'fill="{fill}" stroke="{stroke}" stroke-width="{sw}"'
    if shape == "square":
        s = r * 0.9
        return f'<rect x="{_f(x - s)}" y="{_f(y - s)}" width="{_f(2 * s)}" height="{_f(2 * s)}" {attrs}>{t}</rect>'
    if shape in ("triangle", "triangle-down", "diamond", "hexagon", "pentagon", "star", "plus"):
        if shape == "pentagon":
            pts = [(1.1 * math.cos(a), 1.1 * math.sin(a)) for a in (2 * math.pi / 5 * k - math.pi / 2 for k in range(5))]
        elif shape == "star":
            pts = [((1.3 if k % 2 == 0 else 0.55) * math.cos(a), (1.3 if k % 2 == 0 else 0.55) * math.sin(a))
                   for k, a in enumerate(math.pi / 5 * k - math.pi / 2 for k in range(10))]
        elif shape == "plus":
            w = 0.42
            pts = [(-w, -1.15), (w, -1.15), (w, -w), (1.15, -w), (1.15, w), (w, w), (w, 1.15), (-w, 1.15),
                   (-w, w), (-1.15, w), (-1.15, -w), (-w, -w)]
        elif shape == "triangle":
            pts = [(0, -1.2), (1.1, 0.75), (-1.1, 0.75)]
        elif shape == "triangle-down":
            pts = [(0, 1.2), (1.1, -0.75), (-1.1, -0.75)]
        elif shape == "diamond":
            pts = [(0, -1.25), (1.1, 0), (0, 1.25), (-1.1, 0)]
        else:
            pts = [(math.cos(a), math.sin(a)) for a in (math.pi / 3 * k + math.pi / 6 for k in range(6))]
        d = " ".join(f"{_f(x + px * r)},{_f(y + py * r)}" for px, py in pts)
        return f'<polygon points="{d}" {attrs}>{t}</polygon>'
    if shape == "cross":
        s = r * 0.85
        return (f'<path d="M{_f(x - s)} {_f(y - s)}L{_f(x + s)} {_f(y + s)}M{_f(x - s)} {_f(y + s)}L{_f(x + s)} {_f(y - s)}" '
                f'stroke="{stroke if fill == "none" else fill}" stroke-width="2.2" fill="none">{t}</path>')
    return f'<circle cx="{_f(x)}" cy="{_f(y)}" r="{_f(r)}" {attrs}>{t}</circle>'


def _open(width: float, height: float, title: str, desc: str, cls: str = "chart") -> list[str]:
    i = next(_ids)
    return [f'<svg xmlns="http://www.w3.org/2000/svg" class="{cls}" width="{_f(width)}" height="{_f(height)}" '
            f'viewBox="0 0 {_f(width)} {_f(height)}" role="img" aria-labelledby="svgt{i} svgd{i}">'
            f'<title id="svgt{i}">{escape(title)}</title><desc id="svgd{i}">{escape(desc)}</desc>']


def _dash_attr(r: Run) -> str:
    return f' stroke-dasharray="{r.dash}"' if r.dash else ""


def _legend(runs: list[Run], x0: float, y0: float, width: float, ref_line: bool = True,
            lines: bool = False) -> tuple[list[str], float]:
    """Legend entries (marker + label; with `lines` a line sample in the run's line style behind
    the marker; the reference as a dashed line) wrapped to `width`; also returns the y below
    the last line."""
    parts, x, y = [], x0, y0
    sample = 26 if lines else 14
    for r in runs:
        label = r.label + (" (no edit: reference)" if r.reference else "")
        w = sample + 6 + _text_w(label) + 16
        if x + w > x0 + width and x > x0:
            x, y = x0, y + 18
        if r.reference and ref_line:
            parts.append(f'<path d="M{_f(x)} {_f(y - 4)}H{_f(x + 14)}" class="ref"/>')
        else:
            if lines:
                color = REFERENCE_COLOR if r.reference else r.color
                parts.append(f'<path d="M{_f(x)} {_f(y - 4)}H{_f(x + sample)}" stroke="{color}" stroke-width="1.8" '
                             f'fill="none"{_dash_attr(r)}/>')
            parts.append(marker(r.marker, x + sample / 2, y - 4, 5, r.color))
        parts.append(f'<text x="{_f(x + sample + 6)}" y="{_f(y)}">{escape(label)}</text>')
        x += w
    return parts, y + 18


def look_sample(r: Run) -> Markup:
    """A small inline SVG of the run's look (line style and marker), for the HTML legend."""
    color = REFERENCE_COLOR if r.reference else r.color
    return Markup(f'<svg class="look" width="34" height="14" viewBox="0 0 34 14" aria-hidden="true" focusable="false">'
                  f'<path d="M1 7H33" stroke="{color}" stroke-width="2" fill="none"{_dash_attr(r)}/>'
                  f'{marker(r.marker, 17, 7, 5, color)}</svg>')


def _bar_chart(g: Group, cats: list[tuple[str, str, dict]], title: str, desc: str, ylabel: str,
               cls: str = "chart") -> Markup:
    """Grouped bars: one group per category (top label, bottom label, {run slug: cell}), one bar
    per competing run with its 95% interval and its marker on top; the reference as a dashed
    line across the category."""
    runs = [r for r in g.runs if not r.reference]
    refs = [r for r in g.runs if r.reference]
    if not cats or not runs:
        return Markup("")
    bw = 16 if len(runs) <= 4 else 12
    gap = 22
    left, right, top_pad, plot_h = 46, 16, 14, 220
    # wide enough for the category's label (one run's bars are narrower than "W-Score")
    cat_w = max(len(runs) * bw + gap, max(_text_w(lower) for _, lower, _ in cats) + 8)
    width = max(340, left + right + len(cats) * cat_w)
    legend, legend_bottom = _legend(runs + refs, left, 16, width - left - right)
    top = legend_bottom + top_pad
    height = top + plot_h + 52

    def y(v: float) -> float:
        return top + plot_h * (1 - max(0.0, min(100.0, v)) / 100)

    p = _open(width, height, title, desc, cls)
    p += legend
    for v in (0, 25, 50, 75, 100):
        p.append(f'<line x1="{left}" x2="{width - right}" y1="{_f(y(v))}" y2="{_f(y(v))}" class="grid"/>'
                 f'<text x="{left - 6}" y="{_f(y(v) + 4)}" text-anchor="end">{v}</text>')
    p.append(f'<text x="12" y="{_f(top + plot_h / 2)}" transform="rotate(-90 12 {_f(top + plot_h / 2)})" '
             f'text-anchor="middle">{escape(ylabel)}</text>')
    spans: dict[str, list[float]] = {}
    for ci, (upper, lower, cells) in enumerate(cats):
        x0 = left + (cat_w - len(runs) * bw) / 2 + ci * cat_w
        for ri, r in enumerate(runs):
            s = cells.get(r.slug)
            if s is None or s.get("post") is None:
                continue
            bx = x0 + ri * bw
            yy = y(s["post"])
            tip = (f"{r.label} · {upper} · {lower}: {s['post']:.1f}"
                   + (f" [{s['lo']:.1f}, {s['hi']:.1f}]" if s.get("lo") is not None and s.get("hi") is not None else "")
                   + (f" n={s['n']}" if s.get("n") is not None else ""))
            outline = f' stroke="#222" stroke-width="1"{_dash_attr(r)}' if r.variant else ""
            p.append(f'<rect x="{_f(bx)}" y="{_f(yy)}" width="{bw - 2}" height="{_f(top + plot_h - yy)}" '
                     f'fill="{r.color}"{outline}><title>{escape(tip)}</title></rect>')
            cx = bx + (bw - 2) / 2
            if s.get("lo") is not None and s.get("hi") is not None:
                y1, y2 = y(s["lo"]), y(s["hi"])
                p.append(f'<path class="err" d="M{_f(cx)} {_f(y1)}V{_f(y2)}M{_f(cx - 3)} {_f(y1)}H{_f(cx + 3)}'
                         f'M{_f(cx - 3)} {_f(y2)}H{_f(cx + 3)}"/>')
            p.append(marker(r.marker, cx, top + plot_h + 8, 3.6, r.color, sw=0.8))
        for r in refs:
            s = cells.get(r.slug)
            if s is not None and s.get("post") is not None:
                yy = y(s["post"])
                tip = f"{r.label} (no edit, reference) · {upper} · {lower}: {s['post']:.1f}"
                p.append(f'<path class="ref" d="M{_f(x0 - 4)} {_f(yy)}H{_f(x0 + len(runs) * bw + 2)}">'
                         f'<title>{escape(tip)}</title></path>')
        mid = x0 + (len(runs) * bw - 2) / 2
        p.append(f'<text x="{_f(mid)}" y="{_f(top + plot_h + 26)}" text-anchor="middle">{escape(lower)}</text>')
        span = spans.setdefault(upper, [x0, x0])
        span[1] = x0 + len(runs) * bw - 2
    for t, (a, b) in spans.items():
        if t:
            p.append(f'<line x1="{_f(a)}" x2="{_f(b)}" y1="{_f(top + plot_h + 32)}" y2="{_f(top + plot_h + 32)}" '
                     f'class="axis"/><text x="{_f((a + b) / 2)}" y="{_f(top + plot_h + 46)}" text-anchor="middle" '
                     f'class="task">{escape(t)}</text>')
    p.append(f'<line x1="{left}" x2="{width - right}" y1="{_f(top + plot_h)}" y2="{_f(top + plot_h)}" class="axis"/>')
    p.append("</svg>")
    return Markup("".join(p))


def svg_scores(g: Group, ov: list[dict]) -> Markup:
    """The ranking composite per task and its mean over tasks, with 95% intervals."""
    if g.rank_key is None:
        return Markup("")
    label = COMPOSITES[g.rank_key][0]
    cats = []
    for t in g.rank_tasks:
        cats.append(("", t, {r.slug: g.composite.get((r.slug, t, g.rank_key)) for r in g.runs}))
    overall = {row["run"].slug: ({"post": row["overall"]["value"], "lo": row["overall"]["lo"],
                                  "hi": row["overall"]["hi"], "n": None} if row["overall"] else None) for row in ov}
    cats.append(("", "mean", overall))
    return _bar_chart(g, cats, f"{label} per task", f"{label} (post-edit, %) of each run per task and its mean over "
                      "tasks, with 95% bootstrap intervals; the dashed line is the no-edit reference.",
                      f"{label} %")


def svg_bars(g: Group) -> Markup:
    """Grouped bars of every percent column (task, metric), error bars = 95% CI."""
    cols = [c for c in g.columns if c.scale == 100]
    cats = [(c.task, c.abbr, {r.slug: g.cell(r, c) for r in g.runs}) for c in cols]
    return _bar_chart(g, cats, "Post-edit scores per task and metric",
                      "Post-edit percentages of each run per task and metric with 95% bootstrap intervals; "
                      "the dashed line is the no-edit reference.", "post-edit %", cls="chart wide")


def svg_scatter(g: Group) -> Markup:
    """Reliability (x) versus locality (y): a filled marker per run (mean over tasks) and a small
    hollow one per run and task; the no-edit run as a grey cross."""
    pts = []  # (run, task or None, rel, loc)
    for r in g.runs:
        rels, locs = [], []
        for t in r.tasks:
            a, b = r.stat(t, "reliability"), r.stat(t, "locality")
            if a and b and a["post"] is not None and b["post"] is not None:
                pts.append((r, t, a["post"], b["post"]))
                rels.append(a["post"])
                locs.append(b["post"])
        if rels:
            pts.append((r, None, sum(rels) / len(rels), sum(locs) / len(locs)))
    if not pts:
        return Markup('<p class="muted">No run has both reliability and locality.</p>')

    def axis(vals):  # lower bound and step giving round tick values up to 100
        lo = min(min(vals), 95.0)
        step = 5 if lo >= 75 else 10 if lo >= 40 else 20
        return math.floor(lo / step) * step, step

    (lo_x, step_x), (lo_y, step_y) = axis([p[2] for p in pts]), axis([p[3] for p in pts])
    size, left, top, right = 300, 50, 16, 16
    width = left + size + right
    legend, legend_bottom = _legend(g.runs, 12, top + size + 58, width - 24, ref_line=False)
    height = legend_bottom + 30

    def sx(v):
        return left + size * (v - lo_x) / (100 - lo_x)

    def sy(v):
        return top + size * (1 - (v - lo_y) / (100 - lo_y))

    p = _open(width, height, "Reliability versus locality",
              "Post-edit reliability (x) against locality (y) per run: a filled marker for the mean over tasks, "
              "a small hollow marker per task. Up and to the right is better. The no-edit reference is a grey cross.")
    for vx in range(int(lo_x), 101, step_x):
        p.append(f'<line x1="{_f(sx(vx))}" x2="{_f(sx(vx))}" y1="{top}" y2="{top + size}" class="grid"/>'
                 f'<text x="{_f(sx(vx))}" y="{top + size + 16}" text-anchor="middle">{vx}</text>')
    for vy in range(int(lo_y), 101, step_y):
        p.append(f'<line x1="{left}" x2="{left + size}" y1="{_f(sy(vy))}" y2="{_f(sy(vy))}" class="grid"/>'
                 f'<text x="{left - 6}" y="{_f(sy(vy) + 4)}" text-anchor="end">{vy}</text>')
    p.append(f'<rect x="{left}" y="{top}" width="{size}" height="{size}" class="frame"/>')
    p.append(f'<text x="{left + size / 2}" y="{top + size + 34}" text-anchor="middle">reliability % (post)</text>')
    p.append(f'<text x="14" y="{top + size / 2}" transform="rotate(-90 14 {top + size / 2})" '
             f'text-anchor="middle">locality % (post)</text>')
    p.append(f'<text x="{left + size - 6}" y="{top + 14}" text-anchor="end" class="muted">better ↗</text>')
    for r, t, a, b in sorted(pts, key=lambda q: q[1] is None):  # means drawn last, on top
        tip = f"{r.label} · {t or 'mean over tasks'}: reliability {a:.1f}, locality {b:.1f}"
        color = REFERENCE_COLOR if r.reference else r.color
        if t is None:
            p.append(marker(r.marker, sx(a), sy(b), 6.5, color, tip=tip))
        else:
            p.append(marker(r.marker, sx(a), sy(b), 3.8, "none", stroke=color, sw=1.5, tip=tip))
    p += legend
    p.append(marker("circle", 19, legend_bottom + 4, 3.8, "none", stroke="#555", sw=1.5)
             + f'<text x="30" y="{_f(legend_bottom + 8)}" class="muted">hollow: one task · filled: mean over tasks</text>')
    p.append("</svg>")
    return Markup("".join(p))


def svg_curves(g: Group, curves: dict) -> Markup:
    """Sequential runs (reports.sequential): one small titled chart per task and metric (the
    Score first), then one per regression metric (its own scale). Each run's curve starts at its
    first checkpoint, with its 95% interval as a band; its pre-edit value (the unedited model)
    is a hollow marker of its own at 0 edits, not joined to the curve (no edit happened between
    them as a line would suggest)."""
    charts = []
    for s in curves["series"]:
        pts = [(r, p, pre) for r, p, pre in s["runs"] if p]
        if not pts:
            continue
        xs = sorted({n for _, p, _ in pts for n, *_ in p})
        xmax = max(xs) or 1
        values = [v for _, p, pre in pts for _, v, lo, hi in p for v in (v, lo, hi, pre) if v is not None]
        if s["percent"]:
            lo_v, hi_v, ticks = 0.0, 100.0, [0, 50, 100]
        else:
            lo_v, hi_v = min(values), max(values)
            pad = (hi_v - lo_v) * 0.1 or abs(hi_v) * 0.05 or 1.0
            lo_v, hi_v = lo_v - pad, hi_v + pad
            ticks = [lo_v + (hi_v - lo_v) * k / 2 for k in range(3)]
        size_w, size_h, left, top = 300, 170, 52, 30
        legend, legend_bottom = _legend([r for r, _, _ in pts], 12, top + size_h + 50, size_w + 30, ref_line=False,
                                        lines=True)
        width, height = left + size_w + 16, legend_bottom + 26
        title = (f"{s['task']}: {s['title']}" + (" (%)" if s["percent"] else "")
                 + (" (lm-eval)" if s["regression"] else ""))
        what = (f"{s['title']} (%) on {s['task']}: of every edit made so far (locality: on the run's fixed "
                f"probes), after each number of edits, with its 95% interval as a band"
                if s["percent"] else f"lm-eval {s['task']} {s['title']} of the edited model after each number of edits")
        p = _open(width, height, f"{s['task']} {s['title']} as edits accumulate",
                  f"{what}; the hollow marker at 0 edits is the unedited model's value.")
        p.append(f'<text x="{left}" y="16" font-weight="600">{escape(title)}</text>')

        def sx(n):
            return left + size_w * n / xmax

        def sy(v):
            return top + size_h * (1 - (max(lo_v, min(hi_v, v)) - lo_v) / (hi_v - lo_v))

        for v in ticks:
            label = f"{v:.0f}" if s["percent"] else f"{v:.3g}"
            p.append(f'<line x1="{left}" x2="{left + size_w}" y1="{_f(sy(v))}" y2="{_f(sy(v))}" class="grid"/>'
                     f'<text x="{left - 6}" y="{_f(sy(v) + 4)}" text-anchor="end">{label}</text>')
        shown = [0] + (xs if len(xs) <= 6 else [xs[0]] + xs[len(xs) // 2: len(xs) // 2 + 1] + [xs[-1]])
        for n in dict.fromkeys(shown):
            p.append(f'<text x="{_f(sx(n))}" y="{top + size_h + 16}" text-anchor="middle">{n}</text>')
        p.append(f'<text x="{left + size_w / 2}" y="{top + size_h + 32}" text-anchor="middle">edits made</text>')
        for r, series, _ in pts:  # bands first, under every line
            band = [(n, lo, hi) for n, _, lo, hi in series if lo is not None and hi is not None]
            if len(band) >= 2:
                color = REFERENCE_COLOR if r.reference else r.color
                d = ("M" + "L".join(f"{_f(sx(n))} {_f(sy(hi))}" for n, _, hi in band)
                     + "L" + "L".join(f"{_f(sx(n))} {_f(sy(lo))}" for n, lo, _ in reversed(band)) + "Z")
                p.append(f'<path class="band" d="{d}" fill="{color}" fill-opacity="0.14" stroke="none"/>')
        for r, series, pre in pts:
            color = REFERENCE_COLOR if r.reference else r.color
            if len(series) > 1:
                d = "M" + "L".join(f"{_f(sx(n))} {_f(sy(v))}" for n, v, _, _ in series)
                p.append(f'<path d="{d}" fill="none" stroke="{color}" stroke-width="1.8"{_dash_attr(r)}/>')
            for n, v, lo, hi in series:
                value = f"{v:.1f}" if s["percent"] else f"{v:.4g}"
                ci = f" [{lo:.1f}, {hi:.1f}]" if lo is not None and hi is not None else ""
                p.append(marker(r.marker, sx(n), sy(v), 3.5, color, tip=f"{r.label}: {value}{ci} after {n} edits"))
            if pre is not None:
                value = f"{pre:.1f}" if s["percent"] else f"{pre:.4g}"
                p.append(marker(r.marker, sx(0), sy(pre), 3.5, "none", stroke=color, sw=1.5,
                                tip=f"{r.label}: {value} before editing (the unedited model)"))
        p += legend
        p.append(marker("circle", 19, legend_bottom + 4, 3.5, "none", stroke="#555", sw=1.5)
                 + f'<text x="30" y="{_f(legend_bottom + 8)}" class="muted">hollow at 0: before editing · '
                 f'band: 95% interval</text>')
        p.append("</svg>")
        charts.append("".join(p))
    return Markup("".join(charts))
