"""Inline SVG charts of a group: grouped bars of the post-edit scores and a reliability
versus locality scatter. Every data string passes through markupsafe.escape."""

from __future__ import annotations

import math

from markupsafe import Markup, escape

from reports.runs import Run
from reports.views import METRIC_ABBR, Group


def _f(x: float) -> str:
    """A coordinate with one decimal (keeps the markup short)."""
    return f"{x:.1f}"


def _text_w(s: str, px: float = 6.6) -> float:
    """Approximate width of a label at the charts' font size (no font metrics offline)."""
    return len(s) * px


def _legend(runs: list[Run], x0: float, y0: float, width: float) -> tuple[list[str], float]:
    """Legend entries wrapped to `width`; also returns the y below the last line."""
    parts, x, y = [], x0, y0
    for r in runs:
        w = 16 + _text_w(r.label) + 18
        if x + w > x0 + width and x > x0:
            x, y = x0, y + 18
        parts.append(f'<rect x="{_f(x)}" y="{_f(y - 10)}" width="11" height="11" fill="{r.color}"/>'
                     f'<text x="{_f(x + 16)}" y="{_f(y)}">{escape(r.label)}</text>')
        x += w
    return parts, y + 18


def svg_bars(g: Group) -> Markup:
    """Grouped bars: one group per (task, metric), one bar per run, error bars = 95% CI."""
    runs, cols = g.runs, g.columns
    if not cols:
        return Markup("")
    bw = 14 if len(runs) <= 4 else 10
    gap = 18
    left, right, top_pad, plot_h = 46, 16, 10, 220
    cat_w = len(runs) * bw + gap
    width = max(360, left + right + len(cols) * cat_w)
    legend, legend_bottom = _legend(runs, left, 16, width - left - right)
    top = legend_bottom + top_pad
    height = top + plot_h + 52

    def y(v: float) -> float:
        return top + plot_h * (1 - max(0.0, min(100.0, v)) / 100)

    p = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{width}" height="{_f(height)}" '
         f'viewBox="0 0 {width} {_f(height)}" role="img" aria-label="Post-edit scores per task and metric">']
    p += legend
    for v in (0, 25, 50, 75, 100):
        p.append(f'<line x1="{left}" x2="{width - right}" y1="{_f(y(v))}" y2="{_f(y(v))}" class="grid"/>'
                 f'<text x="{left - 6}" y="{_f(y(v) + 4)}" text-anchor="end">{v}</text>')
    p.append(f'<text x="12" y="{_f(top + plot_h / 2)}" transform="rotate(-90 12 {_f(top + plot_h / 2)})" '
             f'text-anchor="middle">post-edit %</text>')
    task_spans: dict[str, list[float]] = {}
    for ci, (t, m) in enumerate(cols):
        x0 = left + gap / 2 + ci * cat_w
        for ri, r in enumerate(runs):
            s = r.stat(t, m)
            if s is None or s["post"] is None:
                continue
            bx = x0 + ri * bw
            yy = y(s["post"])
            tip = (f"{r.label} · {t} · {m}: {s['post']:.1f}"
                   + (f" [{s['lo']:.1f}, {s['hi']:.1f}]" if s["lo"] is not None and s["hi"] is not None else "")
                   + (f" n={s['n']}" if s["n"] is not None else ""))
            p.append(f'<rect x="{_f(bx)}" y="{_f(yy)}" width="{bw - 2}" height="{_f(top + plot_h - yy)}" '
                     f'fill="{r.color}"><title>{escape(tip)}</title></rect>')
            if s["lo"] is not None and s["hi"] is not None:
                cx = bx + (bw - 2) / 2
                y1, y2 = y(s["lo"]), y(s["hi"])
                p.append(f'<path class="err" d="M{_f(cx)} {_f(y1)}V{_f(y2)}M{_f(cx - 3)} {_f(y1)}H{_f(cx + 3)}'
                         f'M{_f(cx - 3)} {_f(y2)}H{_f(cx + 3)}"/>')
        mid = x0 + (len(runs) * bw - 2) / 2
        p.append(f'<text x="{_f(mid)}" y="{_f(top + plot_h + 16)}" text-anchor="middle">'
                 f'{escape(METRIC_ABBR.get(m, m))}</text>')
        span = task_spans.setdefault(t, [x0, x0])
        span[1] = x0 + len(runs) * bw - 2
    for t, (a, b) in task_spans.items():
        p.append(f'<line x1="{_f(a)}" x2="{_f(b)}" y1="{_f(top + plot_h + 24)}" y2="{_f(top + plot_h + 24)}" class="axis"/>'
                 f'<text x="{_f((a + b) / 2)}" y="{_f(top + plot_h + 40)}" text-anchor="middle" class="task">'
                 f'{escape(t)}</text>')
    p.append(f'<line x1="{left}" x2="{width - right}" y1="{_f(top + plot_h)}" y2="{_f(top + plot_h)}" class="axis"/>')
    p.append("</svg>")
    return Markup("".join(p))


def svg_scatter(g: Group) -> Markup:
    """Reliability (x) versus locality (y): a filled point per run (mean over tasks) and a small
    hollow point per run and task."""
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
    size, left, top, right = 320, 54, 16, 220
    width, height = left + size + right, top + size + 46

    def sx(v):
        return left + size * (v - lo_x) / (100 - lo_x)

    def sy(v):
        return top + size * (1 - (v - lo_y) / (100 - lo_y))

    p = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{width}" height="{height}" '
         f'viewBox="0 0 {width} {height}" role="img" aria-label="Reliability versus locality">']
    for vx in range(int(lo_x), 101, step_x):
        p.append(f'<line x1="{_f(sx(vx))}" x2="{_f(sx(vx))}" y1="{top}" y2="{top + size}" class="grid"/>'
                 f'<text x="{_f(sx(vx))}" y="{top + size + 16}" text-anchor="middle">{vx}</text>')
    for vy in range(int(lo_y), 101, step_y):
        p.append(f'<line x1="{left}" x2="{left + size}" y1="{_f(sy(vy))}" y2="{_f(sy(vy))}" class="grid"/>'
                 f'<text x="{left - 6}" y="{_f(sy(vy) + 4)}" text-anchor="end">{vy}</text>')
    p.append(f'<rect x="{left}" y="{top}" width="{size}" height="{size}" class="frame"/>')
    p.append(f'<text x="{left + size / 2}" y="{top + size + 36}" text-anchor="middle">reliability % (post)</text>')
    p.append(f'<text x="14" y="{top + size / 2}" transform="rotate(-90 14 {top + size / 2})" '
             f'text-anchor="middle">locality % (post)</text>')
    p.append(f'<text x="{left + size - 6}" y="{top + 14}" text-anchor="end" class="muted">better ↗</text>')
    for r, t, a, b in pts:
        tip = f"{r.label} · {t or 'mean over tasks'}: reliability {a:.1f}, locality {b:.1f}"
        if t is None:
            p.append(f'<circle cx="{_f(sx(a))}" cy="{_f(sy(b))}" r="6" fill="{r.color}" stroke="#222">'
                     f'<title>{escape(tip)}</title></circle>')
        else:
            p.append(f'<circle cx="{_f(sx(a))}" cy="{_f(sy(b))}" r="3.5" fill="none" stroke="{r.color}" '
                     f'stroke-width="1.5"><title>{escape(tip)}</title></circle>')
    # legend on the right (labels beside the plot never overlap the points)
    ly = top + 10
    for r in g.runs:
        p.append(f'<circle cx="{left + size + 20}" cy="{ly - 4}" r="5" fill="{r.color}" stroke="#222"/>'
                 f'<text x="{left + size + 30}" y="{ly}">{escape(r.label)}</text>')
        ly += 18
    p.append(f'<circle cx="{left + size + 20}" cy="{ly + 6}" r="3.5" fill="none" stroke="#555" stroke-width="1.5"/>'
             f'<text x="{left + size + 30}" y="{ly + 10}" class="muted">one task</text>'
             f'<circle cx="{left + size + 20}" cy="{ly + 24}" r="5" fill="#999" stroke="#222"/>'
             f'<text x="{left + size + 30}" y="{ly + 28}" class="muted">mean over tasks</text>')
    p.append("</svg>")
    return Markup("".join(p))
