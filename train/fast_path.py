"""Which implementation a run uses wherever there is a choice between a fast CUDA path (flash-attn, fused
Adam, communication overlap, Transformer Engine, ...) and the portable one kept for CPU.

Each component registers one chooser: `(cfg, device) -> description | None` (None: the component takes no
part in this run, e.g. DeepSpeed choices under backend=megatron). The code that builds the component calls
the same decision function its chooser reports, so the start-up line (`describe`) and the run agree;
`python -m train.doctor` prints the same table. Choosers live next to what they choose; their modules are
listed in CHOOSER_MODULES so that every one is registered before `choose` runs.
"""
from __future__ import annotations

import importlib
from typing import Callable

import torch

from train.config.schema import TrainConfig

Chooser = Callable[[TrainConfig, torch.device], "str | None"]
CHOOSER_MODULES = ["train.models.qwen3vl.attention", "train.backends.deepspeed.config",
                   "train.backends.megatron.fast_path"]
_CHOOSERS: dict[str, Chooser] = {}


def register(component: str) -> Callable[[Chooser], Chooser]:
    """Decorator: `chooser` reports what `component` uses; one chooser per component."""
    def add(chooser: Chooser) -> Chooser:
        if _CHOOSERS.get(component, chooser) is not chooser:
            raise ValueError(f"two choosers registered for {component!r}")
        _CHOOSERS[component] = chooser
        return chooser
    return add


def choose(cfg: TrainConfig, device: torch.device) -> dict[str, str]:
    """component -> what this run uses on `device` (components that take no part are left out)."""
    for module in CHOOSER_MODULES:
        importlib.import_module(module)
    choices = {component: chooser(cfg, device) for component, chooser in sorted(_CHOOSERS.items())}
    return {component: choice for component, choice in choices.items() if choice is not None}


def describe(cfg: TrainConfig, device: torch.device) -> str:
    """The start-up line: `run path on cuda:0 (backend=deepspeed, bf16): attention=..., ...`."""
    parts = [f"{component}={choice}" for component, choice in choose(cfg, device).items()]
    return (f"run path on {device} (backend={cfg.backend.name}, {cfg.backend.precision}): "
            + ("; ".join(parts) or "no choices"))
