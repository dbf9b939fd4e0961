"""Backends behind one protocol (base.py); `build_backend` picks one from the config."""
from __future__ import annotations

from train.backends.base import Backend, ParallelInfo, StepMetrics
from train.config.model import ConfigError
from train.config.schema import TrainConfig
from train.models.weight_source import WeightSource


def build_backend(cfg: TrainConfig, weights: WeightSource | None = None) -> Backend:
    """The backend named by cfg.backend.name, built on the initialised torch.distributed world.

    Each rank builds only its shard of the model (meta device; ZeRO-3: partitions only) and fills it from
    `weights` (default: the random initialisation RandomInit(cfg.model, cfg.seed), the same values in every
    layout); the stage's frozen groups (cfg.stage.trainable) are frozen by name before the optimizer exists."""
    if cfg.backend.name == "deepspeed":
        from train.backends.deepspeed import DeepSpeedBackend

        return DeepSpeedBackend(cfg, weights)
    if cfg.backend.name == "megatron":
        from train.backends.megatron import backend as megatron_backend  # type: ignore[attr-defined]

        return megatron_backend.MegatronBackend(cfg, weights)
    raise ConfigError(f"backend.name={cfg.backend.name!r} is not one of deepspeed, megatron")


__all__ = ["Backend", "ParallelInfo", "StepMetrics", "build_backend"]
