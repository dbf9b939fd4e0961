"""Frozen parameters after a resharded (universal) DeepSpeed load.

DeepSpeed's universal load restores the parameters its optimizer owns (from their fp32 masters) and does
not read the module state, so a parameter frozen by `stage.trainable` would keep whatever the backend was
built with: a resumed stage is built from zeros (ZeroInit), and e.g. a merger-only stage would silently
continue with a zeroed vision tower and LLM. Their saved values are put back from the checkpoint
itself: ZeRO 0-2 save the whole module on rank 0 (expert slices: every rank's expert file), ZeRO-3 each
rank's partition of every frozen parameter (`frozen_param_fragments` of its model-states file).
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from train.models.native_io import CheckpointError
from train.models.weight_source import StateDictSource

PREFIX = "model."  # LossModule wraps the model as `model`: DeepSpeed's names are "model.<native name>"


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False, mmap=True)  # DeepSpeed's own pickle


def _zero3_frozen(folder: Path, names: set[str]) -> dict[str, torch.Tensor]:
    """Full tensors from every rank's ZeRO-3 partitions (padded equal parts, in rank order)."""
    files = {int(m.group(1)): path for path in folder.glob("zero_pp_rank_*_mp_rank_00_model_states.pt")
             if (m := re.search(r"zero_pp_rank_(\d+)_", path.name))}
    states = [_load(files[rank]) for rank in sorted(files)]
    out = {}
    for name in names:
        key = PREFIX + name
        shape = torch.Size(states[0]["frozen_param_shapes"][key])
        flat = torch.cat([state["frozen_param_fragments"][key].reshape(-1) for state in states])
        out[name] = flat[:shape.numel()].view(shape)
    return out


def _module_frozen(directory: Path, folder: Path, names: set[str], expert_names: set[str],
                   saved_ep: int) -> dict[str, torch.Tensor]:
    """Full tensors from rank 0's module state; expert parameters from the expert files of ranks 0..E-1
    (the expert-parallel group of rank 0 holds every expert once, in order)."""
    module = _load(folder / "mp_rank_00_model_states.pt")["module"]
    out = {name: module[PREFIX + name] for name in names - expert_names}
    experts = names & expert_names
    if experts and saved_ep > 1:
        slices = [torch.load(directory / f"experts_rank{rank:05d}.pt", map_location="cpu", weights_only=True,
                             mmap=True) for rank in range(saved_ep)]
        out.update({name: torch.cat([part[name] for part in slices]) for name in experts})
    elif experts:
        out.update({name: module[PREFIX + name] for name in experts})
    return out


def saved_frozen(directory: Path, folder: Path, names: set[str], expert_names: set[str], zero3: bool,
                 saved_ep: int) -> StateDictSource:
    """The saved values of the frozen parameters `names` (native names) of the checkpoint in `directory`
    (DeepSpeed's tag directory `folder`), full tensors."""
    try:
        state = _zero3_frozen(folder, names) if zero3 else _module_frozen(directory, folder, names, expert_names,
                                                                          saved_ep)
    except KeyError as missing:
        raise CheckpointError(f"{folder}: frozen parameter {missing} not saved (was it trained then?)") from None
    return StateDictSource(state)
