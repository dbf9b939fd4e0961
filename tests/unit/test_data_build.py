"""data.build / data.inspect / shard_format.ShardWriter: folders and JSONL manifests to shards, and back."""
from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
from PIL import Image

from data import build as build_mod
from data import inspect as inspect_mod
from data.shard_format import ShardWriter
from data.shards import iter_samples
from data.tokenizer import train_sentencepiece
from data.video import encode_mp4


def _png(seed: int = 0, size: int = 48) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
        buf, format="PNG")
    return buf.getvalue()


def _mp4() -> bytes:
    frames = np.zeros((8, 32, 32, 3), dtype=np.uint8)
    frames[:, 8:24, 8:24] = 200
    return encode_mp4(frames, fps=4)


@pytest.fixture()
def folder(tmp_path):
    src = tmp_path / "src"
    (src / "sub.dir").mkdir(parents=True)
    (src / "a.txt").write_text("the red square is left of the blue circle")
    (src / "b.png").write_bytes(_png(1))
    (src / "b.json").write_text(json.dumps({"caption": "a noisy square"}))
    (src / "c.json").write_text(json.dumps({"type": "interleaved", "content": [
        {"text": "page one"}, {"image": "page1.png"}, {"text": "page two"}, {"image": "page2.png"}]}))
    (src / "c.page1.png").write_bytes(_png(2))
    (src / "c.page2.png").write_bytes(_png(3))
    (src / "sub.dir" / "d.mp4").write_bytes(_mp4())
    (src / "sub.dir" / "d.json").write_text(json.dumps({"type": "video", "caption": "a still square"}))
    (src / "e.jpg").write_bytes(_png(4))  # no .json pair: bad
    (src / "f.png").write_bytes(_png(5)[:100])  # truncated: bad only once decoded (with a tokenizer)
    (src / "f.json").write_text(json.dumps({"caption": "cut"}))
    return src


def _read_all(out) -> dict[str, dict]:
    return {s["__key__"]: s for p in sorted(out.glob("shard-*.tar")) for _, s in iter_samples(str(p))}


def test_folder_to_shards_round_trip(folder, tmp_path):
    summary = build_mod.build(folder, tmp_path / "out", progress=False)
    assert dict(summary.samples) == {"text": 1, "caption": 2, "interleaved": 1, "video": 1}
    assert len(summary.bad) == 1 and "e: member jpg has no .json pair" in summary.bad[0]
    samples = _read_all(tmp_path / "out")
    assert sorted(samples) == ["a", "b", "c", "f", "sub_dir_d"]
    assert samples["c"]["page2.png"] == (folder / "c.page2.png").read_bytes()
    assert samples["sub_dir_d"]["mp4"] == (folder / "sub.dir" / "d.mp4").read_bytes()
    # Reproducible: the same source gives byte-identical shards.
    build_mod.build(folder, tmp_path / "again", progress=False)
    assert (tmp_path / "out" / "shard-000000.tar").read_bytes() == (
        tmp_path / "again" / "shard-000000.tar").read_bytes()


def test_token_summary_with_tokenizer(folder, tmp_path, capsys):
    tok_path = tmp_path / "t.model"
    train_sentencepiece(["the red square is left of the blue circle page one two"] * 50, 512, tok_path)
    code = build_mod.main([str(folder), str(tmp_path / "out"), "--tokenizer", str(tok_path), "--seq-len", "512",
                           "--no-progress"])
    assert code == 0
    out = capsys.readouterr()
    assert "f: png: undecodable image" in out.err  # decoding happens only when counting tokens
    rows = {line.split()[0]: line.split()[1:] for line in out.out.splitlines()[1:]}
    assert rows["bad"] == ["2"]
    samples, tokens, vision = (int(v) for v in rows["interleaved"])
    # Two 48x48 pages at Qwen3-VL's min_pixels (256x256 -> 64 tokens each) plus the text.
    assert samples == 1 and vision == 128 and tokens > vision + 4


@pytest.mark.parametrize("flag,value,want_shards", [("--max-samples-per-shard", "2", math.ceil(5 / 2)),
                                                    ("--max-shard-bytes", "1", 5)])
def test_shard_limits(folder, tmp_path, flag, value, want_shards):
    assert build_mod.main([str(folder), str(tmp_path / "out"), flag, value, "--no-progress"]) == 0
    shards = sorted((tmp_path / "out").glob("shard-*.tar"))
    assert len(shards) == want_shards
    assert sum(len(list(iter_samples(str(p)))) for p in shards) == 5


def test_jsonl_manifest(tmp_path, capsys):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "x.png").write_bytes(_png(7))
    (tmp_path / "p1.png").write_bytes(_png(8))
    (tmp_path / "clip.mp4").write_bytes(_mp4())
    lines = [{"text": "plain text"},
             {"key": "cap", "image": "img/x.png", "caption": "noise", "prompt": "what is it"},
             {"type": "interleaved", "content": [{"image": "p1.png"}, {"text": "page"}]},
             {"video": "clip.mp4", "qa": [{"question": "when", "answer": "now", "time": 1.0}]},
             {"image": "img/missing.png", "caption": "x"}]
    manifest = tmp_path / "data.jsonl"
    manifest.write_text("\n".join(json.dumps(x) for x in lines) + "\n{broken\n")
    summary = build_mod.build(manifest, tmp_path / "out", progress=False)
    assert dict(summary.samples) == {"text": 1, "caption": 1, "interleaved": 1, "video": 1}
    assert f"{manifest}:5: media file" in summary.bad[0] and f"{manifest}:6: malformed JSON" in summary.bad[1]
    samples = _read_all(tmp_path / "out")
    assert samples["cap"]["png"] == (tmp_path / "img" / "x.png").read_bytes()
    doc = json.loads(samples["00000003"]["json"])
    assert doc["content"][0] == {"image": "image0.png"} and "image0.png" in samples["00000003"]
    assert build_mod.main([str(manifest), str(tmp_path / "strict"), "--strict", "--no-progress"]) == 1
    assert "data.jsonl:5: media file" in capsys.readouterr().err


def test_writer_refuses_bad_keys(tmp_path):
    with ShardWriter(tmp_path) as w:
        w.write("k", {"txt": b"x"})
        with pytest.raises(ValueError, match="'k' written twice"):
            w.write("k", {"txt": b"y"})
        with pytest.raises(ValueError, match="'a.b'"):
            w.write("a.b", {"txt": b"y"})


def test_inspect_counts_and_shows(folder, tmp_path):
    build_mod.build(folder, tmp_path / "out", progress=False)
    with ShardWriter(tmp_path / "bad", max_samples=10) as w:
        w.write("broken", {"png": _png(), "json": b"{nope"})
    tok_path = tmp_path / "t.model"
    train_sentencepiece(["page one page two the red square"] * 20, 512, tok_path)
    report = io.StringIO()
    counts = inspect_mod.inspect([str(tmp_path / "out" / "*.tar"), str(tmp_path / "bad" / "*.tar")], show=5,
                                 tokenizer=str(tok_path), out=report)
    text = report.getvalue()
    # f.png is counted bad here: shown samples are decoded (all five are shown).
    assert counts == {"text": 1, "caption": 1, "interleaved": 1, "video": 1, "bad": 2}
    assert "broken: json: malformed" in text and "f: png: undecodable image" in text
    assert "video mp4: 8 frames at 4.00 fps (2.0 s), 32x32" in text
    assert "page one<|vision_start|><|image_pad|>x64<|vision_end|>page two" in text
