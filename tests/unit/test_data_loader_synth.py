"""The loader on the synth demo corpus with the real tokenizer and encoder: exact resume with images and
videos in the packing buffer (re-read and re-encoded from restore keys), 2 workers, 24 batches."""
from __future__ import annotations

import itertools
from dataclasses import fields

import pytest
import torch

from data.config import DataConfig, DatasetConfig
from data.encode import DocumentEncoder, EncodeConfig
from data.loader import StreamingLoader
from data.packing import VisionTokens
from data.synth import make_corpus
from data.tokenizer import Tokenizer

SEQ = 1024
MIX = {"text": 0.3, "caption": 0.35, "ocr": 0.25, "video": 0.1}  # stage s1's demo weights


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    make_corpus(root, scale=0.25, shards_per_set=3)
    tok = Tokenizer.load(root / "tokenizer.model")
    encoder = DocumentEncoder(tok, EncodeConfig(), SEQ)
    tokens = VisionTokens.from_tokenizer(tok, encoder.merge)
    cfg = DataConfig(datasets=[DatasetConfig(n, [str(root / n / "shard-*.tar")], w) for n, w in MIX.items()],
                     temperature=0.5, packing_buffer=16, num_workers=2, prefetch_factor=3, seed=5)
    return cfg, encoder, tokens


def _run(setup, n, state=None):
    cfg, encoder, tokens = setup
    loader = StreamingLoader(cfg, encoder.encode, SEQ, tokens=tokens)
    if state is not None:
        loader.load_state_dict(state)
    return list(itertools.islice(loader, n)), loader


def test_synth_mix_resumes_bitwise_with_vision_in_the_buffer(setup):
    reference, _ = _run(setup, 24)
    assert any(b.pixel_values is not None for b in reference)
    assert any(b.pixel_values_videos is not None for b in reference)
    head, first = _run(setup, 11)
    state = first.state_dict()
    buffered_sources = {tag[0] for w in state["streams"].values() for tag in w["buffer"]}
    assert {1, 3} & buffered_sources  # images or videos must be rebuilt from restore keys
    tail, _ = _run(setup, 13, state)
    for got, want in zip(head + tail, reference, strict=True):
        for f in fields(got):
            a, b = getattr(got, f.name), getattr(want, f.name)
            assert (torch.equal(a, b) if torch.is_tensor(a) else a == b), f"{f.name} differs"
    for b in reference:  # every image/video placeholder has its grid row after packing
        merge = 4
        if b.image_grid_thw is not None:
            assert int((b.input_ids == 5).sum()) == int(b.image_grid_thw.prod(1).sum()) // merge
        if b.video_grid_thw is not None:
            assert int((b.input_ids == 6).sum()) == int(b.video_grid_thw.prod(1).sum()) // merge
