"""Core attention over packed sequences, without any L x L mask.

Every attention layer (LLM and ViT) owns a `core_attention` attribute: a module called as
`core_attention(q, k, v, cu_seqlens, causal)` with q [L, Hq, D], k/v [L, Hkv, D] (Hq a multiple of Hkv, i.e.
GQA) and returning [L, Hq, D]. Documents (or images / video frames in the ViT) are the segments of
`cu_seqlens`; tokens never attend across a boundary. Backends replace the object (Ulysses, ring / all-gather
context parallel) with `Qwen3VLModel.set_core_attention` without touching the model, the way megatron-core
module specs swap their core attention.

`PackedAttention` is the reference. For fp16/bf16 on an Ampere-or-newer GPU it makes one varlen kernel call
for all segments: flash-attn's when the package is importable, else torch's own flash varlen
(`torch.nn.attention.varlen.varlen_attn`, no extra package). Otherwise (CPU, fp32, older GPUs) one torch
SDPA call per segment. All keep memory linear in L (SDPA's fused CPU/CUDA kernels never materialise the
scores of a whole segment either).
`attention_kernel` is the one decision, used by the forward and reported at start-up (train/fast_path.py).
The segment bookkeeping (int32 cu_seqlens on the device, max length, lengths) is computed once per
cu_seqlens tensor and reused by every layer: reading it on the host is a device sync.

`KVCache` is for decoding only (train.eval): one sequence, the keys and values of every token so far per
layer, so each new token costs one token's projections and one row of attention scores.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from train.config.schema import TrainConfig
from train.fast_path import register

try:  # optional: only present on CUDA clusters (pip install longvl[gpu])
    from flash_attn import flash_attn_varlen_func
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_varlen_func = None
try:  # recent torch releases (2.13 here) ship a flash varlen kernel of their own (CUDA only)
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # pragma: no cover - depends on the torch release
    varlen_attn = None

FLASH_VARLEN, TORCH_VARLEN, SDPA_PER_SEGMENT = "flash_varlen", "torch_varlen", "sdpa_per_segment"
KERNEL_NAMES = {FLASH_VARLEN: "flash-attn varlen", TORCH_VARLEN: "torch varlen_attn",
                SDPA_PER_SEGMENT: "torch SDPA per segment"}
FLASH_DTYPES = (torch.float16, torch.bfloat16)
FLASH_MIN_CAPABILITY = (8, 0)  # both flash kernels need Ampere or newer


def full_cu_seqlens(length: int, device: torch.device) -> torch.Tensor:
    """cu_seqlens of a sequence that is a single segment."""
    return torch.tensor([0, length], dtype=torch.int32, device=device)


@dataclass(frozen=True)
class KernelSupport:
    """What the machine offers for one device: the flash-attn package, torch's varlen kernel, a GPU new enough."""

    flash_attn: bool
    torch_varlen: bool
    flash_capable_gpu: bool

    @classmethod
    def detect(cls, device: torch.device) -> "KernelSupport":
        capable = device.type == "cuda" and torch.cuda.is_available() and \
            torch.cuda.get_device_capability(device) >= FLASH_MIN_CAPABILITY
        return cls(flash_attn_varlen_func is not None, varlen_attn is not None, capable)


def attention_kernel(device: torch.device, dtype: torch.dtype, support: KernelSupport | None = None) -> str:
    """The kernel PackedAttention uses for tensors of `dtype` on `device` (see the module doc)."""
    support = support or _support_of(device)
    if device.type != "cuda" or dtype not in FLASH_DTYPES or not support.flash_capable_gpu:
        return SDPA_PER_SEGMENT
    if support.flash_attn:
        return FLASH_VARLEN
    return TORCH_VARLEN if support.torch_varlen else SDPA_PER_SEGMENT


_supports: dict[torch.device, KernelSupport] = {}


def _support_of(device: torch.device) -> KernelSupport:
    """KernelSupport.detect, once per device (every layer asks)."""
    if device not in _supports:
        _supports[device] = KernelSupport.detect(device)
    return _supports[device]


@register("attention")
def _attention_choice(cfg: TrainConfig, device: torch.device) -> str:
    """The reference attention runs the ViT always, and the text model too on the DeepSpeed backend."""
    dtype = torch.bfloat16 if cfg.backend.precision == "bf16" else torch.float32
    where = "ViT" if cfg.backend.name == "megatron" else "text + ViT"
    return f"{KERNEL_NAMES[attention_kernel(device, dtype)]} ({where})"


class Segments:
    """cu_seqlens as the kernels take it: int32 on the device, the longest segment, the segment lengths."""

    def __init__(self, cu_seqlens: torch.Tensor, device: torch.device) -> None:
        host = cu_seqlens.detach().to("cpu", torch.int64)
        self.lengths: list[int] = (host[1:] - host[:-1]).tolist()
        self.max_len = max(self.lengths, default=0)
        self.cu = cu_seqlens.to(device=device, dtype=torch.int32)


_last_segments: tuple[torch.Tensor, int, torch.device, Segments] | None = None


def segments_of(cu_seqlens: torch.Tensor, device: torch.device) -> Segments:
    """`Segments` of cu_seqlens, reused while the same tensor (unmodified) comes back: every layer of one
    forward passes the same cu_seqlens. The cache holds the tensor, so its memory cannot be reused by another
    tensor while it is the key; `_version` catches in-place edits."""
    global _last_segments
    cached = _last_segments
    if cached is not None and cached[0] is cu_seqlens and cached[1] == cu_seqlens._version and cached[2] == device:
        return cached[3]
    segments = Segments(cu_seqlens, device)
    _last_segments = (cu_seqlens, cu_seqlens._version, device, segments)
    return segments


class PackedAttention(nn.Module):
    """Attention restricted to the segments of cu_seqlens, causal or not; scale 1/sqrt(D)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                causal: bool) -> torch.Tensor:
        segments = segments_of(cu_seqlens, q.device)
        if q.shape[0] != sum(segments.lengths):
            raise ValueError(f"cu_seqlens covers {sum(segments.lengths)} tokens but q has {q.shape[0]}")
        kernel = attention_kernel(q.device, q.dtype)
        if kernel == FLASH_VARLEN:
            return flash_varlen(q, k, v, segments, causal, flash_attn_varlen_func)
        if kernel == TORCH_VARLEN:
            return torch_varlen(q, k, v, segments, causal, varlen_attn)
        return _sdpa_per_segment(q, k, v, segments.lengths, causal)


def flash_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: Segments, causal: bool,
                 kernel) -> torch.Tensor:
    """One varlen call over all segments (queries and keys share the segments; GQA is native)."""
    return kernel(q, k, v, segments.cu, segments.cu, segments.max_len, segments.max_len, dropout_p=0.0,
                  softmax_scale=None, causal=causal)


def torch_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: Segments, causal: bool,
                 kernel) -> torch.Tensor:
    """torch's varlen flash kernel over all segments; causal is the window (-1, 0), GQA must be asked for."""
    return kernel(q, k, v, segments.cu, segments.cu, segments.max_len, segments.max_len,
                  window_size=(-1, 0) if causal else (-1, -1), enable_gqa=q.shape[1] != k.shape[1])


def _sdpa_per_segment(q, k, v, lengths: list[int], causal) -> torch.Tensor:
    gqa = q.shape[1] != k.shape[1]
    outputs = []
    # split() gives views whose backward is one concatenation; slicing t[seg] per segment would make each
    # segment's backward allocate and accumulate into a full-size zero gradient (hundreds of ViT frames).
    for qs, ks, vs in zip(q.split(lengths), k.split(lengths), v.split(lengths)):
        if qs.shape[0] == 0:
            continue
        # [l, H, D] -> [1, H, l, D]. The batch dim matters: with 3-D inputs torch falls back to the math
        # kernel, which materialises the l x l scores; 4-D inputs get the fused (flash) CPU/CUDA kernel.
        out = F.scaled_dot_product_attention(*(t.transpose(0, 1)[None] for t in (qs, ks, vs)),
                                             is_causal=causal, enable_gqa=gqa)
        outputs.append(out[0].transpose(0, 1))
    return torch.cat(outputs, dim=0) if len(outputs) != 1 else outputs[0]


class LayerKV:
    """One decoder layer's cached keys and values [past, Hkv, D] (rotated, normed: as attention uses them)."""

    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[0]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Append the new tokens' k/v, then causal attention of their queries over every cached token."""
        past = self.length
        self.keys = k if self.keys is None else torch.cat([self.keys, k])
        self.values = v if self.values is None else torch.cat([self.values, v])
        n, total = q.shape[0], self.keys.shape[0]
        # New token i sits at position past + i and sees keys 0 .. past + i.
        mask = None if n == 1 else (torch.arange(total, device=q.device)[None, :]
                                    <= past + torch.arange(n, device=q.device)[:, None])
        out = F.scaled_dot_product_attention(*(t.transpose(0, 1)[None] for t in (q, self.keys, self.values)),
                                             attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])
        return out[0].transpose(0, 1)


class KVCache:
    """Per-layer key/value caches of one sequence being decoded (`Qwen3VLModel.decode(..., cache=)`)."""

    def __init__(self, num_layers: int) -> None:
        self.layers = [LayerKV() for _ in range(num_layers)]

    @property
    def length(self) -> int:
        """Tokens cached so far (the position index of the next token in a one-document sequence)."""
        return self.layers[0].length
