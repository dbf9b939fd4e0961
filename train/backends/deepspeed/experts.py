"""Expert parallelism on DeepSpeed for the stacked-expert layout.

The experts of every MoE block are replaced by `ExpertParallelExperts` (train/parallel/expert.py: a dim-0
slice per rank, all-to-all dispatch). DeepSpeed must then treat those parameters as expert parameters:
reduce their gradients only over the expert-data-parallel group (ranks holding the same experts), broadcast
them only within it at start-up, and give them their own ZeRO partitioning. It does so for parameters
marked `allreduce=False` + `group_name`, in param groups flagged `moe`, and only when the model contains a
`deepspeed.moe.layer.MoE` module; a parameterless marker subclass provides that without DeepSpeed's own
MoE layer (whose per-expert nn.Modules do not fit the stacked tensors).

Checkpoints: DeepSpeed's MoE checkpoint format expects its own per-expert modules, so save/load run with the
engine's MoE flag lowered (`plain_checkpointing`): DeepSpeed then writes the module state once (rank 0, with
rank 0's slices) plus every rank's ZeRO optimizer partition (expert groups included), and each rank also
writes its own expert slices, which it restores after DeepSpeed's load. A load at another data- or
expert-parallel size goes through the universal form instead (moe_universal.py): all weights from the fp32
masters there, the expert files are then not read.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

from train.device import on_group_device
from train.models.native_io import CheckpointError
from train.models.qwen3vl import Qwen3VLModel
from train.models.qwen3vl.moe import SparseMoeBlock
from train.parallel.expert import ExpertParallelExperts


def _marker_class() -> type:
    from deepspeed.moe.layer import MoE

    class ExpertParallelMarker(MoE):
        """Tells the DeepSpeed engine the model has expert-parallel layers (no parameters, never called)."""

        def __init__(self, num_experts: int, ep_size: int) -> None:
            nn.Module.__init__(self)  # deliberately not MoE.__init__: no DeepSpeed expert modules
            self.num_experts, self.ep_size = num_experts, ep_size
            self.num_local_experts = num_experts // ep_size
            self.expert_group_name = f"ep_size_{ep_size}"
            self.enable_expert_tensor_parallelism = False

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            pass  # the groups were created by ExpertParallelism.install

        def forward(self, *args: Any) -> None:
            raise RuntimeError("ExpertParallelMarker is a marker, not a layer")

    return ExpertParallelMarker


def expert_param_names(module: nn.Module) -> set[str]:
    """Names (in `module`) of the stacked expert parameters of every MoE block, expert-parallel or not."""
    return {f"{name}.experts.{param}" for name, block in module.named_modules() if isinstance(block, SparseMoeBlock)
            for param, _ in block.experts.named_parameters()}


def saved_expert_parallel_size(directory: Path, num_experts: int) -> int:
    """The expert-parallel size a checkpoint was written with: num_experts over the experts in rank 0's
    expert file (mmap: its shapes only), 1 without expert files."""
    path = directory / "experts_rank00000.pt"
    if not path.exists():
        return 1
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    local = next(iter(state.values())).shape[0] if state else 0
    if not local or num_experts % local:
        raise CheckpointError(f"{path}: {local} experts per rank, the model has {num_experts}")
    return num_experts // local


class ExpertParallelism:
    def __init__(self, ep_size: int, group: dist.ProcessGroup, layers: dict[str, ExpertParallelExperts]) -> None:
        self.ep_size, self.group, self.layers = ep_size, group, layers
        self.group_name = f"ep_size_{ep_size}"

    @classmethod
    def install(cls, model: Qwen3VLModel, ep_size: int) -> "ExpertParallelism | None":
        """Slice the experts of every MoE block over groups of `ep_size` consecutive ranks."""
        if ep_size == 1 or not model.cfg.text.is_moe:
            return None
        from deepspeed.utils import groups

        name = f"ep_size_{ep_size}"
        groups._create_expert_and_data_parallel(ep_size)
        group = groups._get_expert_parallel_group(name)
        marker = _marker_class()
        layers = {}
        for module_name, block in model.named_modules():
            if not isinstance(block, SparseMoeBlock):
                continue
            block.experts = ExpertParallelExperts(block.experts, group)
            block.experts.deepspeed_marker = marker(model.cfg.text.num_experts, ep_size)
            for param in block.experts.parameters():
                param.allreduce = False
                param.group_name = name
            layers[f"{module_name}.experts"] = block.experts
        return cls(ep_size, group, layers)

    def unmark_if_frozen(self) -> None:
        """With every expert frozen (a stage that does not train the LLM) there is no `moe` param group, which
        DeepSpeed's ZeRO optimizers assert when the model has MoE layers: drop the markers. The slices stay
        expert-parallel (DeepSpeed broadcasts `allreduce=False` parameters within their expert-data-parallel
        group either way) and are saved in the expert files as before."""
        if any(p.requires_grad for layer in self.layers.values() for p in layer.parameters()):
            return
        for layer in self.layers.values():
            del layer.deepspeed_marker

    def optimizer_groups(self, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Move expert parameters into their own `moe` groups (same hyper-parameters), as DeepSpeed needs."""
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

        return split_params_into_different_moe_groups_for_optimizer(groups)

    # ------------------------------------------------------------------------------------ weights
    def is_expert_param(self, name: str) -> bool:
        return name.rsplit(".", 1)[0] in self.layers

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """The full stacked tensor from the EP group's slices (collective over the group)."""
        local = on_group_device(local, self.group)
        parts = [torch.empty_like(local) for _ in range(self.ep_size)]
        dist.all_gather(parts, local, group=self.group)
        return torch.cat(parts, dim=0)

    def local_index(self, name: str) -> tuple[slice, ...] | None:
        """The part of native tensor `name` this rank holds: its experts (dim 0) for an expert parameter."""
        layer = self.layers.get(name.rsplit(".", 1)[0])
        if layer is None:
            return None
        return (slice(layer.first_expert, layer.first_expert + layer.num_local),)

    # ------------------------------------------------------------------------------------ checkpoints
    @staticmethod
    @contextlib.contextmanager
    def plain_checkpointing(engine: Any) -> Iterator[None]:
        saved = engine.has_moe_layers
        engine.has_moe_layers = False
        try:
            yield
        finally:
            engine.has_moe_layers = saved

    def file(self, directory: Path) -> Path:
        return directory / f"experts_rank{dist.get_rank():05d}.pt"

    def _owners(self, optimizer: Any) -> Iterator[tuple[str, nn.Parameter, torch.Tensor, Any]]:
        """(name, expert parameter, the tensor its Adam state is keyed by, the torch optimizer holding that
        state) at ZeRO-0: in fp32 our AdamW steps the parameter itself, in bf16 DeepSpeed's
        FP16_UnfusedOptimizer steps an fp32 master copy of it (fp16_groups / fp32_groups, position by
        position)."""
        masters = {id(low): high for lows, highs in zip(getattr(optimizer, "fp16_groups", []),
                                                        getattr(optimizer, "fp32_groups", []))
                   for low, high in zip(lows, highs)}
        inner = optimizer.optimizer if masters else optimizer
        for layer, module in self.layers.items():
            for n, p in module.named_parameters():
                yield f"{layer}.{n}", p, masters.get(id(p), p), inner

    def state(self, zero0_optimizer: Any = None) -> dict[str, torch.Tensor]:
        """This rank's expert weights (live tensors: the backend snapshots them into host memory and writes
        them to `file(directory)`), and with `zero0_optimizer` their fp32 masters and Adam state too: at
        ZeRO-0 DeepSpeed saves rank 0's optimizer state only, whose expert entries are rank 0's experts'
        (ZeRO 1/2 save every rank's partitions, expert groups included)."""
        if zero0_optimizer is None:
            return {f"{layer}.{n}": p.detach() for layer, module in self.layers.items()
                    for n, p in module.named_parameters()}
        out = {}
        for name, p, owner, inner in self._owners(zero0_optimizer):
            out[name] = p.detach()
            if owner is not p:
                out[f"{name}/fp32"] = owner.detach()
            out.update({f"{name}/{key}": value for key, value in inner.state.get(owner, {}).items()
                        if torch.is_tensor(value)})
        return out

    @torch.no_grad()
    def load(self, directory: Path, zero0_optimizer: Any = None) -> None:
        """Restore this rank's expert weights, and with `zero0_optimizer` (see `state`) their fp32 masters
        and Adam state over the rank-0 copies DeepSpeed's load gave every rank. At ZeRO 1/2 the fp32 masters
        are DeepSpeed's own (each rank's partitions) and are not refreshed from the weights: in bf16 that
        would round every master to bf16."""
        state = torch.load(self.file(directory), map_location="cpu", weights_only=True)
        if zero0_optimizer is None:
            for layer, module in self.layers.items():
                for n, p in module.named_parameters():
                    p.copy_(state[f"{layer}.{n}"])
            return
        for name, p, owner, inner in self._owners(zero0_optimizer):
            p.copy_(state[name])
            if owner is not p and f"{name}/fp32" in state:
                owner.copy_(state[f"{name}/fp32"])
            if owner in inner.state:
                inner.state[owner].update({key[len(name) + 1:]: value for key, value in state.items()
                                           if key.startswith(f"{name}/") and key != f"{name}/fp32"})
