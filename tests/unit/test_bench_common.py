"""bench/common.py at toy sizes: synthetic documents are consistent, packing keeps each sequence's documents,
PeakMemory sees an allocation made inside it. No timing."""
from __future__ import annotations

import random
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import common  # noqa: E402

from train.models.native_io import load_model_config_yaml  # noqa: E402
from train.models.qwen3vl.vision_inputs import check_placeholder_counts  # noqa: E402

CFG = load_model_config_yaml(common.ROOT / "configs" / "model" / "tiny.yaml")


def test_every_document_kind_matches_its_grids_and_fits():
    rng = random.Random(0)
    for kind in ("text", "caption", "interleaved", "video"):
        doc = common.make_document(CFG, kind, kind, rng, max_len=4096)
        assert len(doc) <= 4096 and doc.position_ids.shape == (3, len(doc))
        assert not bool(doc.target_mask[0]) and bool(doc.target_mask.any())
        check_placeholder_counts(doc.input_ids, None, doc.image_grid_thw, doc.video_grid_thw, CFG)
        for pixels, grid in ((doc.pixel_values, doc.image_grid_thw), (doc.pixel_values_videos, doc.video_grid_thw)):
            if grid is not None:
                assert pixels.shape == (int(grid.prod(-1).sum()), 3 * 2 * 16 * 16)


def test_fixed_video_grid_gives_that_many_frame_groups():
    doc = common.make_document(CFG, "video", "v", random.Random(1), video_grid=(5, 8, 8))
    assert doc.video_grid_thw.tolist() == [[5, 8, 8]]
    assert int((doc.input_ids == CFG.video_token_id).sum()) == 5 * 8 * 8 // 4


def test_pack_returns_each_sequence_with_its_documents():
    packed = common.pack(common.document_stream(CFG, 512, seed=2), 1024, 3)
    assert len(packed) == 3
    for batch, docs in packed:
        assert batch.seq_len == 1024 and [d.key for d in docs] == batch.doc_keys
        assert common.real_tokens(batch) == sum(len(d) for d in docs)
        assert torch.equal(batch.input_ids[:common.real_tokens(batch)], torch.cat([d.input_ids for d in docs]))


def test_peak_memory_sees_an_allocation_inside_the_block():
    with common.PeakMemory() as mem:
        block = torch.ones(64 << 18)  # 64 MiB, touched
        del block
    assert mem.extra_mib >= 60 and mem.peak_mib >= mem.extra_mib


def test_append_section_adds_a_dated_entry(tmp_path):
    path = tmp_path / "RESULTS.md"
    common.append_section("Thing (bench/thing.py)", ["- x: 1"], path=path)
    text = path.read_text()
    assert text.startswith("# Benchmark results") and "## Thing (bench/thing.py) — " in text
    assert common.MACHINE in text and text.rstrip().endswith("- x: 1")


def test_data_throughput_measures_our_loader_on_the_demo_mix(tmp_path):
    """bench/data_throughput.py's timed side runs against the loader as it is (its state format included):
    2 packed sequences, their documents counted from the loader's own state. ~6 s."""
    import data_throughput as bench

    bench.make_corpus(str(tmp_path))
    encoder = bench.DocumentEncoder(bench.Tokenizer.load(tmp_path / "tokenizer.model"), bench.EncodeConfig(),
                                    bench.SEQ_LEN)
    tokens_per_s, drawn_before, drawn = bench.ours(bench.demo_mix(str(tmp_path), num_workers=1), encoder, 2)
    assert tokens_per_s > 0 and drawn_before > 0 and drawn > 0
