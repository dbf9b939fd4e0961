"""The universal form of a ZeRO-1/2 checkpoint of an MoE model, built in model space (elastic resume).

DeepSpeed's ds_to_universal reassembles a parameter by concatenating its fragments in data-parallel rank
order. That is wrong for expert parameters under expert parallelism (train/backends/deepspeed/experts.py):
their ZeRO partitions live in `moe` param groups, partitioned over the expert-data-parallel group only
(ranks e, e+E, e+2E, ... hold experts slice e of E), and every rank's fragments carry the same parameter
name for different experts. Here each parameter's fp32 master, exp_avg and exp_avg_sq are put together from
every rank's `*zero_pp_rank_R_*optim_states.pt` (read through mmap: one parameter in memory at a time):
fragments ordered by (expert slice, position in the expert-data-parallel group) for expert groups, by rank
otherwise, giving the full stacked tensor of all experts. They are written in the folder layout DeepSpeed's
universal load reads (zero/<name>/<state>.pt), expert parameters marked `is_expert_param` with their expert
count, so that the loading engine cuts its own experts (dim 0, its expert-parallel rank) and its own ZeRO
partitions out of them, at any data- and expert-parallel size. The param groups of
zero/optimizer_state.pt follow the LOADING engine's groups (DeepSpeed pairs them by position; another EP
size has other `moe` groups), each with the saved hyper-parameters of the group its parameters came from.
"""
from __future__ import annotations

import re
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from train.models.native_io import CheckpointError

STATES = ("fp32", "exp_avg", "exp_avg_sq")
SHARDED = ("base_optimizer_state", "param_slice_mappings", "single_partition_of_fp32_groups")
MODEL_STATES = "mp_rank_00_model_states.pt"
_RANK = re.compile(r"zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")


def _partition_files(folder: Path) -> list[Path]:
    """Every rank's ZeRO optimizer file, in rank order."""
    files = {int(m.group(1)): path for path in folder.glob("*zero_pp_rank_*_optim_states.pt")
             if (m := _RANK.search(path.name))}
    if not files or sorted(files) != list(range(len(files))):
        raise CheckpointError(f"{folder}: ZeRO optimizer partitions of ranks {sorted(files)}, expected 0..N-1")
    return [files[rank] for rank in range(len(files))]


def _group_ep_size(group: dict[str, Any]) -> int:
    """E of a DeepSpeed `moe` param group (named ep_size_E by experts.py), 1 for the others."""
    if not group.get("moe"):
        return 1
    match = re.fullmatch(r"ep_size_(\d+)", str(group.get("name")))
    if match is None:
        raise CheckpointError(f"MoE param group named {group.get('name')!r}, expected ep_size_N")
    return int(match.group(1))


class _Fragments:
    """Every rank's fragments of every parameter, in the order that concatenates to the full tensor."""

    def __init__(self, files: list[Path]) -> None:
        self.pieces: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
        self.step: dict[str, Any] = {}
        self.hyper: dict[str, dict[str, Any]] = {}  # parameter name -> its saved group's hyper-parameters
        self.common: dict[str, Any] = {}  # rank 0's unpartitioned ZeRO state (loss scaler, clip, version)
        for rank, path in enumerate(files):
            optim = torch.load(path, map_location="cpu", weights_only=False, mmap=True)  # DeepSpeed's pickle
            self._add(rank, optim["optimizer_state_dict"])

    def _add(self, rank: int, optim: dict[str, Any]) -> None:
        if rank == 0:
            self.common = {key: value for key, value in optim.items() if key not in SHARDED}
        base = optim["base_optimizer_state"]
        for g, mapping in enumerate(optim["param_slice_mappings"]):
            group, state = base["param_groups"][g], base["state"][g]
            ep = _group_ep_size(group)
            order = (rank % ep, rank // ep)  # expert slice, then place in the expert-data-parallel group
            flat = {"fp32": optim["single_partition_of_fp32_groups"][g], "exp_avg": state["exp_avg"],
                    "exp_avg_sq": state["exp_avg_sq"]}
            for name, address in mapping.items():
                for key, tensor in flat.items():
                    self.pieces[name][key].append((order, tensor.narrow(0, address.start, address.numel)))
                self.step[name] = state["step"]
                self.hyper[name] = {k: v for k, v in group.items() if k not in ("params", "name", "moe")}

    def full(self, name: str, key: str, shape: torch.Size) -> torch.Tensor:
        flat = torch.cat([piece for _, piece in sorted(self.pieces[name][key], key=lambda item: item[0])])
        if flat.numel() != shape.numel():
            raise CheckpointError(f"parameter {name}: its ZeRO fragments hold {flat.numel()} elements of {key}, "
                                  f"expected {shape.numel()} (shape {tuple(shape)})")
        return flat.view(shape)


def convert(folder: Path, out: Path, target_groups: list[list[str]], expert_names: set[str],
            num_experts: int) -> None:
    """Write the universal form of the ZeRO-1/2 checkpoint in `folder` (DeepSpeed's tag directory) to `out`.
    `target_groups`: the parameter names of each param group of the loading engine; `expert_names`: the
    stacked expert parameters (dim 0 = `num_experts` experts)."""
    model_states = torch.load(folder / MODEL_STATES, map_location="cpu", weights_only=False, mmap=True)
    shapes = {name: shape for group in model_states["param_shapes"] for name, shape in group.items()}
    fragments = _Fragments(_partition_files(folder))
    wanted = {name for group in target_groups for name in group}
    if wanted != set(fragments.pieces):
        raise CheckpointError(f"{folder}: trained parameters differ from this run's, e.g. "
                              f"{sorted(wanted ^ set(fragments.pieces))[:3]}")
    for name in sorted(wanted):
        shape, meta = torch.Size(shapes[name]), {"cat_dim": 0}
        if name in expert_names:  # rank 0's shapes: its own experts only
            shape = torch.Size((num_experts, *shape[1:]))
            meta.update(is_expert_param=True, ep_num_experts=num_experts)
        directory = out / "zero" / name
        directory.mkdir(parents=True)
        for key in STATES:
            torch.save({"param": fragments.full(name, key, shape), **meta}, directory / f"{key}.pt")
        torch.save(fragments.step[name], directory / "step.pt")
    groups = [{**fragments.hyper[names[0]]} for names in target_groups]
    torch.save({**fragments.common, "param_groups": groups}, out / "zero" / "optimizer_state.pt")
    shutil.copy2(folder / MODEL_STATES, out / MODEL_STATES)  # client state, counters (weights: from zero/)
