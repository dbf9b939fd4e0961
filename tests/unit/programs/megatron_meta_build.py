"""Build what given ranks of a large world would build, on the meta device, in this one process.

    python megatron_meta_build.py '<json list of {"overrides": [...], "world": N, "ranks": [...]}>'

Each rank: torch's fake process group posing as that rank, megatron-core's groups on it (no gloo groups),
the rank's MegatronQwen3VL stage (ViT on the first stage; with parallel.vpp one model chunk per virtual
stage, as the backend builds them) under torch.device("meta"). Prints one JSON line per rank: its pipeline
stage, decoder layer count and parameter count (all chunks), and each chunk's global decoder layers.
Parameters are never
materialised, so the 235B model's ranks cost no memory.
"""
from __future__ import annotations

import json
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.testing._internal.distributed.fake_pg import FakeStore  # noqa: E402

from train.backends.megatron.layout import check_config  # noqa: E402
from train.backends.megatron.parallel_state import destroy_parallel_groups, init_parallel_groups  # noqa: E402
from train.config.compose import load_config  # noqa: E402


def build_rank(overrides: list[str], world: int, rank: int) -> dict:
    cfg = load_config(overrides)
    sizes = check_config(cfg, world)
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        init_parallel_groups(sizes, gloo_groups=False)
        from megatron.core import parallel_state as mpu

        from train.backends.megatron.model import MegatronQwen3VL, transformer_config
        from train.models.qwen3vl.vision import VisionTower

        config = transformer_config(cfg.model, sizes, cfg.backend.precision, cfg.parallel.sequence_parallel)
        config.perform_initialization = False  # meta tensors: nothing to initialise
        chunks = []
        for vp_stage in range(sizes.vpp) if sizes.vpp is not None else [None]:
            first = mpu.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
            last = mpu.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
            with torch.device("meta"):
                visual = VisionTower(cfg.model.vision, out_size=cfg.model.text.hidden_size) if first else None
                chunks.append(MegatronQwen3VL(config, cfg.model, visual, pre_process=first, post_process=last,
                                              vp_stage=vp_stage))
        params = {id(p): p for chunk in chunks for p in chunk.parameters()}.values()
        return {"overrides": overrides, "world": world, "rank": rank,
                "stage": mpu.get_pipeline_model_parallel_rank(),
                "layers": sum(len(chunk.decoder.layers) for chunk in chunks),
                "chunk_layers": [[layer.layer_number - 1 for layer in chunk.decoder.layers] for chunk in chunks],
                "params": sum(p.numel() for p in params),
                "meta": all(p.device.type == "meta" for p in params)}
    finally:
        destroy_parallel_groups()
        dist.destroy_process_group()


def main() -> None:
    warnings.filterwarnings("ignore")
    for job in json.loads(sys.argv[1]):
        for rank in job["ranks"]:
            print(json.dumps(build_rank(job["overrides"], job["world"], rank)), flush=True)
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
