"""The shared core (docs/design.md)."""

from . import compiled

compiled.install()
