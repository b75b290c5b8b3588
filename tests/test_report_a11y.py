"""What the accessibility check of the generated pages (tools/check_pages.cjs, axe-core in
Chromium) found and the templates now guarantee, pinned on the HTML itself so a template change
cannot undo it: one main landmark; every scrolling table region takes keyboard focus and has a
name of its own; links are underlined (colour alone does not mark them); the overview pins its
rank, run and ranking-score columns."""

from __future__ import annotations

import shutil
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import pytest

from reports import build_report
from reports.index import build_index

RUNS = Path(__file__).parent / "fixtures" / "runs"


class Landmarks(HTMLParser):
    def __init__(self):
        super().__init__()
        self.mains, self.regions, self.ids, self.styles = 0, [], {}, []
        self.pinned_table, self.pin_cols, self._style = None, [], False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids[a["id"]] = tag
        if tag == "main":
            self.mains += 1
        if "tablewrap" in (a.get("class") or "").split():
            self.regions.append(a)
        if tag == "table" and "data-pin" in a:
            self.pinned_table = a
        if "data-pin-col" in a:
            self.pin_cols.append(int(a["data-pin-col"]))
        self._style = tag == "style"

    def handle_data(self, data):
        if self._style:
            self.styles.append(data)


def pages(out: Path) -> list[Path]:
    return sorted(out.glob("*.html"))


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("a11y")
    build_report(sorted(p for p in RUNS.iterdir() if p.is_dir()), out, baseline="ft", fmt="all",
                 title="Fixture leaderboard")
    return out


def test_every_page_has_one_main_and_focusable_named_table_regions(report, tmp_path):
    root = tmp_path / "boards"
    shutil.copytree(report, root / "fixture")
    index = build_index(root)  # the page linking every leaderboard
    assert len(pages(report)) > 5  # the overview and the drill-down pages
    for page in pages(report) + [index]:
        p = Landmarks()
        p.feed(page.read_text(encoding="utf-8"))
        assert p.mains == 1, page.name
        names = []
        for a in p.regions:
            assert a.get("tabindex") == "0" and a.get("role") == "region", (page.name, a)
            name = a.get("aria-label") or a.get("aria-labelledby")
            assert name, (page.name, a)
            if "aria-labelledby" in a:
                assert a["aria-labelledby"] in p.ids, (page.name, a)  # points at a real heading
            names.append(name)
        assert not [n for n, k in Counter(names).items() if k > 1], page.name  # each region its own name


def test_links_are_underlined_and_the_overview_pins_its_leading_columns(report):
    p = Landmarks()
    p.feed((report / "index.html").read_text(encoding="utf-8"))
    css = "".join(p.styles)
    rule = css[css.index("\na {"):].split("}")[0]
    assert "text-decoration: underline" in rule
    assert p.pinned_table is not None and p.pinned_table["data-pin"] == "3"
    # the header cells over the three pinned columns: '#', Run, Score (mean), and the second row's rank, ranking
    assert sorted(p.pin_cols) == [0, 0, 1, 2, 2]
