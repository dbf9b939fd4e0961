"""AdamW parameter groups and the learning-rate schedule, shared by every backend.

Both are pure: the groups depend only on the model's trainable parameters and the config, and the learning
rate only on the step number. That is what makes a resumed run identical to an uninterrupted one (nothing
to restore but the step) and a DeepSpeed run identical to a Megatron one.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from train.config.model import ModelConfig
from train.config.schema import OptimConfig
from train.freeze import strip_wrappers


def uses_weight_decay(module: nn.Module, param: torch.Tensor) -> bool:
    """Matrices get weight decay; vectors (norm gains, biases) and embedding tables do not: decaying norm
    gains towards 0 or shrinking rarely-seen token rows only hurts (standard GPT / Llama practice). Decided
    by the owning module's type, not by name: the ViT's `patch_embed` is a Conv3d that should decay."""
    return param.ndim >= 2 and not isinstance(module, nn.Embedding)


def weight_decay_names(model_cfg: ModelConfig) -> set[str]:
    """Native names of the parameters that get weight decay (`uses_weight_decay` on a meta-device build of
    the reference model: no memory). A tied lm_head is the embedding: not decayed."""
    from train.models.qwen3vl import Qwen3VLModel

    with torch.device("meta"):
        model = Qwen3VLModel(model_cfg)
    return {name for name, decays in _classified(model) if decays}


def _classified(model: nn.Module) -> list[tuple[str, bool]]:
    """(name, decays) per distinct parameter; a shared one under its first owner's name."""
    seen: set[int] = set()
    out = []
    for prefix, module in model.named_modules():
        for name, param in module.named_parameters(prefix=prefix, recurse=False):
            if id(param) not in seen:
                seen.add(id(param))
                out.append((name, uses_weight_decay(module, param)))
    return out


def param_groups(model: nn.Module, cfg: OptimConfig, decayed: set[str] | None = None) -> list[dict[str, Any]]:
    """Two AdamW groups over the *trainable* parameters only (frozen ones get no optimizer state).

    `decayed`: the native names that decay (weight_decay_names), for models whose parameters no longer
    show their shape (ZeRO-3 partitions); wrapper prefixes are stripped before the lookup. Without it the
    rule is applied to the modules themselves. A parameter shared by two modules (tied embeddings) appears
    once, classified by its first owner (the embedding). Each group carries its own weight_decay so any
    AdamW built from them (torch, DeepSpeed, Megatron) applies the same rule.
    """
    params = dict(model.named_parameters())
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, decays in _classified(model):
        param = params[name]
        if not param.requires_grad:
            continue
        if decayed is not None:
            decays = strip_wrappers(name) in decayed
        (decay if decays else no_decay).append(param)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters (stage.trainable froze everything)")
    groups = [{"params": decay, "weight_decay": cfg.weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    return [g for g in groups if g["params"]]


def learning_rate(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """LR of optimizer step `step` (0-based): linear warmup from lr/warmup to lr over `warmup_steps` steps,
    then cosine / linear decay to min_lr at `total_steps` (held there afterwards), or constant."""
    if step < 0:
        raise ValueError(f"step={step} must be >= 0")
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        # (step + 1): the first step already trains with a non-zero LR.
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    decay_steps = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    if cfg.schedule == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif cfg.schedule == "linear":
        factor = 1.0 - progress
    else:
        raise ValueError(f"optim.schedule={cfg.schedule!r} is not one of cosine, linear, constant")
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * factor


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Write `lr` into every param group (DeepSpeed and Megatron wrappers expose their inner groups)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
