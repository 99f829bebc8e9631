"""How every figure looks: paper sizes, fonts, the colour-blind palette, and saving.

Sizes are those of a two-column paper (a column is ~3.4 in, the text ~7 in wide), with fonts
that stay readable at that size. Each method keeps one colour across all figures of a directory.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

COLUMN_WIDTH = 3.4  # inches: one column of a two-column paper
FULL_WIDTH = 7.0  # inches: the full text width
FORMATS = ("png", "pdf")
PNG_DPI = 200

_RC = {
    "font.size": 7, "axes.titlesize": 7, "axes.labelsize": 7, "xtick.labelsize": 6, "ytick.labelsize": 6,
    "legend.fontsize": 6, "legend.title_fontsize": 6, "lines.linewidth": 1.2, "lines.markersize": 4,
    "axes.linewidth": 0.6, "grid.linewidth": 0.4, "errorbar.capsize": 2,
    # Type 42 (TrueType) fonts: conference templates reject PDFs with Type 3 fonts.
    "pdf.fonttype": 42, "ps.fonttype": 42, "savefig.bbox": "tight", "savefig.pad_inches": 0.02,
}


class Skipped(Exception):
    """A figure that the directory's runs cannot support; the message says what it needs."""


@dataclass
class Drawn:
    """A drawn figure, its file stem in DIR/figures/ and its caption (what the error bars are)."""

    stem: str
    title: str
    figure: object  # matplotlib.figure.Figure
    caption: str
    tables: dict[str, str] = field(default_factory=dict)  # extra files written beside it: name -> text


@contextmanager
def paper_style():
    """seaborn's paper context, white ticks style and colour-blind palette, for the figures drawn inside."""
    import matplotlib
    import seaborn as sns

    matplotlib.use("Agg")  # files only; no display is needed or wanted
    import matplotlib.pyplot as plt

    with plt.rc_context():
        sns.set_theme(context="paper", style="ticks", palette="colorblind", rc=_RC)
        yield


def method_colours(methods: Sequence[str]) -> dict[str, tuple]:
    """One colour per method, in the given order, from seaborn's colour-blind palette."""
    import seaborn as sns

    return dict(zip(methods, sns.color_palette("colorblind", max(len(methods), 1))))


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h")


def marker_of(index: int) -> str:
    return MARKERS[index % len(MARKERS)]


def save(figure, stem: Path, formats: Iterable[str] = FORMATS) -> list[Path]:
    """Write the figure as each format (PNG at PNG_DPI; PDF with embedded TrueType fonts) and close it.

    No creation dates or software versions go in the files, so a figure redrawn from the same
    results is the same file."""
    import matplotlib.pyplot as plt

    written = []
    for fmt in formats:
        path = stem.with_suffix(f".{fmt}")
        metadata = {"Software": None} if fmt == "png" else {"CreationDate": None, "Producer": None} if fmt == "pdf" else None
        figure.savefig(path, dpi=PNG_DPI, metadata=metadata)
        written.append(path)
    plt.close(figure)
    return written
