"""torchrun program (2 ranks, gloo): the megatron Qwen3-VL gives the reference model's logits on the same
weights (loaded through the native -> megatron weight map), dense and MoE, on image, text-only and video
sequences, in five layouts: single (every size 1), tp2 + sequence parallel, cp2 (load-balanced split after
the vision merge), cp2doc (split per document, Transformer Engine's THD layout, on documents padded to
multiples of 4: THD packed params, megatron's THD rotary code, the local attention), ep2 (MoE only). Prints one line per (model, layout) with the max |logit diff| over all
tokens of all sequences; then the exported native state dict must equal the loaded one exactly.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.distributed as dist

from data.batch import PackedBatch
from deepspeed_common import SEQ, global_batch
from rank_harness import finish, start
from model_fixtures import (char_tokens, random_pixels, randomize_constant_parameters, tiny_dense_config,
                            tiny_moe_config, video_span)
from train.backends.megatron.fast_path import LOCAL_PATH
from train.backends.megatron.parallel_state import ParallelSizes, destroy_parallel_groups, init_parallel_groups
from train.models.qwen3vl import Qwen3VLModel
from data.positions import packed_position_ids

LAYOUTS = {"single": ParallelSizes(dp=2), "tp2+sp": ParallelSizes(tp=2), "cp2": ParallelSizes(cp=2),
           "cp2doc": ParallelSizes(cp=2), "ep2": ParallelSizes(ep=2)}
# Split per document (Transformer Engine's THD layout) on batches whose documents are padded to 2*cp = 4
PER_DOCUMENT = replace(LOCAL_PATH, document_split=True)
TOLERANCE = 1e-6


def video_batch(cfg) -> PackedBatch:
    """Text, a 2-temporal-patch video with text timestamps, text; padded to SEQ tokens."""
    grid = [2, 4, 4]
    ids = char_tokens("a clip:") + video_span(grid, cfg, lambda s: char_tokens(f"<{s:.1f} seconds>")) \
        + char_tokens("done")
    ids += [0] * (SEQ - len(ids))
    input_ids, cu = torch.tensor(ids), torch.tensor([0, SEQ], dtype=torch.int32)
    pixels, grid_thw = random_pixels([grid], cfg, seed=5)
    positions = packed_position_ids(input_ids, cu, None, grid_thw, image_token_id=cfg.image_token_id,
                                    video_token_id=cfg.video_token_id,
                                    spatial_merge_size=cfg.vision.spatial_merge_size)
    zeros = torch.zeros(SEQ)
    return PackedBatch(input_ids=input_ids, position_ids=positions, cu_seqlens=cu, labels=zeros.long(),
                       loss_weights=zeros, source_ids=zeros.long(), pixel_values_videos=pixels,
                       video_grid_thw=grid_thw, doc_keys=["video"])


def reference_logits(ref: Qwen3VLModel, batch: PackedBatch) -> torch.Tensor:
    return ref(batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.pixel_values, batch.image_grid_thw,
               batch.pixel_values_videos, batch.video_grid_thw).logits


def layout_diff(cfg, sizes: ParallelSizes, state: dict, batches: list[PackedBatch], want: list,
                path=LOCAL_PATH) -> tuple[float, dict]:
    """Max |megatron logits - reference| over this rank's tokens, then over all ranks; and the export."""
    from train.backends.megatron.model import MegatronQwen3VL, transformer_config
    from train.backends.megatron.weights import export_native, load_weights, shard_coords
    from train.models.weight_source import StateDictSource

    sizes = init_parallel_groups(sizes)
    torch.manual_seed(99)  # other weights than the reference until load_native
    model = MegatronQwen3VL(transformer_config(cfg, sizes, sequence_parallel=True), cfg, Qwen3VLModel(cfg).visual,
                            path=path)
    load_weights(model, StateDictSource(state), cfg, shard_coords(model))
    worst = 0.0
    with torch.no_grad():
        for batch, ref in zip(batches, want):
            logits = model.gather_sequence_parallel(model(batch, [])) @ model.lm_head_weight().t()
            index = model.cp_index(batch)
            ref = ref if index is None else ref[index]
            worst = max(worst, (logits - ref).abs().max().item())
    exported = export_native(model, cfg)
    destroy_parallel_groups()
    out = torch.tensor([worst])
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out.item(), exported


def main() -> None:
    start()
    failures: list[str] = []
    for name, cfg in (("dense", tiny_dense_config()), ("moe", tiny_moe_config())):
        torch.manual_seed(0)
        ref = randomize_constant_parameters(Qwen3VLModel(cfg).eval())  # norm gains and biases count too
        state = {k: v.detach().clone() for k, v in ref.state_dict().items()}
        inputs = {multiple: global_batch(cfg, 0, multiple)[:2] + [video_batch(cfg)] for multiple in (1, 4)}
        with torch.no_grad():
            want = {multiple: [reference_logits(ref, b) for b in batches] for multiple, batches in inputs.items()}
        for layout, sizes in LAYOUTS.items():
            if layout == "ep2" and name == "dense":
                continue
            multiple = 4 if layout == "cp2doc" else 1
            diff, exported = layout_diff(cfg, sizes, state, inputs[multiple], want[multiple],
                                         PER_DOCUMENT if multiple > 1 else LOCAL_PATH)
            if dist.get_rank() == 0:
                print(f"[{name} {layout}] max |logits - reference| {diff:.3g}", flush=True)
                if set(exported) != set(state) or any(not torch.equal(exported[k], state[k]) for k in state):
                    failures.append(f"{name} {layout}: exported state dict differs from the loaded one")
            if not diff <= TOLERANCE:
                failures.append(f"{name} {layout}: logits differ by {diff}")
    finish(failures)


if __name__ == "__main__":
    main()
