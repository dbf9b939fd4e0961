"""The needle miniature end to end, shortened for CI: `python -m train pipeline=needle_position` (the recipe's
four stages without the language-model ones of `pipeline=needle`; S0 and S1 long enough to find the needle,
S2 and S3 a few steps each) on a small needle corpus (`--preset needle_small`), then `python -m train.eval
vniah` at the eval's own protocol (1 fps, the last stage's frame sizes and token budget) on haystacks it never
saw (eval seed 17; training seed 0).

Bars (lower than issue 14 asks of the full pipeline; docs/eval.md "Needle miniature"):
(1) at least 90% of the answers in the format the training prompt teaches (`<t seconds> A <color> <shape>.`);
(2) accuracy (color and shape) over 60 needles in 8-24 s haystacks at least 3x chance (15% against 4.8%):
    the S0 + S1 steps here (300 + 600) measured 35%, 45% and 70% for training seeds 2, 1 and 0 at 8-16 s;
    a model that does not see the needle (wrong frame sampling or sizes, a broken vision path, an eval
    prompt that differs from training's) stays near chance;
(3) later times for longer haystacks (it reads the video's timestamps / positions).
At 8-30 s the toy model needs neither timestamps nor MRoPE to find the needle (docs/eval.md ablations):
(3), not (2), is what a broken time signal fails. 203 s in a quiet CI run on 2 cores.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import FAULTS, run
from data.synth import NEEDLE_COLORS, SHAPES, make_corpus
from train.eval.__main__ import main as eval_main

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]  # ~90 s quiet; the margin is for shared machines

ANSWER = re.compile(rf"^<\d+\.\d seconds> A ({'|'.join(NEEDLE_COLORS)}) ({'|'.join(SHAPES)})\.$")


def test_shortened_needle_pipeline_finds_the_needle_and_tells_when(tmp_path: Path) -> None:
    corpus, run_dir = tmp_path / "needle_data", tmp_path / "needle"
    make_corpus(corpus, shards_per_set=2, preset="needle_small")
    result = run([FAULTS, "--max-steps", "300,600,8,4", "pipeline=needle_position", f"data_root={corpus}",
                  f"run_dir={run_dir}", "logging=quiet", "data.num_workers=0"], timeout=1500)
    assert result.returncode == 0, result.stderr[-3000:]
    table = result.stdout[result.stdout.index("stage  "):]
    assert [line.split()[0] for line in table.splitlines()[2:6]] == [f"needle_s{i}" for i in range(4)]
    out = run_dir / "eval"
    status = eval_main(["vniah", f"checkpoint={run_dir / 'needle_s3' / 'final'}",
                        f"tokenizer={corpus / 'tokenizer.model'}", "lengths=[8,16,24]", "depths=[0,0.25,0.5,0.75,1]",
                        "trials=4", "budget=921", "video.min_pixels=1024", "video.max_pixels=4096",
                        "seed=17", f"out={out}"])
    assert status == 0
    report = json.loads((out / "vniah.json").read_text())
    samples = report["samples"]
    assert len(samples) == 60 and (out / "vniah.png").is_file()
    answers = [(s["length"], s["answer"]) for s in samples]
    formatted = [s for s in samples if ANSWER.match(s["answer"].strip())]
    assert len(formatted) >= 0.9 * len(samples), answers
    accuracy = sum(bool(s["correct"]) for s in samples) / len(samples)
    assert accuracy >= 3 * report["chance"], (accuracy, answers)

    def mean_time(length: float) -> float:
        times = [s["answered_time"] for s in samples if s["length"] == length and s["answered_time"] is not None]
        return sum(times) / max(1, len(times))

    assert mean_time(24.0) > mean_time(8.0) + 2.0, answers
