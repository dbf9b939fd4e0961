"""bench/needle_copy.py at toy size: the answer's time is the stamp before the needle's patch, the score
counts a document right only when every time token is, and a short run of the tiny decoder trains. No timing."""
from __future__ import annotations

import random
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench import needle_copy as nc  # noqa: E402


def test_answer_time_is_the_stamp_before_the_needle_patch():
    for whole in (False, True):
        for i in range(20):
            ids, learn, first, stamps = nc.document(random.Random(i), whole)
            needle_pad = next(k for k, t in enumerate(ids) if t >= nc.NEEDLE)
            before = ids[:needle_pad]
            stamp_start = len(before) - 1 - before[::-1].index(nc.LT)
            stamp = before[stamp_start:before.index(nc.GT, stamp_start) + 1]
            assert ids[first - 1:first - 1 + len(stamp)] == stamp
            assert stamp in (nc.stamp(t, whole) for t in stamps)
            assert learn[first - 1:] == [True] * (len(ids) - first + 1) and not any(learn[:first - 1])
            assert (nc.WHOLE <= stamp[1] < nc.GRAY) == whole


class _Oracle:
    """Predicts each next token (shift=0), or the one after it (shift=1: wrong wherever tokens differ)."""

    def __init__(self, shift: int) -> None:
        self.shift = shift

    def __call__(self, ids: torch.Tensor, cu_seqlens: torch.Tensor) -> SimpleNamespace:
        target = torch.roll(ids, -1 - self.shift)
        return SimpleNamespace(logits=torch.nn.functional.one_hot(target, 1024).float())


def test_copy_accuracy_needs_every_time_token_right():
    docs = [nc.document(random.Random(i), False) for i in range(10)]
    assert nc.copy_accuracy(_Oracle(0), docs) == 1.0
    assert nc.copy_accuracy(_Oracle(1), docs) == 0.0


def test_a_short_run_trains_and_scores():
    out, losses = nc.train(whole=False, steps=30, seed=0)
    assert sorted(out) == [10, 20, 30] and all(0.0 <= v <= 1.0 for v in out.values())
    assert len(losses) == 30 and sum(losses[-5:]) < 0.9 * sum(losses[:5])  # the answers' loss falls (7.6 -> 6.3)
