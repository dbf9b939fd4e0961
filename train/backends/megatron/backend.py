"""The Megatron-core backend: TP (+ sequence parallel), PP (1F1B), CP, EP, megatron DDP + distributed
optimizer, dist_checkpointing; the model is train/backends/megatron/model.py.

Loss and gradient scaling: the shared loss (train/loss.py) makes each micro-batch's objective its exact
share of the GLOBAL loss (divided by the global weight sum over DP x CP and all micro-batches). With
`calculate_per_token_loss=True` megatron neither divides the objective by the micro-batch count nor
averages gradients over data-parallel ranks: DDP sums them, and the per-micro-batch token count handed to
the schedule is 0, so finalize_model_grads does not rescale either. The summed gradient is then exactly the
gradient of the global loss (grad_scale = 1), whatever the layout; clipping and the norm are megatron's.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist

from data.batch import PackedBatch
from train.backends.base import ParallelInfo, StepMetrics
from train.backends.megatron.fast_path import ddp_options, document_multiple, run_path
from train.backends.snapshot import PendingWrite
from train.backends.megatron.layout import check_config
from train.backends.megatron.parallel_state import ParallelSizes, destroy_parallel_groups, init_parallel_groups
from train.config.schema import TrainConfig
from train.device import comm_tensor, comm_zeros, compute_device, move_batch, on_group_device
from train.freeze import apply_trainable
from train.loss import MicroBatchLoss, global_weight_sum, micro_batch_loss, reduce_step_metrics
from train.models.materialize import materialize
from train.models.qwen3vl.moe import attach_loss, load_balancing_loss, moe_layer_count
from train.models.qwen3vl.vision import VisionTower
from train.models.weight_source import RandomInit, WeightSource, check_source_fits
from train.optim import learning_rate, set_learning_rate, weight_decay_names
from train.parallel.batch_broadcast import slot_groups
from train.parallel.context import split_tokens

NO_DECAY_ATTR = "longvl_no_weight_decay"


class MegatronBackend:
    """Backend protocol (train/backends/base.py) on megatron-core. Each rank builds its own TP/PP/EP shard of
    the model on the meta device, allocates only it and fills it from a WeightSource slice by slice (the
    weight map of weights.py); `weights` defaults to the random initialisation RandomInit(cfg.model,
    cfg.seed). Trainability and weight decay follow the native names each megatron tensor is made of."""

    def __init__(self, cfg: TrainConfig, weights: WeightSource | None = None) -> None:
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed must be initialised before building the megatron backend")
        sizes = check_config(cfg, dist.get_world_size())  # the rules preflight ran before any process group
        weights = weights or RandomInit(cfg.model, cfg.seed)
        check_source_fits(weights, cfg.model, "initial weights")
        self.cfg, self.sizes = cfg, sizes
        self.total_steps = cfg.stage.num_steps()
        self.step = 0
        init_parallel_groups(_fresh(sizes), seed=cfg.seed)
        from megatron.core import parallel_state as mpu

        self.mpu = mpu
        mp_group, mp_ranks, dp_group = slot_groups(mpu.get_data_parallel_rank())
        self.path = run_path(cfg, compute_device())  # TE / THD / grouped GEMM / overlap on CUDA (logged)
        self.info = ParallelInfo(rank=dist.get_rank(), world_size=dist.get_world_size(),
                                 dp_rank=mpu.get_data_parallel_rank(), dp_size=mpu.get_data_parallel_world_size(),
                                 cp_rank=mpu.get_context_parallel_rank(), cp_size=sizes.cp,
                                 is_logging_rank=dist.get_rank() == 0, model_parallel_group=mp_group,
                                 model_parallel_ranks=mp_ranks, dp_group=dp_group,
                                 document_multiple=document_multiple(self.path, sizes.cp))
        from train.backends.megatron.model import transformer_config

        self.config = transformer_config(cfg.model, sizes, cfg.backend.precision, cfg.parallel.sequence_parallel,
                                         self.path, cfg.parallel.cp_comm_type)
        # Megatron's CPU-initialisation path allocates without a device argument, so under the meta device
        # below it allocates nothing (its init on meta tensors is free and also sets the TP attributes the
        # optimizer and DDP read); the weight source is the initialisation, on GPU clusters as here.
        self.config.use_cpu_initialization = True
        # One model chunk per virtual pipeline stage (megatron's interleaved 1F1B), else the stage's model.
        stages = range(sizes.vpp) if sizes.vpp is not None else [None]
        self.chunks = [self._build_chunk(weights, stage) for stage in stages]
        self.ddps, self.optimizer = self._wrap(self.chunks)

    @property
    def model(self):
        """The first model chunk (this rank's whole stage without virtual pipeline stages)."""
        return self.chunks[0]

    @property
    def ddp(self):
        return self.ddps[0]

    # -------------------------------------------------------------------------------------- building
    def _build_chunk(self, weights: WeightSource, vp_stage: int | None):
        """This rank's model (chunk `vp_stage`): ViT + embedding on the very first chunk, head on the last."""
        from train.backends.megatron.model import DTYPES, MegatronQwen3VL
        from train.backends.megatron.weights import load_weights, rule_for, shard_coords

        cfg, mpu = self.cfg, self.mpu
        first = mpu.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
        last = mpu.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
        with torch.device("meta"):
            visual = VisionTower(cfg.model.vision, out_size=cfg.model.text.hidden_size) if first else None
            model = MegatronQwen3VL(self.config, cfg.model, visual, pre_process=first, post_process=last,
                                    path=self.path, vp_stage=vp_stage)
            model.to(DTYPES[cfg.backend.precision])
        materialize(model, compute_device())  # every parameter, frozen ones (the ViT in s0) too
        coords = shard_coords(model)
        load_weights(model, weights, cfg.model, coords)

        def native_name(name: str) -> str:  # the first native tensor a megatron parameter is made of
            return rule_for(name, cfg.model, coords.layer_offset, coords.expert_offset).natives[0]

        apply_trainable(model, cfg.stage.trainable, native_name)
        decayed = weight_decay_names(cfg.model)
        for name, param in model.named_parameters():
            setattr(param, NO_DECAY_ATTR, native_name(name) not in decayed)
        if cfg.backend.activation_checkpointing:
            model.checkpoint_decoder = True
            if first:
                model.visual.checkpoint_blocks = True
        return model

    def _wrap(self, chunks: list):
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed.finalize_model_grads import finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, ParamGroupOverride, ParamKey, get_megatron_optimizer

        cfg = self.cfg
        distributed = cfg.backend.distributed_optimizer
        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=distributed,
                                                   **ddp_options(self.path))
        # As megatron's training loop: chunks after the first are one bucket each (their reduce overlaps
        # with the other chunks' compute anyway).
        ddps = [DistributedDataParallel(config=self.config, module=chunk, ddp_config=ddp_config,
                                        disable_bucketing=index > 0) for index, chunk in enumerate(chunks)]
        # Without it megatron never reduces data-parallel gradients (silently).
        self.config.finalize_model_grads_func = finalize_model_grads
        if self.path.overlap_grad_reduce:  # the schedule holds the reduce back until the last micro-batch
            no_sync = [ddp.no_sync for ddp in ddps]
            self.config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
        opt = cfg.optim
        optim_cfg = OptimizerConfig(optimizer="adam", lr=opt.lr, min_lr=opt.min_lr, weight_decay=opt.weight_decay,
                                    adam_beta1=opt.betas[0], adam_beta2=opt.betas[1], adam_eps=opt.eps,
                                    clip_grad=opt.grad_clip, use_distributed_optimizer=distributed,
                                    bf16=cfg.backend.precision == "bf16", params_dtype=self.config.params_dtype)
        overrides = {ParamKey(attr=NO_DECAY_ATTR): ParamGroupOverride(wd_mult=0.0)}
        optimizer = get_megatron_optimizer(optim_cfg, ddps, config_overrides=overrides)
        for group in optimizer.param_groups:  # megatron's LR scheduler would do this; we own the schedule
            group["weight_decay"] = opt.weight_decay * group.get("wd_mult", 1.0)
        return ddps, optimizer

    # ------------------------------------------------------------------------------------------ steps
    def _share(self, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(labels, loss_weights, source_ids) of the tokens this rank's loss covers (its CP share)."""
        return split_tokens(batch, self.model.cp_index(batch))

    def _run(self, micro_batches: list[PackedBatch], forward_only: bool):
        """Forward (and backward) over the micro-batches through megatron's schedule; returns the step's
        global LossMetrics (identical on every rank)."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        mpu, text = self.mpu, self.cfg.model.text
        count = len(micro_batches)
        shares = [self._share(b) for b in micro_batches]
        total_weight = global_weight_sum([(labels, weights) for labels, weights, _ in shares],
                                         group=mpu.get_data_parallel_group(with_context_parallel=True))
        aux_count = count * self.info.dp_size * self.sizes.cp
        parts: list[MicroBatchLoss] = []
        stage_aux: dict[int, torch.Tensor] = {}  # per-layer form: this rank's share (all chunks) per micro-batch
        per_layer = self.cfg.moe_aux_loss_form() == "per_layer"
        moe_layers = moe_layer_count(text)

        def forward_step(data_iterator, ddp):
            index, batch, (labels, weights, _) = next(data_iterator)
            counted = index < count  # not a repeat that only fills the interleaved schedule's groups
            router_logits: list[torch.Tensor] | None = [] if text.is_moe else None
            output = ddp(batch, router_logits)
            if per_layer and router_logits:
                # megatron's form: every stage adds its own layers' share through the activations it sends on
                share = load_balancing_loss(router_logits, text.num_experts, text.num_experts_per_tok,
                                            "per_layer", moe_layers)
                if counted:
                    stage_aux[index] = stage_aux.get(index, 0) + share.detach()
                if not forward_only and text.router_aux_loss_coef:
                    output = attach_loss(output, text.router_aux_loss_coef * share / aux_count)
            chunk = ddp.module

            def loss_func(hidden: torch.Tensor):
                aux = load_balancing_loss(router_logits, text.num_experts, text.num_experts_per_tok) \
                    if router_logits and not per_layer else None
                out = micro_batch_loss(chunk.gather_sequence_parallel(hidden), chunk.lm_head_weight(), labels,
                                       weights, global_weight=total_weight, aux_loss=aux,
                                       aux_coef=text.router_aux_loss_coef, aux_count=aux_count)
                if counted:
                    parts.append(MicroBatchLoss(out.objective.detach(), out.weighted_ce, out.token_ce, out.aux_loss))
                # Token count 0: finalize_model_grads must not rescale (the objective is already global).
                return out.objective, torch.zeros((), dtype=torch.int), {}
            return output, loss_func

        scheduled = self._schedule_order(count, forward_only)
        items = [(i, micro_batches[i % count], shares[i % count]) for i in range(scheduled)]
        # The interleaved schedule takes one iterator per chunk (the first and last chunks read theirs).
        iterators = [iter(items) for _ in self.ddps] if len(self.ddps) > 1 else iter(items)
        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iterators, model=self.ddps, num_microbatches=scheduled,
            seq_length=micro_batches[0].seq_len, micro_batch_size=1, forward_only=forward_only)
        if per_layer and text.is_moe:
            parts = self._pipeline_aux(parts, [stage_aux[i] for i in sorted(stage_aux)], count)
        # Every (DP, CP) replica's last stage holds the losses once (TP ranks duplicate them): others add 0.
        counted = mpu.is_pipeline_last_stage() and mpu.get_tensor_model_parallel_rank() == 0
        return reduce_step_metrics(parts if counted else [], shares if counted else [], total_weight, aux_count)

    def _schedule_order(self, count: int, forward_only: bool) -> int:
        """Micro-batches the schedule runs: `count`, or with virtual pipeline stages during evaluation the
        next multiple of pp (megatron's interleaved schedule runs groups of pp micro-batches per chunk; the
        repeats fill the groups and are not counted). Training steps are checked by preflight."""
        pp = self.sizes.pp
        if self.sizes.vpp is None or count % pp == 0:
            return count
        if not forward_only:
            raise ValueError(f"parallel.vpp: {count} micro-batches per step is not a multiple of pp={pp}")
        return count + pp - count % pp

    def _pipeline_aux(self, parts: list[MicroBatchLoss], stage_aux: list[torch.Tensor],
                      count: int) -> list[MicroBatchLoss]:
        """The per-layer aux loss of each micro-batch summed over the pipeline stages (each holds its own
        layers' share), put into the last stage's parts for the step metrics."""
        group = self.mpu.get_pipeline_model_parallel_group()
        if stage_aux:
            shares = on_group_device(torch.stack(stage_aux).float(), group)
        else:  # no MoE layer on this stage
            shares = comm_zeros(count, torch.float32, group)
        if self.sizes.pp > 1:
            dist.all_reduce(shares, group=group)
        return [dataclasses.replace(part, aux_loss=shares[i]) for i, part in enumerate(parts)]

    def train_step(self, micro_batches: list[PackedBatch]) -> StepMetrics:
        if not micro_batches:
            raise ValueError("train_step needs at least one micro-batch")
        lengths = {b.seq_len for b in micro_batches}
        if len(lengths) != 1:
            raise ValueError(f"micro-batches of one step must have one packed length, got {sorted(lengths)}")
        micro_batches = [move_batch(b) for b in micro_batches]
        lr = learning_rate(self.step, self.cfg.optim, self.total_steps)
        set_learning_rate(self.optimizer, lr)
        for ddp in self.ddps:
            ddp.train()
            ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        metrics = self._run(micro_batches, forward_only=False)
        skipped = not (math.isfinite(metrics.loss) and self._grads_finite())
        if skipped:  # parameters, Adam moments and the LR schedule stay where they were
            norm = float("nan")
        else:
            _, norm, _ = self.optimizer.step()
        self.step += int(not skipped)  # the LR schedule counts applied updates (as megatron's scheduler)
        return StepMetrics(loss=metrics.loss, grad_norm=float(norm), lr=lr, tokens=metrics.tokens, skipped=skipped,
                           aux_loss=metrics.aux_loss, loss_per_source=metrics.loss_per_source)

    def _grads_finite(self) -> bool:
        """All ranks agree: the reduced gradient buffers (after finalize_model_grads) hold no NaN/inf."""
        local = all(bool(torch.isfinite(buffer.grad_data).all())
                    for ddp in self.ddps for buffer in [*ddp.buffers, *ddp.expert_parallel_buffers])
        flag = comm_tensor([0 if local else 1])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return not flag.item()

    def _sync_params(self) -> None:
        """With overlap_param_gather the distributed optimizer's updated parameters are gathered during the
        next forward; whoever reads the weights first (save, export, eval) makes them current here."""
        if self.path.overlap_param_gather:
            for ddp in self.ddps:
                ddp.start_param_sync(force_sync=True)

    def eval_step(self, batch: PackedBatch) -> StepMetrics:
        self._sync_params()
        for ddp in self.ddps:
            ddp.eval()
        with torch.no_grad():
            metrics = self._run([move_batch(batch)], forward_only=True)
        for ddp in self.ddps:
            ddp.train()
        lr = learning_rate(max(0, self.step - 1), self.cfg.optim, self.total_steps)
        return StepMetrics(loss=metrics.loss, grad_norm=float("nan"), lr=lr, tokens=metrics.tokens,
                           aux_loss=metrics.aux_loss, loss_per_source=metrics.loss_per_source)

    # ------------------------------------------------------------------------------------------ state
    def save(self, directory: Path) -> None:
        self.save_async(directory).complete()

    def save_async(self, directory: Path) -> PendingWrite:
        """Snapshot now, write later (train/backends/snapshot.py); rank 0's common files are written now."""
        from train.backends.megatron.checkpoint import save_training_state

        self._sync_params()
        return save_training_state(Path(directory), self.ddps, self.optimizer, self.step, self.state_layout())

    def load(self, directory: Path) -> None:
        """Resume: model, optimizer and step, in the layout they were saved in (else a CheckpointError)."""
        from train.backends.megatron.checkpoint import load_training_state

        self.step = load_training_state(Path(directory), self.ddps, self.optimizer, self.state_layout())

    def load_model_weights_from_checkpoint(self, directory: Path) -> None:
        """Only the model weights of a checkpoint saved by `save`, in any layout (resharded by
        dist_checkpointing); the optimizer and the step stay fresh, as at the start of a new stage."""
        from train.backends.megatron.checkpoint import load_model_state

        load_model_state(Path(directory), self.ddps, self.optimizer)

    def state_layout(self) -> dict:
        """What the saved optimizer state's sharding depends on: a full load needs all of it unchanged."""
        return {**dataclasses.asdict(self.sizes), "distributed_optimizer": self.cfg.backend.distributed_optimizer,
                "precision": self.cfg.backend.precision, "reshardable": True}

    def export_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        from train.backends.megatron.weights import iter_native

        self._sync_params()
        return iter_native(self.chunks, self.cfg.model)

    def load_model_weights(self, weights: WeightSource) -> None:
        from train.backends.megatron.weights import load_weights, shard_coords

        check_source_fits(weights, self.cfg.model, "initial weights")
        for chunk in self.chunks:
            load_weights(chunk, weights, self.cfg.model, shard_coords(chunk))
        # Mixed-precision / distributed optimizers keep fp32 master copies of the weights: refresh them.
        self.optimizer.reload_model_params()

    def close(self) -> None:
        """Tear down megatron's parallel groups (the default process group stays)."""
        destroy_parallel_groups()


def _fresh(sizes: ParallelSizes) -> ParallelSizes:
    """A process may build several backends (one per stage): drop the previous stage's megatron groups."""
    from megatron.core import parallel_state as mpu

    if mpu.model_parallel_is_initialized():
        destroy_parallel_groups()
    return sizes
