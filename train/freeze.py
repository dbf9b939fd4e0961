"""Which parameters a stage trains: the vision / merger / llm groups, decided by native parameter name.

Qwen3-VL's S0 trains only the mergers (the 2x2 patch merger and the DeepStack mergers) while the ViT and the
LLM stay frozen; later stages train everything. The grouping is by name so that it works on any module that
uses native names (the reference model, a DeepSpeed-wrapped model, a state dict) and so that a frozen
parameter never reaches the optimizer: backends call `apply_trainable` *before* building their optimizer.
"""
from __future__ import annotations

from collections import Counter
from typing import Callable, Iterable

import torch
from torch import nn

from train.config.model import ConfigError
from train.config.schema import TRAINABLE_GROUPS

MERGER_PREFIXES = ("visual.merger.", "visual.deepstack_merger_list.")
VISION_PREFIX = "visual."
LLM_PREFIXES = ("language_model.", "lm_head.")
# Wrappers (DDP, DeepSpeed, torch.compile) put these in front of native names; strip them before matching.
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")


def strip_wrappers(name: str) -> str:
    """The native name of a parameter seen through DDP / DeepSpeed / compile wrappers (no native name starts
    with one of their prefixes, so stripping them is unambiguous)."""
    while name.startswith(WRAPPER_PREFIXES):
        name = name.split(".", 1)[1]
    return name


def param_group(name: str) -> str:
    """"merger", "vision" or "llm" for a native parameter name; ConfigError for a name in no group."""
    native = strip_wrappers(name)
    if native.startswith(MERGER_PREFIXES):
        return "merger"
    if native.startswith(VISION_PREFIX):
        return "vision"
    if native.startswith(LLM_PREFIXES):
        return "llm"
    raise ConfigError(f"parameter {name!r} belongs to none of the trainable groups {list(TRAINABLE_GROUPS)}")


def apply_trainable(model: nn.Module, trainable: Iterable[str],
                    native_name: Callable[[str], str] = strip_wrappers) -> dict[str, int]:
    """Set requires_grad from the stage's trainable groups; return trainable/frozen element counts per group.

    Decided by name only (no weights are read): `native_name` maps a parameter's name in `model` to the
    native name whose group it belongs to (megatron passes its weight map). Refuses an unknown group name,
    and a selection that leaves no parameter trainable (a tied lm_head counts with the embedding it
    shares), both before anything is built on top of the model.
    """
    wanted = set(trainable)
    unknown = sorted(wanted - set(TRAINABLE_GROUPS))
    if unknown:
        raise ConfigError(f"stage.trainable has unknown group {unknown[0]!r} (groups: {list(TRAINABLE_GROUPS)})")
    counts: Counter[str] = Counter()
    for name, param in model.named_parameters():
        group = param_group(native_name(name))
        param.requires_grad_(group in wanted)
        # ZeRO-3 partitioned parameters are empty placeholders: count their full size.
        counts[f"{group}_{'trainable' if group in wanted else 'frozen'}"] += getattr(param, "ds_numel", param.numel())
    if not any(key.endswith("_trainable") for key in counts):
        raise ConfigError(f"stage.trainable={sorted(wanted)} selects no parameter of this model")
    return dict(counts)


def trainable_names(model: nn.Module) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]


def frozen_snapshot(state_dict: dict[str, torch.Tensor], trainable: Iterable[str]) -> dict[str, torch.Tensor]:
    """Copies of the tensors of the frozen groups (to check later that a stage left them bitwise unchanged)."""
    wanted = set(trainable)
    return {name: t.detach().clone() for name, t in state_dict.items()
            if t.is_floating_point() and param_group(name) not in wanted}
