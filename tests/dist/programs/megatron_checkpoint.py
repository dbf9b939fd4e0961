"""torchrun program: dist_checkpointing save of a GPT on TP=2, load into a TP=1 model, same logits.

Usage: megatron_checkpoint.py <shared checkpoint dir>. The __main__ guard is required: the checkpoint
writer starts a spawn Manager that re-imports __main__ (without the guard save hangs).
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

import megatron_common as mc
from rank_harness import finish, start
from train.backends.megatron.parallel_state import (ParallelSizes, config_kwargs, destroy_parallel_groups,
                                                   init_parallel_groups)


def full_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """Logits over the whole vocabulary (the output layer is vocab-sharded over TP)."""
    from megatron.core import parallel_state as mpu
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    model.eval()
    with torch.no_grad():
        logits = model(tokens, torch.arange(tokens.shape[1]).repeat(tokens.shape[0], 1), None)
        if mpu.get_tensor_model_parallel_world_size() > 1:
            logits = gather_from_tensor_model_parallel_region(logits)
    return logits


def build(tp: int, seed: int):
    sizes = init_parallel_groups(ParallelSizes(tp=tp), seed=seed)
    torch.manual_seed(seed)
    return mc.build_gpt(mc.tiny_config(**config_kwargs(sizes)))


def main() -> None:
    from megatron.core import dist_checkpointing

    ckpt_dir = sys.argv[1]
    start()
    os.makedirs(ckpt_dir, exist_ok=True)  # megatron requires an existing (empty) directory
    failures: list[str] = []
    tokens = mc.random_batches(1, batch=2)[0]["tokens"]

    model = build(tp=2, seed=11)
    saved_logits = full_logits(model, tokens)
    dist_checkpointing.save(model.sharded_state_dict(), ckpt_dir)
    destroy_parallel_groups()

    model = build(tp=1, seed=22)
    before = (full_logits(model, tokens) - saved_logits).abs().max().item()
    state = dist_checkpointing.load(model.sharded_state_dict(), ckpt_dir)
    model.load_state_dict(state)
    after = (full_logits(model, tokens) - saved_logits).abs().max().item()
    if dist.get_rank() == 0:
        print(f"TP2 -> TP1 logits max diff: before load {before:.3g}, after load {after:.3g}", flush=True)
    if not before > 1e-3:
        failures.append(f"fresh TP1 model already matches the saved one (diff {before}): test is vacuous")
    if not after <= 1e-6:
        failures.append(f"logits after TP2 -> TP1 load differ by {after}")
    destroy_parallel_groups()
    finish(failures)


if __name__ == "__main__":
    main()
