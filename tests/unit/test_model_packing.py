"""Packed sequences: documents delimited by cu_seqlens do not see each other (same logits as run alone),
position ids restart per document, and a placeholder/feature count mismatch names the sample."""
from __future__ import annotations

import pytest
import torch
from model_fixtures import (char_tokens, image_span, random_pixels, tiny_dense_config, tiny_moe_config,
                            video_span)

from train.models.qwen3vl import Qwen3VLModel
from data.positions import document_position_ids


def _documents(cfg) -> list[dict]:
    """Three documents: text + image, text only, video + image."""
    stamp = lambda s: char_tokens(f"<{s:.1f} seconds>")  # noqa: E731
    img_a, img_c, vid_c = [1, 4, 6], [1, 2, 4], [2, 4, 4]
    pa, ga = random_pixels([img_a], cfg, seed=10)
    pc, gc = random_pixels([img_c], cfg, seed=11)
    pv, gv = random_pixels([vid_c], cfg, seed=12)
    return [
        dict(input_ids=torch.tensor([5, 6] + image_span(img_a, cfg) + [7, 8, 9]), pixel_values=pa, image_grid_thw=ga),
        dict(input_ids=torch.tensor([11 + i for i in range(17)])),
        dict(input_ids=torch.tensor([3] + video_span(vid_c, cfg, stamp) + [4] + image_span(img_c, cfg) + [2]),
             pixel_values=pc, image_grid_thw=gc, pixel_values_videos=pv, video_grid_thw=gv),
    ]


def _pack(docs: list[dict]) -> dict:
    lengths = [d["input_ids"].numel() for d in docs]
    packed = dict(input_ids=torch.cat([d["input_ids"] for d in docs]),
                  cu_seqlens=torch.tensor([0] + lengths).cumsum(0).to(torch.int32))
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        parts = [d[key] for d in docs if key in d]
        if parts:
            packed[key] = torch.cat(parts)
    return packed


@pytest.mark.parametrize("make_cfg", [tiny_dense_config, tiny_moe_config], ids=["dense", "moe"])
def test_packed_documents_match_separate_runs(make_cfg):
    cfg = make_cfg()
    torch.manual_seed(0)
    model = Qwen3VLModel(cfg).eval()
    docs = _documents(cfg)
    packed = _pack(docs)
    with torch.no_grad():
        packed_logits = model(**packed).logits
        alone = [model(**doc).logits for doc in docs]
    bounds = packed["cu_seqlens"].tolist()
    for d, ref in enumerate(alone):
        got = packed_logits[bounds[d]:bounds[d + 1]]
        assert (got - ref).abs().max().item() <= 1e-5, f"document {d}"
    # Without cu_seqlens the documents attend to each other and positions run on: the logits differ.
    with torch.no_grad():
        unpacked = model(**{k: v for k, v in packed.items() if k != "cu_seqlens"}).logits
    assert (unpacked[bounds[1]:] - packed_logits[bounds[1]:]).abs().max().item() > 1e-3


def test_given_position_ids_equal_computed_ones():
    cfg = tiny_dense_config()
    model = Qwen3VLModel(cfg).eval()
    docs = _documents(cfg)
    packed = _pack(docs)
    merge = cfg.vision.spatial_merge_size
    position_ids = torch.cat([
        document_position_ids(d["input_ids"], d.get("image_grid_thw"), d.get("video_grid_thw"),
                              image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id,
                              spatial_merge_size=merge) for d in docs], dim=1)
    with torch.no_grad():
        given = model(**packed, position_ids=position_ids).logits
        computed = model(**packed).logits
    assert torch.equal(given, computed)


def test_placeholder_count_mismatch_names_the_sample():
    cfg = tiny_dense_config()
    model = Qwen3VLModel(cfg).eval()
    doc = _documents(cfg)[0]
    ids = doc["input_ids"]
    cut = torch.cat([ids[:3], ids[4:]])  # one image placeholder fewer than the 6 merged features
    with pytest.raises(ValueError, match=r"sample 'shard0/img7'.*5 image placeholder tokens but 6 image features"):
        model(cut, pixel_values=doc["pixel_values"], image_grid_thw=doc["image_grid_thw"], doc_keys="shard0/img7")
    with pytest.raises(ValueError, match=r"document 0 \(tokens 0\.\.12\): 5 image placeholder"):
        model(cut, pixel_values=doc["pixel_values"], image_grid_thw=doc["image_grid_thw"])


def test_packed_mismatch_names_the_document_it_is_in():
    cfg = tiny_dense_config()
    model = Qwen3VLModel(cfg).eval()
    docs = _documents(cfg)
    ids = docs[2]["input_ids"]
    first_video = int((ids == cfg.video_token_id).nonzero()[0])
    docs[2]["input_ids"] = torch.cat([ids[:first_video], ids[first_video + 1:]])
    keys = ["a/0", "b/1", "c/2"]
    with pytest.raises(ValueError, match=r"sample 'c/2'.*7 video placeholder tokens but 8 video features"):
        model(**_pack(docs), doc_keys=keys)


def test_position_ids_of_the_wrong_shape_are_rejected():
    model = Qwen3VLModel(tiny_dense_config()).eval()
    ids = torch.arange(1, 11)
    with pytest.raises(ValueError, match=r"position_ids has shape \(10,\), expected \(3, 10\)"):
        model(ids, position_ids=torch.arange(10))
