"""A progress bar on stderr for long runs, off when stderr is not a terminal."""

from __future__ import annotations

import sys


class _NoBar:
    def update(self, n: int = 1) -> None: ...

    def close(self) -> None: ...


def progress(total: int, label: str, enabled: bool | None = None, unit: str = "req"):
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=label, unit=unit, file=sys.stderr, leave=False, mininterval=0.5)
