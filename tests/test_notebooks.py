"""The notebooks run top to bottom with their small default parameters (so they never
rot) and write their figures; each notebook also asserts what its figure shows."""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="the notebook tests need the test extra (make test installs it)")
nbclient = pytest.importorskip("nbclient", reason="the notebook tests need the test extra (make test installs it)")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
EXPECTED = {
    "chunk_size_tradeoff.ipynb": ["ttft_vs_first_chunk.png"],
    "redundancy_vs_spread.ipynb": ["ttft_vs_redundancy_spread.png"],
    "sim_vs_live.ipynb": ["sim_vs_live_ttft_s.png", "sim_vs_live_e2e_s.png"],
    "search_explore.ipynb": ["search_pareto.png", "search_knobs.png"],
    "plan_explore.ipynb": ["plan_frontier.png", "plan_pools.png"],
}


def test_every_notebook_is_covered():
    assert {p.name for p in NOTEBOOKS.glob("*.ipynb")} == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_notebook_executes(name, tmp_path):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    for fig in EXPECTED[name]:
        path = tmp_path / "figures" / fig
        assert path.is_file() and path.stat().st_size > 10_000, fig


# figures the manual shows, with their numbers committed beside them: a fresh run must give the same numbers
COMMITTED = {"chunk_size_tradeoff.ipynb": "ttft_vs_first_chunk.csv"}  # README.md's figure


@pytest.mark.parametrize("name", sorted(COMMITTED))
def test_the_committed_figure_is_what_the_notebook_writes(name, tmp_path):
    """The README's figure (notebooks/figures/) is the notebook's output at its defaults:
    its numbers, written beside it, are what a run now gives; a change that moves them
    fails here until the notebook is run again in notebooks/ and the figure committed."""
    import pandas as pd

    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    fresh = pd.read_csv(tmp_path / "figures" / COMMITTED[name])
    committed = pd.read_csv(NOTEBOOKS / "figures" / COMMITTED[name])
    pd.testing.assert_frame_equal(fresh, committed, rtol=1e-4)
    assert (NOTEBOOKS / "figures" / COMMITTED[name]).with_suffix(".png").is_file()
