"""DeepSpeed backend: ZeRO 0-3, bf16/fp32, Ulysses context parallelism, MoE expert parallelism (ZeRO <= 2)."""
from train.backends.deepspeed.backend import DeepSpeedBackend

__all__ = ["DeepSpeedBackend"]
