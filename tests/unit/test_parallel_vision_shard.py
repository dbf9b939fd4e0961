"""Context-parallel embedding with the vision tower sharded by item (train/parallel/vision_shard.py).

The plan (which rank computes which frame group, where every feature row goes) is checked in one process;
the exchange itself on 2 gloo ranks: the DeepSpeed backend's LossModule at CP=2 (Ulysses) against CP=1 on
images + a 2-frame video split unevenly, a single image whose tokens sit in rank 1's share (rank 0 computes
it, rank 1 runs the tower on the dummy image only), and a text-only sequence: same loss, same gradients,
and each rank's tower sees only its own patches."""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from data.batch import IGNORE_INDEX, PackedBatch
from model_fixtures import char_tokens, image_span, random_pixels, tiny_dense_config, video_span
from train.loss import supervised_weights
from data.positions import packed_position_ids
from train.parallel.context import shard_index
from train.parallel.vision_shard import assign_units, exchange_plan, frame_units

SEQ = 160


def test_frame_units_split_videos_per_temporal_patch():
    grid = torch.tensor([[1, 8, 8], [3, 4, 6]])
    assert frame_units(grid).tolist() == [[1, 8, 8], [1, 4, 6], [1, 4, 6], [1, 4, 6]]
    assert frame_units(None).shape == (0, 3)


def test_assign_units_balances_patches_deterministically():
    patches = [64, 32, 32, 16, 8]
    owner = assign_units(patches, 2)
    assert owner == [0, 1, 1, 0, 1]  # loads 80 / 72; largest first, ties to the lower rank
    assert assign_units(patches, 2) == owner
    assert assign_units([16], 2) == [0]  # one item: rank 1 gets none
    assert assign_units([], 3) == []


def test_exchange_plan_routes_every_row_to_the_rank_holding_its_token():
    # 3 units of 2, 1, 3 rows (global rows 0-1, 2, 3-5); 12 positions, visual tokens at 2..7 in row order
    # except that positions 6 and 7 hold rows 5 and 4 (rows follow placeholder order, not unit order).
    units_rows, owner = torch.tensor([2, 1, 3]), torch.tensor([1, 0, 1])
    row_of_position = torch.full((12,), -1)
    row_of_position[2:8] = torch.tensor([0, 1, 2, 3, 5, 4])
    shares = [shard_index(12, 2, r) for r in range(2)]  # positions 0-5 and 6-11
    plans = [exchange_plan(row_of_position, units_rows, owner, shares, r) for r in range(2)]
    assert [p.my_units.tolist() for p in plans] == [[1], [0, 2]]
    # Rank 1's tower output: unit 0 (rows 0, 1) then unit 2 (rows 3, 4, 5) -> local rows 0..4.
    assert plans[1].send_splits == [3, 2] and plans[1].send_rows.tolist() == [0, 1, 2, 4, 3]
    assert plans[0].send_splits == [1, 0] and plans[0].send_rows.tolist() == [0]
    assert plans[0].recv_splits == [1, 3] and plans[1].recv_splits == [0, 2]
    # Rank 0 needs rows 0, 1, 2, 3 (share order); it receives row 2 (from itself) then rows 0, 1, 3.
    assert plans[0].recv_order.tolist() == [2, 0, 1, 3]
    assert plans[1].recv_order.tolist() == [0, 1]


# --------------------------------------------------------------------------------- 2 ranks, gloo
def _batch(cfg, docs: list[list[int]], image_grids: list[list[int]], video_grids: list[list[int]],
           seed: int) -> PackedBatch:
    ids, bounds = [t for doc in docs for t in doc], [0]
    for doc in docs:
        bounds.append(bounds[-1] + len(doc))
    assert len(ids) <= SEQ, len(ids)
    if len(ids) < SEQ:
        bounds.append(SEQ)
    ids += [0] * (SEQ - len(ids))
    input_ids, cu = torch.tensor(ids), torch.tensor(bounds, dtype=torch.int32)
    # Next-token labels inside each document; nothing predicted onto vision tokens or past a document end.
    vision = {cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id}
    ends = set(int(b) - 1 for b in cu[1:])
    labels = torch.tensor([IGNORE_INDEX if i in ends or i >= bounds[len(docs)] - 1 or ids[i + 1] in vision
                           else ids[i + 1] for i in range(SEQ)])
    weights = (labels != IGNORE_INDEX).float() / math.sqrt(int((labels != IGNORE_INDEX).sum()) or 1)
    pixels, igrid = random_pixels(image_grids, cfg, seed) if image_grids else (None, None)
    vpixels, vgrid = random_pixels(video_grids, cfg, seed + 1) if video_grids else (None, None)
    positions = packed_position_ids(input_ids, cu, igrid, vgrid, image_token_id=cfg.image_token_id,
                                    video_token_id=cfg.video_token_id,
                                    spatial_merge_size=cfg.vision.spatial_merge_size)
    return PackedBatch(input_ids=input_ids, position_ids=positions, cu_seqlens=cu, labels=labels,
                       loss_weights=weights, source_ids=torch.zeros(SEQ, dtype=torch.long), pixel_values=pixels,
                       image_grid_thw=igrid, pixel_values_videos=vpixels, video_grid_thw=vgrid,
                       doc_keys=[f"doc{i}" for i in range(len(docs))])


def _batches(cfg) -> dict[str, PackedBatch]:
    gen = torch.Generator().manual_seed(5)

    def text(n: int) -> list[int]:
        return torch.randint(10, 240, (n,), generator=gen).tolist()

    def stamp(seconds: float) -> list[int]:
        return char_tokens(f"<{seconds:.1f} seconds>")

    # Big image (16 tokens at 71..86: straddles the CP boundary at 80) + small image, then a 2-frame video.
    # Units (patches): 64, 16, 32, 32 -> rank 0: both images, rank 1: both video frames.
    mixed = [text(70) + image_span([1, 8, 8], cfg) + text(3) + image_span([1, 4, 4], cfg) + text(2),
             text(3) + video_span([2, 4, 8], cfg, stamp) + text(2)]
    # One image entirely in rank 1's share: rank 0 computes it, rank 1 has no unit.
    lone = [text(90) + image_span([1, 8, 4], cfg) + text(10)]
    return {"mixed": _batch(cfg, mixed, [[1, 8, 8], [1, 4, 4]], [[2, 4, 8]], seed=1),
            "one_image": _batch(cfg, lone, [[1, 8, 4]], [], seed=2),
            "text_only": _batch(cfg, [text(70), text(40)], [], [], seed=3)}


# Patches each rank's tower must see: its units, or the dummy image (merge^2 = 4 patches) when it has none.
TOWER_PATCHES = {"mixed": [64 + 16, 32 + 32], "one_image": [32, 4], "text_only": [4, 4]}


def _loss_and_grads(module, batch, weight_sum):
    module.model.zero_grad(set_to_none=True)
    objective, *_ = module(batch, weight_sum, 1, 1.0)
    objective.backward()
    return objective.detach(), {n: p.grad.clone() for n, p in module.model.named_parameters()
                                if p.grad is not None}


def _rank(rank: int, init_file: str, results) -> None:
    from train.backends.deepspeed.module import LossModule
    from train.models.qwen3vl import Qwen3VLModel
    from train.parallel.ulysses import UlyssesAttention

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    failures = []
    try:
        cfg = tiny_dense_config()
        torch.manual_seed(0)
        reference = Qwen3VLModel(cfg).train()
        sharded = Qwen3VLModel(cfg).train()
        sharded.load_state_dict(reference.state_dict())
        sharded.set_core_attention(lambda: UlyssesAttention(dist.group.WORLD))
        seen: list[int] = []
        sharded.visual.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[0]))
        for name, batch in _batches(cfg).items():
            total = supervised_weights(batch.labels, batch.loss_weights).sum().float()
            want_loss, want_grads = _loss_and_grads(LossModule(reference), batch, total)
            seen.clear()
            loss, grads = _loss_and_grads(LossModule(sharded, dist.group.WORLD), batch, total)
            if seen != [TOWER_PATCHES[name][rank]]:
                failures.append(f"{name}: tower ran on {seen} patches, expected [{TOWER_PATCHES[name][rank]}]")
            dist.all_reduce(loss)
            if not torch.allclose(loss, want_loss, rtol=1e-5, atol=0):
                failures.append(f"{name}: loss {float(loss)} vs CP=1 {float(want_loss)}")
            for param, want in want_grads.items():
                got = grads.get(param, torch.zeros_like(want))
                dist.all_reduce(got)  # the DP reduction over the CP ranks sums their contributions
                err = float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))
                if err > 1e-4:
                    failures.append(f"{name}: grad of {param} off by {err:.2e} (relative to its max)")
    except Exception as exc:  # report, and let the other rank finish its collectives' partner
        failures.append(f"{type(exc).__name__}: {exc}")
        raise
    finally:
        results[rank] = failures
        dist.destroy_process_group()


@pytest.mark.timeout(300)
def test_cp2_sharded_vision_matches_cp1(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(_rank, args=(os.fspath(tmp_path / "init"), results), nprocs=2, join=True)
    assert results[0] == [] and results[1] == [], dict(results)
