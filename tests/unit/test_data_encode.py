"""data.encode: placeholders, targets, pixels, positions and budgets for each sample type; bad samples."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from data.encode import DocumentEncoder, EncodeConfig
from data.errors import BadSample
from data.tokenizer import train_sentencepiece
from data.video import VideoConfig, encode_mp4
from data.vision import ImageConfig, process_image

CFG = EncodeConfig(image=ImageConfig(min_pixels=4 * 32 * 32, max_pixels=64 * 32 * 32),
                   video=VideoConfig(min_pixels=2 * 32 * 32, max_pixels=8 * 32 * 32))


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    words = "a the red blue square circle page video shows what color is it moving left right".split()
    texts = [" ".join(words[(i * 7 + j) % len(words)] for j in range(9)) for i in range(200)]
    return train_sentencepiece(texts, 1024, tmp_path_factory.mktemp("tok") / "t.model")


def _png(h: int = 96, w: int = 64, seed: int = 0) -> bytes:
    a = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def _mp4(n: int = 20, fps: int = 10) -> bytes:
    frames = np.zeros((n, 64, 64, 3), dtype=np.uint8)
    for i in range(n):
        frames[i, 16:48, i * 2:i * 2 + 16] = 200
    return encode_mp4(frames, fps)


def _json(obj) -> bytes:
    return json.dumps(obj).encode()


def test_text_document(tok):
    doc = DocumentEncoder(tok, CFG, 256).encode({"__key__": "k", "txt": b"the red square"}, "s0/k", 3)
    assert (doc.key, doc.source) == ("s0/k", 3)
    assert doc.input_ids.tolist() == tok.encode("the red square") + [tok.eos_id]
    assert doc.target_mask.tolist() == [False] + [True] * (len(doc) - 1)
    assert torch.equal(doc.position_ids, torch.arange(len(doc)).expand(3, -1))
    assert doc.pixel_values is None and doc.pixel_values_videos is None


def test_caption_with_prompt(tok):
    sample = {"png": _png(), "json": _json({"caption": "a red square", "prompt": "what is it "})}
    doc = DocumentEncoder(tok, CFG, 256).encode(sample, "s/k", 0)
    want_pixels, grid = process_image(Image.open(io.BytesIO(sample["png"])), CFG.image)
    assert torch.equal(doc.pixel_values, want_pixels) and torch.equal(doc.image_grid_thw, grid)
    n_pad = int(grid.prod()) // 4
    prompt, caption = tok.encode("what is it "), tok.encode("a red square")
    assert doc.input_ids.tolist() == ([tok.vision_start_id] + [tok.image_pad_id] * n_pad + [tok.vision_end_id]
                                      + prompt + caption + [tok.eos_id])
    assert doc.target_mask.tolist() == [False] * (n_pad + 2 + len(prompt)) + [True] * (len(caption) + 1)
    # MRoPE: the vision span is a (1, gh/2, gw/2) grid after vision_start; text resumes at max + 1.
    gh, gw = int(grid[0, 1]) // 2, int(grid[0, 2]) // 2
    assert doc.position_ids[:, 1 + n_pad - 1].tolist() == [1, gh, gw]
    assert doc.position_ids[:, n_pad + 1].tolist() == [1 + max(gh, gw)] * 3


def test_learn_prompts_switch(tok):
    sample = {"png": _png(), "json": _json({"caption": "a red square", "prompt": "what is it "})}
    cfg = EncodeConfig(image=CFG.image, video=CFG.video, learn_prompts=True)
    doc = DocumentEncoder(tok, cfg, 256).encode(sample, "k", 0)
    vision = (doc.input_ids == tok.image_pad_id) | (doc.input_ids == tok.vision_start_id) | (
        doc.input_ids == tok.vision_end_id)
    assert doc.target_mask[~vision][1:].all() and not doc.target_mask[vision].any()


def test_interleaved_pages_share_the_budget(tok):
    content = [{"text": "page one "}, {"image": "p1.png"}, {"text": "page two "}, {"image": "p2.png"},
               {"text": "the end"}]
    sample = {"json": _json({"type": "interleaved", "content": content}),
              "p1.png": _png(512, 512, 1), "p2.png": _png(512, 512, 2)}
    roomy = DocumentEncoder(tok, CFG, 1024).encode(sample, "k", 0)
    assert roomy.image_grid_thw.tolist() == [[1, 16, 16]] * 2  # 64 tokens each: max_pixels
    tight = DocumentEncoder(tok, CFG, 100).encode(sample, "k", 0)
    # 0.9 * 100 = 90 tokens for 2 images -> at most 45 each; 512x512 -> 6x6 merged tokens = 36.
    assert tight.image_grid_thw.tolist() == [[1, 12, 12]] * 2
    assert len(tight) <= 100
    pads = tight.input_ids == tok.image_pad_id
    assert int(pads.sum()) == 72 and tight.pixel_values.shape[0] == 288
    text = tok.decode(tight.input_ids[~pads].tolist())
    assert text.startswith("page one <|vision_start|><|vision_end|>page two ")


def test_video_caption_timestamps(tok):
    sample = {"mp4": _mp4(), "json": _json({"type": "video", "caption": "a square moving right"})}
    doc = DocumentEncoder(tok, CFG, 512).encode(sample, "k", 0)
    grid = doc.video_grid_thw[0].tolist()
    assert grid[0] == 2  # 2 s at 2 fps = 4 frames = 2 temporal patches
    per_patch = grid[1] * grid[2] // 4
    assert int((doc.input_ids == tok.video_pad_id).sum()) == grid[0] * per_patch
    assert doc.pixel_values_videos.shape[0] == grid[0] * grid[1] * grid[2]
    assert doc.input_ids[-1] == tok.eos_id
    text = tok.decode([i for i in doc.input_ids.tolist() if i != tok.video_pad_id])
    # frames 0, 6, 13, 19 at 10 fps -> patch times 0.3 and 1.6
    assert text == ("<0.3 seconds><|vision_start|><|vision_end|><1.6 seconds><|vision_start|><|vision_end|>"
                    "a square moving right")
    caption_start = len(doc) - 1 - len(tok.encode("a square moving right"))
    assert not doc.target_mask[:caption_start].any() and doc.target_mask[caption_start:].all()
    # Every temporal patch is its own MRoPE item with t = 0.
    pad_pos = doc.position_ids[0][doc.input_ids == tok.video_pad_id].reshape(grid[0], -1)
    assert (pad_pos == pad_pos[:, :1]).all() and pad_pos[1, 0] > pad_pos[0, 0]


def test_video_qa_with_timestamped_answer(tok):
    qa = [{"question": "when is it red", "answer": "it is red", "time": 65.5}]
    cfg = EncodeConfig(image=CFG.image, video=VideoConfig(min_pixels=2 * 32 * 32, max_pixels=8 * 32 * 32,
                                                         timestamp_format="hms"))
    doc = DocumentEncoder(tok, cfg, 512).encode({"mp4": _mp4(), "json": _json({"qa": qa})}, "k", 0)
    answer = tok.encode("<00:01:05.5> it is red\n") + [tok.eos_id]
    question = tok.encode("when is it red\n")
    assert doc.input_ids[-len(answer):].tolist() == answer
    assert doc.target_mask[-len(answer):].all()
    assert doc.input_ids[-len(answer) - len(question):-len(answer)].tolist() == question
    assert not doc.target_mask[-len(answer) - len(question):-len(answer)].any()
    assert "<00:00:00.3>" in tok.decode(doc.input_ids.tolist())


def test_clip_start_shifts_frame_timestamps_into_source_time(tok):
    """A clip cut at 100 s of its video: stamps read 100.3 and 101.6 s, the answer's time is given as is."""
    meta = {"start": 100, "qa": [{"question": "when is it red", "answer": "it is red", "time": 101.6}]}
    interleaved = {"type": "interleaved", "content": [{"video": "c.mp4", "start": 100.0}, {"text": "x"}]}
    for sample in ({"mp4": _mp4(), "json": _json(meta)}, {"c.mp4": _mp4(), "json": _json(interleaved)}):
        doc = DocumentEncoder(tok, CFG, 512).encode(sample, "k", 0)
        text = tok.decode([i for i in doc.input_ids.tolist() if i != tok.video_pad_id])
        assert text.startswith("<100.3 seconds><|vision_start|><|vision_end|><101.6 seconds><|vision_start|>"), text
    assert text.endswith("x")
    assert tok.decode(doc.input_ids.tolist()).count("seconds>") == 2
    unshifted = DocumentEncoder(tok, CFG, 512).encode({"mp4": _mp4(), "json": _json({"caption": "x"})}, "k", 0)
    assert "<0.3 seconds>" in tok.decode(unshifted.input_ids.tolist())


@pytest.mark.parametrize("sample,match", [
    ({"mp4": _mp4(), "json": _json({"caption": "x", "start": -1})}, "k1: json: start=-1 is not a non-negative"),
    ({"mp4": _mp4(), "json": _json({"caption": "x", "start": "5"})}, "k1: json: start='5' is not a non-negative"),
    ({"c.mp4": _mp4(), "json": _json({"type": "interleaved", "content": [{"video": "c.mp4", "start": True}]})},
     r"k1: json: content\[0\].start=True is not"),
    ({"jpg": _png()[:200], "json": _json({"caption": "x"})}, "k1: jpg: undecodable image"),
    ({"mp4": b"\x00" * 500, "json": _json({"caption": "x"})}, "k1: mp4: undecodable video"),
    ({"png": _png(), "json": b"{not json"}, "k1: json: malformed"),
    ({"png": _png()}, "k1: member png has no .json pair"),
    ({"json": _json({"type": "interleaved", "content": [{"image": "p9.png"}]})}, "names member p9.png"),
    ({"json": _json({"type": "audio", "text": "x"})}, "unknown sample type 'audio'"),
    ({"bin": b"x"}, "unknown sample type"),
    ({"png": _png(), "json": _json({"prompt": "x"})}, "missing key 'caption'"),
    ({"txt": "see <|image_pad|> here".encode()}, "text contains a vision special token"),
    ({"txt": b"\xff\xfe"}, "txt: not UTF-8"),
])
def test_bad_samples(tok, sample, match):
    with pytest.raises(BadSample, match=match):
        DocumentEncoder(tok, CFG, 256).encode(sample, "k1", 0)


def test_long_documents_are_whole_but_vision_fits(tok):
    long_text = " ".join(["the red square"] * 40)
    sample = {"json": _json({"type": "interleaved", "content": [
        {"image": "a.png"}, {"text": long_text}, {"image": "b.png"}]}), "a.png": _png(512, 512), "b.png": _png()}
    doc = DocumentEncoder(tok, CFG, 64).encode(sample, "k", 0)
    # The packer cuts long documents at a text boundary; the encoder keeps vision within 0.9 * seq_len.
    assert len(doc) > 64
    assert int((doc.input_ids == tok.image_pad_id).sum()) <= int(0.9 * 64)


def test_data_package_imports_nothing_from_train():
    """data/ is upstream of train/ (one-way data flow): no module of it may import train.*"""
    import ast
    from pathlib import Path

    data_dir = Path(__file__).resolve().parents[2] / "data"
    offenders = []
    for path in sorted(data_dir.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{path.name}: {n}" for n in names if n == "train" or n.startswith("train.")]
    assert offenders == []
