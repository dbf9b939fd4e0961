"""Shared pieces of the megatron torchrun programs: a tiny GPT, a single-process
reference training loop, and copying/comparing full weights against a sharded (TP/PP/EP) model."""
from __future__ import annotations

import os
import re
import sys
from typing import Callable, Iterable

import torch
import torch.distributed as dist

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


VOCAB, SEQ, LR = 64, 16, 1e-3


def tiny_config(**overrides):
    from megatron.core.transformer.transformer_config import TransformerConfig

    base = dict(num_layers=2, hidden_size=16, ffn_hidden_size=32, num_attention_heads=4,
                use_cpu_initialization=True, hidden_dropout=0.0, attention_dropout=0.0,
                params_dtype=torch.float32, pipeline_dtype=torch.float32, calculate_per_token_loss=True)
    base.update(overrides)
    return TransformerConfig(**base)


def build_gpt(config, layer_spec=None, pre_process: bool = True, post_process: bool = True,
              vp_stage: int | None = None):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = layer_spec if layer_spec is not None else get_gpt_layer_local_spec()
    return GPTModel(config=config, transformer_layer_spec=spec, vocab_size=VOCAB, max_sequence_length=SEQ * 4,
                    pre_process=pre_process, post_process=post_process, vp_stage=vp_stage)


def random_batches(steps: int, batch: int, seq: int = SEQ, seed: int = 7) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        tokens = torch.randint(0, VOCAB, (batch, seq + 1), generator=gen)
        out.append({"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(),
                    "position_ids": torch.arange(seq).repeat(batch, 1),
                    "loss_mask": torch.ones(batch, seq)})
    return out


def masked_loss_sum(per_token_loss: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of masked token losses, number of loss tokens): megatron's per-token-loss contract."""
    mask = loss_mask.float().reshape(-1)
    return (per_token_loss.float().reshape(-1) * mask).sum(), mask.sum().to(torch.int)


def reference_train(model: torch.nn.Module, batches: Iterable[dict], forward: Callable, clip: float = 1.0):
    """Plain single-process loop (no megatron optimizer or DDP): the ground truth every layout must match."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8)
    losses, norms = [], []
    for batch in batches:
        opt.zero_grad()
        loss_sum, num_tokens = masked_loss_sum(forward(model, batch), batch["loss_mask"])
        loss = loss_sum / num_tokens
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, clip)))
        losses.append(float(loss))
        opt.step()
    return losses, norms


def megatron_optimizer(model_chunks: list, distributed: bool):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    cfg = OptimizerConfig(optimizer="adam", lr=LR, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999,
                          adam_eps=1e-8, clip_grad=1.0, use_distributed_optimizer=distributed)
    return get_megatron_optimizer(cfg, model_chunks)


def wrap_ddp(config, model, distributed_optimizer: bool):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    ddp_cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                            use_distributed_optimizer=distributed_optimizer)
    ddp = DistributedDataParallel(config=config, ddp_config=ddp_cfg, module=model)
    # Without this megatron never reduces data-parallel grads (silently): schedules call it after backward.
    config.finalize_model_grads_func = finalize_model_grads
    return ddp


def full_name(name: str, layer_offset: int = 0, expert_offset: int = 0) -> str:
    """Map a sharded model's parameter name to the single-process model's (PP layer / EP expert offsets)."""
    name = re.sub(r"^module\.", "", name)
    name = re.sub(r"decoder\.layers\.(\d+)\.", lambda m: f"decoder.layers.{int(m.group(1)) + layer_offset}.", name)
    return re.sub(r"local_experts\.(\d+)\.", lambda m: f"local_experts.{int(m.group(1)) + expert_offset}.", name)


def local_slice(param: torch.Tensor, full: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    if getattr(param, "tensor_model_parallel", False) and tp_size > 1:
        full = full.chunk(tp_size, dim=param.partition_dim)[tp_rank]
    if full.shape != param.shape:
        raise AssertionError(f"shape {tuple(param.shape)} vs full slice {tuple(full.shape)}")
    return full


def shard_offsets(model, num_layers_total: int, layer_offset: int | None = None) -> tuple[int, int, int, int]:
    """(layer offset, expert offset, tp rank, tp size); `layer_offset` overrides the even PP split's (a
    virtual-pipeline chunk's offset is megatron's get_transformer_layer_offset)."""
    from megatron.core import parallel_state as mpu

    if layer_offset is None:
        pp_rank, pp_size = mpu.get_pipeline_model_parallel_rank(), mpu.get_pipeline_model_parallel_world_size()
        layer_offset = pp_rank * (num_layers_total // pp_size)
    cfg = model.config
    experts = getattr(cfg, "num_moe_experts", None) or 0
    expert_offset = mpu.get_expert_model_parallel_rank() * (experts // mpu.get_expert_model_parallel_world_size())
    return layer_offset, expert_offset, mpu.get_tensor_model_parallel_rank(), mpu.get_tensor_model_parallel_world_size()


def load_full_weights(model, full: dict[str, torch.Tensor], num_layers_total: int,
                      layer_offset: int | None = None) -> None:
    layer_off, expert_off, tp_rank, tp_size = shard_offsets(model, num_layers_total, layer_offset)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(local_slice(param, full[full_name(name, layer_off, expert_off)], tp_rank, tp_size))


def max_param_diff(model, full: dict[str, torch.Tensor], num_layers_total: int,
                   layer_offset: int | None = None) -> float:
    """Largest |param - reference| over this rank's shard, then over all ranks."""
    layer_off, expert_off, tp_rank, tp_size = shard_offsets(model, num_layers_total, layer_offset)
    worst = 0.0
    for name, param in model.named_parameters():
        ref = local_slice(param, full[full_name(name, layer_off, expert_off)], tp_rank, tp_size)
        worst = max(worst, (param.detach() - ref).abs().max().item())
    out = torch.tensor([worst])
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out.item()


def params_of(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def check_close(failures: list[str], what: str, got: float, want: float, rel: float = 1e-5) -> None:
    ok = abs(got - want) <= rel * max(abs(want), 1e-12)
    if dist.get_rank() == 0:
        print(f"{what}: got {got:.9g} want {want:.9g} rel diff {abs(got - want) / max(abs(want), 1e-12):.3g}",
              flush=True)
    if not ok:
        failures.append(f"{what}: got {got} want {want}")
