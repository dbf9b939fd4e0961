"""TrainConfig -> checks and the DeepSpeed JSON config, before anything expensive is built.

Layout on DeepSpeed: world = dp x cp. Context-parallel groups are consecutive ranks; DeepSpeed itself is not
told about them (no mpu): its data-parallel group is the whole world, and summing the gradients of the CP
ranks is exactly right for Ulysses (every CP rank holds all parameters and computed the gradient of its
share of the tokens). Expert-parallel groups are consecutive ranks too (DeepSpeed's own EP groups).
"""
from __future__ import annotations

from typing import Any

from train.config.model import ConfigError
from train.config.schema import TrainConfig


def check_layout(cfg: TrainConfig, world_size: int) -> int:
    """Raise ConfigError (one line, naming the key) for what the DeepSpeed backend cannot run; return the
    number of micro-batches per rank and step (gradient accumulation steps)."""
    par, text = cfg.parallel, cfg.model.text
    for key in ("tp", "pp"):
        if getattr(par, key) != 1:
            raise ConfigError(f"parallel.{key}={getattr(par, key)}: the deepspeed backend has no tensor/pipeline "
                              f"parallelism; use backend=megatron")
    if cfg.backend.zero_stage == 3 and text.is_moe:
        raise ConfigError(f"backend.zero_stage=3 with an MoE model (model.text.num_experts={text.num_experts}): "
                          f"DeepSpeed MoE expert parallelism needs ZeRO stage <= 2")
    if par.ep > 1 and not text.is_moe:
        raise ConfigError(f"parallel.ep={par.ep} but the model is dense (model.text.num_experts=0)")
    if world_size % par.cp:
        raise ConfigError(f"world size {world_size} is not divisible by parallel.cp={par.cp}")
    if world_size % par.ep:
        raise ConfigError(f"world size {world_size} is not divisible by parallel.ep={par.ep}")
    if text.is_moe and text.num_experts % par.ep:
        raise ConfigError(f"model.text.num_experts={text.num_experts} is not divisible by parallel.ep={par.ep}")
    if text.num_attention_heads % par.cp:
        raise ConfigError(f"model.text.num_attention_heads={text.num_attention_heads} is not divisible by "
                          f"parallel.cp={par.cp} (Ulysses splits the heads)")
    if cfg.stage.seq_len % par.cp:
        raise ConfigError(f"stage.seq_len={cfg.stage.seq_len} is not divisible by parallel.cp={par.cp}")
    dp = world_size // par.cp
    if cfg.stage.global_batch_size % dp:
        raise ConfigError(f"stage.global_batch_size={cfg.stage.global_batch_size} is not divisible by the "
                          f"data-parallel size {dp} (world {world_size} / parallel.cp {par.cp})")
    return cfg.stage.global_batch_size // dp


def deepspeed_config(cfg: TrainConfig, grad_accum: int, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config. One packed sequence per micro-batch; DeepSpeed's data-parallel group is the
    whole world (see module doc), hence train_batch_size counts every rank. The LR is set by us every step
    (train/optim.py), so there is no DeepSpeed scheduler."""
    optim, backend = cfg.optim, cfg.backend
    zero: dict[str, Any] = {"stage": backend.zero_stage}
    if backend.zero_stage in (1, 2):
        # DeepSpeed's MoE support asserts contiguous gradients + reduce-scatter for ZeRO-1/2.
        zero.update(contiguous_gradients=True, reduce_scatter=True, overlap_comm=False)
    if backend.zero_stage == 3:
        # Keep every parameter partitioned (no persistence threshold) so tiny test models exercise the
        # gather/release path of real ones.
        zero.update(stage3_param_persistence_threshold=0, overlap_comm=False, stage3_prefetch_bucket_size=0)
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": grad_accum * world_size,
        "gradient_clipping": optim.grad_clip,
        "optimizer": {"type": "AdamW", "params": {
            "lr": optim.lr, "betas": list(optim.betas), "eps": optim.eps, "weight_decay": optim.weight_decay,
            "torch_adam": True, "adam_w_mode": True}},
        "bf16": {"enabled": backend.precision == "bf16", "check_grad_overflow": True},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
