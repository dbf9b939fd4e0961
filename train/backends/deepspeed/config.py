"""TrainConfig -> checks and the DeepSpeed JSON config, before anything expensive is built.

Layout on DeepSpeed: world = dp x cp. Context-parallel groups are consecutive ranks; DeepSpeed itself is not
told about them (no mpu): its data-parallel group is the whole world, and summing the gradients of the CP
ranks is exactly right for Ulysses (every CP rank holds all parameters and computed the gradient of its
share of the tokens). Expert-parallel groups are consecutive ranks too (DeepSpeed's own EP groups).
"""
from __future__ import annotations

import shutil
from typing import Any

import torch

from train.config.model import ConfigError
from train.config.schema import TrainConfig
from train.device import compute_device
from train.fast_path import register


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
    if par.cp_layout == "document":
        raise ConfigError("parallel.cp_layout=document: DeepSpeed's Ulysses context parallelism splits the "
                          "sequence contiguously; use parallel.cp_layout=auto (or backend=megatron)")
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
    return cfg.stage.global_batch_size // dp // cfg.stage.micro_batch_size  # micro-batches per rank and step


def deepspeed_config(cfg: TrainConfig, grad_accum: int, world_size: int,
                     device: torch.device | None = None) -> dict[str, Any]:
    """The DeepSpeed config for a run on `device` (default: this rank's compute device). One packed sequence
    (stage.micro_batch_size of them joined) per micro-batch; DeepSpeed's data-parallel group is the whole
    world (see module doc), hence train_batch_size counts every rank. The LR is set by us every step
    (train/optim.py), so there is no DeepSpeed scheduler."""
    optim, backend = cfg.optim, cfg.backend
    on_cuda = (device or compute_device()).type == "cuda"
    zero: dict[str, Any] = {"stage": backend.zero_stage}
    if backend.zero_stage in (1, 2):
        # DeepSpeed's MoE support asserts contiguous gradients + reduce-scatter for ZeRO-1/2. Overlapping
        # the gradient reduction with the backward needs CUDA streams (the CPU accelerator has none).
        zero.update(contiguous_gradients=True, reduce_scatter=True, overlap_comm=on_cuda)
        if on_cuda:
            zero.update(communication_buckets(cfg.model.text.hidden_size))
    if backend.zero_stage == 3:
        zero.update(zero3_thresholds(cfg.model.text.hidden_size, on_cuda))
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": grad_accum * world_size,
        "gradient_clipping": optim.grad_clip,
        "optimizer": {"type": "AdamW", "params": {
            "lr": optim.lr, "betas": list(optim.betas), "eps": optim.eps, "weight_decay": optim.weight_decay,
            "adam_w_mode": True, **adam_implementation(on_cuda)}},
        "bf16": {"enabled": backend.precision == "bf16", "check_grad_overflow": True},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def communication_buckets(hidden_size: int) -> dict[str, int]:
    """Gradient-reduce / parameter-gather buckets of hidden^2 elements (33 MB in bf16 at hidden 4096). With
    overlap_comm DeepSpeed keeps about 4.5 buckets of each in flight: its 5e8-element defaults would hold
    ~9 GB per GPU that the planner does not budget."""
    return {"reduce_bucket_size": hidden_size * hidden_size, "allgather_bucket_size": hidden_size * hidden_size}


def zero3_thresholds(hidden_size: int, on_cuda: bool) -> dict[str, Any]:
    """ZeRO-3 parameter traffic. On CUDA: gathers overlap compute (overlap_comm, a prefetch bucket of ~0.9
    hidden^2 elements, i.e. about one attention projection ahead), and parameters under 10 x hidden elements
    (norms, biases) stay resident instead of being gathered per layer. On CPU everything stays partitioned
    and nothing is prefetched, so tiny test models exercise the gather/release path of real ones."""
    if not on_cuda:
        return {"stage3_param_persistence_threshold": 0, "overlap_comm": False, "stage3_prefetch_bucket_size": 0}
    return {"overlap_comm": True, "contiguous_gradients": True,
            "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
            "stage3_param_persistence_threshold": 10 * hidden_size,
            "reduce_bucket_size": communication_buckets(hidden_size)["reduce_bucket_size"]}


def adam_implementation(on_cuda: bool, deepspeed_fused_adam: bool | None = None) -> dict[str, Any]:
    """The Adam kernel, as DeepSpeed optimizer params. CUDA: DeepSpeed's FusedAdam when its op is prebuilt or
    can be JIT-built here (nvcc present), else torch's fused AdamW (no build step). CPU: torch's AdamW."""
    if not on_cuda:
        return {"torch_adam": True}
    fused = _deepspeed_fused_adam_builds() if deepspeed_fused_adam is None else deepspeed_fused_adam
    return {"torch_adam": False} if fused else {"torch_adam": True, "fused": True}


def _deepspeed_fused_adam_builds() -> bool:  # pragma: no cover - CUDA machines only
    try:
        from deepspeed.git_version_info import installed_ops
        from deepspeed.ops.op_builder import FusedAdamBuilder
    except ImportError:
        return False
    if installed_ops.get("fused_adam"):
        return True
    return shutil.which("nvcc") is not None and FusedAdamBuilder().is_compatible(verbose=False)


def describe_adam(params: dict[str, Any]) -> str:
    if not params.get("torch_adam"):
        return "DeepSpeed FusedAdam"
    return "torch fused AdamW" if params.get("fused") else "torch AdamW"


@register("deepspeed")
def _deepspeed_choice(cfg: TrainConfig, device: torch.device) -> str | None:
    if cfg.backend.name != "deepspeed":
        return None
    ds = deepspeed_config(cfg, 1, 1, device)
    zero = ds["zero_optimization"]
    overlap = "overlap_comm" if zero.get("overlap_comm") else "no comm overlap"
    bucket = zero.get("stage3_prefetch_bucket_size")
    prefetch = f", prefetch {bucket:.3g}" if bucket else ""
    return f"ZeRO-{zero['stage']} {overlap}{prefetch}, {describe_adam(ds['optimizer']['params'])}"
