"""The DeepSpeed backend: ZeRO 0-3, bf16/fp32, Ulysses context parallelism, MoE expert parallelism.

Gradient scaling (why `grad_scale` = dp_world_size x gradient_accumulation_steps): the shared loss makes
every micro-batch's objective its exact share of the GLOBAL loss (divided by the global sum of weights), so
the wanted gradient is the SUM over micro-batches and ranks. DeepSpeed divides the loss by the number of
accumulation steps in `engine.backward` and averages gradients over its data-parallel group (here the
whole world, CP ranks included); multiplying the objective by both divisors turns those means back into
sums, so the gradient, its norm and the clipping are those of the global loss, whatever the layout.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist

from data.batch import PackedBatch
from train.backends.base import ParallelInfo, StepMetrics
from train.backends.deepspeed.checkpoint_io import RecordingEngine
from train.backends.snapshot import PendingWrite
from train.checkpoint_files import WrittenFile, save_hashed
from train.backends.deepspeed.config import check_layout, deepspeed_config
from train.backends.deepspeed import moe_universal
from train.backends.deepspeed.experts import ExpertParallelism, expert_param_names, saved_expert_parallel_size
from train.backends.deepspeed.frozen import saved_frozen
from train.backends.deepspeed.module import LossModule
from train.backends.deepspeed.partition import build_partitioned
from train.backends.deepspeed.reshard import Converter, ds_to_universal, load_resharded, saved_partitions
from train.backends.deepspeed.weights import iter_native, load_weights
from train.config.schema import TrainConfig
from train.models.native_io import CheckpointError
from train.device import move_batch
from train.freeze import apply_trainable
from train.loss import MicroBatchLoss, global_weight_sum, reduce_step_metrics
from train.models.materialize import materialize
from train.models.qwen3vl import Qwen3VLModel
from train.models.weight_source import RandomInit, WeightSource, check_source_fits
from train.optim import learning_rate, param_groups, set_learning_rate, weight_decay_names
from train.parallel.batch_broadcast import slot_groups
from train.parallel.context import split_tokens
from train.parallel.ulysses import UlyssesAttention

CHECKPOINT_TAG = "deepspeed"


def _consecutive_groups(size: int) -> dist.ProcessGroup | None:
    """This rank's group among world/size groups of consecutive ranks (every rank creates all of them)."""
    if size == 1:
        return None
    world, rank = dist.get_world_size(), dist.get_rank()
    mine = None
    for start in range(0, world, size):
        group = dist.new_group(list(range(start, start + size)))
        if start <= rank < start + size:
            mine = group
    return mine


class DeepSpeedBackend:
    """Backend protocol (train/backends/base.py) on a DeepSpeed engine.

    Construction (README "Model construction"): ZeRO-3 builds the model on the meta device and gives every
    parameter only this rank's ZeRO-3 partition (partition.py), which it fills straight from the weight
    source. ZeRO 0-2 replicate the parameters by design: the model is built on the meta device,
    this rank's experts cut out (expert parallelism), then allocated and filled. `weights` defaults to the
    random initialisation RandomInit(cfg.model, cfg.seed)."""

    def __init__(self, cfg: TrainConfig, weights: WeightSource | None = None) -> None:
        os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
        import deepspeed

        if not dist.is_initialized():
            raise RuntimeError("torch.distributed must be initialised before building the deepspeed backend")
        world, rank = dist.get_world_size(), dist.get_rank()
        grad_accum = check_layout(cfg, world)  # before anything expensive
        deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)
        self.cfg = cfg
        cp = cfg.parallel.cp
        mp_group, mp_ranks, dp_group = slot_groups(rank // cp)
        self.info = ParallelInfo(rank=rank, world_size=world, dp_rank=rank // cp, dp_size=world // cp,
                                 cp_rank=rank % cp, cp_size=cp, is_logging_rank=rank == 0,
                                 model_parallel_group=mp_group, model_parallel_ranks=mp_ranks, dp_group=dp_group)
        self.total_steps = cfg.stage.num_steps()
        self.step = 0
        ds_config = deepspeed_config(cfg, grad_accum, world)
        model = self._build_model(ds_config, weights or RandomInit(cfg.model, cfg.seed))
        apply_trainable(model, cfg.stage.trainable)  # by name, before the optimizer exists
        model.aux_loss_form = cfg.moe_aux_loss_form()
        cp_group = _consecutive_groups(cp)
        if cp_group is not None:
            model.set_core_attention(lambda: UlyssesAttention(cp_group))
        if cfg.backend.activation_checkpointing:
            model.enable_activation_checkpointing()
        self.model = model
        groups = param_groups(model, cfg.optim, decayed=weight_decay_names(cfg.model))
        if self.experts is not None:
            self.experts.unmark_if_frozen()
            groups = self.experts.optimizer_groups(groups)
        module = LossModule(model, cp_group)
        self.engine, *_ = deepspeed.initialize(model=module, model_parameters=groups, config=ds_config)
        if cfg.backend.zero_stage == 3:
            self._register_external_parameters(module)
        self.checkpoint_io = RecordingEngine(self.engine.checkpoint_engine)
        self.engine.checkpoint_engine = self.checkpoint_io
        copy_scripts = self.engine._copy_recovery_script
        self.engine._copy_recovery_script = lambda path: self.checkpoint_io.defer(lambda: copy_scripts(path))

    def _build_model(self, ds_config: dict, weights: WeightSource) -> Qwen3VLModel:
        """This rank's model, filled from `weights` (whose names and shapes are checked first)."""
        cfg = self.cfg
        zero3 = cfg.backend.zero_stage == 3
        check_source_fits(weights, cfg.model, "initial weights")
        if zero3:  # no expert parallelism under ZeRO-3 (check_layout); partitions only, filled below
            model = build_partitioned(lambda: Qwen3VLModel(cfg.model), ds_config)
            self.experts = None
        else:
            with torch.device("meta"):
                model = Qwen3VLModel(cfg.model)
            self.experts = ExpertParallelism.install(model, cfg.parallel.ep)
            materialize(model, "cpu")
        load_weights(model, weights, zero3, self.experts)
        return model

    def _register_external_parameters(self, module: LossModule) -> None:
        """Parameters read outside their owner's forward must be gathered by ZeRO-3 for the reader."""
        from deepspeed.runtime.zero.partition_parameters import register_external_parameter

        register_external_parameter(module, module.model.lm_head.weight)  # read by the chunked loss
        patch_embed = module.model.visual.patch_embed  # reads proj.weight/bias as a matmul
        for param in patch_embed.proj.parameters():
            register_external_parameter(patch_embed, param)

    # ------------------------------------------------------------------------------------------ steps
    def _share(self, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(labels, loss_weights, source_ids) of the tokens this rank's loss covers (its CP share)."""
        return split_tokens(batch, self.engine.module.token_share(batch.seq_len))

    def _forward(self, batches: list[PackedBatch], backward: bool) -> tuple[list[MicroBatchLoss], list, object]:
        batches = [move_batch(b, self.engine.device) for b in batches]
        shares = [self._share(b) for b in batches]
        total_weight = global_weight_sum([(labels, weights) for labels, weights, _ in shares])
        aux_count = len(batches) * self.info.world_size
        grad_scale = float(self.engine.dp_world_size * len(batches))
        parts = []
        for i, batch in enumerate(batches):
            objective, weighted, token_ce, aux = self.engine(batch, total_weight, aux_count, grad_scale)
            if backward:
                self.engine.backward(objective)
                if i < len(batches) - 1:
                    # DeepSpeed counts micro-steps in step(); it only updates at the accumulation boundary,
                    # whose step() the caller makes once it knows whether to skip.
                    self.engine.step()
            parts.append(MicroBatchLoss(objective.detach(), weighted, token_ce, aux))
        return parts, shares, reduce_step_metrics(parts, shares, total_weight, aux_count)

    def train_step(self, micro_batches: list[PackedBatch]) -> StepMetrics:
        if not micro_batches:
            raise ValueError("train_step needs at least one micro-batch")
        if len(micro_batches) != self.engine.gradient_accumulation_steps():
            self.engine.set_train_batch_size(len(micro_batches) * self.engine.dp_world_size)
        lr = learning_rate(self.step, self.cfg.optim, self.total_steps)
        set_learning_rate(self.engine.optimizer, lr)
        self.engine.train()
        _, _, metrics = self._forward(micro_batches, backward=True)
        loss_finite = math.isfinite(metrics.loss)
        if self._plain_optimizer() and not (loss_finite and self._grads_finite()):
            self._step_without_update()
            applied = False
        else:
            self.engine.step()  # ZeRO 1-3 and bf16 skip non-finite gradients themselves, cleanly
            applied = self.engine.was_step_applied()
        skipped = not applied or not loss_finite
        norm = self.engine.get_global_grad_norm()
        if norm is None or (skipped and math.isfinite(norm)):
            norm = float("nan")
        self.step += int(not skipped)  # the LR schedule counts applied updates (as megatron's scheduler)
        return StepMetrics(loss=metrics.loss, grad_norm=float(norm), lr=lr, tokens=metrics.tokens,
                           skipped=skipped, aux_loss=metrics.aux_loss, loss_per_source=metrics.loss_per_source)

    def _plain_optimizer(self) -> bool:
        """ZeRO-0 in fp32 hands our torch AdamW the gradients directly: DeepSpeed has no overflow check."""
        return self.cfg.backend.zero_stage == 0 and self.cfg.backend.precision == "fp32"

    def _zero0_optimizer(self):
        """The engine's optimizer at ZeRO-0 (its expert state is saved per rank: experts.py), else None."""
        return self.engine.optimizer if self.cfg.backend.zero_stage == 0 else None

    def _grads_finite(self) -> bool:
        """ZeRO-0: every rank holds the all-reduced gradients after the last backward, so all agree."""
        return all(bool(torch.isfinite(p.grad).all()) for p in self.model.parameters() if p.grad is not None)

    def _step_without_update(self) -> None:
        """Advance DeepSpeed's step bookkeeping but keep parameters and Adam moments untouched."""
        optimizer = self.engine.optimizer
        real_step = optimizer.step
        optimizer.step = lambda *args, **kwargs: None
        try:
            self.engine.step()
        finally:
            optimizer.step = real_step
        self.engine.zero_grad()

    def eval_step(self, batch: PackedBatch) -> StepMetrics:
        self.engine.eval()
        with torch.no_grad():
            _, _, metrics = self._forward([batch], backward=False)
        self.engine.train()
        lr = learning_rate(max(0, self.step - 1), self.cfg.optim, self.total_steps)
        return StepMetrics(loss=metrics.loss, grad_norm=float("nan"), lr=lr, tokens=metrics.tokens,
                           aux_loss=metrics.aux_loss, loss_per_source=metrics.loss_per_source)

    # ------------------------------------------------------------------------------------ state
    def _checkpointing(self):
        if self.experts is None:
            return contextlib.nullcontext()
        return self.experts.plain_checkpointing(self.engine)

    def save(self, directory: Path) -> None:
        self.save_async(directory).complete()

    def save_async(self, directory: Path) -> PendingWrite:
        """DeepSpeed's own save (its collectives, which rank writes which partition) with every file's state
        copied to host memory instead of written; the returned writer serialises the copies."""
        with self._checkpointing():
            self.engine.save_checkpoint(str(directory), tag=CHECKPOINT_TAG, client_state={"step": self.step},
                                        save_latest=False)
        files, deferred = self.checkpoint_io.take_pending()
        if self.experts is not None:
            path = self.experts.file(Path(directory))
            state = self.experts.state(self._zero0_optimizer())
            files.append((path, self.checkpoint_io.buffers.copy(path.name, state)))

        def write() -> list[WrittenFile]:
            for other in deferred:
                other()
            return [save_hashed(state, path) for path, state in files]
        return PendingWrite(write)

    def load(self, directory: Path) -> None:
        folder = Path(directory) / CHECKPOINT_TAG
        text = self.cfg.model.text
        saved_ep = saved_expert_parallel_size(Path(directory), text.num_experts) if text.is_moe else 1
        with self._checkpointing():
            if self._layout_changed(folder, saved_ep):
                path, client = load_resharded(self.engine, folder, self._universal_converter(saved_ep))
                self._restore_frozen(Path(directory), folder, saved_ep)
            else:
                path, client = self.engine.load_checkpoint(str(directory), tag=CHECKPOINT_TAG)
                if path is not None and self.experts is not None:
                    self.experts.load(Path(directory), self._zero0_optimizer())
        if path is None:
            raise FileNotFoundError(f"no deepspeed checkpoint under {directory}")
        self.step = int(client["step"])

    def export_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        return iter_native(self.model, self.cfg.backend.zero_stage == 3, self.experts)

    def _layout_changed(self, folder: Path, saved_ep: int) -> bool:
        """Whether the checkpoint in `folder` was written at another data-parallel size (number of ZeRO
        partitions) or expert-parallel size `saved_ep`. Either change with expert parallelism at ZeRO-0 is
        refused in one line: ZeRO-1/2 save every rank's expert optimizer state, ZeRO-0 only rank 0's."""
        saved = saved_partitions(folder)
        ep = 1 if self.experts is None else self.experts.ep_size
        changed = saved_ep != ep or bool(saved) and saved != self.engine.dp_world_size
        if changed and max(saved_ep, ep) > 1 and self.cfg.backend.zero_stage == 0:
            raise CheckpointError(f"{folder}: ZeRO-0 checkpoint of an MoE model written with parallel.ep={saved_ep}, "
                                  f"this run has ep={ep} over {self.engine.dp_world_size} ranks: resume it at its "
                                  f"own layout, or use ZeRO 1/2")
        return changed

    def _restore_frozen(self, directory: Path, folder: Path, saved_ep: int) -> None:
        """The universal load restores only what the optimizer owns: frozen parameters from the checkpoint."""
        frozen = {name for name, param in self.model.named_parameters() if not param.requires_grad}
        if not frozen:
            return
        zero3 = self.cfg.backend.zero_stage == 3
        source = saved_frozen(directory, folder, frozen, expert_param_names(self.model), zero3, saved_ep)
        load_weights(self.model, source, zero3, self.experts, only=frozen)

    def _universal_converter(self, saved_ep: int) -> Converter:
        """ds_to_universal, or with expert parallelism on either side the model-space conversion (expert
        parameters and `moe` param groups, which ds_to_universal does not put together)."""
        if saved_ep == 1 and self.experts is None:
            return ds_to_universal
        zero = self.engine.optimizer
        groups = [[zero.param_names[p] for p in group] for group in zero.bit16_groups]
        experts = expert_param_names(self.engine.module)
        return functools.partial(moe_universal.convert, target_groups=groups, expert_names=experts,
                                 num_experts=self.cfg.model.text.num_experts)

    def load_model_weights(self, weights: WeightSource) -> None:
        check_source_fits(weights, self.cfg.model, "initial weights")
        load_weights(self.model, weights, self.cfg.backend.zero_stage == 3, self.experts)
        refresh = getattr(self.engine.optimizer, "refresh_fp32_params", None)
        if refresh is not None:  # ZeRO / bf16 optimizers keep fp32 master copies of the weights
            refresh()

