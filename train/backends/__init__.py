"""Backends behind one protocol (base.py); `build_backend` picks one from the config."""
from __future__ import annotations

from typing import Callable

from train.backends.base import Backend, ParallelInfo, StepMetrics
from train.config.model import ConfigError
from train.config.schema import TrainConfig
from train.models.qwen3vl import Qwen3VLModel


def build_backend(cfg: TrainConfig, model: Qwen3VLModel | None = None,
                  prepare: Callable[[Qwen3VLModel], None] | None = None) -> Backend:
    """The backend named by cfg.backend.name, built on the initialised torch.distributed world.

    `model`: an already built model (else one is built from cfg.model with cfg.seed); `prepare(model)` runs
    on the plain model before it is wrapped and its optimizer is built: freeze module groups there
    (frozen parameters get no optimizer state) or load initial weights."""
    if cfg.backend.name == "deepspeed":
        from train.backends.deepspeed import DeepSpeedBackend

        return DeepSpeedBackend(cfg, model=model, prepare=prepare)
    if cfg.backend.name == "megatron":
        from train.backends.megatron import backend as megatron_backend  # type: ignore[attr-defined]

        return megatron_backend.MegatronBackend(cfg, model=model, prepare=prepare)
    raise ConfigError(f"backend.name={cfg.backend.name!r} is not one of deepspeed, megatron")


__all__ = ["Backend", "ParallelInfo", "StepMetrics", "build_backend"]
