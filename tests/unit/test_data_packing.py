"""data.packing: PackedBatch layout, loss weights, cutting over-long documents at text boundaries, best fit."""
from __future__ import annotations

import math
import random

import pytest
import torch

from data.batch import IGNORE_INDEX, Document, concat_batches
from data.packing import (BestFitPacker, BufferEntry, VisionTokens, build_packed, document_loss_weight,
                          fit_document)
from data.positions import document_position_ids

TOK = VisionTokens()  # vision_start 3, vision_end 4, image_pad 5, video_pad 6, merge 2
PATCH_DIM = 12


def text_doc(key: str, n: int, source: int = 0, first_target: int = 1) -> Document:
    mask = torch.zeros(n, dtype=torch.bool)
    mask[first_target:] = True
    return Document(key=key, source=source, input_ids=torch.arange(n) + 100,
                    position_ids=torch.arange(n).expand(3, n).clone(), target_mask=mask)


def vision_doc(key: str, layout: list) -> Document:
    """layout: ints (text runs) and ("image", h, w) / ("video", t, h, w) items, in patch units."""
    ids, mask, images, igrids, videos, vgrids = [], [], [], [], [], []
    for item in layout:
        if isinstance(item, int):
            ids += [100 + i for i in range(item)]
            mask += [True] * item
            continue
        kind, *thw = item
        t, h, w = thw if kind == "video" else [1, *thw]
        pad, store, grids = (TOK.image_pad, images, igrids) if kind == "image" else (TOK.video_pad, videos, vgrids)
        groups = 1 if kind == "image" else t
        for _ in range(groups):
            span = [TOK.vision_start] + [pad] * (t * h * w // 4 // groups) + [TOK.vision_end]
            ids += span
            mask += [False] * len(span)
        # Patch rows carry their item index and row number so a wrong cut is visible.
        store.append(torch.arange(t * h * w, dtype=torch.float32)[:, None] + 1000 * len(grids) + torch.zeros(PATCH_DIM))
        grids.append([t, h, w])
    input_ids = torch.tensor(ids)
    igrid = torch.tensor(igrids) if igrids else None
    vgrid = torch.tensor(vgrids) if vgrids else None
    positions = document_position_ids(input_ids, igrid, vgrid, image_token_id=TOK.image_pad,
                                      video_token_id=TOK.video_pad, spatial_merge_size=2)
    return Document(key=key, source=1, input_ids=input_ids, position_ids=positions,
                    target_mask=torch.tensor(mask), pixel_values=torch.cat(images) if images else None,
                    image_grid_thw=igrid, pixel_values_videos=torch.cat(videos) if videos else None,
                    video_grid_thw=vgrid)


def test_packed_layout_labels_positions_segments():
    a, b = text_doc("a", 5, source=0, first_target=2), text_doc("b", 3, source=2)
    batch = build_packed([a, b], 12, "per_token", pad_id=0)
    assert batch.cu_seqlens.tolist() == [0, 5, 8, 12]  # the pad tail is its own segment
    assert batch.num_pad == 4 and batch.doc_keys == ["a", "b"]
    assert batch.input_ids[8:].tolist() == [0] * 4
    assert batch.position_ids[0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3]
    ignore = IGNORE_INDEX
    # label i = next token of the same document if that token is a target; nothing crosses a boundary.
    assert batch.labels.tolist() == [ignore, 102, 103, 104, ignore, 101, 102, ignore] + [ignore] * 4
    assert batch.source_ids.tolist() == [0] * 5 + [2] * 3 + [-1] * 4
    assert batch.loss_weights.tolist() == [0, 1, 1, 1, 0, 1, 1, 0, 0, 0, 0, 0]


@pytest.mark.parametrize("mode", ["sqrt", "per_token", "per_sample"])
def test_loss_weights_turn_the_global_sum_into_the_selected_loss(mode):
    docs = [text_doc("long", 101), text_doc("short", 5)]  # 100 and 4 targets
    batch = build_packed(docs, 128, mode)
    per_doc = [float(batch.loss_weights[lo:hi].sum()) for lo, hi in ((0, 101), (101, 106))]
    expected = {"sqrt": [math.sqrt(100), math.sqrt(4)], "per_token": [100, 4], "per_sample": [1, 1]}[mode]
    assert per_doc == pytest.approx(expected)
    assert document_loss_weight(0, mode) == 0.0


def test_vision_tensors_concatenate_in_document_order():
    first = vision_doc("img", [3, ("image", 4, 4), 2])
    second = vision_doc("vid", [2, ("video", 2, 4, 4), 1, ("image", 2, 4), 2])
    batch = build_packed([first, second], 64, "sqrt")
    assert batch.image_grid_thw.tolist() == [[1, 4, 4], [1, 2, 4]]
    assert torch.equal(batch.pixel_values, torch.cat([first.pixel_values, second.pixel_values]))
    assert torch.equal(batch.pixel_values_videos, second.pixel_values_videos)
    assert (batch.labels[batch.input_ids == TOK.image_pad] == IGNORE_INDEX).all()


def test_joined_batches_keep_every_segment_and_vision_item_in_order():
    first = build_packed([vision_doc("img", [3, ("image", 4, 4), 2]), text_doc("t", 5)], 32, "sqrt")
    full = build_packed([text_doc("full", 16)], 16, "sqrt")  # no pad tail
    last = build_packed([vision_doc("vid", [2, ("video", 2, 4, 4), 1])], 24, "sqrt")
    joined = concat_batches([first, full, last])
    assert joined.seq_len == 72 and joined.num_pad == first.num_pad + last.num_pad
    assert joined.cu_seqlens.dtype == torch.int32
    assert joined.cu_seqlens.tolist() == [0, 11, 16, 32, 48, 63, 72]
    assert joined.doc_keys == ["img", "t", "", "full", "vid"]  # key d names segment d; "" a pad tail
    for key in ("input_ids", "labels", "loss_weights", "source_ids"):
        assert torch.equal(getattr(joined, key), torch.cat([getattr(b, key) for b in (first, full, last)]))
    assert torch.equal(joined.position_ids, torch.cat([b.position_ids for b in (first, full, last)], dim=1))
    assert torch.equal(joined.pixel_values, first.pixel_values)
    assert torch.equal(joined.video_grid_thw, last.video_grid_thw)
    assert joined.image_grid_thw.tolist() == [[1, 4, 4]]
    assert concat_batches([full]) is full


def test_cut_moves_before_the_vision_span_the_limit_falls_in():
    doc = vision_doc("d", [6, ("image", 4, 4), 5, ("image", 4, 4), 6])  # spans at [6..11] and [17..22]
    for limit in range(18, 23):  # anywhere inside the second span, including on its vision_end
        cut = fit_document(doc, limit, TOK)
        assert len(cut) == 17 and cut.input_ids.tolist() == doc.input_ids[:17].tolist()
        assert cut.image_grid_thw.tolist() == [[1, 4, 4]]
        assert torch.equal(cut.pixel_values, doc.pixel_values[:16])
        assert torch.equal(cut.position_ids, doc.position_ids[:, :17])
    after_span = fit_document(doc, 25, TOK)  # limit in the trailing text: a plain text cut
    assert len(after_span) == 25 and after_span.image_grid_thw.shape[0] == 2


def test_cut_inside_a_video_keeps_whole_frame_groups():
    doc = vision_doc("v", [2, ("video", 4, 4, 4), 3])  # 4 frame groups of 1+4+1 tokens from index 2
    cut = fit_document(doc, 2 + 6 * 2 + 3, TOK)  # limit in the third group
    assert len(cut) == 14 and cut.video_grid_thw.tolist() == [[2, 4, 4]]
    assert torch.equal(cut.pixel_values_videos, doc.pixel_values_videos[:32])
    # The cut document is what the encoder would have produced for two frame groups.
    recomputed = document_position_ids(cut.input_ids, None, cut.video_grid_thw, image_token_id=5,
                                       video_token_id=6, spatial_merge_size=2)
    assert torch.equal(recomputed, cut.position_ids)


def test_cut_that_keeps_no_target_drops_the_document():
    doc = vision_doc("d", [("image", 8, 8), 10])  # the only text follows a 18-token span
    assert fit_document(doc, 15, TOK) is None
    assert fit_document(text_doc("t", 10), 10, TOK) is not None
    assert fit_document(text_doc("t", 20, first_target=12), 12, TOK) is None


def _pack_all(docs: list[Document], seq_len: int, buffer: int) -> list:
    stream = iter(docs)
    packer = BestFitPacker(seq_len, buffer, "sqrt")
    batches = []
    while (batch := packer.next_sequence(lambda: next((BufferEntry(d, None) for d in stream), None))):
        batches.append(batch)
    return batches


def test_best_fit_packs_every_document_once_densely_and_without_starvation():
    rng = random.Random(0)
    docs = [text_doc(f"d{i}", rng.choice([rng.randint(2, 60), rng.randint(200, 900)])) for i in range(600)]
    batches = _pack_all(docs, 1024, buffer=32)
    keys = [k for b in batches for k in b.doc_keys]
    assert sorted(keys) == sorted(d.key for d in docs)
    assert all(b.seq_len == 1024 for b in batches)
    tokens = sum(len(d) for d in docs)
    assert tokens / (1024 * (len(batches) - 2)) > 0.97  # the last sequences drain the buffer
    # No starvation: every sequence starts with the oldest buffered document, so heads come in stream
    # order and a document is out before any younger document heads a sequence.
    heads = [int(b.doc_keys[0][1:]) for b in batches]
    assert heads == sorted(heads)
    packed_in = {int(k[1:]): j for j, b in enumerate(batches) for k in b.doc_keys}
    for i, j in packed_in.items():
        assert all(heads[m] <= i for m in range(j)), f"d{i} waited behind a younger head"


def test_packer_rejects_documents_longer_than_seq_len():
    with pytest.raises(ValueError, match="pass it through fit_document"):
        _pack_all([text_doc("x", 20)], 16, buffer=4)


def test_vision_tokens_come_from_the_tokenizer_not_the_defaults() -> None:
    from types import SimpleNamespace

    from data.packing import VisionTokens

    # Qwen's HF tokenizer ids differ from the project's sentencepiece ids (the defaults).
    qwen = SimpleNamespace(vision_start_id=151652, vision_end_id=151653, image_pad_id=151655,
                           video_pad_id=151656, pad_id=151643)
    assert VisionTokens.from_tokenizer(qwen, 2) == VisionTokens(151652, 151653, 151655, 151656, 2, 151643)


def test_documents_padded_to_a_multiple_keep_their_tokens_weights_and_fill_seq_len():
    """The per-document context-parallel split (2*cp chunks of every document) needs every segment a
    multiple of 2*cp: each document is followed by pads inside its own segment, which carry no target."""
    a, b = text_doc("a", 5, source=0, first_target=2), vision_doc("v", [3, ("image", 4, 4), 2])
    plain = build_packed([a, b], 32, "sqrt")
    padded = build_packed([a, b], 32, "sqrt", document_multiple=4)
    assert padded.cu_seqlens.tolist() == [0, 8, 20, 32]  # 5 -> 8, 11 -> 12, the tail
    assert padded.seq_len == 32 and padded.num_pad == 32 - 16
    real = torch.cat([torch.arange(0, 5), torch.arange(8, 19)])
    for name in ("input_ids", "labels", "loss_weights", "source_ids"):
        assert torch.equal(getattr(padded, name)[real], getattr(plain, name)[:16]), name
    assert torch.equal(padded.position_ids[:, real], plain.position_ids[:, :16])
    pads = torch.tensor([5, 6, 7, 19])
    assert (padded.labels[pads] == IGNORE_INDEX).all() and (padded.loss_weights[pads] == 0).all()
    assert (padded.source_ids[pads] == -1).all() and (padded.input_ids[pads] == 0).all()
    # pads continue the document's text positions (they follow its last token)
    assert padded.position_ids[:, 5:8].tolist() == [[5, 6, 7]] * 3
    assert torch.equal(padded.pixel_values, plain.pixel_values)


def test_packer_fits_documents_by_their_padded_length():
    docs = [text_doc(f"d{i}", n) for i, n in enumerate([13, 9, 5, 17, 3, 30, 2])]
    stream = iter(docs)
    packer = BestFitPacker(32, 8, "sqrt", document_multiple=4)
    batches = []
    while (batch := packer.next_sequence(lambda: next((BufferEntry(d, None) for d in stream), None))):
        batches.append(batch)
    assert sorted(k for b in batches for k in b.doc_keys) == sorted(d.key for d in docs)
    for batch in batches:
        lengths = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).tolist()
        assert batch.seq_len == 32 and all(n % 4 == 0 for n in lengths), lengths
    with pytest.raises(ValueError, match="seq_len=30 is not a multiple of the per-document padding multiple 4"):
        BestFitPacker(30, 8, "sqrt", document_multiple=4)
