"""Pure-PyTorch Qwen3-VL (dense and MoE): the reference every backend is checked against."""
from train.models.qwen3vl.attention import PackedAttention
from train.models.qwen3vl.model import Qwen3VLModel, Qwen3VLOutput

__all__ = ["PackedAttention", "Qwen3VLModel", "Qwen3VLOutput"]
