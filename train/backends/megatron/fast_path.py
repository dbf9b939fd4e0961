"""What the megatron backend runs on this device: Transformer Engine layers and attention, packed THD
sequences, grouped-GEMM experts with fused token permutation, and gradient-reduce / parameter-gather overlap
on CUDA; the local (pure PyTorch) spec everywhere else. One decision (`choose_path`), used by the model
(layer specs, TransformerConfig, PackedSeqParams), by the wrapper (DDP config) and by the start-up line
(train/fast_path.py), so what is logged is what runs.

- Transformer Engine layer spec (megatron's get_gpt_layer_with_transformer_engine_spec: fused
  norm+linear, TEDotProductAttention) when TE imports and the device is CUDA.
- THD: with TE, attention reads the packed documents through PackedSeqParams(qkv_format="thd", cu_seqlens)
  with the longest document as max_seqlen. With context parallelism (parallel.cp_layout auto or document)
  every document is split into 2*cp chunks, rank r holding chunks r and 2*cp-1-r of each (TE's THD layout,
  train/parallel/context.py), documents padded by the packer to multiples of 2*cp, and TE's attention
  exchanges K/V itself (parallel.cp_comm_type); megatron's THD rotary code takes this rank's rows of the
  whole sequence's MRoPE angles by the same rule. With cp_layout=sequence (the whole sequence in 2*cp
  chunks, which TE's THD attention cannot read) the layers keep this project's ContextParallelAttention,
  which reads both layouts (train/backends/megatron/cp_attention.py): the local path with
  cp_layout=document runs everything the TE path runs except TE's kernel, which is how CPU tests cover it.
- MoE: moe_grouped_gemm (TEGroupedMLP) and moe_permute_fusion need TE's kernels.
- Overlap: overlap_grad_reduce on CUDA; overlap_param_gather with the distributed optimizer on CUDA (the
  backend forces a parameter sync before it reads weights: save, export, eval).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from train.config.schema import TrainConfig
from train.fast_path import register


@dataclass(frozen=True)
class MegatronPath:
    transformer_engine: bool  # TE layer spec (fused norm + linear, TE attention)
    thd_attention: bool  # TE attention over packed THD documents (cu_seqlens)
    document_split: bool  # cp > 1, split per document (THD PackedSeqParams, documents padded to 2*cp)
    grouped_gemm: bool  # moe_grouped_gemm: all local experts in one grouped GEMM
    permute_fusion: bool  # moe_permute_fusion: fused token permutation / unpermutation
    overlap_grad_reduce: bool  # DDP reduces gradient buckets while backward runs
    overlap_param_gather: bool  # distributed optimizer gathers parameter buckets during the next forward

    def describe(self) -> str:
        spec = "transformer-engine spec" if self.transformer_engine else "local spec"
        split = ", context parallel per document" if self.document_split else ""
        attention = (f"TE attention, THD packed{split}" if self.thd_attention
                     else f"ContextParallelAttention (blockwise, packed-aware{split})")
        experts = "grouped GEMM + permute fusion" if self.grouped_gemm else "sequential experts"
        overlap = [name for name, on in (("grad reduce", self.overlap_grad_reduce),
                                         ("param gather", self.overlap_param_gather)) if on]
        return f"{spec}, {attention}, {experts}, overlap: {' + '.join(overlap) or 'none'}"


LOCAL_PATH = MegatronPath(transformer_engine=False, thd_attention=False, document_split=False, grouped_gemm=False,
                          permute_fusion=False, overlap_grad_reduce=False,
                          overlap_param_gather=False)  # CPU: nothing but PyTorch


def transformer_engine_importable() -> bool:
    """TE imports (its CUDA libraries load); False on CPU-only installs and when TE is absent."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # ImportError, or OSError / RuntimeError from missing CUDA libraries
        return False
    return True


def choose_path(device: torch.device, cp: int, distributed_optimizer: bool,
                te_available: Callable[[], bool] = transformer_engine_importable,
                cp_layout: str = "auto") -> MegatronPath:
    """The megatron path for `device` and parallel.cp_layout; `te_available` is asked only on CUDA (tests
    inject it)."""
    cuda = device.type == "cuda"
    te = cuda and te_available()
    document = cp > 1 and (cp_layout == "document" or (cp_layout == "auto" and te))
    return MegatronPath(transformer_engine=te, thd_attention=te and (cp == 1 or document), document_split=document,
                        grouped_gemm=te, permute_fusion=te, overlap_grad_reduce=cuda,
                        overlap_param_gather=cuda and distributed_optimizer)


def run_path(cfg: TrainConfig, device: torch.device) -> MegatronPath:
    return choose_path(device, cfg.parallel.cp, cfg.backend.distributed_optimizer, cp_layout=cfg.parallel.cp_layout)


def document_multiple(path: MegatronPath, cp: int) -> int:
    """What every packed document's length must be a multiple of on this path (the loader pads to it)."""
    return 2 * cp if path.document_split else 1


@register("megatron")
def _megatron_choice(cfg: TrainConfig, device: torch.device) -> str | None:
    if cfg.backend.name != "megatron":
        return None
    line = run_path(cfg, device).describe()
    par = cfg.parallel
    if par.vpp is not None:  # parallel_state.config_kwargs: pp=2 sends both directions unbatched
        line += f", interleaved 1F1B (vpp={par.vpp}{', unbatched p2p' if par.pp == 2 else ''})"
    return line


def config_options(path: MegatronPath, is_moe: bool) -> dict[str, bool]:
    """TransformerConfig fields of the path (MoE ones only for MoE models)."""
    options: dict[str, bool] = {}
    if is_moe:
        options.update(moe_grouped_gemm=path.grouped_gemm, moe_permute_fusion=path.permute_fusion)
    return options


def ddp_options(path: MegatronPath) -> dict[str, bool]:
    """DistributedDataParallelConfig fields of the path."""
    return {"overlap_grad_reduce": path.overlap_grad_reduce, "overlap_param_gather": path.overlap_param_gather}


def packed_seq_params(cu_seqlens: torch.Tensor, path: MegatronPath):
    """PackedSeqParams for one packed sequence (cu_seqlens of the whole sequence, on every CP rank): THD with
    the longest document as max_seqlen for TE's attention and for the per-document CP split; the sbhd form
    ContextParallelAttention reads for the whole-sequence split. The per-document pads are left in the
    documents (cu_seqlens = cu_seqlens_padded): they follow each document's last token, so causal attention
    never shows them to a real token, and they carry no loss."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = cu_seqlens.to(torch.int32)
    if not (path.thd_attention or path.document_split):
        return PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu)
    longest = int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu,
                           cu_seqlens_kv_padded=cu, max_seqlen_q=longest, max_seqlen_kv=longest)
