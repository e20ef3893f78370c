"""The shared core (see DESIGN.md)."""

from . import compiled

compiled.install()
