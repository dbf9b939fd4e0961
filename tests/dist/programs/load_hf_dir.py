"""torchrun program (2 ranks, gloo): backends built straight from a sharded transformers directory.

    load_hf_dir.py WORK_DIR

Rank 0 writes random tiny transformers models with save_pretrained (dense; MoE in the transformers-5 fused
expert layout), sharded with an index; then each case builds a backend with `weights=read_model_dir(...)`:
every rank reads only the slices it holds (megatron TP=2 pieces, EP=2 experts, ZeRO-3 partitions). The
weights exported right after construction must equal transformers' tensors bitwise.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_backend import mode_config
from deepspeed_common import make_config
from model_fixtures import LargestAllocation, build_hf_model
from rank_harness import finish, start
from train.backends import build_backend
from train.backends.base import gathered_state_dict
from train.checkpoint import read_model_dir
from train.models.hf import load_hf_checkpoint

CASES = {"megatron tp2": lambda: mode_config("tp"), "megatron ep2": lambda: mode_config("ep"),
         "deepspeed zero3": lambda: make_config(zero_stage=3)}


# The share of the model's elements rank 0 may hold (deterministic element counts, measured 0.748 / 0.906 /
# 0.500): ZeRO-3 half (+ alignment padding); megatron TP=2 half of the TP-split decoder and embedding, the
# ViT and norms replicated; EP=2 (TP=1) half of the experts only. A build that materialised the whole model
# on a rank and sliced it afterwards would hold 1.0 at some point; these count what stays allocated.
LIMITS = {"megatron tp2": 0.76, "megatron ep2": 0.92, "deepspeed zero3": 0.51}


def held_fraction(backend) -> float:
    """Elements this rank allocated for parameters / elements of the whole native model."""
    model = backend.model
    params = list(model.parameters())
    held = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
    full = sum(p.ds_numel if hasattr(p, "ds_numel") else 0 for p in params) or None
    if full is None:  # megatron: count the native model's elements
        from train.models.native_io import expected_native_shapes

        shapes = expected_native_shapes(backend.cfg.model)
        tied = backend.cfg.model.text.tie_word_embeddings
        full = sum(torch.Size(s).numel() for n, s in shapes.items() if not (tied and n == "lm_head.weight"))
    return held / full


def largest_partition(backend) -> int:
    """Elements of the largest ZeRO-3 partition of the model (0 for other layouts)."""
    return max((p.ds_tensor.numel() for p in backend.model.parameters() if hasattr(p, "ds_tensor")), default=0)


def probe_deepspeed_build() -> LargestAllocation:
    """The largest tensor allocated while DeepSpeed builds and fills the model (not its optimizer)."""
    from train.backends.deepspeed.backend import DeepSpeedBackend

    probe, build = LargestAllocation(), DeepSpeedBackend._build_model

    def probed(self, *args):
        with probe:
            return build(self, *args)
    DeepSpeedBackend._build_model = probed
    return probe


def main(work: Path) -> None:
    start()
    failures: list[str] = []
    probe = probe_deepspeed_build()
    for name, make in CASES.items():
        cfg = make()
        directory = work / name.replace(" ", "_")
        if dist.get_rank() == 0:
            build_hf_model(cfg.model, seed=3).save_pretrained(directory, max_shard_size="200KB")
        dist.barrier()
        backend = build_backend(cfg, weights=read_model_dir(directory, cfg.model))
        held = held_fraction(backend)
        if name == "deepspeed zero3" and probe.largest > largest_partition(backend):
            # zero.Init's way: every parameter whole (default init, broadcast), then cut
            failures.append(f"{name}: a tensor of {probe.largest} elements was allocated while building, the "
                            f"largest partition has {largest_partition(backend)}")
        exported = gathered_state_dict(backend)
        close = getattr(backend, "close", None)
        if close is not None:
            close()
        if dist.get_rank() == 0:
            _, want = load_hf_checkpoint(directory)
            differing = sorted(k for k in want if k not in exported or not torch.equal(exported[k], want[k]))
            print(f"[{name}] {len(want)} tensors from {len(list(directory.glob('*.safetensors')))} shards, "
                  f"{len(differing)} differ; rank 0 holds {held:.3f} of the parameters", flush=True)
            if not held < LIMITS[name]:
                failures.append(f"{name}: rank 0 holds {held:.3f} of the model's parameters (limit {LIMITS[name]})")
            if differing or set(exported) != set(want):
                failures.append(f"{name}: built weights differ from the HF dir's, first {differing[:1]}")
    finish(failures)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
