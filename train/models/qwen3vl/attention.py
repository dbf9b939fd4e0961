"""Core attention over packed sequences, without any L x L mask.

Every attention layer (LLM and ViT) owns a `core_attention` attribute: a module called as
`core_attention(q, k, v, cu_seqlens, causal)` with q [L, Hq, D], k/v [L, Hkv, D] (Hq a multiple of Hkv, i.e.
GQA) and returning [L, Hq, D]. Documents (or images / video frames in the ViT) are the segments of
`cu_seqlens`; tokens never attend across a boundary. Backends replace the object (Ulysses, ring / all-gather
context parallel) with `Qwen3VLModel.set_core_attention` without touching the model, the way megatron-core
module specs swap their core attention.

`PackedAttention` is the reference: flash-attn's varlen kernel when it is importable and the tensors are
half precision on CUDA, otherwise one torch SDPA call per segment. Both keep memory linear in L (SDPA's
fused CPU/CUDA kernels never materialise the scores of a whole segment either).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

try:  # optional: only present on CUDA clusters
    from flash_attn import flash_attn_varlen_func
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_varlen_func = None


def full_cu_seqlens(length: int, device: torch.device) -> torch.Tensor:
    """cu_seqlens of a sequence that is a single segment."""
    return torch.tensor([0, length], dtype=torch.int32, device=device)


def segment_lengths(cu_seqlens: torch.Tensor) -> list[int]:
    return (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()


class PackedAttention(nn.Module):
    """Attention restricted to the segments of cu_seqlens, causal or not; scale 1/sqrt(D)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                causal: bool) -> torch.Tensor:
        if q.shape[0] != int(cu_seqlens[-1]):
            raise ValueError(f"cu_seqlens covers {int(cu_seqlens[-1])} tokens but q has {q.shape[0]}")
        if _flash_usable(q):
            return _flash_varlen(q, k, v, cu_seqlens, causal)
        return _sdpa_per_segment(q, k, v, cu_seqlens, causal)


def _flash_usable(q: torch.Tensor) -> bool:
    return flash_attn_varlen_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


def _flash_varlen(q, k, v, cu_seqlens, causal) -> torch.Tensor:  # pragma: no cover - CUDA only
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max())
    return flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, causal=causal)


def _sdpa_per_segment(q, k, v, cu_seqlens, causal) -> torch.Tensor:
    gqa = q.shape[1] != k.shape[1]
    lengths = segment_lengths(cu_seqlens)
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
