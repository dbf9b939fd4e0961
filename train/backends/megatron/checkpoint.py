"""Resumable training state of the megatron backend through dist_checkpointing.

One dist_checkpointing directory (`<checkpoint>/megatron/`) holds the sharded model (megatron's own
sharded_state_dict: TP/PP/EP shards with global layer and expert numbering, so the model part reshards
across layouts, e.g. saved TP=2 and loaded TP=1), the optimizer state and the step. The distributed
optimizer's state is saved "dp_reshardable" (fully parallel, no gather): it restores exactly within the
same layout, which is what resuming a stage needs, and does not survive a TP change. So the save records
its layout (parallel sizes, distributed optimizer, precision) and a full load in another layout is refused
with one line; across layouts only the model loads (load_model_state: weights resharded by
dist_checkpointing, the optimizer starts fresh), as does the layout-independent native handoff
(Backend.export_tensors / load_model_weights).

Saving starts dist_checkpointing's writer (a spawn Manager that re-imports __main__): scripts that save
need an `if __name__ == "__main__"` guard; every save stops the writer's Manager again.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from train.backends.megatron.parallel_state import stop_checkpoint_writer_manager
from train.models.native_io import CheckpointError

SUBDIR = "megatron"
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


def _unwrapped(ddp: Any) -> Any:
    return ddp.module


def _optimizer_parts(optimizer: Any) -> list[Any]:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _state(ddp: Any, optimizer: Any, step: int, is_loading: bool, layout: dict[str, Any]) -> dict[str, Any]:
    model_state = _unwrapped(ddp).sharded_state_dict()
    optim_state = optimizer.sharded_state_dict(model_state, is_loading=is_loading, metadata=OPTIMIZER_METADATA)
    return {"model": model_state, "optimizer": optim_state, "step": step, "adam_steps": _adam_steps(optimizer),
            "layout": layout}


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


def save_training_state(directory: Path, ddp: Any, optimizer: Any, step: int, layout: dict[str, Any]) -> None:
    """Every rank calls it; `directory` exists (the caller's temp checkpoint dir). `layout` describes what
    the optimizer state's sharding depends on (the backend's parallel sizes, optimizer kind, precision)."""
    from megatron.core import dist_checkpointing

    target = directory / SUBDIR
    target.mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(_state(ddp, optimizer, step, is_loading=False, layout=layout), str(target))
    # The writer's Manager process would outlive the trainer (which ends ranks with os._exit) and hold the
    # job's stdout/stderr open: whoever waits for them hangs. Stop it now; the next save starts a new one.
    stop_checkpoint_writer_manager()


def _checkpoint_dir(directory: Path) -> Path:
    target = directory / SUBDIR
    if not (target / "metadata.json").is_file():
        raise CheckpointError(f"no megatron checkpoint under {directory} (expected {target}/metadata.json)")
    return target


def saved_layout(directory: Path) -> dict[str, Any]:
    """The layout a checkpoint was written in (read from its common state, no tensors loaded)."""
    from megatron.core import dist_checkpointing

    layout = dist_checkpointing.load_common_state_dict(str(_checkpoint_dir(directory))).get("layout")
    return dict(layout) if layout is not None else {}


def load_training_state(directory: Path, ddp: Any, optimizer: Any, layout: dict[str, Any]) -> int:
    """Restore what save_training_state wrote, model and optimizer; returns the saved step. Only in the
    layout it was saved in: the dp_reshardable optimizer shards follow the saving run's TP/PP/EP split and
    do not survive a change of it, so any difference is refused up front (load_model_state loads the
    weights alone). Checkpoints written before layouts were recorded (no "layout") are loaded unchecked."""
    from megatron.core import dist_checkpointing

    target = _checkpoint_dir(directory)
    saved = saved_layout(directory)
    if saved and saved != layout:
        changed = ", ".join(f"{k} {saved.get(k)}->{layout.get(k)}" for k in sorted({*saved, *layout})
                            if saved.get(k) != layout.get(k))
        raise CheckpointError(f"{target}: optimizer state was saved in another layout ({changed}); it only "
                              f"resumes in the same layout: load the weights alone (a new stage) instead")
    for part in _optimizer_parts(optimizer):
        # A fresh distributed optimizer has no Adam state yet; dist_checkpointing loads into existing tensors.
        init = getattr(part, "_init_optimizer_states_with_dummy_values", None)
        if init is not None:
            init()
    with torch.no_grad():
        state = dist_checkpointing.load(_state(ddp, optimizer, 0, is_loading=True, layout=layout), str(target))
        _unwrapped(ddp).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    _restore_adam_steps(optimizer, state["adam_steps"])
    return int(state["step"])


def load_model_state(directory: Path, ddp: Any, optimizer: Any) -> int:
    """Load only the model weights of a checkpoint, in any layout (dist_checkpointing reshards the TP/PP/EP
    shards by their global offsets); the optimizer keeps its fresh state, only its master copies of the
    weights are refreshed. Returns the step the checkpoint was saved at."""
    from megatron.core import dist_checkpointing

    target = _checkpoint_dir(directory)
    model = _unwrapped(ddp)
    with torch.no_grad():
        state = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(target))
        model.load_state_dict(state["model"])
    # Mixed-precision / distributed optimizers step fp32 master copies: without this the next step would
    # overwrite the loaded weights with the fresh model's.
    optimizer.reload_model_params()
    return int(state["step"])
