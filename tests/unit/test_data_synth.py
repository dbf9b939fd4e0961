"""data.synth: byte-identical per seed, every sample encodes, the needle is where the answer says."""
from __future__ import annotations

import io
import json
import random
import re
import tarfile
from pathlib import Path

import decord
import numpy as np
import pytest
import torch

from data.encode import DocumentEncoder, EncodeConfig
from data.synth import GENERATORS, NEEDLE_COLORS, NEEDLE_QUESTION, SHAPES, main, make_corpus
from data.tokenizer import Tokenizer
from data.video import VideoConfig
from data.vision import ImageConfig


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _samples(shard: Path) -> dict[str, dict[str, bytes]]:
    """{key: {ext: bytes}} read with tarfile: independent of the project's own reader."""
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(shard) as tar:
        for m in tar:
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth") / "a"
    assert main(["--out", str(root), "--seed", "3", "--scale", "0.05"]) == 0
    return root


def test_same_seed_same_bytes_other_seed_differs(corpus, tmp_path):
    make_corpus(tmp_path / "b", seed=3, scale=0.05)
    make_corpus(tmp_path / "c", seed=4, scale=0.05)
    a, b, c = _files(corpus), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert a == b
    assert a.keys() == c.keys()
    assert a["text/shard-000000.tar"] != c["text/shard-000000.tar"]
    assert a["needle/shard-000000.tar"] != c["needle/shard-000000.tar"]


def test_manifest_and_layout(corpus):
    manifest = json.loads((corpus / "manifest.json").read_text())
    assert set(manifest["datasets"]) == {"text", "caption", "ocr", "video", "needle"}
    for name, d in manifest["datasets"].items():
        assert len(d["shards"]) == 4, name
        assert sum(len(_samples(corpus / s)) for s in d["shards"]) == d["samples"], name
    assert manifest["datasets"]["text"]["samples"] == 48  # 1000 * 0.05, a whole number per shard
    assert Tokenizer.load(corpus / "tokenizer.model").video_pad_id == 6


def test_every_sample_encodes(corpus):
    tok = Tokenizer.load(corpus / "tokenizer.model")
    cfg = EncodeConfig(image=ImageConfig(min_pixels=4 * 1024, max_pixels=64 * 1024),
                       video=VideoConfig(min_pixels=4 * 1024, max_pixels=16 * 1024))
    enc = DocumentEncoder(tok, cfg, 1024)
    kinds = {"text": "input_ids", "caption": "image_grid_thw", "ocr": "image_grid_thw",
             "video": "video_grid_thw", "needle": "video_grid_thw"}
    for name, field in kinds.items():
        for shard in sorted((corpus / name).glob("*.tar")):
            for key, sample in _samples(shard).items():
                doc = enc.encode(sample, key, 0)
                assert getattr(doc, field) is not None, key
                assert doc.target_mask.any(), key


def test_needle_is_at_the_answer_time(corpus):
    shard = sorted((corpus / "needle").glob("*.tar"))[0]
    for key, sample in _samples(shard).items():
        qa = json.loads(sample["json"])["qa"][0]
        reader = decord.VideoReader(io.BytesIO(sample["mp4"]))
        fps = reader.get_avg_fps()
        frames = reader.get_batch(list(range(len(reader)))).asnumpy().astype(np.float32)
        # The needle frames differ most from the haystack's median frame.
        distance = np.abs(frames - np.median(frames, axis=0)).mean(axis=(1, 2, 3))
        needle = np.flatnonzero(distance > distance.max() / 2)
        assert len(needle) == int(fps), key  # one second long
        assert abs((needle.mean() / fps) - qa["time"]) <= 0.05, key
        assert qa["answer"].split()[1] in {"red", "green", "blue", "yellow", "purple", "orange", "white"}


@pytest.fixture(scope="module")
def needle_tokenizer(tmp_path_factory) -> Tokenizer:
    from data.synth import _timestamp_texts
    from data.tokenizer import train_sentencepiece
    texts = _timestamp_texts() + [f"A {c} {s}." for c in NEEDLE_COLORS for s in SHAPES] + [NEEDLE_QUESTION]
    return train_sentencepiece(texts, 512, tmp_path_factory.mktemp("tok") / "t.model")


def test_needle_clips_answer_with_the_timestamp_before_the_needle(needle_tokenizer):
    """`--preset needle_clips` haystacks are clips of a 144 s video: their frame timestamps start at the clip's
    start (so the sequence position does not tell the time), and the answer's time is the text written before
    the temporal patch that shows the needle, found here from the document's own pixels."""
    tok = needle_tokenizer
    cfg = EncodeConfig(image=ImageConfig(min_pixels=1024, max_pixels=16384),
                       video=VideoConfig(fps=1.0, max_frames=4096, min_pixels=1024, max_pixels=4096))
    enc = DocumentEncoder(tok, cfg, 256)
    starts = []
    for i in range(12):
        members, _ = GENERATORS["needle_short_clips"][1](random.Random(i))
        meta = json.loads(members["json"])
        doc = enc.encode(members, f"k{i}", 0)
        patches = doc.pixel_values_videos.reshape(int(doc.video_grid_thw[0, 0]), -1)  # uint8 pixels
        # The haystack is gray in 60..120; every needle color has a channel far outside. The first patch
        # showing it (a needle stretched to the sampling gap may reach into the next one):
        needle_share = ((patches < 45) | (patches > 135)).float().mean(dim=1)
        needle_patch = int(torch.nonzero(needle_share > 0.01)[0])
        text = tok.decode(doc.input_ids.tolist())
        stamps = re.findall(r"<[0-9.]+ seconds>(?=<\|vision_start\|>)", text)
        answer = re.findall(r"\n(<[0-9.]+ seconds>) A ", text)
        assert answer == [stamps[needle_patch]], (i, stamps, answer, needle_patch)
        assert float(stamps[0][1:].split()[0]) >= meta["start"]
        assert 0 <= meta["start"] <= 144 - 4
        starts.append(meta["start"])
    assert len(set(starts)) > 6  # spread over the source video, not one offset
    plain = json.loads(GENERATORS["needle_short"][1](random.Random(0))[0]["json"])  # the needle preset's
    assert "start" not in plain and plain["qa"][0]["time"] == round(plain["qa"][0]["time"], 1)


def test_stamp_text_answers_with_the_stamp_before_the_needle_words(needle_tokenizer):
    """`--preset needle_read`'s stamp_text documents: a needle clip in words (per patch the timestamp the
    encoder writes at 1 fps, then two words), the needle's color and shape at one patch, answered with that
    patch's stamp; only the answer is learned. A quarter of the clips start at 0, as the eval's haystacks."""
    tok = needle_tokenizer
    enc = DocumentEncoder(tok, EncodeConfig(), 256)
    starts = []
    for i in range(40):
        members, _ = GENERATORS["stamp_text"][1](random.Random(i))
        content = json.loads(members["json"])["content"]
        patches = [(content[k]["text"], content[k + 1]["text"]) for k in range(0, len(content) - 2, 2)]
        needles = [(stamp, words) for stamp, words in patches if words.split()[0] in NEEDLE_COLORS]
        assert len(needles) == 1 and len(patches) >= 2, patches
        (stamp, words), = needles
        assert content[-1] == {"text": f"{stamp} A {words}.\n"}
        assert content[-2] == {"text": NEEDLE_QUESTION + "\n", "learn": False}
        seconds = [float(stamp[1:].split()[0]) for stamp, _ in patches]
        assert seconds == sorted(seconds) and seconds[-1] <= 144
        starts.append(seconds[0])
        doc = enc.encode(members, f"k{i}", 0)
        learned = tok.decode(doc.input_ids[doc.target_mask].tolist())
        assert learned.startswith(stamp) and NEEDLE_QUESTION not in learned, learned
    from_zero = sum(s < 1.5 for s in starts)  # the first patch's stamp of a clip from 0 is below 1.5 s
    assert 4 <= from_zero <= 20 and max(starts) > 60, starts


def test_needle_read_clips_start_at_zero_a_quarter_of_the_time():
    """needle_read's haystack clips: timestamps from 0 (the eval's case) for about a quarter, the rest
    anywhere in the 144 s source; needle_clips' clips are unchanged (no extra draw)."""
    read = [json.loads(GENERATORS["needle_short_read"][1](random.Random(i))[0]["json"])["start"] for i in range(40)]
    assert 4 <= read.count(0) <= 20 and max(read) > 60, read
    clips = [json.loads(GENERATORS["needle_short_clips"][1](random.Random(i))[0]["json"])["start"] for i in range(40)]
    assert clips.count(0) <= 2, clips


@pytest.mark.parametrize("pipeline", ["demo", "needle", "needle_position"])
def test_pipelines_read_only_data_sets_their_synth_corpus_writes(pipeline):
    """`python -m train pipeline=P` writes the corpus of its `pipeline.synth_corpus` preset on first use: every
    data set its stages mix must be one that preset writes."""
    from data.synth import PRESETS
    from train.config.compose import stage_configs
    configs = stage_configs([f"pipeline={pipeline}"])
    preset = configs[0].pipeline.synth_corpus
    read = {d.name for cfg in configs for d in cfg.data.datasets}
    assert preset and read and read <= set(PRESETS[preset]), (preset, read)
