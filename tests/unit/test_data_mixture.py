"""data.mixture: temperature-scaled probabilities and a source choice that is a pure function of (seed, k)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from data.errors import DataError
from data.mixture import SourceSchedule, mixture_probabilities


def test_temperature_scales_weights():
    assert mixture_probabilities([1, 3], 1.0) == pytest.approx([0.25, 0.75])
    root = [1 / (1 + math.sqrt(3)), math.sqrt(3) / (1 + math.sqrt(3))]
    assert mixture_probabilities([1, 3], 0.5) == pytest.approx(root)  # square-root sampling
    assert mixture_probabilities([1, 3], 0.0) == pytest.approx([0.5, 0.5])
    with pytest.raises(DataError, match="> 0"):
        mixture_probabilities([1, 0], 1.0)


def test_choice_is_a_pure_function_of_seed_stream_and_index():
    probs = mixture_probabilities([5, 3, 2], 1.0)
    forward = SourceSchedule(probs, seed=7, stream=0)
    sequence = [forward.source(k) for k in range(3000)]
    # A fresh schedule asked in another order (as after a restart at k=2500) gives the same answers.
    restarted = SourceSchedule(probs, seed=7, stream=0)
    for k in [2500, 17, 2999, 1024, 1023, 0]:
        assert restarted.source(k) == sequence[k]
    other_stream = [SourceSchedule(probs, seed=7, stream=1).source(k) for k in range(3000)]
    other_seed = [SourceSchedule(probs, seed=8, stream=0).source(k) for k in range(3000)]
    assert sequence != other_stream and sequence != other_seed


def test_long_run_frequencies_follow_the_probabilities():
    probs = mixture_probabilities([5, 3, 2, 0.1], 0.5)
    schedule = SourceSchedule(probs, seed=0, stream=3)
    counts = np.bincount([schedule.source(k) for k in range(40_000)], minlength=4) / 40_000
    assert counts == pytest.approx(probs, abs=0.01)
