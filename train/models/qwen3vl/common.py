"""Small building blocks shared by the ViT, the LLM and the MoE layers."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn


class RMSNorm(nn.Module):
    """RMS norm computed in fp32 (like HF), weight applied in the input dtype."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size))
        self.eps = eps
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The few activations Qwen3-VL uses, by their HF names."""
    if name == "silu":
        return F.silu
    if name == "gelu_pytorch_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu
    raise ValueError(f"unsupported hidden_act={name!r} (expected silu, gelu or gelu_pytorch_tanh)")


def maybe_checkpoint(module: nn.Module, enabled: bool, *args: object) -> object:
    """module(*args); when enabled and gradients are on, its activations are recomputed in backward
    (non-reentrant torch.utils.checkpoint, which handles tuple outputs and unused inputs)."""
    if enabled and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(module, *args, use_reentrant=False)
    return module(*args)
