"""Video needle in a haystack: needle placement and frame timing, prompt format, scoring, end to end."""
from __future__ import annotations

import dataclasses
import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from data.encode import DocumentEncoder, EncodeConfig
from data.synth import _timestamp_texts, needle_sample
from data.tokenizer import train_sentencepiece
from data.video import VideoConfig, encode_mp4, process_video
from data.vision import ImageConfig
from train.config.model import ConfigError
from train.eval.__main__ import main as eval_main
from train.eval.config import load_vniah_config
from train.eval.needle import (NEEDLE_COLORS, NEEDLE_QUESTION, NUM_CHOICES, Needle, NeedleVideo,
                               SyntheticHaystack, needle_patch_times, place_needle, prompt_ids, sample_clip,
                               sampled_needle_frames, sampling_plan)
from train.eval.vniah import parse_time, score_answer
from train.models.native_io import load_model_config_yaml, save_native_checkpoint
from train.models.qwen3vl.model import Qwen3VLModel

VCFG = VideoConfig(fps=1.0, max_frames=4096)
ICFG = ImageConfig()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = _timestamp_texts() + [NEEDLE_QUESTION, "A red circle.", "A blue square.", "A green triangle."] * 3
    return train_sentencepiece(texts, 2048, tmp_path_factory.mktemp("tok") / "tokenizer.model")


def _needle_video(seconds: float, depth: float, budget: int, fps: float = 4.0, seed: int = 0):
    haystack = SyntheticHaystack(seconds, fps, 64, seed)
    indices, h, w = sampling_plan(haystack, VCFG, ICFG, budget)
    needle = place_needle(haystack.total, fps, depth, indices, 1.0, random.Random(seed))
    return NeedleVideo(haystack, needle), indices, h, w


@pytest.mark.parametrize("seconds, depth, budget", [(10, 0.0, 4096), (10, 0.5, 4096), (10, 1.0, 4096),
                                                    (600, 0.3, 8192), (600, 0.97, 2048)])
def test_needle_frames_are_sampled_at_the_claimed_time(seconds, depth, budget):
    video, indices, h, w = _needle_video(seconds, depth, budget)
    needle, fps = video.needle, video.fps
    # Which sampled frames differ from the bare haystack, found from the pixels, not from the bookkeeping.
    drawn = video.frames(indices).astype(int)
    bare = video.haystack.frames(indices).astype(int)
    shown = [k for k in range(len(indices)) if np.abs(drawn[k] - bare[k]).max() > 0]
    clip = sample_clip(video, indices, h, w, ICFG)
    assert shown and shown == sampled_needle_frames(clip, needle)
    claimed = needle.time(fps)
    assert abs(claimed - (depth * (video.total - needle.count) + (needle.count - 1) / 2) / fps) < 1 / fps
    for k in shown:  # every sampled needle frame lies in the needle's interval around the claimed time
        assert abs(clip.frame_indices[k] / fps - claimed) <= needle.count / fps / 2
    # The timestamps the model reads beside the needle frames are within one temporal patch of the claim.
    patch_span = (indices[-1] - indices[0]) / fps / max(1, len(clip.timestamps) - 1)
    assert all(abs(t - claimed) <= patch_span + needle.count / fps for t in needle_patch_times(clip, needle, 2))
    assert int(clip.grid_thw.prod()) // 4 <= budget


def test_sampling_and_prompt_match_the_training_pipeline(tokenizer):
    """The same needle video as an mp4 through data/ (process_video, DocumentEncoder) gives the same frames,
    timestamps, grid and prompt tokens as the eval path."""
    video, indices, h, w = _needle_video(6, 0.6, 576)
    clip = sample_clip(video, indices, h, w, ICFG)
    mp4 = encode_mp4(video.frames(list(range(video.total))), int(video.fps))
    reference = process_video(mp4, VCFG, ICFG, 576)
    assert reference.frame_indices == clip.frame_indices and reference.timestamps == clip.timestamps
    assert torch.equal(reference.grid_thw, clip.grid_thw)
    qa = {"question": NEEDLE_QUESTION, "answer": video.needle.answer, "time": round(video.needle.time(4.0), 1)}
    sample = {"mp4": mp4, "json": json.dumps({"type": "video", "qa": [qa]}).encode()}
    doc = DocumentEncoder(tokenizer, EncodeConfig(video=VCFG), seq_len=640).encode(sample, "k", 0)
    ids = prompt_ids(tokenizer, clip, 2, VCFG.timestamp_format)
    assert doc.input_ids[:len(ids)].tolist() == ids
    assert tokenizer.decode(doc.input_ids[len(ids):].tolist()).startswith(f"<{qa['time']:.1f} seconds> A ")
    # The timestamps-off ablation (video.frame_timestamps=false) drops them on both paths, answers keep theirs.
    bare_cfg = dataclasses.replace(VCFG, frame_timestamps=False)
    bare = DocumentEncoder(tokenizer, EncodeConfig(video=bare_cfg), seq_len=640).encode(sample, "k", 0)
    bare_ids = prompt_ids(tokenizer, clip, 2, VCFG.timestamp_format, frame_timestamps=False)
    assert bare.input_ids[:len(bare_ids)].tolist() == bare_ids and "seconds" not in tokenizer.decode(bare_ids)
    assert len(bare_ids) < len(ids)
    assert tokenizer.decode(bare.input_ids[len(bare_ids):].tolist()).startswith(f"<{qa['time']:.1f} seconds> A ")


def test_needle_format_is_the_demo_corpus_one():
    members, _ = needle_sample(random.Random(3))
    qa = json.loads(members["json"])["qa"][0]
    assert qa["question"] == NEEDLE_QUESTION
    _, color, shape = qa["answer"].rstrip(".").split()
    assert color in NEEDLE_COLORS and NUM_CHOICES == len(NEEDLE_COLORS) * 3


def test_sparse_sampling_stretches_the_needle_so_a_sampled_frame_shows_it():
    # 2 hours at 4 fps with at most 64 frames: samples ~450 frames apart, a 1-second needle would be missed.
    haystack = SyntheticHaystack(7200, 4.0, 64, 0)
    indices, _, _ = sampling_plan(haystack, VideoConfig(fps=1.0, max_frames=64), ICFG, 1 << 20)
    for depth in (0.0, 0.33, 0.5, 1.0):
        needle = place_needle(haystack.total, 4.0, depth, indices, 1.0, random.Random(0))
        assert any(needle.start <= i < needle.start + needle.count for i in indices)


@pytest.mark.parametrize("text, expected", [
    ("<12.5 seconds> A red circle.", 12.5), ("<00:01:03.5> A red circle.", 63.5), ("at <7 seconds>", 7.0),
    ("A red circle.", None), ("<01:00:00.0> then <3.0 seconds>", 3600.0), ("<seconds>", None)])
def test_parse_time(text, expected):
    assert parse_time(text) == expected


def test_score_answer_on_crafted_answers():
    needle = Needle("red", "circle", start=40, count=4)
    truth = needle.time(4.0)  # frames 40..43 at 4 fps: 10.375 s
    exact = score_answer("<10.4 seconds> A red circle.\n", needle, truth)
    assert exact.correct and exact.exact and exact.time_error == pytest.approx(0.025)
    wordy = score_answer("<00:00:20.0> I think it is a Red  Circle, clearly.", needle, truth)
    assert wordy.correct and not wordy.exact and wordy.time_error == pytest.approx(9.625)
    wrong = score_answer("<10.4 seconds> A red square.", needle, truth)
    assert not wrong.correct and not wrong.exact and wrong.time_error == pytest.approx(0.025)
    assert not score_answer("A reddish circle.", needle, truth).correct
    no_time = score_answer("A red circle.", needle, truth)
    assert no_time.exact and no_time.time is None and no_time.time_error is None


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, tokenizer):
    torch.manual_seed(0)
    cfg = load_model_config_yaml("configs/model/tiny.yaml")
    path = tmp_path_factory.mktemp("ckpt") / "final"
    save_native_checkpoint(path, cfg, Qwen3VLModel(cfg).state_dict())
    return path


def test_vniah_end_to_end_on_a_tiny_random_model(tiny_checkpoint, tokenizer, tmp_path, capsys):
    out = tmp_path / "out"
    status = eval_main(["vniah", f"checkpoint={tiny_checkpoint}", f"tokenizer={tokenizer.path}",
                        "lengths=[4,12]", "depths=[0.0,1.0]", "trials=2", "budget=512", f"out={out}"])
    assert status == 0
    result = json.loads((out / "vniah.json").read_text())
    assert result["lengths"] == [4.0, 12.0] and result["depths"] == [0.0, 1.0]
    assert result["chance"] == pytest.approx(1 / 21)
    samples = result["samples"]
    assert len(samples) == 2 * 2 * 2
    for i, length in enumerate(result["lengths"]):
        for j, depth in enumerate(result["depths"]):
            cell = [s for s in samples if s["length"] == length and s["depth"] == depth]
            rescored = [score_answer(s["answer"], Needle(*s["needle"][2:-1].split(), 0, 1), s["needle_time"])
                        for s in cell]
            assert result["accuracy"][i][j] == pytest.approx(sum(r.correct for r in rescored) / len(cell))
            assert all(s["visual_tokens"] <= 512 for s in cell)
    printed = capsys.readouterr().out
    for i, row in enumerate(result["accuracy"]):
        line = next(ln for ln in printed.splitlines() if ln.strip().startswith(f"{result['lengths'][i]:g} s"))
        assert [f"{a:.1%}" for a in row] == line.split("|")[1].split()
    assert "chance 4.8% (1 of 21)" in printed
    png = Image.open(out / "vniah.png")
    assert png.format == "PNG" and png.size[0] > 100
    assert json.loads(png.info["Description"])["accuracy"] == result["accuracy"]


def test_config_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(ConfigError, match="checkpoint=PATH is required"):
        load_vniah_config([])
    with pytest.raises(ConfigError, match=r"depths=\[1.5\] must be"):
        load_vniah_config([f"checkpoint={tmp_path}", "depths=[1.5]"])
    assert eval_main(["vniah", f"checkpoint={tmp_path}", "budget=abc"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "budget" in err


def test_stamp_time_is_the_timestamp_the_prompt_writes_before_the_needle(tiny_checkpoint, tokenizer, tmp_path,
                                                                         monkeypatch):
    """Each sample records the `<t seconds>` text the prompt holds before the first patch showing the needle
    (stamp_time) and what an exact copy of it scores (stamp_error). An oracle that reads that text from the
    prompt (the patch found from the needle's frames) is scored `copied` with time_error == stamp_error; the
    tiny random model does not copy."""
    import re

    import train.eval.vniah as vniah
    needles, original_place = [], vniah.place_needle

    def place(*args, **kwargs):
        needles.append(original_place(*args, **kwargs))
        return needles[-1]

    def oracle(model, tok, ids, clip, max_new_tokens):
        stamps = re.findall(r"<[0-9.]+ seconds>(?=<\|vision_start\|>)", tok.decode(ids))
        first = sampled_needle_frames(clip, needles[-1])[0]
        return tok.encode(f"{stamps[first // 2]} {needles[-1].answer}")

    monkeypatch.setattr(vniah, "place_needle", place)
    monkeypatch.setattr(vniah, "greedy_answer", oracle)
    out = tmp_path / "oracle"
    assert eval_main(["vniah", f"checkpoint={tiny_checkpoint}", f"tokenizer={tokenizer.path}", "lengths=[8,36]",
                      "depths=[0.0,0.5,1.0]", "trials=2", "budget=512", f"out={out}"]) == 0
    result = json.loads((out / "vniah.json").read_text())
    for s in result["samples"]:
        assert s["copied"] and s["correct"], s
        assert s["time_error"] == pytest.approx(s["stamp_error"]) and s["stamp_error"] <= 1.0, s
    assert result["copied"] == [[1.0] * 3] * 2
    monkeypatch.undo()
    out = tmp_path / "random"
    assert eval_main(["vniah", f"checkpoint={tiny_checkpoint}", f"tokenizer={tokenizer.path}", "lengths=[36]",
                      "depths=[0.0,0.5,1.0]", "trials=2", "budget=512", f"out={out}"]) == 0
    assert not any(s["copied"] for s in json.loads((out / "vniah.json").read_text())["samples"])
