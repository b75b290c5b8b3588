"""How a run looks in the charts and tables: a colour from its editor, a marker shape and a line
style from its variant. It never runs out: however many editors and runs a report holds, no two
runs of one group share a look, and every run of an editor wears its editor's colour family.

* **Colour = the editor.** Each editor has a colour family: a base colour and two shades of it
  (darker, lighter or darker still, every one with at least 3:1 contrast on white). Its first
  variant wears the base colour, the next ones the shades in turn. The base colours of the six
  editors of the first leaderboards (ft, rome, mend, instructedit, memit, alphaedit) and the
  reference grey differ pairwise by a CIEDE2000 distance of at least 15 under normal vision and
  simulated deuteranopia, protanopia and tritanopia (Machado et al. 2009, severity 1); the four
  later editors (ike, lora, grace, wise) by at least 16 under normal vision and 10 under the
  simulations (the best four a greedy search over sRGB found beside the first seven), so an
  editor's own marker tells it from those its colour is nearest to under a simulation (wise
  shares instructedit's diamond, at a distance of 30 or more under every vision). An editor the
  table does not know gets a spare family, or past those one made from a hue its name picks.
* **Marker and line style = the variant** (runs of one editor that differ in hyperparameters,
  instruction mode or held-out task): the editor's own marker for its first variant, the next
  shapes in turn for the others, and a line style (dash pattern) of its own for every variant.
  A variant is a run label: the same label (FT-L on two models) has the same look everywhere.
"""

from __future__ import annotations

import math
import zlib
from typing import Any, Iterable

REFERENCE_EDITOR = "none"  # the no-edit editor: a reference line, never ranked
REFERENCE_COLOR = "#6b6b6b"
# editor -> (base colour, shade, shade): the family of its runs' colours
EDITOR_FAMILIES: dict[str, tuple[str, str, str]] = {
    "ft": ("#005a96", "#003962", "#417cbc"),
    "rome": ("#a51e2d", "#700417", "#d0484c"),
    "mend": ("#00a569", "#047d4f", "#08613d"),
    "instructedit": ("#a569ff", "#7c45d6", "#5f2bba"),
    "memit": ("#ff0f00", "#bc1002", "#fe6140"),
    "alphaedit": ("#d278a5", "#aa5480", "#8e3a67"),
    "ike": ("#5533ff", "#060ad2", "#8f66fc"),
    "lora": ("#668833", "#42650e", "#7b9d47"),
    "grace": ("#882266", "#6a034d", "#af4989"),
    "wise": ("#ff5566", "#d22745", "#ad0631"),
    REFERENCE_EDITOR: (REFERENCE_COLOR, "#494949", "#8f8f8f"),
}
# families for editors not in the table above, taken in order of the editors' names
SPARE_FAMILIES: tuple[tuple[str, str, str], ...] = (
    ("#8a6100", "#5f4200", "#a87a1e"),
    ("#00777a", "#005255", "#2f9497"),
    ("#7f4f24", "#5a3210", "#9c6a3d"),
)
# the colour-blind-safe palette of the first six editors (tests/test_reports.py checks it)
PALETTE = tuple(EDITOR_FAMILIES[e][0] for e in ("ft", "rome", "mend", "instructedit", "memit", "alphaedit"))
EDITOR_COLORS = {e: f[0] for e, f in EDITOR_FAMILIES.items()}
MARKERS = ("circle", "square", "triangle", "diamond", "triangle-down", "hexagon", "pentagon", "star", "plus")
EDITOR_MARKERS = {"ft": "circle", "rome": "square", "mend": "triangle", "instructedit": "diamond",
                  "memit": "triangle-down", "alphaedit": "hexagon", "ike": "pentagon", "lora": "star",
                  "grace": "plus", "wise": "diamond", REFERENCE_EDITOR: "cross"}
# line style of the k-th variant: solid, then these, then patterns made from k
DASHES = ("", "6 3", "2 2", "8 3 2 3", "1 3", "10 4")
REFERENCE_DASH = "5 3"  # the no-edit reference: a dashed line everywhere


def dash(k: int) -> str:
    """The dash pattern (SVG stroke-dasharray) of an editor's k-th variant: '' is solid."""
    return DASHES[k] if k < len(DASHES) else f"{k} 2 1 2"


def _lin(c: float) -> float:
    return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4


def _gamma(c: float) -> float:
    return 12.92 * c if c <= 0.0031308 else 1.055 * c ** (1 / 2.4) - 0.055


_M = ((0.4124564, 0.3575761, 0.1804375), (0.2126729, 0.7151522, 0.0721750), (0.0193339, 0.1191920, 0.9503041))
_M_INV = ((3.2404542, -1.5371385, -0.4985314), (-0.9692660, 1.8760108, 0.0415560), (0.0556434, -0.2040259, 1.0572252))
_WHITE = tuple(sum(row) for row in _M)


def luminance(color: str) -> float:
    """Relative luminance (WCAG) of '#rrggbb'."""
    r, g, b = (_lin(int(color[i:i + 2], 16) / 255) for i in (1, 3, 5))
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast_on_white(color: str) -> float:
    return 1.05 / (luminance(color) + 0.05)


def _from_lch(lightness: float, chroma: float, hue: float) -> str | None:
    """'#rrggbb' of a CIELAB colour given as lightness, chroma, hue (degrees); None outside sRGB."""
    a, b = chroma * math.cos(math.radians(hue)), chroma * math.sin(math.radians(hue))
    fy = (lightness + 16) / 116
    f = (fy + a / 500, fy, fy - b / 200)
    xyz = [(v ** 3 if v > 6 / 29 else 3 * (6 / 29) ** 2 * (v - 4 / 29)) * w for v, w in zip(f, _WHITE)]
    lin = [sum(m * x for m, x in zip(row, xyz)) for row in _M_INV]
    if any(v < -1e-6 or v > 1 + 1e-6 for v in lin):
        return None
    return "#" + "".join(f"{round(_gamma(min(1.0, max(0.0, v))) * 255):02x}" for v in lin)


def made_family(name: str) -> tuple[str, str, str]:
    """A colour family for an editor past the spare ones: a hue picked by its name, at three
    lightnesses that keep 3:1 contrast on white (chroma lowered until the colour is in sRGB)."""
    hue = zlib.crc32(name.encode("utf-8")) % 360
    out = []
    for lightness in (45.0, 33.0, 56.0):
        chroma = 60.0
        while (c := _from_lch(lightness, chroma, hue)) is None:
            chroma -= 2.0
        out.append(c)
    return out[0], out[1], out[2]


def families(editors: Iterable[str]) -> dict[str, tuple[str, str, str]]:
    """The colour family of each editor: its own, else a spare one (in order of the unknown
    editors' names), else one made from its name."""
    editors = list(editors)
    out = {e: EDITOR_FAMILIES[e] for e in editors if e in EDITOR_FAMILIES}
    unknown = sorted({e for e in editors if e not in EDITOR_FAMILIES})
    for i, e in enumerate(unknown):
        out[e] = SPARE_FAMILIES[i] if i < len(SPARE_FAMILIES) else made_family(e)
    return out


def _variant_key(run: Any) -> tuple:
    # the variant with the editor's default hyperparameters first (FT-L before FT-M), then by label
    return (run.hparam_overrides not in (None, {}), run.name != run.editor and not run.name.startswith(run.editor + "-"),
            run.label)


def assign_style(runs: list) -> None:
    """Set each run's `family` (its editor), `color`, `marker`, `dash` and `variant` (0 for the
    editor's first variant). Variants are the distinct labels of an editor's runs, ordered with
    the default hyperparameters first, then by label; a label keeps its look across groups."""
    fams = families(r.editor for r in runs)
    by_editor: dict[str, list[str]] = {}
    for r in sorted(runs, key=_variant_key):
        labels = by_editor.setdefault(r.editor, [])
        if r.label not in labels:
            labels.append(r.label)
    for r in runs:
        k = by_editor[r.editor].index(r.label)
        family = fams[r.editor]
        r.family = r.editor
        r.variant = k
        r.color = family[k % len(family)]
        if r.editor == REFERENCE_EDITOR:
            r.marker, r.dash = "cross", REFERENCE_DASH if k == 0 else dash(k)
            continue
        first = EDITOR_MARKERS.get(r.editor, MARKERS[zlib.crc32(r.editor.encode("utf-8")) % len(MARKERS)])
        r.marker = MARKERS[(MARKERS.index(first) + k) % len(MARKERS)]
        r.dash = dash(k)


def look(run: Any) -> tuple[str, str, str]:
    """(colour, marker, dash): what tells a run apart in a chart."""
    return run.color, run.marker, run.dash
