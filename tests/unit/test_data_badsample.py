"""Bad data through the loader with the real encoder: skipped, counted per data set, warned about (rate-
limited, naming shard and key); the limit on the sum over ranks and workers (data.max_bad_fraction) is the
trainer's; missing shards fail at start-up."""
from __future__ import annotations

import io
import json
import logging
import os
import tarfile

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from data.config import DataConfig, DatasetConfig
from data.encode import DocumentEncoder, EncodeConfig
from data.errors import DataError, over_limit
from data.loader import StreamingLoader
from data.tokenizer import train_sentencepiece
from data.vision import ImageConfig

SEQ = 512


@pytest.fixture(scope="module")
def encode(tmp_path_factory):
    texts = [f"the {c} square is on the {s} of page {i}" for i in range(60)
             for c, s in (("red", "left"), ("blue", "right"))]
    tok = train_sentencepiece(texts, 512, tmp_path_factory.mktemp("tok") / "t.model")
    cfg = EncodeConfig(image=ImageConfig(min_pixels=4 * 32 * 32, max_pixels=16 * 32 * 32))
    return DocumentEncoder(tok, cfg, SEQ).encode


def _jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG")
    return buf.getvalue()


def _good(i: int) -> dict:
    if i % 2:
        return {"txt": f"the red square is on the left of page {i}".encode()}
    return {"jpg": _jpeg(i), "json": json.dumps({"caption": f"the blue square {i}"}).encode()}


BAD = {
    "truncated_jpeg": {"jpg": _jpeg(99)[:300], "json": b'{"caption": "cut"}'},
    "undecodable_mp4": {"mp4": b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 50, "json": b'{"caption": "x"}'},
    "malformed_json": {"jpg": _jpeg(98), "json": b'{"caption": "unterminated'},
    "missing_pair": {"jpg": _jpeg(97)},
}


def _write(path: str, samples: dict[str, dict]) -> None:
    with wds.TarWriter(path) as sink:
        for key, members in samples.items():
            sink.write({"__key__": key, **members})


def _config(root: str, **overrides) -> DataConfig:
    base = dict(datasets=[DatasetConfig("mixed", [os.path.join(root, "*.tar")])], num_workers=0, max_epochs=1,
                max_bad_fraction=0.5, bad_sample_grace=0, packing_buffer=4, warn_interval_s=3600.0)
    base.update(overrides)
    return DataConfig(**base)


def _keys(loader: StreamingLoader) -> list[str]:
    return [k for batch in loader for k in batch.doc_keys]


def test_bad_samples_are_skipped_counted_and_warned_about_once(tmp_path, encode, caplog):
    samples = {f"good{i}": _good(i) for i in range(6)}
    samples.update({name: members for name, members in BAD.items()})
    _write(str(tmp_path / "shard-000000.tar"), samples)
    loader = StreamingLoader(_config(str(tmp_path)), encode, SEQ)
    with caplog.at_level(logging.WARNING, logger="data.loader"):
        keys = _keys(loader)
    assert sorted(keys) == [f"shard-000000/good{i}" for i in range(6)]
    assert loader.stats()["mixed"]["bad_samples"] == 4 and loader.stats()["mixed"]["samples"] == 6
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1  # rate-limited: the other three are counted only
    assert "shard-000000.tar key 'truncated_jpeg'" in warnings[0]


@pytest.mark.parametrize("bad", sorted(BAD))
def test_each_kind_of_bad_sample_is_named_in_its_warning(tmp_path, encode, caplog, bad):
    _write(str(tmp_path / "shard-000000.tar"), {"good0": _good(0), bad: BAD[bad], "good1": _good(1)})
    loader = StreamingLoader(_config(str(tmp_path)), encode, SEQ)
    with caplog.at_level(logging.WARNING, logger="data.loader"):
        assert sorted(_keys(loader)) == ["shard-000000/good0", "shard-000000/good1"]
    assert loader.stats()["mixed"]["bad_samples"] == 1
    assert f"key {bad!r}" in caplog.records[0].getMessage()


def test_empty_truncated_and_vanished_shards_are_skipped_and_counted(tmp_path, encode):
    root = str(tmp_path)
    _write(f"{root}/shard-000000.tar", {f"a{i}": _good(i) for i in range(4)})
    with tarfile.open(f"{root}/shard-000001.tar", "w"):
        pass  # a valid tar without members
    _write(f"{root}/full.tar", {f"c{i}": _good(i) for i in range(6)})
    data = open(f"{root}/full.tar", "rb").read()
    with open(f"{root}/shard-000002.tar", "wb") as f:
        f.write(data[:len(data) * 2 // 3])  # cut inside a later member
    os.remove(f"{root}/full.tar")
    _write(f"{root}/shard-000003.tar", {"d0": _good(0)})
    loader = StreamingLoader(_config(root, datasets=[DatasetConfig("mixed", [f"{root}/shard-*.tar"])]), encode,
                             SEQ)
    os.remove(f"{root}/shard-000003.tar")  # disappears after start-up
    keys = _keys(loader)
    assert {k.split("/")[0] for k in keys} == {"shard-000000", "shard-000002"}
    assert sum(k.startswith("shard-000000/") for k in keys) == 4
    assert 0 < sum(k.startswith("shard-000002/") for k in keys) < 6  # what precedes the cut is kept
    assert loader.stats()["mixed"]["bad_shards"] == 3


def test_missing_shards_at_start_up_are_an_error_naming_the_pattern(tmp_path, encode):
    _write(str(tmp_path / "shard-000000.tar"), {"a": _good(1)})
    cfg = _config(str(tmp_path))
    cfg.datasets.append(DatasetConfig("ocr", [str(tmp_path / "ocr" / "shard-*.tar")]))
    with pytest.raises(DataError, match=r"data set 'ocr': shard pattern '.*/ocr/shard-\*.tar' matches no file"):
        StreamingLoader(cfg, encode, SEQ)


def test_workers_count_bad_data_and_the_limit_is_decided_on_the_sum(tmp_path, encode):
    """No worker stops on its own share any more: the trainer sums the counts of every rank and worker and
    applies data.errors.over_limit (tests/unit/test_pipeline.py runs that through the trainer)."""
    samples = {f"good{i}": _good(i) for i in range(12)}
    samples.update({f"bad{i}": BAD["malformed_json"] for i in range(4)})  # 4 of 16 = 0.25
    for shard in range(2):
        _write(str(tmp_path / f"shard-{shard:06d}.tar"), samples)
    loader = StreamingLoader(_config(str(tmp_path), max_bad_fraction=0.2, num_workers=2), encode, SEQ)
    assert len(_keys(loader)) == 24
    counts = loader.stats()
    assert counts["mixed"]["bad_samples"] == 8 and counts["mixed"]["samples"] == 24
    assert over_limit(counts, 0.3, 0) == [] and over_limit(counts, 0.2, 0) == ["mixed 8/32 = 0.250"]


def test_a_data_error_in_a_worker_process_is_one_line(tmp_path, encode):
    with tarfile.open(tmp_path / "shard-000000.tar", "w"):
        pass  # no samples: a full pass returns nothing, which the worker reports as a DataError
    loader = StreamingLoader(_config(str(tmp_path), num_workers=1, max_epochs=None), encode, SEQ)
    with pytest.raises(DataError) as err:
        _keys(loader)
    assert str(err.value).startswith("data set 'mixed': a full pass over its 1 shard(s)")
    assert "\n" not in str(err.value)
