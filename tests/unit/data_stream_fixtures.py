"""Tiny shards and a byte-level text encoder for the streaming tests (import as `from data_stream_fixtures
import ...`; the dist tests put tests/unit on sys.path).

`byte_encode` turns a sample's `txt` member into a Document (token = byte + 10, so no special id appears)
and raises BadSample for a sample without `txt` or whose text starts with "BAD", which lets tests plant bad
samples next to good ones without images or videos.
"""
from __future__ import annotations

import os

import torch
import webdataset as wds

from data.batch import Document
from data.config import DataConfig, DatasetConfig
from data.errors import BadSample


def byte_encode(sample: dict, key: str, source: int) -> Document:
    if "txt" not in sample:
        raise BadSample(f"no txt member (members {sorted(k for k in sample if not k.startswith('_'))})", key)
    text = sample["txt"]
    if text.startswith(b"BAD"):
        raise BadSample("planted bad sample", key)
    ids = torch.tensor(list(text), dtype=torch.long) + 10
    n = ids.numel()
    return Document(key=key, source=source, input_ids=ids, position_ids=torch.arange(n).expand(3, n).clone(),
                    target_mask=torch.ones(n, dtype=torch.bool))


def sample_text(name: str, shard: int, index: int) -> bytes:
    """Deterministic text of varied length (5..204 bytes) so packing has something to fit."""
    length = 5 + (shard * 37 + index * 53) % 200
    return (f"{name}-{shard}-{index}:" * 30).encode()[:length]


def write_text_shards(root: str, name: str, num_shards: int, per_shard: int) -> list[str]:
    """Shards root/name/shard-00000N.tar of `per_shard` text samples; returns the expected doc keys."""
    os.makedirs(os.path.join(root, name), exist_ok=True)
    keys = []
    for shard in range(num_shards):
        stem = f"shard-{shard:06d}"
        with wds.TarWriter(os.path.join(root, name, stem + ".tar")) as sink:
            for i in range(per_shard):
                sink.write({"__key__": f"s{i:05d}", "txt": sample_text(name, shard, i)})
                keys.append(f"{stem}/s{i:05d}")
    return keys


def text_config(root: str, names_weights: dict[str, float], **overrides) -> DataConfig:
    datasets = [DatasetConfig(name=n, shards=[os.path.join(root, n, "shard-*.tar")], weight=w)
                for n, w in names_weights.items()]
    base = dict(datasets=datasets, packing_buffer=8, num_workers=0, prefetch_factor=2, seed=1234)
    base.update(overrides)
    return DataConfig(**base)
