"""data.synth: byte-identical per seed, every sample encodes, the needle is where the answer says."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import decord
import numpy as np
import pytest

from data.encode import DocumentEncoder, EncodeConfig
from data.synth import main, make_corpus
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
