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
