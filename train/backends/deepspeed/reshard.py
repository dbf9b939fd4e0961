"""Elastic resume on DeepSpeed: a ZeRO-1/2/3 checkpoint written by another number of data-parallel ranks.

ZeRO partitions the fp32 master weights and the Adam moments over the data-parallel ranks that wrote the
checkpoint (one `*zero_pp_rank_R_*optim_states.pt` per rank), and DeepSpeed's regular load refuses another
count. Its universal checkpoint is the layout-free form: `ds_to_universal` reassembles every parameter's
fp32 weight, exp_avg and exp_avg_sq in model space (one folder per parameter name), and an engine whose
config says `checkpoint.load_universal` cuts its own partitions out of them. Here rank 0 converts the saved
checkpoint into a hidden sibling directory (`.step_N.universal`, on the same shared file system, so every
node sees it; ignored by the checkpoint listing), every rank loads from it, and rank 0 removes it. The saved
checkpoint itself is never modified (its checksums stay valid) and is converted again if the load is retried.
An MoE model's checkpoint is converted by moe_universal.py instead (ds_to_universal cannot put expert-parallel
partitions together); the load is the same.
"""
from __future__ import annotations

import contextlib
import shutil
from argparse import Namespace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from train.device import comm_tensor
from train.models.native_io import CheckpointError


def saved_partitions(folder: Path) -> int:
    """How many data-parallel ranks' ZeRO optimizer partitions `folder` (DeepSpeed's tag directory) holds."""
    return len(list(folder.glob("*zero_pp_rank_*_optim_states.pt")))


Converter = Callable[[Path, Path], None]  # (DeepSpeed tag directory, universal tag directory to write)


def ds_to_universal(folder: Path, out: Path) -> None:
    """DeepSpeed's ds_to_universal, in this process (no worker pool: a forked child of a rank would inherit
    its process group)."""
    from deepspeed.checkpoint import ds_to_universal

    args = Namespace(input_folder=str(folder), output_folder=str(out), num_extract_workers=1, num_merge_workers=1,
                     keep_temp_folder=False, strict=True, inject_missing_state=True)
    with contextlib.redirect_stdout(None):  # its progress prints, per parameter
        ds_to_universal.main(args)


def _agree(failure: str) -> None:
    """Raise on every rank if any rank failed (rank 0's conversion), instead of leaving the others waiting."""
    failed = comm_tensor([float(bool(failure))])
    dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    if failed.item():
        raise CheckpointError(failure or "converting the DeepSpeed checkpoint to a universal one failed on rank 0")


@contextlib.contextmanager
def universal_copy(folder: Path, convert: Converter) -> Iterator[Path]:
    """The universal form of the DeepSpeed checkpoint in `folder` (collective; rank 0 runs `convert`):
    yields the converted tag directory, which exists until the context ends."""
    root = folder.parent.parent / f".{folder.parent.name}.universal"
    out = root / folder.name
    failure = ""
    if dist.get_rank() == 0:
        try:
            shutil.rmtree(root, ignore_errors=True)  # leftover of an interrupted load
            out.parent.mkdir(parents=True)
            convert(folder, out)
        except Exception as error:  # noqa: BLE001 - reported on every rank by _agree
            failure = f"{folder}: converting to a DeepSpeed universal checkpoint failed: {error!r}"
    _agree(failure)
    try:
        yield out
    finally:
        dist.barrier()  # every rank has read its partitions
        if dist.get_rank() == 0:
            shutil.rmtree(root, ignore_errors=True)


def load_resharded(engine: Any, folder: Path, convert: Converter = ds_to_universal) -> tuple[str | None, dict]:
    """engine.load_checkpoint of a checkpoint written by another data- (or expert-) parallel size, via its
    universal form. DeepSpeed reads `checkpoint.load_universal` from the engine's config at load time only,
    so it is switched on for this one load; the weights are then the loaded fp32 masters (update_lp_params),
    the module state of the checkpoint is not read."""
    with universal_copy(folder, convert) as converted:
        engine._config.load_universal_checkpoint = True
        try:
            loaded = engine.load_checkpoint(str(converted.parent), tag=converted.name)
        finally:
            engine._config.load_universal_checkpoint = False
        if engine.zero_optimization_partition_weights():
            _restore_group_hyperparameters(engine.optimizer.optimizer, converted)
    return loaded


def _restore_group_hyperparameters(optimizer: torch.optim.Optimizer, converted: Path) -> None:
    """Two slips of DeepSpeed's ZeRO-3 universal load (stage3.py, load_hp_checkpoint_state_from_checkpoint_dir
    _stage3), each measured as every no-decay weight 3-5e-4 off after the next step: it gives every param
    group the hyperparameters of the first (weight decay on the no-decay group), and one Adam `step` tensor
    to every group, which torch's AdamW then increments once per group per step (wrong bias correction).
    Put back each group's own saved values and give each its own step counter."""
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
    saved = torch.load(converted / "zero" / "optimizer_state.pt", map_location="cpu",
                       weights_only=False)["param_groups"]  # DeepSpeed's own pickle, as its load reads it
    if len(saved) != len(optimizer.param_groups):
        raise CheckpointError(f"{converted}: {len(saved)} optimizer param groups saved, this run has "
                              f"{len(optimizer.param_groups)}")
    for group, hyper in zip(optimizer.param_groups, saved):
        group.update({key: value for key, value in hyper.items() if key != "params"})
