"""Video needle in a haystack (Qwen3-VL's headline long-video evaluation) on a native or HF checkpoint.

For every haystack length T (seconds), depth d in [0, 1] and trial: a needle (a colored shape, data/synth.py's)
is shown at depth d of a T-second haystack, the video is sampled at `video.fps` (1 by default) under a fixed
visual-token budget by data/video.py's sampling, the model reads `<t seconds>` + frames ... + the demo
corpus' needle question and answers greedily. An answer is correct when it names the needle's color and
shape ("contains" match; "exact" additionally requires nothing else but the timestamp). The timestamp
error is |answered time - the needle's middle time| in seconds (unanswered when no timestamp parses).
Chance accuracy is 1 / (colors x shapes).

Outputs: a length x depth accuracy table on stdout, `<out>/vniah.json` (the table, per-cell exact rates and
timestamp errors, every sample) and `<out>/vniah.png` (heatmap; the accuracy matrix is also stored in the
PNG's "Description" text chunk so the figure can be checked against the JSON).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from train.eval.config import VNIAHConfig
from train.eval.generate import check_tokenizer_matches, find_tokenizer, greedy_answer, load_model
from train.eval.needle import (NUM_CHOICES, Needle, NeedleVideo, SyntheticHaystack, VideoFileHaystack,
                               chance_accuracy, needle_patch_times, needle_rng, place_needle, prompt_ids, sample_clip,
                               sampling_plan)

_SECONDS = re.compile(r"<\s*(\d+(?:\.\d+)?)\s*seconds?\s*>")
_HMS = re.compile(r"<\s*(\d+):(\d{1,2}):(\d{1,2}(?:\.\d+)?)\s*>")


@dataclass
class Score:
    correct: bool  # the answer names the needle's color and shape
    exact: bool  # ... and says nothing else (apart from the timestamp)
    time: float | None  # the answered time, seconds
    time_error: float | None  # |time - needle time|


def parse_time(text: str) -> float | None:
    """The first timestamp of an answer: `<12.5 seconds>` or `<hh:mm:ss.s>`; None when there is none."""
    match = _SECONDS.search(text)
    hms = _HMS.search(text)
    if hms and (match is None or hms.start() < match.start()):
        h, m, s = hms.groups()
        return int(h) * 3600 + int(m) * 60 + float(s)
    return float(match.group(1)) if match else None


def score_answer(text: str, needle: Needle, needle_time: float) -> Score:
    lowered = " ".join(text.lower().split())
    correct = re.search(rf"\b{needle.color}\s+{needle.shape}\b", lowered) is not None
    body = " ".join(_HMS.sub(" ", _SECONDS.sub(" ", text)).split()).lower()
    answered = parse_time(text)
    error = None if answered is None else abs(answered - needle_time)
    return Score(correct, correct and body == needle.answer.lower(), answered, error)


def make_haystack(cfg: VNIAHConfig, length: float, trial: int, seed: int):
    if cfg.videos:
        return VideoFileHaystack(cfg.videos[trial % len(cfg.videos)], length)
    return SyntheticHaystack(length, cfg.source_fps, cfg.frame_size, seed)


def run_cell(cfg: VNIAHConfig, model, tok, length: float, depth: float, trial: int) -> dict[str, Any]:
    """One needle video through sampling, the model and the scorer; the sample's record."""
    rng = needle_rng(cfg.seed, length, depth, trial)
    haystack = make_haystack(cfg, length, trial, rng.getrandbits(32))
    indices, height, width = sampling_plan(haystack, cfg.video, cfg.image, cfg.budget)
    needle = place_needle(haystack.total, haystack.fps, depth, indices, cfg.needle_seconds, rng)
    clip = sample_clip(NeedleVideo(haystack, needle), indices, height, width, cfg.image)
    ids = prompt_ids(tok, clip, cfg.image.merge_size, cfg.video.timestamp_format, cfg.video.frame_timestamps)
    answer = tok.decode(greedy_answer(model, tok, ids, clip, cfg.max_new_tokens))
    truth = needle.time(haystack.fps)
    score = score_answer(answer, needle, truth)
    # The timestamp written before the first patch showing the needle, to the tenth as the prompt writes it
    # (with video.frame_timestamps off, the one it would write): a model that copies it scores stamp_error,
    # the floor of the timestamp error at the eval's frame rate.
    stamp = round(needle_patch_times(clip, needle, cfg.image.temporal_patch_size)[0], 1)
    return {"length": length, "depth": depth, "trial": trial, "needle": needle.answer, "needle_time": truth,
            "frames": len(indices), "visual_tokens": int(clip.grid_thw.prod()) // cfg.image.merge_size ** 2,
            "prompt_tokens": len(ids), "answer": answer, "correct": score.correct, "exact": score.exact,
            "answered_time": score.time, "time_error": score.time_error, "stamp_time": stamp,
            "stamp_error": abs(stamp - truth),
            "copied": score.time is not None and abs(score.time - stamp) < 0.05}


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(cfg: VNIAHConfig, samples: list[dict[str, Any]]) -> dict[str, Any]:
    """The length x depth tables of a run's samples."""
    def table(key: str, reduce=_mean) -> list[list[Any]]:
        return [[reduce([s[key] for s in samples if s["length"] == t and s["depth"] == d and s[key] is not None])
                 for d in cfg.depths] for t in cfg.lengths]
    return {"checkpoint": cfg.checkpoint, "lengths": list(cfg.lengths), "depths": list(cfg.depths),
            "trials": cfg.trials, "budget": cfg.budget, "fps": cfg.video.fps, "num_choices": NUM_CHOICES,
            "chance": chance_accuracy(), "accuracy": table("correct"), "exact": table("exact"),
            "timestamp_error": table("time_error"), "stamp_error": table("stamp_error"), "copied": table("copied"),
            "visual_tokens": [row[0] for row in table("visual_tokens")],
            "samples": samples}


def format_table(result: dict[str, Any]) -> str:
    depths = result["depths"]
    lines = [f"video needle in a haystack: {result['checkpoint']}",
             f"accuracy (contains match), {result['trials']} needle(s) per cell, {result['fps']:g} fps, budget "
             f"{result['budget']} visual tokens; chance {result['chance']:.1%} (1 of {result['num_choices']})",
             f"{'length':>16} | " + " ".join(f"{d:>7.2f}" for d in depths) + " |    mean  ts err"]
    for i, length in enumerate(result["lengths"]):
        row = result["accuracy"][i]
        errors = [e for e in result["timestamp_error"][i] if e is not None]
        err = f"{sum(errors) / len(errors):6.1f}s" if errors else "     -"
        label = f"{length:g} s ({result['visual_tokens'][i]:.0f} tok)"
        lines.append(f"{label:>16} | " + " ".join(f"{a:>7.1%}" for a in row) + f" | {sum(row) / len(row):>7.1%} {err}")
    return "\n".join(lines)


def write_heatmap(result: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = result["accuracy"]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(result["depths"]), 1.2 + 0.6 * len(result["lengths"])))
    image = ax.imshow(acc, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
    for i, row in enumerate(acc):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.0%}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(result["depths"])), [f"{d:g}" for d in result["depths"]])
    ax.set_yticks(range(len(result["lengths"])), [f"{t:g} s" for t in result["lengths"]])
    ax.set_xlabel("needle depth")
    ax.set_ylabel("video length")
    ax.set_title(f"video NIAH accuracy (chance {result['chance']:.1%})", fontsize=9)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Description": json.dumps({"accuracy": acc})})
    plt.close(fig)


def run_vniah(cfg: VNIAHConfig) -> dict[str, Any]:
    """Evaluate, print the table, write JSON + PNG under cfg.out; return the result dict."""
    tok = find_tokenizer(cfg.checkpoint, cfg.tokenizer)
    model = load_model(cfg.checkpoint, cfg.device, cfg.dtype)
    check_tokenizer_matches(tok, model.cfg)
    samples = [run_cell(cfg, model, tok, t, d, k) for t in cfg.lengths for d in cfg.depths for k in range(cfg.trials)]
    result = summarize(cfg, samples)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vniah.json").write_text(json.dumps(result, indent=1) + "\n")
    write_heatmap(result, out / "vniah.png")
    print(format_table(result))
    print(f"wrote {out / 'vniah.json'} and {out / 'vniah.png'}")
    return result
