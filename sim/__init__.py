"""The SimPy simulator (docs/design.md)."""

import staircase  # noqa: F401  (first: its finder keeps a stale compiled module from loading)
