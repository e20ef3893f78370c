"""The one plotting set-up: matplotlib without a screen (Agg) and seaborn's theme."""

from __future__ import annotations


def pyplot():
    """(matplotlib.pyplot, seaborn), ready to draw into files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid")
    return plt, sns


def save_figure(fig, path, dpi: int = 110, rect=None, tight_bbox: bool = False):
    """The figure's tail, once: lay out (``rect``: the part of the figure the axes fill),
    write to ``path``, close. Returns the path. ``tight_bbox``: crop to what was drawn
    (a figure whose titles sit outside the axes' layout)."""
    import matplotlib.pyplot as plt

    if tight_bbox:
        fig.savefig(path, dpi=dpi, bbox_inches="tight")
    else:
        fig.tight_layout(**({"rect": rect} if rect is not None else {}))
        fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
