"""Bootstrap 95 % intervals, paired by prompt (``scipy.stats.bootstrap``, percentile).

A score's interval resamples the prompts; a difference between two policies resamples
the prompts and takes both policies' scores of the same prompts (paired), so the
prompt-to-prompt spread, which both share, does not widen it.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

CONFIDENCE = 0.95


class Interval(NamedTuple):
    mean: float
    low: float
    high: float
    n: int

    def excludes_zero(self) -> bool:
        return self.n > 1 and (self.low > 0 or self.high < 0)

    def text(self, digits: int = 2) -> str:
        if self.n == 0 or math.isnan(self.mean):
            return "-"
        return f"{self.mean:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


def mean_interval(values, resamples: int = 2000, seed: int = 0) -> Interval:
    """The mean of ``values`` (NaN dropped) with its bootstrap 95 % interval."""
    x = np.asarray(values, dtype=float)
    x = x[~np.isnan(x)]
    return _interval(x, resamples, seed)


def paired_difference(a, b, resamples: int = 2000, seed: int = 0) -> Interval:
    """Mean of ``a - b`` over the pairs where both are known, with its interval."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired_difference: {a.shape} against {b.shape}")
    keep = ~(np.isnan(a) | np.isnan(b))
    return _interval(a[keep] - b[keep], resamples, seed)


def _interval(x: np.ndarray, resamples: int, seed: int) -> Interval:
    n = int(x.size)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = float(x.mean())
    if n == 1 or np.ptp(x) == 0:  # nothing to resample: the interval is the point
        return Interval(mean, mean, mean, n)
    from scipy.stats import bootstrap

    res = bootstrap((x,), np.mean, confidence_level=CONFIDENCE, n_resamples=resamples, method="percentile",
                    random_state=np.random.default_rng(seed), vectorized=True)
    return Interval(mean, float(res.confidence_interval.low), float(res.confidence_interval.high), n)
