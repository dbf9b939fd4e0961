"""The backend protocol: the only thing the trainer knows about DeepSpeed or Megatron-core.

A backend builds the parallel model and its optimizer from the config, runs one optimizer step over a list
of micro-batches, and saves/loads its own resumable state. Everything that is not specific to one backend
(loss, LR schedule, freezing, the loader, checkpoint directories, metrics) lives outside the backends and is
shared, so no logic is written twice.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from data.batch import PackedBatch


@dataclass
class StepMetrics:
    """What one optimizer step reports. Values are global (reduced over data/context-parallel ranks)."""

    loss: float  # the normalised training loss of the global batch (sum(w * ce) / sum(w))
    grad_norm: float  # before clipping; nan/inf when the step was skipped
    lr: float
    tokens: int  # non-pad tokens in the global batch
    skipped: bool = False  # loss or gradients were not finite: the optimizer step was not applied
    aux_loss: float = 0.0  # MoE load-balancing loss (already included in the optimised objective)
    loss_per_source: dict[int, float] = field(default_factory=dict)  # mixture index -> normalised loss


@dataclass
class ParallelInfo:
    """Where this rank sits. The data loader needs the data-parallel coordinates, not the global rank."""

    rank: int
    world_size: int
    dp_rank: int
    dp_size: int
    cp_rank: int = 0
    cp_size: int = 1
    is_logging_rank: bool = True  # the rank that prints, logs and writes the non-sharded files


@runtime_checkable
class Backend(Protocol):
    info: ParallelInfo

    def train_step(self, micro_batches: list[PackedBatch]) -> StepMetrics:
        """One optimizer step over this rank's micro-batches (gradient accumulation inside)."""

    def eval_step(self, batch: PackedBatch) -> StepMetrics:
        """Loss on one batch without gradients or state changes."""

    def save(self, directory: Path) -> None:
        """Write the resumable training state (model, optimizer, LR scheduler) into `directory`, which the
        caller created; every rank calls it. Atomicity (temp dir, rename, `latest`) is the caller's job."""

    def load(self, directory: Path) -> None:
        """Restore exactly what `save` wrote (same parallel layout)."""

    def state_dict_for_export(self) -> dict[str, torch.Tensor]:
        """The full model in native parameter names and fp32, independent of the parallel layout (gathered
        from all shards). Collective: every rank calls it; only the logging rank's return value is complete."""

    def load_model_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Initialise the model from a full native state dict (stage handoff, HF import). Every rank calls it
        with the same dict; each keeps its own shard."""
