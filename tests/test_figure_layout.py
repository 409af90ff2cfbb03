"""Every report figure, drawn from the committed reference records, reads at a glance: no two text
labels overlap (titles, axis labels, tick labels, legends, annotations: matplotlib gives each text's
window extent after a draw), and no panel carries more than MAX_SERIES lines or bar groups."""

from __future__ import annotations

import itertools
from pathlib import Path

import matplotlib
import pytest

matplotlib.use("Agg")

from matplotlib.text import Text

from kvpack.report import assemble, figures

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = [ROOT / "reports" / "reference" / g for g in ("h100", "h200")]
MAX_SERIES = 10  # lines (or bar containers) in one panel, legends' handles not counted


@pytest.fixture(scope="module")
def tables():
    return assemble.build_tables(reference_dirs=REFERENCE, paper_dir=ROOT / "reports" / "paper")


def _undrawn_ticks(fig) -> set[int]:
    """Tick labels matplotlib keeps but does not draw: ticks outside the axis' view interval."""
    hidden = set()
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            lo, hi = sorted(axis.get_view_interval())
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                if not (lo - 1e-12 * abs(lo) <= tick.get_loc() <= hi + 1e-12 * abs(hi)):
                    hidden |= {id(tick.label1), id(tick.label2)}
    return hidden


def _texts(fig):
    renderer = fig.canvas.get_renderer()
    hidden = _undrawn_ticks(fig)
    out = []
    for t in fig.findobj(Text):
        if id(t) in hidden or not t.get_visible() or not t.get_text().strip():
            continue
        ax = t.axes
        if ax is not None and not ax.get_visible():
            continue
        bb = t.get_window_extent(renderer)
        if bb.width > 0 and bb.height > 0:
            out.append((t.get_text(), bb))
    return out


def overlaps(fig, tolerance_px: float = 1.0) -> list[tuple[str, str]]:
    """Pairs of text labels whose boxes overlap by more than ``tolerance_px`` in both directions."""
    fig.canvas.draw()
    found = []
    for (a, ba), (b, bb) in itertools.combinations(_texts(fig), 2):
        w = min(ba.x1, bb.x1) - max(ba.x0, bb.x0)
        h = min(ba.y1, bb.y1) - max(ba.y0, bb.y0)
        if w > tolerance_px and h > tolerance_px:
            found.append((a, b))
    return found


def series_per_panel(fig) -> dict[str, int]:
    counts = {}
    for i, ax in enumerate(fig.axes):
        if not ax.get_visible() or ax.get_label() == "<colorbar>":
            continue
        lines = [ln for ln in ax.get_lines() if ln.get_visible() and len(ln.get_xdata()) > 1]
        counts[f"panel {i} {ax.get_title()!r}"] = len(lines) + len(ax.containers)
    return counts


@pytest.fixture
def drawn(monkeypatch):
    kept = {}

    def keep(fig, png, svg=None):
        kept["fig"] = fig
        return Path(png), Path(svg or png)

    monkeypatch.setattr(figures, "_save", keep)
    return kept


@pytest.mark.parametrize("name", sorted(figures.FIGURES))
def test_figure_has_no_overlapping_labels_and_few_series(name, tables, drawn, tmp_path):
    figures.make_figure(name, tables, tmp_path / f"{name}.png")
    fig = drawn["fig"]
    try:
        clash = overlaps(fig)
        assert not clash, f"{name}: overlapping labels {clash[:5]}"
        crowded = {k: n for k, n in series_per_panel(fig).items() if n > MAX_SERIES}
        assert not crowded, f"{name}: more than {MAX_SERIES} series in {crowded}"
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


def test_the_overlap_check_finds_an_overlap():
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.text(0.5, 0.5, "copy ceiling, h100: 3,000 GB/s")
    ax.text(0.5, 0.5, "copy ceiling, h200: 4,200 GB/s")
    assert overlaps(fig)
    plt.close(fig)
