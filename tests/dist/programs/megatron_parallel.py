"""torchrun program: megatron parallelisms (dp | tp | pp | vpp | cp | ep) on 2 ranks vs the same GPT on 1 process,
and ContextParallelAttention alone (cp_attn). Usage: megatron_parallel.py <mode>...

Phase 1 trains the single-process reference on every rank (all parallel sizes 1, no communication: plain
torch AdamW + clip_grad_norm_). Phase 2 rebuilds megatron's groups for the layout under test, loads the
reference's initial weights into the sharded model, trains through megatron's DDP, optimizer and
get_forward_backward_func, and compares step-0 loss and grad norm, every loss, and the final parameters.
"""
from __future__ import annotations

import sys

import torch
import torch.distributed as dist

import megatron_common as mc
from rank_harness import finish, start
from train.backends.megatron.parallel_state import (ParallelSizes, destroy_parallel_groups, init_parallel_groups,
                                                   config_kwargs as parallel_config_kwargs)

STEPS = 3


def gpt_forward(model, batch, attention_mask=None, packed_seq_params=None):
    return model(batch["tokens"], batch["position_ids"], attention_mask, labels=batch["labels"],
                 packed_seq_params=packed_seq_params)


def forward_step(data_iterator, model):
    batch = next(data_iterator)
    packed = None
    if "cu_seqlens" in batch:
        from megatron.core.packed_seq_params import PackedSeqParams
        packed = PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=batch["cu_seqlens"],
                                 cu_seqlens_kv=batch["cu_seqlens"])
    output = gpt_forward(model, batch, packed_seq_params=packed)

    def loss_func(per_token_loss):
        loss_sum, num_tokens = mc.masked_loss_sum(per_token_loss, batch["loss_mask"])
        return loss_sum, num_tokens, {"lm loss": torch.stack([loss_sum.detach(), num_tokens.float()])}
    return output, loss_func


def train_parallel(chunks, optimizer, steps: list[list[dict]], vpp: int = 1):
    """Megatron's own training step; returns per step (global mean loss, grad norm). With virtual pipeline
    stages the interleaved schedule wants one data iterator per model chunk (only the first and last chunk
    read theirs: each gets its own iterator over the same micro-batches)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    out = []
    for microbatches in steps:
        microbatches = microbatches() if callable(microbatches) else microbatches
        for chunk in chunks:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        reports = get_forward_backward_func()(
            forward_step_func=forward_step, model=chunks,
            data_iterator=[iter(microbatches) for _ in chunks] if vpp > 1 else iter(microbatches),
            num_microbatches=len(microbatches), seq_length=microbatches[0]["tokens"].shape[1],
            micro_batch_size=microbatches[0]["tokens"].shape[0], forward_only=False)
        _, grad_norm, _ = optimizer.step()
        # Loss sum and count from the last pipeline stage of every replica; TP duplicates cancel in the ratio.
        total = sum((r["lm loss"] for r in reports), torch.zeros(2))
        dist.all_reduce(total)
        out.append((float(total[0] / total[1]), float(grad_norm)))
    return out


def reference_phase(config_kwargs: dict, spec, batches: list[dict], forward=gpt_forward):
    init_parallel_groups(ParallelSizes())  # every size 1: no communication at all
    model = mc.build_gpt(mc.tiny_config(**config_kwargs), spec)
    initial = mc.params_of(model)
    losses, norms = mc.reference_train(model, batches, forward)
    final = mc.params_of(model)
    destroy_parallel_groups()
    return initial, final, losses, norms


def compare(failures, label, results, ref_losses, ref_norms, max_diff):
    mc.check_close(failures, f"{label} step-0 grad norm", results[0][1], ref_norms[0])
    for step, ((loss, _), ref) in enumerate(zip(results, ref_losses)):
        mc.check_close(failures, f"{label} step-{step} loss", loss, ref)
    if dist.get_rank() == 0:
        print(f"{label} max |param - reference| after {len(results)} steps: {max_diff:.3g}", flush=True)
    if not max_diff <= 1e-5:
        failures.append(f"{label}: params differ by {max_diff}")


def run_layout(failures, label, sizes, config_kwargs, ref_spec, spec, full_batches, local_steps,
               distributed_optimizer=False, ref_forward=gpt_forward):
    ref_kwargs = {k: v for k, v in config_kwargs.items() if k != "sequence_parallel"}
    initial, final, ref_losses, ref_norms = reference_phase(ref_kwargs, ref_spec, full_batches, ref_forward)
    sizes = init_parallel_groups(sizes)
    from megatron.core import parallel_state as mpu

    config = mc.tiny_config(**config_kwargs, **parallel_config_kwargs(sizes))
    model = mc.build_gpt(config, spec, pre_process=mpu.is_pipeline_first_stage(),
                         post_process=mpu.is_pipeline_last_stage())
    mc.load_full_weights(model, initial, config.num_layers)
    ddp = mc.wrap_ddp(config, model, distributed_optimizer)
    optimizer = mc.megatron_optimizer([ddp], distributed_optimizer)
    results = train_parallel([ddp], optimizer, local_steps)
    compare(failures, label, results, ref_losses, ref_norms, mc.max_param_diff(model, final, config.num_layers))
    destroy_parallel_groups()


def run_vpp(failures):
    """PP=2 x VPP=2 (megatron's interleaved 1F1B): 4 layers, each rank builds one GPT chunk per virtual stage
    (vp_stage v of pipeline rank p holds global layer 2v + p), one DDP per chunk, one optimizer over all."""
    from megatron.core import parallel_state as mpu
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    layers, vpp = 4, 2
    batches = mc.random_batches(STEPS, batch=4)
    # 4 micro-batches of one row: the schedule's steady state sends activations and gradients together
    local = [[rows(b, i, i + 1) for i in range(4)] for b in batches]
    initial, final, ref_losses, ref_norms = reference_phase({"num_layers": layers}, None, batches)
    sizes = init_parallel_groups(ParallelSizes(pp=2, vpp=vpp))
    config = mc.tiny_config(num_layers=layers, **parallel_config_kwargs(sizes))
    chunks, offsets = [], []
    for stage in range(vpp):
        model = mc.build_gpt(config, pre_process=mpu.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
                             post_process=mpu.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
                             vp_stage=stage)
        offsets.append(get_transformer_layer_offset(config, vp_stage=stage))
        mc.load_full_weights(model, initial, layers, layer_offset=offsets[-1])
        chunks.append(mc.wrap_ddp(config, model, False))
    if dist.get_rank() == 0:
        print(f"pp2 vpp2 rank-0 chunk layer offsets {offsets}", flush=True)
    optimizer = mc.megatron_optimizer(chunks, False)
    results = train_parallel(chunks, optimizer, local, vpp=vpp)
    diff = max(mc.max_param_diff(chunk.module, final, layers, layer_offset=offset)
               for chunk, offset in zip(chunks, offsets))
    compare(failures, "pp2 vpp2 interleaved", results, ref_losses, ref_norms, diff)
    destroy_parallel_groups()


def rows(batch: dict, start: int, stop: int) -> dict:
    return {k: v[start:stop] for k, v in batch.items()}


def run_dp(failures):
    batches = mc.random_batches(STEPS, batch=4)
    r = dist.get_rank()
    local = [[rows(b, 2 * r, 2 * r + 2)] for b in batches]
    run_layout(failures, "dp2+distopt", ParallelSizes(dp=2), {}, None, None, batches, local,
               distributed_optimizer=True)


def sequence_parallel_spec(num_layers: int):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    from train.backends.megatron.cpu_compat import SequenceParallelTorchNorm

    layer = get_gpt_layer_local_spec()
    layer.submodules.input_layernorm = SequenceParallelTorchNorm
    layer.submodules.pre_mlp_layernorm = SequenceParallelTorchNorm
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=SequenceParallelTorchNorm)


def run_tp(failures):
    batches = mc.random_batches(STEPS, batch=2)
    run_layout(failures, "tp2+sp", ParallelSizes(tp=2), {"sequence_parallel": True},
               None, sequence_parallel_spec(2), batches, [[b] for b in batches])


def run_pp(failures):
    batches = mc.random_batches(STEPS, batch=4)
    # Two micro-batches of 2 so the 1F1B schedule really overlaps the stages.
    local = [[rows(b, 0, 2), rows(b, 2, 4)] for b in batches]
    run_layout(failures, "pp2 1f1b", ParallelSizes(pp=2), {}, None, None, batches, local)


def run_ep(failures):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    moe = dict(num_moe_experts=4, moe_router_topk=2, moe_token_dispatcher_type="alltoall",
               add_bias_linear=False, moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0)
    spec = get_gpt_layer_local_spec(num_experts=4, moe_grouped_gemm=False)
    batches = mc.random_batches(STEPS, batch=4)
    r = dist.get_rank()
    local = [[rows(b, 2 * r, 2 * r + 2)] for b in batches]
    run_layout(failures, "ep2 moe alltoall", ParallelSizes(ep=2), moe, spec, spec, batches, local)


DOCUMENTS = ([0, 11, 25, 32], [0, 5, 6, 30, 32], [0, 32])  # per step; chunks of 8 cut through documents


def packed_batches() -> list[dict]:
    """One packed sequence per step: positions restart per document, no loss across a document end."""
    out = []
    for step, (batch, bounds) in enumerate(zip(mc.random_batches(len(DOCUMENTS), 1, seq=32), DOCUMENTS)):
        starts = torch.tensor(bounds[:-1]).repeat_interleave(torch.tensor(bounds).diff())
        batch["position_ids"] = (torch.arange(32) - starts).unsqueeze(0)
        batch["loss_mask"][0, torch.tensor(bounds[1:]) - 1] = 0.0
        batch["cu_seqlens"] = torch.tensor(bounds, dtype=torch.int32)
        out.append(batch)
    return out


def document_causal_mask(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Full [1, 1, L, L] mask for the single-process reference only (True = masked, megatron's convention)."""
    doc = torch.arange(len(cu_seqlens) - 1).repeat_interleave(cu_seqlens.diff())
    allowed = (doc[:, None] == doc[None, :]) & torch.ones(len(doc), len(doc), dtype=torch.bool).tril()
    return ~allowed[None, None]


def reference_packed_forward(model, batch):
    return gpt_forward(model, batch, attention_mask=document_causal_mask(batch["cu_seqlens"]))


def run_cp(failures):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.utils import get_batch_on_this_cp_rank

    from train.backends.megatron.cp_attention import ContextParallelAttention

    spec = get_gpt_layer_local_spec()
    spec.submodules.self_attention.submodules.core_attention = ContextParallelAttention
    batches = packed_batches()
    local = []
    for batch in batches:
        share = {k: v for k, v in batch.items() if k != "cu_seqlens"}
        # A callable: train_parallel splits each step's batch once the CP groups exist.
        local.append(lambda share=share, cu=batch["cu_seqlens"]: [{**get_batch_on_this_cp_rank(dict(share)),
                                                                   "cu_seqlens": cu}])
    run_layout(failures, "cp2 packed", ParallelSizes(cp=2), {}, None, spec, batches, local,
               ref_forward=reference_packed_forward)


def reference_attention(q, k, v, bounds):
    """One-process attention on the full sequence: full document-causal mask, GQA by repetition."""
    allowed = ~document_causal_mask(torch.tensor(bounds))[0, 0]
    out = torch.nn.functional.scaled_dot_product_attention(
        q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3), attn_mask=allowed, enable_gqa=True)
    return out.permute(2, 0, 1, 3).reshape(q.shape[0], q.shape[1], -1)


def cp_attention_case(attn, bounds, batch, packed: str | None) -> dict[str, float]:
    """Max |CP=2 - reference| of the output and of the q/k/v gradients on this rank's share. packed: None
    (one sequence), "sbhd" (megatron's whole-sequence split) or "thd" (TE's per-document split, [t, h, d]
    inputs as megatron hands them over)."""
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.utils import get_batch_on_this_cp_rank

    from train.parallel.context import document_shard_index

    gen = torch.Generator().manual_seed(3)
    full = {"q": torch.randn(32, batch, 4, 4, generator=gen), "k": torch.randn(32, batch, 2, 4, generator=gen),
            "v": torch.randn(32, batch, 2, 4, generator=gen)}
    ref_in = {n: t.clone().requires_grad_() for n, t in full.items()}
    ref_out = reference_attention(ref_in["q"], ref_in["k"], ref_in["v"], bounds)
    weights = torch.randn(ref_out.shape, generator=gen)  # a non-uniform upstream gradient
    (ref_out * weights).sum().backward()
    seq_major = {**full, "w": weights, "out": ref_out.detach(), **{f"d{n}": t.grad for n, t in ref_in.items()}}
    cu = torch.tensor(bounds, dtype=torch.int32)
    if packed == "thd":
        index = document_shard_index(cu, 2, dist.get_rank())
        local = {n: t.index_select(0, index) for n, t in seq_major.items()}
        params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu,
                                 cu_seqlens_kv_padded=cu)
    else:
        # get_batch_on_this_cp_rank splits dim 1 ([b, s, ...]); attention tensors are [s, b, ...].
        local = {n: t.transpose(0, 1) for n, t in get_batch_on_this_cp_rank(
            {n: t.transpose(0, 1) for n, t in seq_major.items()}).items()}
        params = PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu) if packed else None
    mine = {n: local[n].clone().requires_grad_() for n in ("q", "k", "v")}
    if packed == "thd":  # megatron squeezes the batch dimension of THD inputs
        out = attn(*(mine[n][:, 0] for n in ("q", "k", "v")), None, packed_seq_params=params)
    else:
        out = attn(mine["q"], mine["k"], mine["v"], None, packed_seq_params=params)
    (out * local["w"]).sum().backward()
    diffs = {"out": (out - local["out"]).abs().max().item()}
    diffs.update({f"d{n}": (t.grad - local[f"d{n}"]).abs().max().item() for n, t in mine.items()})
    return diffs


def run_cp_attention(failures):
    """ContextParallelAttention alone, GQA (4 heads, 2 groups): outputs and K/V gradients vs one process."""
    from megatron.core.transformer.enums import AttnMaskType

    from train.backends.megatron.cp_attention import ContextParallelAttention

    sizes = init_parallel_groups(ParallelSizes(cp=2))
    config = mc.tiny_config(num_query_groups=2, **parallel_config_kwargs(sizes))
    attn = ContextParallelAttention(config, 1, AttnMaskType.causal, "self")
    for case, bounds, batch, packed in (("packed", [0, 3, 17, 18, 32], 1, "sbhd"), ("b=2", [0, 32], 2, None),
                                        ("thd per document", [0, 4, 4, 20, 32], 1, "thd")):
        diffs = cp_attention_case(attn, bounds, batch, packed)
        worst = torch.tensor([max(diffs.values())])
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        if dist.get_rank() == 0:
            print(f"cp2 attention {case} max diff: " + " ".join(f"{k} {v:.3g}" for k, v in diffs.items()), flush=True)
        if not worst.item() <= 1e-5:
            failures.append(f"cp2 attention {case}: {diffs}")
    destroy_parallel_groups()


MODES = {"dp": run_dp, "tp": run_tp, "pp": run_pp, "ep": run_ep, "cp": run_cp, "cp_attn": run_cp_attention,
         "vpp": run_vpp}


def main() -> None:
    start()
    failures: list[str] = []
    for mode in sys.argv[1:]:
        MODES[mode](failures)
    finish(failures)


if __name__ == "__main__":
    main()
