"""The SimPy simulator (see DESIGN.md)."""

import staircase  # noqa: F401  (first: its finder keeps a stale compiled module from loading)
