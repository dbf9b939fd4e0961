"""Weighted, temperature-scaled data mixture with a source choice that is a pure function of the step.

p_i ∝ w_i ** T over the stage's data sets (T = 1 keeps the weights, T = 0.5 is square-root sampling,
T = 0 is uniform). Like Levanter's step-indexed mixtures, the data set that feeds the k-th document of a
stream is a function of (seed, stream, k) alone: resuming needs only k, and two runs with the same seed draw
the same sequence of sources whatever happened in between (restarts, bad samples, worker read-ahead).
A stream is one (data-parallel rank, loader worker) slot; data sets that ran out (finite epochs) are skipped
by the caller, which keeps k advancing so the choice stays a pure function.
"""
from __future__ import annotations

import numpy as np

from data.errors import DataError


def mixture_probabilities(weights: list[float], temperature: float) -> list[float]:
    """Sampling probabilities p_i = w_i^T / sum_j w_j^T."""
    if not weights:
        raise DataError("a mixture needs at least one data set")
    if any(not w > 0 for w in weights):
        raise DataError(f"mixture weights must be > 0, got {weights}")
    scaled = np.asarray(weights, dtype=np.float64) ** float(temperature)
    return (scaled / scaled.sum()).tolist()


class SourceSchedule:
    """source(k): which data set feeds document k of one stream. Draws are made a block at a time."""

    BLOCK = 1024

    def __init__(self, probabilities: list[float], seed: int, stream: int) -> None:
        self.cumulative = np.cumsum(np.asarray(probabilities, dtype=np.float64))
        self.cumulative[-1] = 1.0  # guard against rounding so every draw lands in a source
        self.seed, self.stream = seed, stream
        self._block, self._choices = -1, np.empty(0, dtype=np.int64)

    def source(self, k: int) -> int:
        block = k // self.BLOCK
        if block != self._block:
            # SeedSequence keyed by (seed, stream, block): independent of every earlier draw.
            rng = np.random.default_rng([self.seed, self.stream, block])
            self._choices = np.searchsorted(self.cumulative, rng.random(self.BLOCK), side="right")
            self._block = block
        return int(self._choices[k % self.BLOCK])
