"""Resumable training state of the megatron backend through dist_checkpointing.

One dist_checkpointing directory (`<checkpoint>/megatron/`) holds the sharded model (megatron's own
sharded_state_dict: TP/PP/EP shards with global layer and expert numbering, so the model part reshards
across layouts, e.g. saved TP=2 and loaded TP=1), the optimizer state and the step. The distributed
optimizer's state is saved "dp_reshardable" (fully parallel, no gather): it restores exactly within the
same layout, which is what resuming a stage needs; a stage handoff across layouts goes through the
layout-independent native weights instead (Backend.state_dict_for_export / load_model_weights).

Saving starts dist_checkpointing's writer (a spawn Manager that re-imports __main__): scripts that save
need an `if __name__ == "__main__"` guard; every save stops the writer's Manager again.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from train.backends.megatron.parallel_state import stop_checkpoint_writer_manager

SUBDIR = "megatron"
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


def _unwrapped(ddp: Any) -> Any:
    return ddp.module


def _optimizer_parts(optimizer: Any) -> list[Any]:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _state(ddp: Any, optimizer: Any, step: int, is_loading: bool) -> dict[str, Any]:
    model_state = _unwrapped(ddp).sharded_state_dict()
    optim_state = optimizer.sharded_state_dict(model_state, is_loading=is_loading, metadata=OPTIMIZER_METADATA)
    return {"model": model_state, "optimizer": optim_state, "step": step, "adam_steps": _adam_steps(optimizer)}


def _adam_steps(optimizer: Any) -> list[float]:
    """Adam's update count per optimizer part (torch AdamW keeps it per parameter; all are equal)."""
    steps = []
    for part in _optimizer_parts(optimizer):
        values = {float(s["step"]) for s in part.optimizer.state.values() if "step" in s}
        steps.append(values.pop() if len(values) == 1 else 0.0)
    return steps


def _restore_adam_steps(optimizer: Any, steps: list[float]) -> None:
    """megatron 0.16 restores torch AdamW's step as ONE tensor shared by every parameter, which the
    foreach update then advances once per parameter group (and after the dummy initialisation): the bias
    correction of the resumed run would be off. Give each parameter its own, saved, count."""
    for part, step in zip(_optimizer_parts(optimizer), steps):
        for state in part.optimizer.state.values():
            if "step" in state:
                state["step"] = torch.tensor(step, dtype=torch.float32)


def save_training_state(directory: Path, ddp: Any, optimizer: Any, step: int) -> None:
    """Every rank calls it; `directory` exists (the caller's temp checkpoint dir)."""
    from megatron.core import dist_checkpointing

    target = directory / SUBDIR
    target.mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(_state(ddp, optimizer, step, is_loading=False), str(target))
    # The writer's Manager process would outlive the trainer (which ends ranks with os._exit) and hold the
    # job's stdout/stderr open: whoever waits for them hangs. Stop it now; the next save starts a new one.
    stop_checkpoint_writer_manager()


def load_training_state(directory: Path, ddp: Any, optimizer: Any) -> int:
    """Restore what save_training_state wrote (same layout); returns the saved step."""
    from megatron.core import dist_checkpointing

    target = directory / SUBDIR
    if not target.is_dir():
        raise FileNotFoundError(f"no megatron checkpoint under {directory} (expected {target})")
    for part in _optimizer_parts(optimizer):
        # A fresh distributed optimizer has no Adam state yet; dist_checkpointing loads into existing tensors.
        init = getattr(part, "_init_optimizer_states_with_dummy_values", None)
        if init is not None:
            init()
    with torch.no_grad():
        state = dist_checkpointing.load(_state(ddp, optimizer, 0, is_loading=True), str(target))
        _unwrapped(ddp).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    _restore_adam_steps(optimizer, state["adam_steps"])
    return int(state["step"])
