"""bench/needle_stamp_copy.py at toy size: its documents answer with the stamp before the needle's words, the
score counts a document right only when every token of that stamp is, and stages are read in the order they
ran. No timing."""
from __future__ import annotations

import os
import random
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench import needle_stamp_copy as bench  # noqa: E402
from data.synth import stamp_text_sample  # noqa: E402
from data.tokenizer import train_sentencepiece  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    texts = [stamp_text_sample(random.Random(i), seconds=(4, 60))[1] for i in range(200)]
    return train_sentencepiece(texts, 400, tmp_path_factory.mktemp("tok") / "t.model")


def test_each_answer_starts_with_the_stamp_before_the_needle(tokenizer) -> None:
    for ids, _, first, n, patches in bench.documents(tokenizer, (4, 30), 10):
        text = tokenizer.decode(ids.tolist())
        stamp = tokenizer.decode(ids[first:first + n].tolist())
        assert stamp.startswith("<") and stamp.endswith(">") and " seconds" in stamp
        prompt = text[:text.index("\n")]
        needle_at = prompt.index(stamp)  # the stamp is in the prompt, and what follows it is the needle's words
        color, shape = tokenizer.decode(ids[first + n:].tolist()).split()[1:3]
        assert prompt[needle_at + len(stamp):].startswith(f"{color} {shape.rstrip('.')}")
        assert prompt.count("seconds>") == patches


class _Oracle:
    """Predicts each next token; `wrong` = an offset into the answer's stamp whose prediction is changed."""

    def __init__(self, first: int | None = None, wrong: int | None = None) -> None:
        self.first, self.wrong = first, wrong

    def __call__(self, ids: torch.Tensor, cu_seqlens: torch.Tensor, position_ids: torch.Tensor) -> SimpleNamespace:
        target = torch.roll(ids, -1).clone()
        if self.wrong is not None:
            target[self.first - 1 + self.wrong] += 1
        return SimpleNamespace(logits=torch.nn.functional.one_hot(target, 4096).float())


def test_a_document_counts_only_when_every_stamp_token_is_right(tokenizer) -> None:
    docs = bench.documents(tokenizer, (4, 30), 4)
    assert bench.copy_accuracy(_Oracle(), docs) == 1.0
    first, n = docs[0][2], docs[0][3]
    for wrong in (0, n - 1):  # the stamp's first and last token
        assert bench.copy_accuracy(_Oracle(first, wrong), docs[:1]) == 0.0
    assert bench.copy_accuracy(_Oracle(first, n), docs[:1]) == 1.0  # the token after the stamp does not count


def test_stages_are_read_in_the_order_they_finished(tmp_path: Path) -> None:
    for k, name in enumerate(["needle_read_s0", "needle_lm", "needle_lm_long", "unfinished"]):
        (tmp_path / name / "final").mkdir(parents=True)
        if name != "unfinished":
            summary = tmp_path / name / "summary.json"
            summary.write_text("{}")
            os.utime(summary, (1000 + [2, 0, 1][k], 1000 + [2, 0, 1][k]))
    assert [p.parent.name for p in bench.stage_dirs(tmp_path)] == ["needle_lm", "needle_lm_long", "needle_read_s0"]
    with pytest.raises(SystemExit, match="no finished stage"):
        bench.stage_dirs(tmp_path / "unfinished")
