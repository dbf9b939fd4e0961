"""The backend protocol: the only thing the trainer knows about DeepSpeed or Megatron-core.

A backend builds the parallel model (each rank only its shard, filled from a WeightSource) and its
optimizer from the config, runs one optimizer step over a list
of micro-batches, and saves/loads its own resumable state. Everything that is not specific to one backend
(loss, LR schedule, freezing, the loader, checkpoint directories, metrics) lives outside the backends and is
shared, so no logic is written twice.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol, runtime_checkable

import torch

from data.batch import PackedBatch
from train.backends.snapshot import PendingWrite
from train.models.weight_source import WeightSource


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
    # The ranks that train on this rank's batches (its tensor/context/pipeline peers of one DP slot) and their
    # global ranks; the first of them is the slot's loading rank (train.parallel.batch_broadcast). None / [rank]
    # when the rank is its slot's only rank.
    model_parallel_group: Any = None
    model_parallel_ranks: list[int] = field(default_factory=list)
    # This rank's data-parallel group (the ranks at the same model-parallel coordinate, one per DP slot), for
    # exchanges between slots (train.parallel.vision_balance); None when dp_size is 1.
    dp_group: Any = None
    # Every packed document's length must be a multiple of this (the loader pads each one): 2*cp when
    # context parallelism splits per document (Transformer Engine's THD layout), else 1.
    document_multiple: int = 1

    @property
    def is_loading_rank(self) -> bool:
        """Reads and decodes the slot's batches (its peers receive them)."""
        return not self.model_parallel_ranks or self.model_parallel_ranks[0] == self.rank


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

    def save_async(self, directory: Path) -> PendingWrite:
        """The first half of `save` (collective, on the training thread): copy the state to host memory and
        plan the files; the returned PendingWrite writes them later (train/backends/snapshot.py)."""

    def load(self, directory: Path) -> None:
        """Restore exactly what `save` wrote (same parallel layout)."""

    def export_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The full model, one (native name, full tensor) at a time, independent of the parallel layout, in
        the module's dtype; a tied `lm_head.weight` comes once, as the embedding. Collective: every rank
        iterates to the end; the pairs come out on global rank 0 only (nothing elsewhere). A yielded tensor
        is valid until the next step of the iteration (the caller writes or copies it). No rank waits longer
        than one tensor's gather + write (train/export.py writes them; exports never hold the model)."""

    def load_model_weights(self, weights: WeightSource) -> None:
        """Initialise the model from a WeightSource in native names (stage handoff, `stage.init_from`, HF
        import; train/models/weight_source.py). Every rank calls it with an equivalent source; each reads
        and keeps only its own shard (TP/PP/EP slices, ZeRO-3 partitions). Names and shapes are checked
        against the model config first (CheckpointError naming the file and tensor)."""


def gathered_state_dict(backend: Backend) -> dict[str, torch.Tensor]:
    """The whole model as an fp32 native state dict on rank 0 ({} elsewhere; collective), a tied head under
    both names like model.state_dict(). Tests and small models only: exports stream `export_tensors`."""
    state = {name: tensor.float().clone() for name, tensor in backend.export_tensors()}
    embed, head = "language_model.embed_tokens.weight", "lm_head.weight"
    if embed in state and head not in state:  # an untied model always yields its head
        state[head] = state[embed]
    return state
