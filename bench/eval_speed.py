"""Decoding speed of `train.eval vniah`: KV-cache decoding vs full recomputation per token (the baseline),
in the same run, on the same needle prompts and model.

The tiny model (configs/model/tiny.yaml, random weights) answers needle videos at the eval's protocol (1 fps,
64 px synthetic haystack frames at 4 LLM tokens per two-frame patch); each decode produces `--tokens` tokens
(no early stop, so both paths do the same work). Order A-B-B-A per length, best of the repeats; CPU time
(user + sys of this process) is reported beside wall time because the machine may be shared.

Prints `RESULT eval_decode_s_<len>s[_no_cache] <s>` and `RESULT eval_decode_speedup_<len>s <ratio>` and
appends them to bench/RESULTS.md. Usage: python bench/eval_speed.py [--lengths 60 300] [--tokens 24]
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.common import append_section, print_results  # noqa: E402
from data.video import VideoConfig  # noqa: E402
from data.vision import ImageConfig  # noqa: E402
from train.eval.generate import greedy_decode  # noqa: E402
from train.eval.needle import NeedleVideo, SyntheticHaystack, place_needle, sample_clip, sampling_plan  # noqa: E402
from train.models.native_io import load_model_config_yaml  # noqa: E402
from train.models.qwen3vl.model import Qwen3VLModel  # noqa: E402

ICFG = ImageConfig(min_pixels=1024, max_pixels=4096)
VCFG = VideoConfig(fps=1.0, max_frames=4096, min_pixels=1024, max_pixels=4096)


def needle_prompt(model: Qwen3VLModel, seconds: float):
    """A needle video's prompt ids and clip (timestamps as two plain tokens, the question as three)."""
    haystack = SyntheticHaystack(seconds, 4.0, 64, seed=0)
    indices, h, w = sampling_plan(haystack, VCFG, ICFG, 1 << 20)
    clip = sample_clip(NeedleVideo(haystack, place_needle(haystack.total, 4.0, 0.5, indices, 1.0,
                                                          random.Random(0))), indices, h, w, ICFG)
    per_patch = int(clip.grid_thw[0, 1] * clip.grid_thw[0, 2]) // 4
    cfg = model.cfg
    ids: list[int] = []
    for k, _ in enumerate(clip.timestamps):
        ids += [20 + k % 10, 30, cfg.vision_start_token_id] + [cfg.video_token_id] * per_patch + [cfg.vision_end_token_id]
    return ids + [40, 41, 42], clip


def timed(model, ids, clip, tokens: int, use_cache: bool) -> tuple[float, float, list[int]]:
    cpu, wall = time.process_time(), time.perf_counter()
    out, _ = greedy_decode(model, ids, clip, tokens, use_cache=use_cache)
    return time.perf_counter() - wall, time.process_time() - cpu, out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=float, nargs="+", default=[60.0, 300.0])
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    torch.manual_seed(0)
    model = Qwen3VLModel(load_model_config_yaml(ROOT / "configs" / "model" / "tiny.yaml")).eval()
    figures: dict[str, float] = {}
    notes = []
    for seconds in args.lengths:
        ids, clip = needle_prompt(model, seconds)
        runs: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
        outputs = {}
        for _ in range(args.repeats):
            for use_cache in (True, False, False, True):  # A-B-B-A
                wall, cpu, outputs[use_cache] = timed(model, ids, clip, args.tokens, use_cache)
                runs[use_cache].append((wall, cpu))
        if outputs[True] != outputs[False]:
            raise SystemExit(f"{seconds:g} s: cached and recomputed decoding chose different tokens")
        tag = f"{seconds:g}s"
        best = {c: min(r, key=lambda x: x[0]) for c, r in runs.items()}
        figures[f"eval_decode_s_{tag}"] = best[True][0]
        figures[f"eval_decode_s_{tag}_no_cache"] = best[False][0]
        figures[f"eval_decode_cpu_s_{tag}"] = best[True][1]
        figures[f"eval_decode_cpu_s_{tag}_no_cache"] = best[False][1]
        figures[f"eval_decode_speedup_{tag}"] = best[False][0] / best[True][0]
        notes.append(f"{tag}: {len(ids)} prompt tokens ({int(clip.grid_thw.prod()) // 4} visual)")
    print_results(figures)
    if not args.no_append:
        append_section("Eval decoding speed (bench/eval_speed.py)", [
            f"Tiny model, greedy decoding of {args.tokens} tokens after a needle prompt (vision tower once), "
            f"KV cache vs full recomputation per token, best of {2 * args.repeats} each (A-B-B-A), "
            f"{torch.get_num_threads()} thread(s); prompts: " + "; ".join(notes) + ". Wall and CPU (user+sys) "
            "seconds; the machine was shared with other jobs, so compare the ratios.", ""]
            + [f"- {name}: {value:.4g}" for name, value in figures.items()])
    return 0


if __name__ == "__main__":
    sys.exit(main())
